#!/usr/bin/env python
"""Thin wrapper of `meditron-train` (meditron_jax/cli/train.py); `--help` shows an example."""

import sys

from meditron_jax.cli.train import console, main, parse_flags  # noqa: F401

if __name__ == "__main__":
    sys.exit(console())
