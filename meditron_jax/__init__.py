"""meditron_jax: MEDITRON (medical Llama-2) in JAX/Flax."""

import importlib.util as _importlib_util
import sys as _sys

__version__ = "0.1.0"

# Importing triton (torch's GPU compiler, on Colab's GPU runtime and most CUDA machines) after TensorFlow,
# which the data pipeline uses, segfaults (triton 3.7.1, TF 2.21, Python 3.11 and 3.12); the other order works.
if "tensorflow" not in _sys.modules and _importlib_util.find_spec("triton") is not None:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001  a broken triton is torch's problem, not a reason to fail importing us
        pass

# TensorFlow and tensorflow_text load without Keras (2.8 s of a command's start; meditron_jax/lean_imports.py).
from meditron_jax import lean_imports as _lean_imports  # noqa: E402

_lean_imports.install()


def load(path, **kwargs):
    """Load a Hugging Face or meditron_jax model directory; see :func:`meditron_jax.api.load`."""
    from meditron_jax.api import load as _load

    return _load(path, **kwargs)
