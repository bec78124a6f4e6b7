"""The GAP-REPLAY curation pipeline on Apache Beam.

    match files -> parse + clean (malformed -> side output with file and position)
    -> document filters (no abstract, empty, too short, non-English, replay sampling)
    -> abstracts whose paper has full text (join on PMID) -> exact dedup -> MinHash/LSH near dedup
    -> benchmark contamination (13-grams) -> train/validation split + token counts
    -> {output_dir}/{source}/{split}-{i:05d}-of-{n:05d}.jsonl, stats.json, malformed.jsonl, removed.jsonl,
       and last manifest.json (the shards training reads); a local output folder is replaced as a whole

Every transform is a plain Beam transform, so the same graph runs on DirectRunner (one process or several),
Dask, Dataflow or Flink (file access goes through ``FileSystems``: local paths, gs://, ...). The output
bytes do not depend on the runner: documents go to shards by a hash of their id and every file is written
sorted. Each stage reports what it removed to a ``stats`` stream; nothing is dropped without an event.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pickle
import traceback
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from meditron_jax.convert.files import OutputError, OutputKind, atomic_directory, check_output_dir

from . import SOURCES, guidelines, jats, medline, replay
from . import stats as S
from .contamination import DEFAULT_REFERENCES, NGRAM, ContaminationIndex
from .dedup import MinHashConfig, MinHasher, exact_key, near_duplicate_pairs
from .extsort import external_sorted
from .manifest import MANIFEST_FILE, build_manifest
from .records import Doc, Malformed
from .text import english_score

# MEDITRON.md §2: validation shares 5% guidelines, 3% abstracts, 3% papers, no replay.
MEDITRON_VALIDATION = {"guidelines": 0.05, "pubmed_abstracts": 0.03, "pmc_papers": 0.03, "replay": 0.0}
DEFAULT_PATTERNS = {
    "guidelines": (
        "guidelines*/*.json",
        "guidelines*/*.jsonl",
        "guidelines*/*.zip",
        "guidelines*/*.json.gz",
        "guidelines*/*.jsonl.gz",
    ),
    "pubmed_abstracts": ("pubmed_abstracts/*.xml", "pubmed_abstracts/*.xml.gz"),
    "pmc_papers": ("pmc_papers/*.nxml", "pmc_papers/*.xml", "pmc_papers/*.nxml.gz"),
    "replay": ("replay_general/*.txt", "replay_general/*.jsonl", "replay_general/*.jsonl.gz"),
}
# Which copy of a duplicate survives: curated sources first, then the smaller id.
SOURCE_RANK = {"guidelines": 0, "pmc_papers": 1, "pubmed_abstracts": 2, "replay": 3}


@dataclasses.dataclass
class CurationConfig:
    input_dir: str
    output_dir: str
    num_shards: int = 4
    num_validation_shards: int = 1
    validation_fraction: dict[str, float] = dataclasses.field(default_factory=lambda: dict(MEDITRON_VALIDATION))
    seed: int = 0
    patterns: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_PATTERNS))
    keep_captions: bool = False
    min_chars: int = 10  # MEDITRON dropped guideline texts of 10 characters or fewer
    english_threshold: float = 0.08  # text.english_score: English ~0.2-0.5 (min 0.12 on the sample)
    replay_keep_fraction: float = 1.0  # MEDITRON sampled RedPajama at 0.0004; the sample is kept whole
    minhash: MinHashConfig = dataclasses.field(default_factory=MinHashConfig)
    contamination_refs: tuple[str, ...] = DEFAULT_REFERENCES
    ngram: int = NGRAM
    max_ref_df: int = 10
    tokenizer_model: str | None = None  # Llama-2 tokenizer.model; None: no token counts
    max_docs_per_file: int | None = None  # CI cap, applied while reading
    max_examples: int = 200  # removed/malformed examples kept in stats.json per filter

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patterns"] = {k: list(v) for k, v in self.patterns.items()}
        return d

    def validate(self) -> None:
        """Type and range of every setting, named as the command-line flag, before anything runs."""

        def need(ok: bool, flag: str, value, allowed: str) -> None:
            if not ok:
                raise ValueError(f"--{flag} {value!r} is invalid: {allowed}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def in_range(v, lo, hi) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi

        need(is_int(self.num_shards) and self.num_shards >= 1, "num_shards", self.num_shards, "at least 1")
        need(
            is_int(self.num_validation_shards) and self.num_validation_shards >= 1,
            "num_validation_shards",
            self.num_validation_shards,
            "at least 1",
        )
        for src, frac in self.validation_fraction.items():
            need(src in SOURCES, "validation_fraction", src, f"a source of {SOURCES}")
            need(in_range(frac, 0.0, 1.0), "validation_fraction", f"{src}={frac}", "a fraction in [0, 1]")
        need(
            in_range(self.replay_keep_fraction, 0.0, 1.0),
            "replay_keep_fraction",
            self.replay_keep_fraction,
            "in [0, 1]",
        )
        need(in_range(self.english_threshold, 0.0, 1.0), "english_threshold", self.english_threshold, "in [0, 1]")
        need(is_int(self.min_chars) and self.min_chars >= 0, "min_chars", self.min_chars, "a count >= 0")
        need(
            in_range(self.minhash.threshold, 0.0, 1.0) and self.minhash.threshold > 0,
            "near_dup_threshold",
            self.minhash.threshold,
            "a Jaccard similarity in (0, 1]",
        )
        need(is_int(self.ngram) and self.ngram >= 1, "ngram", self.ngram, "at least 1")
        need(
            self.max_docs_per_file is None or (is_int(self.max_docs_per_file) and self.max_docs_per_file >= 1),
            "max_docs_per_file",
            self.max_docs_per_file,
            "at least 1",
        )
        if self.tokenizer_model and "://" not in self.tokenizer_model:
            if not os.path.isfile(self.tokenizer_model):
                raise FileNotFoundError(f"--tokenizer_model {self.tokenizer_model} does not exist ('none' disables)")
            import sentencepiece

            try:  # here, not in a Beam worker's setup, whose failure comes wrapped in a worker traceback
                sentencepiece.SentencePieceProcessor(model_file=self.tokenizer_model)
            except (OSError, RuntimeError) as e:
                raise ValueError(f"--tokenizer_model {self.tokenizer_model} is not a sentencepiece model ({e})") from e
        self.input_files()

    def input_files(self) -> dict[str, list[str]]:
        """{source: matched files}; a clear error when the input folder is missing or matches nothing."""
        remote = "://" in self.input_dir
        if not remote and not os.path.isdir(self.input_dir):
            raise FileNotFoundError(f"--input_dir {self.input_dir} does not exist or is not a folder")
        found: dict[str, list[str]] = {}
        for src in SOURCES:
            for pattern in self.patterns.get(src, ()):
                found.setdefault(src, []).extend(match_input(self.input_dir, pattern))
        if not any(found.values()):
            shown = ", ".join(p for src in SOURCES for p in self.patterns.get(src, ()))
            raise FileNotFoundError(f"--input_dir {self.input_dir} holds no input files (looked for {shown})")
        return found


def match_input(input_dir: str, pattern: str) -> list[str]:
    """Files a source pattern names, sorted. Local patterns go through ``glob``, which follows symlinked
    folders (Beam's local matcher does not: a symlinked ``guidelines_cdc/`` matched nothing); URLs through
    Beam's file systems."""
    if "://" in pattern or "://" in input_dir:
        full = pattern if "://" in pattern else FileSystems.join(input_dir, pattern)
        return sorted(m.path for m in FileSystems.match([full])[0].metadata_list)
    full = pattern if os.path.isabs(pattern) else os.path.join(input_dir, pattern)
    return sorted(p for p in glob.glob(full) if os.path.isfile(p))


def _unit_hash(seed: int, salt: str, ident: str) -> float:
    h = hashlib.blake2b(f"{seed}:{salt}:{ident}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def sort_key(doc: Doc) -> str:
    return f"{SOURCE_RANK.get(doc.source, 9)}|{doc.id}"


# Every stage emits one stream of (tag, value) pairs, split afterwards by tag (``_split``). Beam's multi-output
# ParDo (``with_outputs``) would do it in one pass, but the Dask runner of apache-beam 2.77 merges all outputs
# of a ParDo into one bag; a stream filtered per tag means the same on every runner.
DOCS, STATS, REMOVED, MALFORMED, LINES = "docs", "stats", "removed", "malformed", "lines"


def _select(item: tuple[str, Any], tag: str) -> Iterable[Any]:
    if item[0] == tag:
        yield item[1]


def _split(pcoll, label: str, tags: tuple[str, ...]) -> dict[str, Any]:
    return {t: pcoll | f"{label}/{t}" >> beam.FlatMap(_select, t) for t in tags}


def _removed(filter_name: str, doc: Doc, **detail) -> Iterable[tuple[str, Any]]:
    yield STATS, ((doc.source, "removed", filter_name, "docs"), 1)
    yield STATS, ((doc.source, "removed", filter_name, "chars"), len(doc.text))
    yield REMOVED, {"filter": filter_name, "id": doc.id, "source": doc.source, **detail}


# ---------------------------------------------------------------- read + parse


class _MatchFn(beam.DoFn):
    def __init__(self, input_dir: str):
        self.input_dir = input_dir

    def process(self, item):
        source, pattern = item
        for path in match_input(self.input_dir, pattern):
            yield source, path


class ParseFile(beam.DoFn):
    """One file -> cleaned ``Doc`` s; malformed records and unreadable files go to the ``malformed`` output."""

    def __init__(self, config: CurationConfig):
        self.config = config

    def _reader(self, source: str, path: str, fh):
        if source == "guidelines":
            return guidelines.read_guidelines(path, fh)
        if source == "pubmed_abstracts":
            return medline.read_medline(path, fh)
        if source == "pmc_papers":
            return jats.read_jats(path, fh, keep_captions=self.config.keep_captions)
        if source == "replay":
            return replay.read_replay(path, fh)
        raise ValueError(f"unknown source {source!r}")

    def _malformed(self, m: Malformed):
        yield STATS, ((m.source, "malformed"), 1)
        yield MALFORMED, m.to_json()

    def process(self, item):
        source, path = item
        yield STATS, ((source, "input", "files"), 1)
        n = 0
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
                for rec in self._reader(source, path, fh):
                    if isinstance(rec, Malformed):
                        yield from self._malformed(rec)
                        continue
                    if self.config.max_docs_per_file is not None and n >= self.config.max_docs_per_file:
                        break
                    n += 1
                    yield STATS, ((source, "input", "docs"), 1)
                    yield STATS, ((source, "input", "raw_chars"), rec.raw_chars)
                    for key, v in S.cleaning_events(source, rec.removed):
                        yield STATS, (key, v)
                    yield DOCS, rec
        except Exception as e:  # one bad file must not fail the run; it is reported instead
            where = traceback.extract_tb(e.__traceback__)[-1]
            yield from self._malformed(
                Malformed(
                    source,
                    path,
                    {"docs_read_before_error": n},
                    f"{type(e).__name__}: {e} (at {where.name}:{where.lineno})",
                )
            )


# ---------------------------------------------------------------- filters


class DocFilters(beam.DoFn):
    def __init__(self, config: CurationConfig):
        self.config = config

    def process(self, doc: Doc):
        c = self.config
        if doc.meta.get("drop"):
            yield from _removed(doc.meta["drop"], doc)
        elif not doc.text.strip():
            yield from _removed("empty_after_cleaning", doc)
        elif len(doc.text) <= c.min_chars:
            yield from _removed("too_short", doc, chars=len(doc.text))
        elif (score := english_score(doc.text)) < c.english_threshold:
            yield from _removed("non_english", doc, english_score=round(score, 3))
        elif doc.source == "replay" and _unit_hash(c.seed, "replay", doc.id) >= c.replay_keep_fraction:
            yield from _removed("replay_not_sampled", doc)
        else:
            yield DOCS, doc


def _is_abstract(doc: Doc) -> bool:
    return doc.source == "pubmed_abstracts"


def _is_not_abstract(doc: Doc) -> bool:
    return doc.source != "pubmed_abstracts"


def _key_by_pmid(doc: Doc) -> tuple[str, Doc]:
    return doc.meta.get("pmid") or doc.id, doc


def _paper_pmids(doc: Doc) -> list[tuple[str, int]]:
    return [(doc.meta["pmid"], 1)] if doc.source == "pmc_papers" and doc.meta.get("pmid") else []


def _drop_abstracts_with_papers(item):
    # MEDITRON.md §2: abstracts whose paper is in the full-text set are dropped.
    _, groups = item
    has_paper = bool(list(groups["paper"]))
    for doc in groups["abstract"]:
        if has_paper:
            yield from _removed("abstract_has_full_text", doc, pmid=doc.meta.get("pmid"))
        else:
            yield DOCS, doc


def _key_by_text(doc: Doc) -> tuple[str, Doc]:
    return exact_key(doc.text), doc


def _keep_first(item):
    _, docs = item
    docs = sorted(docs, key=sort_key)
    yield DOCS, docs[0]
    for d in docs[1:]:
        yield from _removed("exact_duplicate", d, duplicate_of=docs[0].id)


class _Signature(beam.DoFn):
    def __init__(self, config: MinHashConfig):
        self.config = config

    def setup(self):
        self.hasher = MinHasher(self.config)

    def process(self, doc: Doc):
        sig = self.hasher.signature(doc.text)
        key = sort_key(doc)
        for band in self.hasher.band_keys(sig):
            yield band, (key, sig)


def _candidate_pairs(item, config: MinHashConfig):
    return near_duplicate_pairs(list(item[1]), config)  # sorts the bucket by key: arrival order does not matter


def _key_dropped(pair) -> tuple[str, tuple[str, float]]:
    return pair[0], (pair[1], round(pair[2], 3))


def _key_by_sort_key(doc: Doc) -> tuple[str, Doc]:
    return sort_key(doc), doc


def _drop_near_duplicates(item):
    _, groups = item
    drops = list(groups["drop"])
    for doc in groups["doc"]:
        if drops:
            kept, sim = min(drops)
            yield from _removed("near_duplicate", doc, duplicate_of=kept.split("|", 1)[1], similarity=sim)
        else:
            yield DOCS, doc


class ContaminationFilter(beam.DoFn):
    """The reference n-grams (several MB) travel as a file written before the run, not in the job graph."""

    def __init__(self, index_path: str):
        self.index_path = index_path

    def setup(self):
        with FileSystems.open(self.index_path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            self.index: ContaminationIndex = pickle.loads(f.read())

    def process(self, doc: Doc):
        bad, labels = self.index.is_contaminated(doc.text)
        if bad:
            yield from _removed("contaminated", doc, benchmarks=labels[:10])
            for label in sorted({lb.split(":", 1)[0] for lb in labels}):
                yield STATS, ((doc.source, "contaminated_by", label), 1)
        else:
            yield DOCS, doc


def shard_path(source: str, split: str, index: int, count: int) -> str:
    """A shard's path relative to the output folder (the layout ``tasks.py`` and the manifest read)."""
    return f"{source}/{split}-{index:05d}-of-{count:05d}.jsonl"


def shard_paths(config: CurationConfig) -> list[str]:
    """Every shard the run writes (an empty one too: the count is fixed by the flags, not by the data)."""
    out = []
    for src in SOURCES:
        out += [shard_path(src, "train", i, config.num_shards) for i in range(config.num_shards)]
        if config.validation_fraction.get(src, 0.0) > 0:
            n = config.num_validation_shards
            out += [shard_path(src, "validation", i, n) for i in range(n)]
    return out


class SplitAndCount(beam.DoFn):
    """Train/validation assignment and shard (hashes of seed + id) and output statistics with Llama-2 tokens.

    The shard is a hash of the id, not the order documents arrive in, so every runner writes the same files."""

    def __init__(self, config: CurationConfig):
        self.config = config
        self.tokenizer = None

    def setup(self):
        if self.config.tokenizer_model:
            from meditron_jax.data.vocabulary import MEDITRON_EXTRA_TOKENS, Tokenizer

            path = self.config.tokenizer_model
            if "://" in path:  # remote (gs://...): copy next to the worker first
                local = os.path.join(os.environ.get("TMPDIR", "/tmp"), "meditron_tokenizer.model")
                with FileSystems.open(path) as src, open(local, "wb") as dst:
                    dst.write(src.read())
                path = local
            # The MEDITRON vocabulary: markers such as [bib_ref] are single tokens (MEDITRON.md §1).
            self.tokenizer = Tokenizer(path, extra_tokens=MEDITRON_EXTRA_TOKENS)

    def process(self, doc: Doc):
        c = self.config
        frac = c.validation_fraction.get(doc.source, 0.0)
        split = "validation" if _unit_hash(c.seed, "split", doc.id) < frac else "train"
        yield STATS, ((doc.source, "output", split, "docs"), 1)
        yield STATS, ((doc.source, "output", split, "chars"), len(doc.text))
        if self.tokenizer is not None:
            n = len(self.tokenizer.encode(doc.text, bos=False, eos=False))
            yield STATS, ((doc.source, "output", split, "tokens"), n)
        count = c.num_shards if split == "train" else c.num_validation_shards
        index = int(_unit_hash(c.seed, "shard", doc.id) * count)
        line = json.dumps(doc.output(), ensure_ascii=False)
        yield LINES, (shard_path(doc.source, split, index, count), (doc.id, line))


# ---------------------------------------------------------------- output files


class WriteFiles(beam.DoFn):
    """``(path relative to the output folder, [(sort key, line) or None, ...])`` -> that file, its lines in
    sort-key order, written whole; yields the path. ``None`` only makes sure the file exists.

    Sorting makes the bytes independent of the runner; writing a whole file per element makes a retried
    bundle rewrite the same bytes (no temporary shards to rename). The sort spills to the worker's local
    disk beyond ``extsort.RUN_SIZE`` lines, so a file may be bigger than a worker's memory."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def process(self, item):
        rel, rows = item
        path = FileSystems.join(self.output_dir, *rel.split("/"))
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            for _, line in external_sorted(r for r in rows if r is not None):
                f.write(line.encode("utf-8") + b"\n")
        yield rel


def _removed_row(rec: dict) -> tuple[str, tuple[tuple, str]]:
    order = S.FILTERS.index(rec["filter"]) if rec["filter"] in S.FILTERS else len(S.FILTERS)
    line = json.dumps(rec)
    return "removed.jsonl", ((order, rec["filter"], rec["id"]), line)


def _malformed_order(m: dict) -> tuple[str, str, str]:
    return m["file"], json.dumps(m["position"], sort_keys=True), m["error"]


def _malformed_row(m: dict) -> tuple[str, tuple[tuple, str]]:
    return "malformed.jsonl", (_malformed_order(m), json.dumps(m))


def _removed_order(rec: dict) -> tuple[str, str]:
    return rec["id"], json.dumps(rec, sort_keys=True)


def _by_filter(rec: dict) -> tuple[str, dict]:
    return rec["filter"], rec


def _by_nothing(value: Any) -> tuple[str, Any]:
    return "", value


def _tagged(value: Any, tag: str) -> tuple[str, tuple[str, Any]]:
    return "stats.json", (tag, value)


class AssembleStats(beam.DoFn):
    """All statistics events (summed), malformed and removed examples -> ``stats.json``; yields its path."""

    def __init__(self, output_dir: str, config: dict[str, Any], contamination: dict | None, count_tokens: bool):
        self.output_dir = output_dir
        self.config = config
        self.contamination = contamination
        self.count_tokens = count_tokens

    def process(self, item):
        _, rows = item
        counts, malformed, removed = [], [], []
        for tag, value in rows:
            if tag == "counts":
                counts.append(value)
            elif tag == "malformed":
                malformed += value[1]
            elif tag == "removed":
                removed += value[1]
        report = S.assemble(
            sorted(counts),  # the order keys first appear in stats.json: by key, whichever runner summed them
            config=self.config,
            malformed_examples=malformed,
            removed_examples=removed,
            contamination=self.contamination,
            sources=SOURCES,
            count_tokens=self.count_tokens,
        )
        with FileSystems.create(FileSystems.join(self.output_dir, "stats.json")) as f:
            f.write((json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
        yield "stats.json"


def _sorted_paths(item) -> list[str]:
    return sorted(item[1])


# ---------------------------------------------------------------- graph


def build(
    p: beam.Pipeline,
    config: CurationConfig,
    contamination_path: str | None = None,
    contamination_stats: dict[str, Any] | None = None,
    report_config: dict[str, Any] | None = None,
):
    """Add the curation transforms to ``p``; ``contamination_path``: a pickled ``ContaminationIndex``;
    ``report_config``: the settings stats.json records (default: ``config``'s).

    Returns the PCollection of the one list of files written; it is the graph's last step and depends on
    every write (the Dask runner computes only the last step's ancestors)."""
    stats_pcolls, removed_pcolls = [], []

    specs = [(src, pat) for src in SOURCES for pat in config.patterns.get(src, ())]
    parsed = _split(
        p
        | "Patterns" >> beam.Create(specs)
        | "Match" >> beam.ParDo(_MatchFn(config.input_dir))
        | "SpreadFiles" >> beam.Reshuffle()
        | "Parse" >> beam.ParDo(ParseFile(config)),
        "Parsed",
        (DOCS, STATS, MALFORMED),
    )
    stats_pcolls.append(parsed[STATS])

    filtered = _split(parsed[DOCS] | "Filter" >> beam.ParDo(DocFilters(config)), "Filtered", (DOCS, STATS, REMOVED))
    stats_pcolls.append(filtered[STATS])
    removed_pcolls.append(filtered[REMOVED])
    docs = filtered[DOCS]

    abstracts = docs | "Abstracts" >> beam.Filter(_is_abstract) | "KeyAbstracts" >> beam.Map(_key_by_pmid)
    paper_pmids = docs | "PaperPmids" >> beam.FlatMap(_paper_pmids)
    kept_abstracts = _split(
        {"abstract": abstracts, "paper": paper_pmids}
        | "JoinFullText" >> beam.CoGroupByKey()
        | "DropAbstractsWithPaper" >> beam.FlatMap(_drop_abstracts_with_papers),
        "KeptAbstracts",
        (DOCS, STATS, REMOVED),
    )
    stats_pcolls.append(kept_abstracts[STATS])
    removed_pcolls.append(kept_abstracts[REMOVED])
    others = docs | "NotAbstracts" >> beam.Filter(_is_not_abstract)
    docs = (kept_abstracts[DOCS], others) | "MergeAbstracts" >> beam.Flatten()

    exact = _split(
        docs
        | "ExactKey" >> beam.Map(_key_by_text)
        | "GroupExact" >> beam.GroupByKey()
        | "KeepFirstExact" >> beam.FlatMap(_keep_first),
        "ExactDedup",
        (DOCS, STATS, REMOVED),
    )
    stats_pcolls.append(exact[STATS])
    removed_pcolls.append(exact[REMOVED])
    docs = exact[DOCS]

    mh = config.minhash
    drops = (
        docs
        | "MinHash" >> beam.ParDo(_Signature(mh))
        | "GroupBands" >> beam.GroupByKey()
        | "CandidatePairs" >> beam.FlatMap(_candidate_pairs, mh)
        | "KeyDropped" >> beam.Map(_key_dropped)
    )
    near = _split(
        {"doc": docs | "KeyBySortKey" >> beam.Map(_key_by_sort_key), "drop": drops}
        | "JoinNear" >> beam.CoGroupByKey()
        | "DropNear" >> beam.FlatMap(_drop_near_duplicates),
        "NearDedup",
        (DOCS, STATS, REMOVED),
    )
    stats_pcolls.append(near[STATS])
    removed_pcolls.append(near[REMOVED])
    docs = near[DOCS]

    if contamination_path is not None:
        clean = _split(
            docs | "Contamination" >> beam.ParDo(ContaminationFilter(contamination_path)),
            "Decontaminated",
            (DOCS, STATS, REMOVED),
        )
        stats_pcolls.append(clean[STATS])
        removed_pcolls.append(clean[REMOVED])
        docs = clean[DOCS]

    out = _split(docs | "SplitAndCount" >> beam.ParDo(SplitAndCount(config)), "Output", (LINES, STATS))
    stats_pcolls.append(out[STATS])

    malformed = parsed[MALFORMED]
    removed = tuple(removed_pcolls) | "AllRemoved" >> beam.Flatten()
    every_file = [(rel, None) for rel in [*shard_paths(config), "removed.jsonl", "malformed.jsonl"]]
    written = (
        (
            p | "EveryFile" >> beam.Create(every_file),
            out[LINES],
            removed | "RemovedRows" >> beam.Map(_removed_row),
            malformed | "MalformedRows" >> beam.Map(_malformed_row),
        )
        | "AllRows" >> beam.Flatten()
        | "GroupByFile" >> beam.GroupByKey()
        | "WriteFiles" >> beam.ParDo(WriteFiles(config.output_dir))
    )

    counts = tuple(stats_pcolls) | "AllStats" >> beam.Flatten() | "SumStats" >> beam.CombinePerKey(sum)
    malformed_top = (
        malformed
        | "KeyMalformed" >> beam.Map(_by_nothing)
        | "MalformedExamples" >> beam.combiners.Top.SmallestPerKey(config.max_examples, key=_malformed_order)
    )
    removed_top = (
        removed
        | "KeyRemoved" >> beam.Map(_by_filter)
        | "RemovedExamples" >> beam.combiners.Top.SmallestPerKey(config.max_examples, key=_removed_order)
    )
    stats_written = (
        (
            p | "StatsSeed" >> beam.Create([("stats.json", ("counts_seed", None))]),
            counts | "TagCounts" >> beam.Map(_tagged, "counts"),
            malformed_top | "TagMalformed" >> beam.Map(_tagged, "malformed"),
            removed_top | "TagRemoved" >> beam.Map(_tagged, "removed"),
        )
        | "AllReportRows" >> beam.Flatten()
        | "GroupReport" >> beam.GroupByKey()
        | "Assemble"
        >> beam.ParDo(
            AssembleStats(
                config.output_dir, report_config or config.to_json(), contamination_stats, bool(config.tokenizer_model)
            )
        )
    )
    return (
        (written, stats_written)
        | "AllWritten" >> beam.Flatten()
        | "KeyWritten" >> beam.Map(_by_nothing)
        | "GroupWritten" >> beam.GroupByKey()
        | "Written" >> beam.Map(_sorted_paths)
    )


def _is_curated_output(folder: str, names: set[str]) -> bool:
    """What an earlier curation (before the marker file) left: stats and the per-source shard folders."""
    ours = {"stats.json", "malformed.jsonl", "removed.jsonl", "contamination_index.pkl", MANIFEST_FILE, *SOURCES}
    return "stats.json" in names and names <= ours


CURATED_OUTPUT = OutputKind("curated_corpus", "curated GAP-REPLAY folder", _is_curated_output)


class CurationError(ValueError):
    """The Beam pipeline failed; the message holds the cause and the failing step."""


def check_output(config: CurationConfig, overwrite: bool = False) -> None:
    """Refuse an output folder the run could not replace without destroying other files (before any work)."""
    if "://" in config.output_dir:
        if FileSystems.match([FileSystems.join(config.output_dir, "*")])[0].metadata_list:
            raise OutputError(
                f"--output_dir {config.output_dir} is not empty; a remote output cannot be replaced atomically, "
                "so name a new folder"
            )
        return
    check_output_dir(config.output_dir, CURATED_OUTPUT, inputs=[config.input_dir], overwrite=overwrite)


def run(
    config: CurationConfig,
    pipeline_args: list[str] | None = None,
    contamination_index: ContaminationIndex | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Check the settings and the input, build and run the pipeline; returns the parsed ``stats.json``.

    A local output folder is replaced as a whole when the run succeeds (never mixed with an earlier run's
    shards); it must be new, empty or an earlier curation output unless ``overwrite``. A remote one
    (gs://...) must be new. ``manifest.json``, written last, lists the shards training reads.

    ``contamination_index``: built from ``config.contamination_refs`` with the benchmark loader when None;
    pass ``ContaminationIndex.build([...])`` to use other references, or set ``contamination_refs=()`` to
    skip the filter."""
    config.validate()
    check_runner_paths(config, pipeline_args)
    check_output(config, overwrite)
    if "://" in config.output_dir:
        return _run_into(config, config.output_dir, pipeline_args, contamination_index)
    record = {"config": config.to_json()}
    with atomic_directory(
        config.output_dir, CURATED_OUTPUT, inputs=[config.input_dir], overwrite=overwrite, record=record
    ) as tmp:
        return _run_into(config, tmp, pipeline_args, contamination_index)


def _run_into(
    config: CurationConfig, out: str, pipeline_args: list[str] | None, contamination_index: ContaminationIndex | None
) -> dict[str, Any]:
    from apache_beam.options.pipeline_options import PipelineOptions

    if contamination_index is None and config.contamination_refs:
        from .contamination import benchmark_references

        contamination_index = ContaminationIndex.build(
            benchmark_references(config.contamination_refs), n=config.ngram, max_ref_df=config.max_ref_df
        )
    work = dataclasses.replace(config, output_dir=out)
    path = None
    if contamination_index is not None:
        path = FileSystems.join(out, "contamination_index.pkl")
        with FileSystems.create(path) as f:
            f.write(pickle.dumps(contamination_index))
    options = PipelineOptions(beam_args(pipeline_args))
    p = beam.Pipeline(options=options)
    build(
        p,
        work,
        path,
        contamination_index.stats if contamination_index is not None else None,
        report_config=config.to_json(),
    )
    result = None
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as e:  # Beam re-raises a worker's error with the failing step in its message
        raise CurationError(f"the curation pipeline failed: {type(e).__name__}: {e}") from e
    finally:
        client = getattr(result, "client", None)  # the Dask runner leaves its client (and own cluster) open
        if client is not None:
            client.close()
    expected = [*shard_paths(config), "removed.jsonl", "malformed.jsonl", "stats.json"]
    missing = [rel for rel in expected if not FileSystems.exists(FileSystems.join(out, *rel.split("/")))]
    if missing:  # a runner that skipped part of the graph and still reported success
        raise CurationError(f"the runner finished without writing {len(missing)} output files, e.g. {missing[0]}")
    with FileSystems.open(FileSystems.join(out, "stats.json")) as f:
        stats = json.loads(f.read())
    shards: dict[tuple[str, str], list[str]] = {}
    for rel in shard_paths(config):
        src, name = rel.split("/")
        shards.setdefault((src, name.split("-", 1)[0]), []).append(rel)
    with FileSystems.create(FileSystems.join(out, MANIFEST_FILE)) as f:
        f.write(json.dumps(build_manifest(shards, stats), indent=1).encode())
    return stats


# Beam 2.77 knows its Dask runner only by module path.
RUNNER_ALIASES = {"DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}


def beam_args(pipeline_args: list[str] | None) -> list[str]:
    """Beam's command line with ``--runner=DaskRunner`` spelled out; DirectRunner when no runner is named.
    A clear error when the Dask runner is asked for without dask installed (the ``dask`` extra)."""
    args = list(pipeline_args or [])
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.insert(0, "--runner=DirectRunner")
    for i, a in enumerate(args):
        name = a.split("=", 1)[1] if a.startswith("--runner=") else None
        if name is None and i and args[i - 1] == "--runner":
            name = a
        if name is None:
            continue
        if name in RUNNER_ALIASES or name.endswith("dask_runner.DaskRunner"):
            try:
                import dask.distributed  # noqa: F401
            except ImportError as e:
                raise ValueError(
                    f"--runner {name} needs dask and distributed: pip install 'meditron_jax[dask]' ({e})"
                ) from e
        full = RUNNER_ALIASES.get(name, name)
        args[i] = f"--runner={full}" if a.startswith("--runner=") else full
    return args


# Runners whose workers are other machines: a local path means nothing there.
REMOTE_RUNNERS = ("DataflowRunner",)


def runner_name(pipeline_args: list[str] | None) -> str:
    """The runner the Beam command line names (the last ``--runner``), DirectRunner by default."""
    args = beam_args(pipeline_args)
    names = [a.split("=", 1)[1] for a in args if a.startswith("--runner=")]
    names += [b for a, b in zip(args, args[1:], strict=False) if a == "--runner"]
    return names[-1] if names else "DirectRunner"


def check_runner_paths(config: CurationConfig, pipeline_args: list[str] | None) -> None:
    """Refuse local paths for a runner whose workers run elsewhere, before anything is launched."""
    runner = runner_name(pipeline_args)
    if not runner.endswith(REMOTE_RUNNERS):
        return
    paths = [("input_dir", config.input_dir), ("output_dir", config.output_dir)]
    paths += [("tokenizer_model", config.tokenizer_model or "none://")]
    paths += [(f"{src}_glob", p) for src, pats in config.patterns.items() for p in pats if os.path.isabs(p)]
    for flag, value in paths:
        if "://" not in value:
            raise ValueError(f"--{flag} {value} is a local path, which {runner}'s workers cannot read; use gs://...")
