"""Evaluate a checkpoint on MEDITRON's benchmarks. All logic lives in meditron_jax.eval.cli; see --help
and docs/evaluation.md."""

import sys

from meditron_jax.cli.evaluate import console, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(console())
