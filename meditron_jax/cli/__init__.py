"""Command-line entry points (console scripts in setup.cfg; scripts/*.py are thin wrappers around them)."""
