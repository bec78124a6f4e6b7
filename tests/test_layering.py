"""The package's import graph points one way: each layer imports only layers below it (or itself)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "meditron_jax"

# Lower rank = lower layer. Equal ranks in different packages may not import each other.
RANKS = {
    "config": 0,
    "fs": 0,  # paths that may be gs:// URLs
    "hardware": 0,
    "host_memory": 0,
    "lean_imports": 0,  # TensorFlow and tensorflow_text without Keras, installed by __init__
    "resources": 0,
    "kernels": 1,
    "compilation_cache": 1,  # JAX's persistent cache, set by the commands that compile
    "model": 2,
    "parallel": 3,
    "convert": 3,
    "data": 4,
    "train": 5,
    "infer": 5,
    "api": 6,  # a loaded model (load(), LanguageModel): what evaluation builds on
    "eval": 7,
    "cli": 8,
    "__init__": 9,
}


def _layer(module_path: pathlib.Path) -> str:
    rel = module_path.relative_to(PACKAGE).parts
    return rel[0].removesuffix(".py")


def _imported_layers(path: pathlib.Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "meditron_jax" and len(parts) > 1:
                yield parts[1], node.lineno


def test_every_module_has_a_layer():
    layers = {_layer(p) for p in PACKAGE.rglob("*.py")}
    assert layers <= set(RANKS), f"give these a rank in RANKS: {sorted(layers - set(RANKS))}"


def test_no_upward_imports():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _layer(path)
        for target, line in _imported_layers(path):
            if target not in RANKS:  # e.g. `from meditron_jax import x` where x is an attribute, not a layer
                continue
            if target != src and RANKS[target] >= RANKS[src]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {src} imports {target}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)
