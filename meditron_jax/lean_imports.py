"""Import TensorFlow and tensorflow_text without Keras, which the data pipeline never uses.

TensorFlow's ``__init__`` imports ``keras.src.optimizers`` eagerly, and tensorflow_text defines Keras layers
when it loads; between them they import Keras, scikit-learn, pandas and matplotlib: 2.8 of the 8.3 s a
command spends importing (docs/performance.md, "Start-up"). ``install()`` (called by ``meditron_jax``'s
``__init__``) wraps the first import of each package: TensorFlow's eager import finds a ``None`` entry in
``sys.modules`` and skips it (TensorFlow catches the ImportError), and ``tensorflow_text.keras`` becomes a
module that imports the real one on first use. Keras itself, imported before or after, is untouched.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

SKIPPED_WHILE_LOADING = {"tensorflow": "keras.src.optimizers", "tensorflow_text": "tensorflow_text.python.keras"}


class _DeferredModule(types.ModuleType):
    """Stands in for a module; the first attribute read imports the real one and reads it there."""

    def __getattr__(self, attr: str):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


class _LoaderWithout(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, skipped: str):
        self._loader, self._skipped = loader, skipped

    def __getattr__(self, attr: str):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        skip = self._skipped not in sys.modules and "keras" not in sys.modules  # else nothing to save
        # The package's own submodule gets a stand-in (it is part of its API); another package's gets None.
        stand_in = _DeferredModule(self._skipped) if self._skipped.startswith(module.__name__ + ".") else None
        if skip:
            sys.modules[self._skipped] = stand_in  # type: ignore[assignment]  # None: "not importable"
        try:
            self._loader.exec_module(module)
        finally:
            if skip and sys.modules.get(self._skipped) is stand_in:
                del sys.modules[self._skipped]  # a later import of it loads the real module
            module.__loader__ = module.__spec__.loader = self._loader  # no trace of the wrapper left


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, pending: dict[str, str]):
        self._pending = pending  # package -> what its first import skips

    def find_spec(self, fullname, path, target=None):
        skipped = self._pending.pop(fullname, None)
        if skipped is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None  # not a plain installed package: import it the usual way
        spec.loader = _LoaderWithout(spec.loader, skipped)
        return spec


def install() -> None:
    """Wrap the first import of TensorFlow and of tensorflow_text, unless it has already happened."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    pending = {name: skipped for name, skipped in SKIPPED_WHILE_LOADING.items() if name not in sys.modules}
    if pending:
        sys.meta_path.insert(0, _Finder(pending))
