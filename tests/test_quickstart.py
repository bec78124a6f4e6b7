"""The README's first command: the whole job on the embedded sample, without the shared data, on a small
setting (the command itself runs the same entry point with larger defaults)."""

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_runs_every_stage_without_shared_data(tmp_path):
    out = tmp_path / "qs"
    env = {k: v for k, v in os.environ.items() if k != "MEDITRON_SHARED_DATA"}
    env["MEDITRON_SHARED_DATA"] = str(tmp_path / "no_shared_data_here")  # nothing may read the shared data
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = ""  # one CPU device, as on a laptop (the test session fakes 8)
    cmd = [
        sys.executable,
        "-m",
        "meditron_jax.cli.quickstart",
        "--output",
        str(out),
        "--pretrain_steps",
        "4",
        "--sequence_length",
        "64",
        "--sft_steps",
        "2",
        "--sft_batch",
        "4",
        "--eval_limit",
        "4",
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout[proc.stdout.index("=== meditron-quickstart summary ===") :]
    assert "PubMedQA top_token accuracy" in summary and "PubMedQA loglik" in summary
    assert f"Hugging Face export {out / 'hf'}" in summary
    stage_times = r"\(\d+ s: curated \d+ s, pretrain \d+ s, sft \d+ s, eval \d+ s, hf \d+ s, reload \d+ s\)"
    assert re.search(stage_times, summary), summary
    # Every stage left its artefact under the one folder.
    assert (out / "curated" / "manifest.json").is_file()
    assert (out / "pretrain" / "metrics.jsonl").is_file() and (out / "sft" / "metrics.jsonl").is_file()
    for strategy in ("top_token", "loglik"):
        results = json.loads((out / f"eval_{strategy}" / "results.json").read_text())["results"][0]
        assert results["benchmark"] == "pubmedqa" and results["n"] == 4 and results["strategy"] == strategy
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.model").is_file()
    # transformers reloaded the export and agreed with us.
    diff = float(summary.split("max |logit difference| ")[1].split()[0])
    assert diff < 1e-4
    # A second run into the same folder is allowed (it is the quickstart's own), a foreign folder is not.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = subprocess.run(
        [sys.executable, "-m", "meditron_jax.cli.quickstart", "--output", str(foreign)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "holds files that a quickstart did not write" in proc.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
