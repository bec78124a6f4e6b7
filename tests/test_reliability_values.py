"""Issue 12, item 5: a value read from a file or a flag is type- and range-checked where it enters, and the
error names the field, the value and what is allowed. (A misspelled gin macro is
tests/test_gin_recipes.py::test_a_misspelled_macro_on_the_command_line_is_found.)"""

import json
import math
import os

import numpy as np
import pytest

from meditron_jax.config import ModelConfig, get_config
from meditron_jax.convert.hf import ConversionError, read_hf_config

from .hf_utils import load_script, random_hf_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return random_hf_llama(tmp_path_factory.mktemp("hf"), tied=False)[0]


def _with_config(src, dst, **changes):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f != "config.json":
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)  # NaN is written as NaN, which json.load reads back as nan
    return str(dst)


def test_a_string_false_for_tie_word_embeddings_is_refused(hf_dir, tmp_path, capsys):
    """It used to read as True (a non-empty string): the trained lm_head was dropped and the logits wrong."""
    bad = _with_config(hf_dir, tmp_path / "bad", tie_word_embeddings="false")
    want = "config.json: tie_word_embeddings='false' (str) is invalid: must be a boolean (JSON true/false)"
    with pytest.raises(ConversionError, match=want.replace("(", r"\(").replace(")", r"\)")):
        read_hf_config(bad)
    rc = load_script("convert_checkpoint").console(
        ["--to", "orbax", "--input", bad, "--output", str(tmp_path / "out"), "--no_tokenizer"]
    )
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 1 and last.startswith("error: ") and "tie_word_embeddings='false'" in last and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("num_hidden_layers", "2", "must be a positive integer"),
        ("num_hidden_layers", 2.5, "must be a positive integer"),
        ("num_hidden_layers", 0, "must be a positive integer"),
        ("hidden_size", -64, "must be a positive integer"),
        ("hidden_size", True, "must be a positive integer"),
        ("intermediate_size", "64", "must be a positive integer"),
        ("head_dim", 0, "must be a positive integer"),
        ("rms_norm_eps", float("nan"), "must be a finite positive number"),
        ("rms_norm_eps", 0, "must be a finite positive number"),
        ("rope_parameters", {"rope_type": "default", "rope_theta": "1e4"}, None),
        ("eos_token_id", 200, "must be below vocab_size 200"),
        ("bos_token_id", -1, "must be a non-negative integer token id"),
    ],
)
def test_wrong_types_and_ranges_in_config_json_name_the_key(hf_dir, tmp_path, key, value, allowed):
    bad = _with_config(hf_dir, tmp_path / "bad", **{key: value})
    with pytest.raises(ConversionError) as e:
        read_hf_config(bad)
    if key == "rope_parameters":  # named as our field, rope_theta, read from rope_parameters
        key, value, allowed = "rope_theta", "1e4", "must be a finite positive number"
    shown = "nan" if isinstance(value, float) and math.isnan(value) else repr(value)
    assert str(e.value) == f"{bad}/config.json: {key}={shown} ({type(value).__name__}) is invalid: {allowed}"


def test_two_disagreeing_rope_thetas_are_refused(hf_dir, tmp_path):
    bad = _with_config(hf_dir, tmp_path / "bad", rope_theta="10000")
    with pytest.raises(ConversionError, match=r"rope_theta='10000' and rope_parameters.rope_theta=10000.0 disagree"):
        read_hf_config(bad)


def test_our_own_config_files_are_checked_too(tmp_path):
    from meditron_jax.convert.model_dir import read_model_config

    model = tmp_path / "m"
    model.mkdir()
    d = get_config("tiny").to_dict() | {"scan_layers": "yes"}
    (model / "meditron_config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"meditron_config.json: scan_layers='yes' \(str\) is invalid: must be a bool"):
        read_model_config(model)


def test_python_and_gin_values_are_checked():
    import gin

    with pytest.raises(ValueError, match=r"num_layers=2.5 \(float\) is invalid"):
        get_config("tiny", num_layers=2.5)
    gin.clear_config()
    try:
        gin.parse_config("ModelConfig.num_heads = 0")
        with pytest.raises(ValueError, match=r"num_heads=0 \(int\) is invalid: must be a positive integer"):
            gin.get_configurable("ModelConfig")()
    finally:
        gin.clear_config()
    assert ModelConfig(rope_theta=10000).rope_theta == 10000.0  # an integer where a float goes is fine


def test_logits_refuse_positions_past_the_context():
    from meditron_jax.api import LanguageModel
    from meditron_jax.model import init_params

    cfg = get_config("tiny-mqa", max_position_embeddings=16)
    lm = LanguageModel(cfg, init_params(cfg, 0), tokenizer=None)
    assert lm.logits(np.zeros((1, 16), np.int32)).shape == (1, 16, cfg.vocab_size)
    with pytest.raises(ValueError, match="token_ids hold 17 positions, more than the model's context of 16"):
        lm.logits(np.zeros((1, 17), np.int32))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--override", "num_layers=0"], "num_layers=0 (int) is invalid: must be a positive integer"),
        (["--override", "not_a_field=3"], "unknown ModelConfig field(s) ['not_a_field']"),
        (["--override", "num_layers"], "--override 'num_layers' is not FIELD=VALUE"),
        (["--seq_len", "0"], "--seq_len 0 is invalid: must be at least 1"),
        (["--global_batch", "-8"], "--global_batch -8 is invalid: must be at least 1"),
    ],
)
def test_aot_rejects_bad_sizes_and_overrides_with_a_json_line(capsys, flags, message):
    """It used to report "fits" for 0 layers or a 0-length sequence, and a raw TypeError for an unknown field."""
    from meditron_jax.cli import aot_compile

    argv = ["--model", "tiny", "--topology", "v5e-4"]
    sizes = {"--seq_len": "128", "--global_batch": "8"}
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        if flag in sizes:
            sizes[flag] = value
        else:
            argv += [flag, value]
    argv += [x for kv in sizes.items() for x in kv]
    code = aot_compile.main(argv)
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and result["fits"] is False and message in result["error"]
    assert err.startswith("error: ") and message in err
