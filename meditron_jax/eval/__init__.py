"""Benchmark evaluation: MEDITRON's strategies and parser, a log-likelihood scorer, reports, lm-eval adapter.

Entry point: ``python scripts/evaluate.py`` (:func:`meditron_jax.eval.cli.main`). See docs/evaluation.md.
"""
