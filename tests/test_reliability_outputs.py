"""Issue 12, item 1: the converter never destroys a user's files.

Each test gives the input that used to lose data (``--output .``, ``--input X --output X``, a folder of
unrelated files, a file as output, a killed conversion) and checks the error line and that every file the
user had is still there, byte for byte (snapshot of names and sha256 before and after).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from meditron_jax.convert.files import MARKER

from .hf_utils import load_script, random_hf_llama
from .reliability_utils import snapshot, user_folder


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, shared_data):
    src, _ = random_hf_llama(tmp_path_factory.mktemp("hf") / "model")
    shutil.copy(shared_data / "llama2_tokenizer" / "tokenizer.model", os.path.join(src, "tokenizer.model"))
    return src


@pytest.fixture
def hf(hf_model, tmp_path):
    return shutil.copytree(hf_model, tmp_path / "hf")


def convert(capsys, *argv):
    rc = load_script("convert_checkpoint").console(list(argv))
    return rc, capsys.readouterr().err


def test_output_dot_is_refused_and_the_current_folder_kept(hf, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    before = user_folder(work)
    monkeypatch.chdir(work)
    for extra in ([], ["--overwrite"]):
        rc, err = convert(capsys, "--to", "orbax", "--input", str(hf), "--output", ".", *extra)
        assert rc == 1
        assert err.startswith("error: output . is the current folder or holds it") and "Traceback" not in err
    assert snapshot(work) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("to", ["orbax", "hf"])
def test_input_as_output_is_refused(hf, tmp_path, capsys, to):
    src = hf
    if to == "hf":  # an orbax model exported onto itself
        assert convert(capsys, "--to", "orbax", "--input", str(hf), "--output", str(tmp_path / "ox"))[0] == 0
        src = tmp_path / "ox"
    before = snapshot(src)
    for extra in ([], ["--overwrite"]):
        rc, err = convert(capsys, "--to", to, "--input", str(src), "--output", str(src), *extra)
        assert rc == 1 and f"error: output {src} is the input {src}" in err
    assert snapshot(src) == before


def test_output_inside_input_or_holding_it_is_refused(hf, tmp_path, capsys):
    before = snapshot(tmp_path)
    rc, err = convert(capsys, "--to", "orbax", "--input", str(hf), "--output", str(hf / "converted"))
    assert rc == 1 and "lies inside the input" in err
    rc, err = convert(capsys, "--to", "orbax", "--input", str(hf), "--output", str(tmp_path), "--overwrite")
    assert rc == 1 and "holds the input" in err
    assert snapshot(tmp_path) == before


def test_a_folder_of_unrelated_files_is_refused_unless_overwrite(hf, tmp_path, capsys):
    out = tmp_path / "mine"
    before = user_folder(out)
    rc, err = convert(capsys, "--to", "orbax", "--input", str(hf), "--output", str(out))
    assert rc == 1
    assert f"output {out} is not empty (2 entries: data, notes.txt)" in err and "pass --overwrite" in err
    assert snapshot(out) == before
    # Asked for explicitly: replaced by the model.
    rc, _ = convert(capsys, "--to", "orbax", "--input", str(hf), "--output", str(out), "--overwrite")
    assert rc == 0 and sorted(os.listdir(out)) == [MARKER, "meditron_config.json", "params", "tokenizer.model"]


def test_a_model_saved_by_transformers_is_not_taken_for_an_earlier_export(hf, tmp_path, capsys):
    """save_pretrained writes the same file names as our HF export; its config.json records its version."""
    theirs, _ = random_hf_llama(tmp_path / "finetuned")
    before = snapshot(theirs)
    rc, err = convert(capsys, "--to", "hf", "--input", str(hf), "--output", theirs)
    assert rc == 1 and "is not a previous Hugging Face model folder; pass --overwrite" in err
    assert snapshot(theirs) == before
    # Our own export without its marker (written before the marker existed) is recognised.
    ours = tmp_path / "ours"
    assert convert(capsys, "--to", "hf", "--input", str(hf), "--output", str(ours))[0] == 0
    (ours / MARKER).unlink()
    (ours / "README.md").unlink()  # versions before the marker wrote no model card either
    assert convert(capsys, "--to", "hf", "--input", str(hf), "--output", str(ours))[0] == 0


def test_an_output_that_is_a_file_fails_before_the_conversion(hf, tmp_path, capsys, monkeypatch):
    import meditron_jax.convert.model_dir as model_dir

    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")

    def must_not_load(*a, **k):
        raise AssertionError("the conversion ran although the output was invalid")

    monkeypatch.setattr(model_dir, "load_model_dir", must_not_load)
    rc, err = convert(capsys, "--to", "hf", "--input", str(hf), "--output", str(target))
    assert rc == 1 and f"error: output {target} is a file, not a folder" in err
    assert target.read_bytes() == b"precious"


def test_a_previous_output_is_replaced_but_not_one_of_another_kind(hf, tmp_path, capsys):
    out = tmp_path / "ox"
    assert convert(capsys, "--to", "orbax", "--input", str(hf), "--output", str(out))[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "orbax_model" and marker["inputs"] == [str(hf)]
    assert convert(capsys, "--to", "orbax", "--input", str(hf), "--output", str(out))[0] == 0  # rerun
    (out / MARKER).unlink()  # an output of a version before the marker: recognised by its names
    assert convert(capsys, "--to", "orbax", "--input", str(hf), "--output", str(out))[0] == 0
    before = snapshot(out)
    rc, err = convert(capsys, "--to", "hf", "--input", str(out), "--output", str(out.parent / "hf2"))
    assert rc == 0
    rc, err = convert(capsys, "--to", "hf", "--input", str(tmp_path / "hf2"), "--output", str(out))
    assert rc == 1 and "holds a meditron_jax 'orbax_model' output, not a Hugging Face model folder" in err
    assert snapshot(out) == before


_KILLED_WRITER = """
import os, signal, sys
from meditron_jax.convert.files import atomic_directory
from meditron_jax.convert.orbax import ORBAX_OUTPUT
with atomic_directory(sys.argv[1], ORBAX_OUTPUT) as tmp:
    open(os.path.join(tmp, "half.bin"), "wb").write(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_conversion_leaves_a_temporary_that_the_next_run_removes(hf, tmp_path, capsys):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    (killed,) = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-model-")]
    assert (killed / "half.bin").exists() and not out.exists()
    # A leftover of an older version (no owner record), an hour old; and the folder of a writer still running.
    legacy = tmp_path / ".tmp-model-legacy"
    legacy.mkdir()
    os.utime(legacy, (time.time() - 3600,) * 2)
    live = tmp_path / ".tmp-model-live"
    live.mkdir()
    (live / ".meditron_jax_writer.json").write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "target": str(out)})
    )
    rc, err = convert(capsys, "--to", "orbax", "--input", str(hf), "--output", str(out))
    assert rc == 0
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == [".tmp-model-live"]
    assert f"removed {killed}, left by an interrupted write (process" in err
    assert f"removed {legacy}, left by an interrupted write (no owner record" in err


def test_a_target_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    from meditron_jax.convert.files import clean_stale_temporaries

    out = tmp_path / "model"
    aside = tmp_path / ".old-model-abc"
    aside.mkdir()
    (aside / "weights").write_text("the previous model")
    (aside / ".meditron_jax_writer.json").write_text(
        json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "target": str(out)})  # no such process
    )
    assert clean_stale_temporaries(str(tmp_path)) == []
    assert (out / "weights").read_text() == "the previous model" and not aside.exists()
