#!/usr/bin/env python
"""Thin wrapper of `meditron-aot` (meditron_jax/cli/aot_compile.py); `--help` shows examples."""

import sys

from meditron_jax.cli.aot_compile import console, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(console())
