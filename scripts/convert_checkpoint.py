#!/usr/bin/env python
"""Thin wrapper of meditron_jax/cli/convert.py (console script: see setup.cfg); `--help` shows an example."""

import sys

from meditron_jax.cli.convert import console, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(console())
