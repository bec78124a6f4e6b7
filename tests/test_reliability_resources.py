"""Issue 12, item 6: resource traps. A safetensors header is checked (byte ranges, then the model's shapes)
before any tensor data is read; a conversion without tokenizer.model is refused unless asked for, and
generating from such a model names the flag that supplies the tokenizer."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from meditron_jax.convert.files import MARKER
from meditron_jax.convert.hf import ConversionError, TensorReader, load_hf_params, read_hf_config

from .hf_utils import load_script, random_hf_llama
from .reliability_utils import snapshot

FAKE = "model.embed_tokens.weight"


def _write_raw(path, header: dict, data: bytes, data_len: int | None = None):
    """A safetensors file with a hand-made header; ``data_len`` > len(data) leaves a sparse hole."""
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
        if data_len is not None:
            f.truncate(8 + len(h) + data_len)


def _fake_2gib_model(folder):
    """The tiny model with its embedding declared as a consistent 2 GiB tensor (sparse file: no disk used)."""
    src, _ = random_hf_llama(folder)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    rows = (2 << 30) // (64 * 4)
    header, blobs, off = {}, [], 2 << 30
    header[FAKE] = {"dtype": "F32", "shape": [rows, 64], "data_offsets": [0, off]}
    for k, v in tensors.items():
        if k != FAKE:
            header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + v.nbytes]}
            blobs.append(v.tobytes())
            off += v.nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(src, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.seek(8 + len(h) + (2 << 30))
        f.write(b"".join(blobs))
    return src


_MEASURE = """
import resource, sys
from meditron_jax.convert.hf import load_hf_params, read_hf_config
try:
    load_hf_params(sys.argv[1], read_hf_config(sys.argv[1]))
except Exception as e:
    print(type(e).__name__, e)
# VmHWM: this process's own peak. (ru_maxrss keeps the peak of the forked pytest parent across exec.)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
print(int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_a_2gib_fake_tensor_is_refused_from_the_header(tmp_path):
    """Before: the 2 GiB tensor was read, then its shape checked (4.3 GiB peak RSS for a 1 MB model).
    Now the header's shape is compared with the model's first; the peak is the interpreter's own (~0.2 GiB)."""
    src = _fake_2gib_model(tmp_path / "m")
    assert os.path.getsize(os.path.join(src, "model.safetensors")) > 2 << 30
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, src], capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stdout.strip().splitlines()
    seen = f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
    assert (
        f"ConversionError {src}: tensor '{FAKE}' has shape (8388608, 64), expected (200, 64) for the config in "
        "config.json"
    ) in lines, seen
    peak = int(lines[-1])
    print(f"peak RSS {peak / 2**20:.0f} MiB")
    assert peak < 1.25 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB: the tensor data was read"


@pytest.mark.parametrize(
    "entry, data_len, message",
    [
        ({"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}, 32, r"data_offsets \[0, 64\] lie outside"),
        ({"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}, 64, r"needs 64 bytes, the header gives 60"),
        ({"dtype": "F32", "shape": [4, -4], "data_offsets": [0, 64]}, 64, "is not a list of non-negative integers"),
        ({"dtype": "Q4", "shape": [4, 4], "data_offsets": [0, 64]}, 64, "unknown dtype 'Q4'"),
    ],
)
def test_inconsistent_headers_are_named(tmp_path, entry, data_len, message):
    (tmp_path / "config.json").write_text("{}")
    _write_raw(tmp_path / "model.safetensors", {"w": entry}, b"", data_len)
    with pytest.raises(ConversionError, match=message):
        TensorReader(str(tmp_path))


def test_overlapping_tensors_and_a_huge_header_length(tmp_path):
    a = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    b = {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}
    _write_raw(tmp_path / "model.safetensors", {"a": a, "b": b}, bytes(24))
    with pytest.raises(ConversionError, match="tensors 'a' and 'b' overlap"):
        TensorReader(str(tmp_path))
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ConversionError, match="header length 1099511627776 does not fit a 10-byte file"):
        TensorReader(str(tmp_path))


def test_an_index_pointing_outside_the_folder_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../elsewhere/model.safetensors"}})
    )
    with pytest.raises(ConversionError, match="points to '../elsewhere/model.safetensors', not a file of this folder"):
        TensorReader(str(tmp_path))


def test_an_integer_tensor_is_refused(tmp_path):
    src, _ = random_hf_llama(tmp_path / "m")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, os.path.join(src, "model.safetensors"))
    with pytest.raises(ConversionError, match="'model.norm.weight' has dtype I32, expected a floating-point type"):
        load_hf_params(src, read_hf_config(src))


@pytest.fixture
def stories_without_tokenizer(shared_data, tmp_path):
    """The real tiny model's weights and config, without its tokenizer.model."""
    src = tmp_path / "stories"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        os.symlink(shared_data / "stories260K_hf" / f, src / f)
    return src


def test_a_conversion_without_tokenizer_is_refused_unless_asked_for(stories_without_tokenizer, tmp_path, capsys):
    convert = load_script("convert_checkpoint").console
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    assert convert(["--to", "orbax", "--input", str(stories_without_tokenizer), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: {stories_without_tokenizer}/tokenizer.model does not exist" in err
    assert "Pass --tokenizer_dir DIR, or --no_tokenizer" in err
    assert snapshot(tmp_path) == before  # nothing written
    args = ["--to", "orbax", "--input", str(stories_without_tokenizer), "--output", str(out), "--no_tokenizer"]
    assert convert(args) == 0
    assert "warning: " in capsys.readouterr().err
    assert json.loads((out / MARKER).read_text())["tokenizer"] is None
    assert not (out / "tokenizer.model").exists()


@pytest.mark.slow
def test_generating_from_a_model_without_tokenizer_names_the_flag(
    stories_without_tokenizer, shared_data, tmp_path, capsys
):
    generate = load_script("generate").console
    common = ["--prompt", "Once upon a time", "--max_new_tokens", "6"]
    assert generate(["--model_dir", str(stories_without_tokenizer), *common]) == 1
    err = capsys.readouterr().err
    assert f"error: {stories_without_tokenizer} has no tokenizer.model; pass --tokenizer_path DIR" in err
    tok = str(shared_data / "stories260K_hf")
    assert generate(["--model_dir", str(stories_without_tokenizer), "--tokenizer_path", tok, *common]) == 0
    with_flag = capsys.readouterr().out
    assert generate(["--model_dir", tok, *common]) == 0
    assert capsys.readouterr().out == with_flag  # the same text as the model with its own tokenizer
