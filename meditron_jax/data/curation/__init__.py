"""GAP-REPLAY curation: raw guideline / MEDLINE / PMC / replay dumps to clean, deduplicated, sharded JSONL.

The parsers and cleaners here are plain Python (testable without Beam); ``pipeline.py`` wires them into an
Apache Beam pipeline that runs on DirectRunner locally and on Dataflow/Flink for the full corpus.
Rules follow MEDITRON.md §2; where we deviate, the module docstring says so.
"""

SOURCES = ("guidelines", "pubmed_abstracts", "pmc_papers", "replay")
