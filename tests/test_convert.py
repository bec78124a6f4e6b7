"""HF ⇄ ours ⇄ orbax conversion: exact round trips, sharded files, and errors that name what is wrong."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from meditron_jax.convert.hf import ConversionError, load_hf_params, read_hf_config, save_hf
from meditron_jax.convert.orbax import load_orbax, save_orbax

from .hf_utils import hf_logits, load_script, random_hf_llama


def _all_tensors(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@pytest.mark.parametrize("scan,tied", [(True, False), (False, True)])
def test_hf_round_trip_is_exact_and_loads_in_transformers(tmp_path, scan, tied):
    import transformers

    # Source sharded (index file) so the sharded reader is exercised; vocab 200 is padded to 256 inside.
    src, hf = random_hf_llama(tmp_path / "src", tied=tied, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    cfg = read_hf_config(src, scan_layers=scan)
    assert cfg.padded_vocab_size == 256 and cfg.vocab_size == 200
    params = load_hf_params(src, cfg)
    out = str(tmp_path / "out")
    save_hf(params, cfg, out, max_shard_bytes=30_000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    a, b = _all_tensors(src), _all_tensors(out)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = np.random.RandomState(0).randint(0, 200, (1, 32))
    assert np.array_equal(hf_logits(reloaded, tokens), hf_logits(hf, tokens))


def test_orbax_round_trip_and_cli(tmp_path, shared_data):
    convert_main = load_script("convert_checkpoint").main
    src, _ = random_hf_llama(tmp_path / "src")
    shutil.copy(shared_data / "llama2_tokenizer" / "tokenizer.model", os.path.join(src, "tokenizer.model"))
    assert convert_main(["--to", "orbax", "--input", src, "--output", str(tmp_path / "orbax")]) == 0
    assert os.path.isfile(tmp_path / "orbax" / "tokenizer.model")
    params, cfg = load_orbax(str(tmp_path / "orbax"))
    direct = load_hf_params(src, read_hf_config(src))
    for x, y in zip(_leaves(params), _leaves(direct), strict=True):
        assert np.array_equal(np.asarray(x), y)
    assert (
        convert_main(
            ["--to", "hf", "--input", str(tmp_path / "orbax"), "--output", str(tmp_path / "hf"), "--dtype", "bfloat16"]
        )
        == 0
    )
    exported = _all_tensors(str(tmp_path / "hf"))
    original = _all_tensors(src)
    for name, w in original.items():
        assert str(exported[name].dtype) == "bfloat16"
        np.testing.assert_allclose(exported[name].astype(np.float32), w, rtol=1e-2, atol=1e-6)
    assert json.load(open(tmp_path / "hf" / "config.json"))["torch_dtype"] == "bfloat16"


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        read_hf_config(str(tmp_path))


def test_unknown_config_key(tmp_path):
    src, _ = random_hf_llama(tmp_path)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["sliding_window"] = 4096
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(ConversionError, match=r"unknown config keys \['sliding_window'\]"):
        read_hf_config(src)


def test_rope_scaling_is_refused(tmp_path):
    src, _ = random_hf_llama(tmp_path)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(ConversionError, match="rope_type='linear' is not implemented"):
        read_hf_config(src)


def test_wrong_shape_names_the_tensor(tmp_path):
    src, _ = random_hf_llama(tmp_path)
    cfg = read_hf_config(src, intermediate_size=128)  # the file has 96
    with pytest.raises(ConversionError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\)"):
        load_hf_params(src, cfg)


def test_missing_tensor_names_it(tmp_path):
    from safetensors.numpy import save_file

    src, _ = random_hf_llama(tmp_path)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, os.path.join(src, "model.safetensors"))
    with pytest.raises(ConversionError, match="'model.layers.1.self_attn.k_proj.weight' is missing"):
        load_hf_params(src, read_hf_config(src))


def test_unexpected_tensor_names_it(tmp_path):
    from safetensors.numpy import save_file

    src, _ = random_hf_llama(tmp_path)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, os.path.join(src, "model.safetensors"))
    with pytest.raises(ConversionError, match="unexpected tensors.*q_proj.bias"):
        load_hf_params(src, read_hf_config(src))


def test_index_naming_a_missing_shard(tmp_path):
    src, _ = random_hf_llama(tmp_path, max_shard_size="40KB")
    victim = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(src, victim))
    with pytest.raises(FileNotFoundError, match=victim):
        load_hf_params(src, read_hf_config(src))


def test_no_weights_at_all(tmp_path):
    src, _ = random_hf_llama(tmp_path)
    os.remove(os.path.join(src, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors, pytorch_model.bin"):
        load_hf_params(src, read_hf_config(src))


def test_pytorch_bin_is_loaded_weights_only(tmp_path):
    import torch

    src, hf = random_hf_llama(tmp_path / "st")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(os.path.join(src, "config.json"), bin_dir / "config.json")
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    a = load_hf_params(src, read_hf_config(src))
    b = load_hf_params(str(bin_dir), read_hf_config(str(bin_dir)))
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        assert np.array_equal(x, y)
    # A pickle carrying code is refused by weights_only loading.
    torch.save({"x": _Evil()}, bin_dir / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_hf_params(str(bin_dir), read_hf_config(str(bin_dir)))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_orbax_checkpoint_mismatched_config(tmp_path):
    from meditron_jax.config import get_config
    from meditron_jax.model import init_params

    cfg = get_config("tiny")
    save_orbax(init_params(cfg, 0), cfg, str(tmp_path / "m"))
    want = r"does not match the model config: parameter \['embedding'\] has shape \(512, 64\)"
    with pytest.raises(ValueError, match=want):
        load_orbax(str(tmp_path / "m"), cfg.replace(hidden_size=32, intermediate_size=64))


def test_failed_export_leaves_the_previous_directory_intact(tmp_path, monkeypatch):
    import safetensors.numpy

    src, _ = random_hf_llama(tmp_path / "src")
    cfg = read_hf_config(src)
    params = load_hf_params(src, cfg)
    out = tmp_path / "out"
    save_hf(params, cfg, str(out))
    before = _all_tensors(str(out))
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf(params, cfg, str(out), max_shard_bytes=30_000)
    assert calls
    after = _all_tensors(str(out))
    assert set(after) == set(before) and all(np.array_equal(after[k], before[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
