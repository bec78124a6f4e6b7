"""The quickstart notebook: stored without outputs, in step with its generator, and it runs end to end."""

import importlib.util
import json
import pathlib
import time

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "meditron_jax_quickstart.ipynb"


def _builder():
    spec = importlib.util.spec_from_file_location("build_quickstart", ROOT / "notebooks" / "build_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stored_without_outputs():
    raw = json.loads(NOTEBOOK.read_text())
    code = [c for c in raw["cells"] if c["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell["outputs"] == [], f"code cell {i} has stored outputs: strip them (rebuild the notebook)"
        assert cell["execution_count"] is None, f"code cell {i} has an execution count"
    nbformat.validate(nbformat.reads(NOTEBOOK.read_text(), as_version=4))


def test_matches_its_generator():
    assert NOTEBOOK.read_text() == _builder().render(), "run: python notebooks/build_quickstart.py"


def test_code_cells_are_valid_python():
    import ast

    for i, cell in enumerate(c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"):
        ast.parse(cell.source, f"code cell {i}")


def test_install_cell_only_installs_when_the_package_is_missing():
    first = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code")
    guard = 'if importlib.util.find_spec("meditron_jax") is None:'
    assert guard in first.source
    before_guard = first.source.split(guard)[0]
    assert "pip" not in before_guard, "pip must only run inside the not-installed branch"


def _text(outputs) -> str:
    parts = []
    for out in outputs:
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def _execute(nb, tmp_path):
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()


@pytest.mark.slow
def test_loads_and_shards_without_the_shared_data(tmp_path, monkeypatch):
    """Colab has no shared data: the notebook falls back to the packaged sample and a random tiny Llama-2."""
    monkeypatch.setenv("MEDITRON_SHARED_DATA", str(tmp_path / "no_shared_data"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = nb.cells[: next(i for i, c in enumerate(nb.cells) if "## 3." in c.source)]  # sections 1 and 2
    _execute(nb, tmp_path)
    text = "\n".join(_text(c.outputs) for c in nb.cells if c.cell_type == "code")
    assert "embedded_data" in text and "vocabulary 32000" in text and "fsdp=8" in text


@pytest.mark.slow
def test_runs_end_to_end(tmp_path, shared_data, monkeypatch):
    """Executes every cell in a fresh kernel (8 CPU devices, the shared data: stories260K and MedQA)."""
    monkeypatch.setenv("MEDITRON_SHARED_DATA", str(shared_data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's work folder lands under pytest's
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    _execute(nb, tmp_path)
    seconds = time.perf_counter() - start
    cells = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(cells):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"cell {i}: {errors[0].ename}: {errors[0].evalue}"
    text = "\n".join(_text(c.outputs) for c in cells)
    print(text[-3000:], f"\nexecuted in {seconds:.0f} s")
    assert "fsdp=8" in text  # the mesh spans the 8 CPU devices
    assert "greedy: 'Once upon a time" in text  # stories260K loaded
    assert "medqa_4opt" in text and "pubmedqa" in text
    assert "cot " in text and "top_token" in text
    assert "max |logit difference|" in text and "notebook done" in text
    # The loss plot is a PNG that the training loop replaced in place (one display, updated each step).
    train_cell = next(c for c in cells if "TRAIN_STEPS, BATCH, SEQ_LEN" in c.source)
    pngs = [o for o in train_cell.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1, f"expected one live plot output, got {len(pngs)}"
