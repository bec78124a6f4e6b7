#!/usr/bin/env python
"""What a command costs before it does its work: fresh processes, timed from start to exit.

Each row is one command run in a new Python process (imports, model load, compiling, the work, exit), the
rows taking turns round by round so that a busy machine slows them all alike:

* ``generate``: ``meditron-generate`` on the real tiny Llama (stories260K), 8 greedy tokens; its peer is
  transformers loading the same directory and generating the same 8 tokens (``AutoModelForCausalLM`` +
  ``AutoTokenizer``, as its model card would say), and the row reports peer ÷ ours;
* ``prepare-data``: ``meditron-prepare-data`` on the embedded GAP-REPLAY sample (the quickstart's stage 1);
* ``train, wrong vocabulary``: ``meditron-train`` of README "Train" with ``vocab_size=32000`` against the
  curated corpus, which holds MEDITRON's marker tokens: the documented error (docs/troubleshooting.md);
* ``import tensorflow``: for scale, what any process using SeqIO or tf.data pays first.

``--before DIR`` runs our commands from another checkout too (``git worktree add /tmp/before REV``), from that
folder and with ``PYTHONPATH`` pointing there, for before/after figures in one run.

    python bench/startup.py --rounds 3
    python bench/startup.py --rounds 3 --before /tmp/before
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meditron_jax.cli.quickstart import EMBEDDED  # noqa: E402
from meditron_jax.data.paths import shared_data_dir  # noqa: E402

PEER_GENERATE = """
import sys, torch, transformers
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
ids = tok("Once upon a time", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False)
print(tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True))
"""


def commands(work: Path) -> dict[str, tuple[list[str], int]]:
    """name -> (argv after the interpreter, expected exit code)."""
    stories = str(shared_data_dir() / "stories260K_hf")
    sample = str(EMBEDDED / "gap_replay_sample")
    return {
        "generate": (
            ["-m", "meditron_jax.cli.generate", "--model_dir", stories, "--max_new_tokens", "8"],
            0,
        ),
        "prepare-data": (
            ["-m", "meditron_jax.cli.prepare_data", "--input_dir", sample, "--output_dir", "{out}"],
            0,
        ),
        "train, wrong vocabulary": (
            [
                "-m",
                "meditron_jax.cli.train",
                "--gin_file=runs/tiny_cpu.gin",
                "--gin.MODEL_DIR='{out}'",
                f"--gin.curated_data_dir.path='{work / 'curated'}'",
                "--gin.ModelConfig.vocab_size=32000",
            ],
            1,
        ),
        "import tensorflow": (["-c", "import tensorflow"], 0),
    }


def timed(argv: list[str], expect: int, env: dict, work: Path, out: str | None = None) -> float:
    """Seconds to run ``argv`` in the tree named by ``env["PYTHONPATH"]`` (its folder is the working directory,
    which ``python -m`` puts first on the path); ``{out}`` in it becomes ``out``, or a new path under ``work``."""
    if out is None:
        out = tempfile.mkdtemp(dir=work)
        os.rmdir(out)  # the writers refuse folders they did not create
    argv = [a.replace("{out}", out) for a in argv]
    start = time.perf_counter()
    cwd = env.get("PYTHONPATH", ROOT)
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != expect:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}, expected {expect}:\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another checkout whose commands run alongside (before/after)")
    args = parser.parse_args()

    base = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", XLA_FLAGS="")
    trees = {"ours": dict(base, PYTHONPATH=str(ROOT))}
    if args.before:
        trees["before"] = dict(base, PYTHONPATH=str(args.before.resolve()))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = commands(work)
        timed(*rows["prepare-data"], trees["ours"], work, out=str(work / "curated"))  # the training row's data
        times: dict[tuple[str, str], list[float]] = {}
        peer = ["-c", PEER_GENERATE, str(shared_data_dir() / "stories260K_hf")]
        for r in range(args.rounds):
            for name, (argv, expect) in rows.items():
                for tree, env in trees.items():
                    times.setdefault((name, tree), []).append(timed(argv, expect, env, work))
                if name == "generate":
                    times.setdefault((name, "transformers"), []).append(timed(peer, 0, base, work))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    cols = list(trees) + ["transformers"]
    print(f"\n{os.cpu_count()} CPUs, {args.rounds} rounds; median seconds (min) from process start to exit\n")
    print("| command | " + " | ".join(cols) + " | " + " | ".join(f"{c} ÷ ours" for c in cols[1:]) + " |")
    print("|---" * (1 + 2 * len(cols) - 1) + "|")
    for name in rows:
        cells, ratios = [], []
        ours = statistics.median(times[(name, "ours")])
        for col in cols:
            got = times.get((name, col))
            cells.append(f"{statistics.median(got):.1f} ({min(got):.1f})" if got else "")
            if col != "ours":
                ratios.append(f"{statistics.median(got) / ours:.2f}" if got else "")
        print(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
