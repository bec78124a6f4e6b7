"""Issue 12, item 7: what users see. Scripts end in one ``error: ...`` line and a non-zero exit (traceback with
--verbose); a non-UTF-8 prompt is named; a training run prints no bogus gin log lines, and its MODEL_DIR
can be generated from and converted to a Hugging Face model."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from .hf_utils import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUTF8="1", TF_CPP_MIN_LOG_LEVEL="2")


def _script(name, *args, **kw):
    cmd = [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args]
    return subprocess.run(cmd, capture_output=True, env=ENV, timeout=600, cwd=kw.get("cwd", ROOT))


def test_a_script_error_is_one_line_and_a_nonzero_exit(tmp_path):
    missing = str(tmp_path / "no_such_model")
    args = ["--to", "orbax", "--input", missing, "--output", str(tmp_path / "out")]
    proc = _script("convert_checkpoint", *args)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"error: {missing} is not a directory")
    verbose = _script("convert_checkpoint", *args, "--verbose")
    assert verbose.returncode == 1 and b"Traceback (most recent call last)" in verbose.stderr


def test_a_traceback_inside_an_error_message_is_cut_to_its_cause():
    """Remote Beam runners put the worker's traceback into the exception message itself."""
    from meditron_jax.cli.common import one_line

    message = (
        'Traceback (most recent call last):\n  File "apache_beam/runners/common.py", line 1498, in process\n'
        "    return self.do_fn_invoker.invoke_process(windowed_value)\n"
        "ValueError: --tokenizer_model is corrupt [while running 'SplitAndCount/ParDo(SplitAndCount)']"
    )
    assert one_line(message) == (
        "ValueError: --tokenizer_model is corrupt [while running 'SplitAndCount/ParDo(SplitAndCount)'] "
        "(--verbose shows the traceback)"
    )
    assert one_line("plain message") == "plain message"


def test_a_non_utf8_prompt_is_named(tmp_path):
    """Used to fail inside the tokenizer with `TypeError: not a string`."""
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt", "fine", "--prompt", b"caf\xe9 au lait"]
    proc = subprocess.run(cmd, capture_output=True, env=ENV, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.strip() == ("error: --prompt #2 is not valid UTF-8 (byte b'\\xe9' at offset 3 of b'caf\\xe9 au lait')")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_data):
    """A real 2-step training run of the tiny model through scripts/train.py, and its stderr."""
    base = tmp_path_factory.mktemp("cli_run")
    (base / "curated" / "replay").mkdir(parents=True)
    text = (shared_data / "gap_replay_sample" / "replay_general" / "input.txt").read_text()[:20_000]
    with open(base / "curated" / "replay" / "train-00000-of-00001.jsonl", "w") as f:
        for i, doc in enumerate(d for d in text.split("\n\n") if d.strip()):
            f.write(json.dumps({"id": str(i), "source": "replay", "text": doc}) + "\n")
    run = base / "run"
    proc = _script(
        "train",
        "--gin_file=runs/tiny_cpu.gin",
        f"--gin.MODEL_DIR='{run}'",
        f"--gin.curated_data_dir.path='{base / 'curated'}'",
        "--gin.TrainConfig.mixture='gap_replay_replay'",
        "--gin.SEQUENCE_LENGTH=64",
        "--gin.TRAIN_STEPS=2",
        "--gin.OptimizerConfig.warmup_steps=1",
        "--gin.TrainConfig.checkpoint_every=2",
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return run, proc.stderr.decode()


@pytest.mark.slow
def test_training_prints_no_bogus_gin_path_errors(run_dir):
    """gin's search-path lookup used to configure logging first: three `ERROR:root:Path not found` lines."""
    _, err = run_dir
    assert "Path not found" not in err and "ERROR:root" not in err


@pytest.mark.slow
def test_generate_and_convert_from_a_training_run(run_dir, shared_data, tmp_path, capsys):
    import meditron_jax

    run, _ = run_dir
    tok = str(shared_data / "llama2_tokenizer")
    generate = load_script("generate").console
    args = ["--model_dir", str(run), "--prompt", "The patient", "--max_new_tokens", "4"]
    assert generate([*args, "--tokenizer_path", tok]) == 0
    assert capsys.readouterr().out.startswith("=== 'The patient'\nThe patient")
    # The trainer writes its mixture's tokenizer into MODEL_DIR, so the run folder alone is enough ...
    assert (run / "tokenizer.model").is_file() and (run / "added_tokens.json").is_file()
    assert generate(args) == 0
    assert capsys.readouterr().out.startswith("=== 'The patient'\nThe patient")
    # ... and a run folder without one (e.g. written before that) is told where the tokenizer is missing.
    bare = tmp_path / "bare_run"
    shutil.copytree(run, bare)
    (bare / "tokenizer.model").unlink()
    (bare / "added_tokens.json").unlink()
    assert generate(["--model_dir", str(bare), "--prompt", "The patient", "--max_new_tokens", "4"]) == 1
    assert "has no tokenizer.model; pass --tokenizer_path DIR" in capsys.readouterr().err

    convert = load_script("convert_checkpoint").console
    out = tmp_path / "hf"
    assert convert(["--to", "hf", "--input", str(bare), "--output", str(out)]) == 1
    assert "(this training run's MODEL_DIR has none: pass the tokenizer's folder)" in capsys.readouterr().err
    with_tok = ["--to", "hf", "--input", str(run), "--output", str(out), "--tokenizer_dir", tok]
    assert convert([*with_tok, "--step", "7"]) == 1
    assert "training run has no finished checkpoint of step 7 (it has [2])" in capsys.readouterr().err
    assert convert([*with_tok, "--step", "2"]) == 0
    assert (out / "tokenizer.model").is_file() and (out / "model.safetensors").is_file()
    from_run, from_hf = meditron_jax.load(run, tokenizer_path=tok), meditron_jax.load(out)
    assert from_hf.config.vocab_size == from_run.config.vocab_size == 32017
    # The same weights (the export drops only the embedding's padding rows, which no token id reaches), so
    # the same logits; same program on the same CPU, so equal up to float32 rounding of reordered sums.
    tokens = np.random.RandomState(0).randint(0, 32017, (2, 24))
    np.testing.assert_allclose(from_hf.logits(tokens), from_run.logits(tokens), rtol=0, atol=1e-5)
