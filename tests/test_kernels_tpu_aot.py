"""The Mosaic flash kernel compiles for a real TPU (v5e, 2x2 topology) through libtpu, with no TPU here:
forward and backward on their own, and inside a Llama training step (loss, grad, AdamW) on a sharded mesh.

``jax.jit(...).lower(...).compile()`` on topology devices runs XLA:TPU and the Mosaic compiler, so tile
shapes, layouts and VMEM budgets are all checked; the tests then look for the three kernels' custom calls.
"""

from __future__ import annotations

import os

# libtpu takes a lock file per process; compile-only use may share the machine with other jobs.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from meditron_jax import kernels  # noqa: E402
from meditron_jax.kernels import dispatch  # noqa: E402

pytestmark = pytest.mark.slow  # multi-second runs: excluded from the quick `-m "not slow"` loop

KERNELS = ("meditron_flash_fwd", "meditron_flash_dkv", "meditron_flash_dq")
RULES = (("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))


@pytest.fixture(scope="module")
def mesh():
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    return Mesh(np.asarray(devices).reshape(2, 2), ("data", "tensor"))


def _custom_calls(hlo: str) -> dict[str, int]:
    lines = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    return {name: sum(name in line for line in lines) for name in KERNELS}


def test_kernel_forward_and_backward_compile_for_tpu(mesh):
    batch, length, heads, kv_heads, head_dim = 4, 1000, 8, 2, 128  # GQA 4, length not a tile multiple
    data = NamedSharding(mesh, P("data"))
    q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16, sharding=data)
    kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16, sharding=data)
    seg = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=data)

    def loss(q, k, v, seg):
        assert dispatch.current_target().platform == "tpu"  # the mesh, not the CPU host, decides
        return kernels.attention(q, k, v, segment_ids=seg).astype(jnp.float32).sum()  # impl="auto"

    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
    hlo = compiled.as_text()
    assert _custom_calls(hlo) == dict.fromkeys(KERNELS, 1), _custom_calls(hlo)
    # Batch over "data", heads over "tensor": each device runs its shard, nothing is gathered.
    assert "all-gather" not in hlo


def test_model_training_step_compiles_with_mosaic_attention(mesh):
    from meditron_jax.config import get_config
    from meditron_jax.model import Llama, abstract_params

    config = get_config("tiny", attention_impl="pallas_tpu")
    model = Llama(config)
    optimizer = optax.adamw(1e-3)
    batch, length = 8, 256
    params = nn.meta.unbox(abstract_params(config))
    opt_state = jax.eval_shape(optimizer.init, params)

    def train_step(params, opt_state, tokens, positions, segment_ids):
        def loss_fn(params):
            logits = model.apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)
            targets = jnp.roll(tokens, -1, axis=1)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def abstract(tree, sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

    ints = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        lowered = jax.jit(train_step).lower(
            abstract(params, replicated), abstract(opt_state, replicated), ints, ints, ints
        )
        compiled = lowered.compile()
    calls = _custom_calls(compiled.as_text())
    # Layers are scanned, so each kernel appears once in the loop body (forward) or its transpose.
    assert all(calls[name] >= 1 for name in KERNELS), calls
