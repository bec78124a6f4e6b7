"""Data: vocabulary, SeqIO tasks, benchmark formats, GAP-REPLAY curation.

Kept import-light: submodules that need TensorFlow/SeqIO import them themselves.
"""
