"""Command-line entry points (console scripts in setup.cfg; scripts/*.py are thin wrappers around them)."""

from meditron_jax.host_memory import reuse_freed_memory

# Before JAX starts its threads: XLA:CPU's per-step buffers then reuse freed memory instead of page-faulting.
reuse_freed_memory()
