"""The four MEDITRON benchmarks: readers (local files and the Hugging Face hub) and prompt rendering.

Every reader returns plain records (``list[dict]``) with at least ``id``, ``question``, ``options``
(letter -> text; empty for PubMedQA), ``answer`` (a letter, or yes/no/maybe) and, for PubMedQA,
``context``. Malformed rows raise :class:`BenchmarkFormatError` naming the file, the line and the field.

Prompt formats follow MEDITRON's ``evaluation/benchmarks.py`` and ``inference.py`` (epfLLM/meditron
@ a7c7cda3), summarised in ../shared/MEDITRON.md §4-§5:

* ``format_mcq``: ``Question: {q}`` (a "?" is added unless the question ends in "?" or "."), a blank
  line, ``Options:``, then ``A. ...`` one per line. PubMedQA: the contexts joined by newlines, a newline,
  the question.
* raw-model prompt: ``{system}\\n{[few-shot block\\n\\n]question}\\n{cue}\\n``; with few-shot exemplars
  the final newline is dropped (``format_prompt`` strips one character when ``shots > 0``).
* few-shot block: ``{question}\\nThe answer is: {gold}`` per exemplar, joined by blank lines; the
  exemplars are the first k rows of the pool after Hugging Face ``Dataset.shuffle(seed)``, which is
  ``np.random.default_rng(seed).permutation(n)``. One block serves every test item.
* finetuned model (ChatML, MEDITRON.md §4): ``<|im_start|>question\\n{system}\\n{question}\\n{cue}\\n<|im_end|>\\n``
  then ``<|im_start|>answer\\n``; SFT targets are ``<|im_start|>answer\\n{gold}<|im_end|>\\n``, or for
  chain-of-thought SFT ``<|im_start|>answer\\n{explanation}.\\nThe answer is: {gold} ###<|im_end|>\\n``.
"""

from __future__ import annotations

import copy
import csv
import functools
import gzip
import io
import json
import math
import os
import pathlib
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from meditron_jax.data.paths import shared_data_dir

LETTERS = "ABCDEFGHIJ"
PUBMEDQA_LABELS = ("yes", "no", "maybe")

# MEDITRON `MMLU.subsets_medical`, in its order (the few-shot pool is aggregated in this order).
MMLU_MEDICAL_SUBJECTS = (
    "anatomy",
    "college_biology",
    "college_medicine",
    "professional_medicine",
    "medical_genetics",
    "virology",
    "clinical_knowledge",
    "high_school_biology",
    "high_school_chemistry",
    "nutrition",
    "college_chemistry",
)
# The 9 subjects MEDITRON scores (MEDITRON.md §5): the two chemistry subjects are loaded, then dropped.
MMLU_MEDICAL_SCORED = tuple(s for s in MMLU_MEDICAL_SUBJECTS if "chemistry" not in s)

# Benchmark -> key of instructions.json (MEDITRON inference.py INSTRUCTIONS): MMLU uses MedMCQA's.
_INSTRUCTION_KEY = {"medqa": "medqa", "medmcqa": "medmcqa", "pubmedqa": "pubmedqa", "mmlu": "medmcqa"}

CUE = "The answer is:"
COT_CUE = "Let's think step by step."
MEDITRON_SEEDS = (1234, 432, 32)
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


class BenchmarkFormatError(ValueError):
    """A row of a benchmark file that does not have the expected shape."""

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None, problem: str):
        where = f"{os.fspath(path)}" + (f":{line}" if line is not None else "")
        what = f" field {field!r}" if field else ""
        super().__init__(f"{where}:{what} {problem}")
        self.path, self.line, self.field = os.fspath(path), line, field


# ----------------------------------------------------------------------------------------------
# Local files
# ----------------------------------------------------------------------------------------------


def _open_text(path: pathlib.Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) per non-blank line; a bad line is an error naming it."""
    path = pathlib.Path(path)
    with _open_text(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkFormatError(path, n, None, f"is not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise BenchmarkFormatError(path, n, None, f"is a JSON {type(obj).__name__}, expected an object")
            yield n, obj


def _field(obj: Mapping, key: str, path, line, *, kind: type | tuple = str):
    if key not in obj:
        raise BenchmarkFormatError(path, line, key, "is missing")
    value = obj[key]
    if not isinstance(value, kind):
        raise BenchmarkFormatError(path, line, key, f"is {type(value).__name__}, expected {kind}")
    return value


def _check_answer(letter, options: Mapping[str, str], path, line, field: str) -> str:
    if letter not in options:
        raise BenchmarkFormatError(path, line, field, f"answer {letter!r} is not among the options {sorted(options)}")
    return letter


def _mcq_record(rid: str, question: str, options: dict[str, str], answer: str | None, **extra) -> dict:
    rec = {"id": rid, "question": question, "options": options, "answer": answer, "context": ""}
    rec.update(extra)
    return rec


def _medqa_rows(rows: Iterable[tuple[int, Mapping]], path, split: str, n_options: int) -> list[dict]:
    out = []
    for i, (line, obj) in enumerate(rows):
        question = _field(obj, "question", path, line)
        raw = _field(obj, "options", path, line, kind=(dict, list))
        # The jind11 / GBaker files store a dict; bigbio's med_qa source schema a list of {key, value}.
        if isinstance(raw, list):
            try:
                raw = {o["key"]: o["value"] for o in raw}
            except (KeyError, TypeError) as e:
                raise BenchmarkFormatError(path, line, "options", "list entries need 'key' and 'value'") from e
        options = {str(k): v for k, v in raw.items() if v is not None}
        if sorted(options) != list(LETTERS[:n_options]):
            raise BenchmarkFormatError(
                path, line, "options", f"has letters {sorted(options)}, expected {list(LETTERS[:n_options])}"
            )
        letter = _check_answer(_field(obj, "answer_idx", path, line), options, path, line, "answer_idx")
        text = obj.get("answer")
        if text is not None and text != options[letter]:
            raise BenchmarkFormatError(
                path, line, "answer", f"{text!r} differs from option {letter} {options[letter]!r}"
            )
        out.append(
            _mcq_record(
                f"{split}-{i:05d}",
                question,
                options,
                letter,
                meta_info=obj.get("meta_info", ""),
                source=f"{path}:{line}",
            )
        )
    return out


def _medmcqa_rows(rows: Iterable[tuple[int, Mapping]], path, *, cop_base: int, labelled: bool) -> list[dict]:
    """``cop`` is 1-based in the original release and 0-based in the hub copy: ``cop_base`` says which."""
    out = []
    for line, obj in rows:
        question = _field(obj, "question", path, line)
        options = {}
        for letter, key in zip("ABCD", ("opa", "opb", "opc", "opd"), strict=True):
            value = _field(obj, key, path, line, kind=(str, int, float))
            options[letter] = str(value)  # a handful of hub rows hold numbers
        cop = obj.get("cop")
        if cop is None or (not labelled and cop in (-1, "")):
            if labelled:
                raise BenchmarkFormatError(path, line, "cop", "is missing")
            answer = None
        else:
            if not isinstance(cop, int) or isinstance(cop, bool):
                raise BenchmarkFormatError(path, line, "cop", f"is {cop!r}, expected an integer")
            index = cop - cop_base
            if not 0 <= index < 4:
                raise BenchmarkFormatError(
                    path, line, "cop", f"{cop} is outside {cop_base}..{cop_base + 3} (cop_base={cop_base})"
                )
            answer = "ABCD"[index]
        out.append(
            _mcq_record(
                str(_field(obj, "id", path, line)),
                question,
                options,
                answer,
                subject=obj.get("subject_name") or "",
                topic=obj.get("topic_name") or "",
                choice_type=obj.get("choice_type") or "",
                explanation=obj.get("exp"),
                source=f"{path}:{line}",
            )
        )
    return out


def read_mmlu_csv(path: str | os.PathLike, subject: str, split: str) -> list[dict]:
    """Hendrycks' CSV: no header, ``question, A, B, C, D, answer_letter``."""
    path = pathlib.Path(path)
    out: list[dict] = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        for row in reader:
            line = reader.line_num  # the physical line where the row ends (rows can span lines)
            if len(row) != 6:
                raise BenchmarkFormatError(path, line, None, f"has {len(row)} columns, expected 6")
            options = dict(zip("ABCD", row[1:5], strict=True))
            answer = _check_answer(row[5].strip(), options, path, line, "answer")
            out.append(
                _mcq_record(
                    f"{subject}-{split}-{len(out):04d}",
                    row[0],
                    options,
                    answer,
                    subject=subject,
                    source=f"{path}:{line}",
                )
            )
    return out


def _pubmedqa_record(pmid: str, obj: Mapping, path, line=None, answer: str | None = None) -> dict:
    question = _field(obj, "QUESTION", path, line)
    contexts = _field(obj, "CONTEXTS", path, line, kind=list)
    if not all(isinstance(c, str) for c in contexts):
        raise BenchmarkFormatError(path, line, "CONTEXTS", f"item {pmid}: contexts must be strings")
    decision = obj.get("final_decision")
    answer = answer if answer is not None else decision
    if answer not in PUBMEDQA_LABELS:
        raise BenchmarkFormatError(path, line, "final_decision", f"item {pmid}: {answer!r} is not yes/no/maybe")
    return {
        "id": str(pmid),
        "question": question,
        "options": {},
        "answer": answer,
        "context": "\n".join(contexts),
        "contexts": list(contexts),
        "labels": list(obj.get("LABELS") or []),
        "long_answer": obj.get("LONG_ANSWER") or "",
        "source": f"{path}:{pmid}",
    }


def _pubmedqa_splits(pqal: Mapping[str, Mapping]) -> dict[str, list[str]]:
    """PQA-L test / fold-0 train / fold-0 dev ids, as pubmedqa's ``preprocess/split_dataset.py pqal``.

    That script seeds ``random`` with 0, splits the 1000 items label-stratified into 500 CV + 500 test,
    then the 500 CV into 10 folds; bigbio's ``pubmed_qa_labeled_fold0_source`` (MEDITRON's loader) is
    fold 0: train 450, validation 50, test 500. Replaying it reproduces test_ground_truth.json exactly,
    which ``load_benchmark`` checks.
    """
    rng = random.Random(0)

    def split(dataset: dict[str, Mapping], fold: int) -> list[dict[str, Mapping]]:
        by_label: dict[str, list[str]] = {"yes": [], "no": [], "maybe": []}
        for pmid, info in dataset.items():
            by_label[info["final_decision"]].append(pmid)
        parts = {}
        for label, pmids in by_label.items():
            rng.shuffle(pmids)
            size = math.ceil(len(pmids) / fold)
            parts[label] = [
                pmids[i * size :] if i == fold - 1 else pmids[i * size : (i + 1) * size] for i in range(fold)
            ]
        out = [{p: dataset[p] for label in by_label for p in parts[label][i]} for i in range(fold)]
        if len(out[-1]) != len(out[0]):
            for i in range(fold - 1):
                picked = rng.choice(list(out[i]))
                out[-1][picked] = out[i].pop(picked)
        return out

    cv, test = split(dict(pqal), 2)
    folds = split(cv, 10)
    return {"test": list(test), "validation": list(folds[0]), "train": [p for i in range(1, 10) for p in folds[i]]}


def _pqaa_split(pmids: list[str], split: str) -> list[str]:
    # split_dataset.py pqaa: random.seed(0), shuffle, first 200,000 train (MEDITRON's SFT set), rest dev.
    order = list(pmids)
    random.Random(0).shuffle(order)
    return order[:200_000] if split == "train" else order[200_000:]


# Benchmark -> split -> file under the shared data folder (MEDITRON's split names; "dev" = "validation").
_MEDQA_FILES = {
    "medqa_4opt": {
        "test": "phrases_no_exclude_test.jsonl",
        "validation": "phrases_no_exclude_dev.jsonl",
        "train": "phrases_no_exclude_train.jsonl",
    },
    "medqa_5opt": {"test": "test.jsonl", "validation": "dev.jsonl", "train": "train.jsonl"},
}
_SPLIT_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation"}
_NAME_ALIASES = {"medqa4": "medqa_4opt", "medqa": "medqa_5opt", "mmlu": "mmlu_medical"}


def canonical_name(name: str) -> str:
    return _NAME_ALIASES.get(name, name)


def _canonical_split(name: str, split: str) -> str:
    # MMLU's "dev" (5 few-shot rows per subject) is not its "val"; elsewhere dev means validation.
    if name.startswith("mmlu") and split == "dev":
        return split
    return _SPLIT_ALIASES.get(split, split)


def benchmark_family(name: str) -> str:
    """medqa / medmcqa / pubmedqa / mmlu: decides the instruction and the answer type."""
    name = canonical_name(name)
    for family in ("medqa", "medmcqa", "pubmedqa", "mmlu"):
        if name.startswith(family):
            return family
    raise KeyError(f"unknown benchmark {name!r}")


def _missing(path: pathlib.Path, name: str, split: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{path} does not exist: the {name!r} {split!r} split is not in the shared data "
        f"({shared_data_dir()}); put the file there or use load_benchmark_from_hub({name!r}, {split!r})"
    )


def load_benchmark(name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Records of benchmark ``name`` (``medqa_4opt``, ``medqa_5opt``, ``medmcqa``, ``pubmedqa``,
    ``pubmedqa_artificial``, ``mmlu_medical`` = the 9 scored subjects, ``mmlu_medical_all`` = all 11,
    ``mmlu_<subject>``), split ``train`` / ``validation`` (alias ``dev``) / ``test``, from local files.
    """
    name = canonical_name(name)
    split = _canonical_split(name, split)
    root = pathlib.Path(data_dir) if data_dir is not None else shared_data_dir()
    return copy.deepcopy(list(_load_cached(name, split, str(root))))


@functools.lru_cache(maxsize=64)
def _load_cached(name: str, split: str, root_str: str) -> tuple[dict, ...]:
    # Cached because SeqIO tasks and tests read the same files many times; callers get copies.
    root = pathlib.Path(root_str)
    if name in _MEDQA_FILES:
        if split not in _MEDQA_FILES[name]:
            raise KeyError(f"{name} has splits {sorted(_MEDQA_FILES[name])}, not {split!r}")
        path = root / "medqa" / _MEDQA_FILES[name][split]
        if not path.exists():
            raise _missing(path, name, split)
        return tuple(_medqa_rows(read_jsonl(path), path, split, 4 if name == "medqa_4opt" else 5))
    if name == "medmcqa":
        files = {"validation": "dev.json", "train": "train.json", "test": "test.json"}
        if split not in files:
            raise KeyError(f"medmcqa has splits {sorted(files)}, not {split!r}")
        path = root / "medmcqa" / files[split]
        if not path.exists():
            raise _missing(path, name, split)
        # The original release (MedMCQA GitHub / MIRAGE copy) numbers cop from 1.
        return tuple(_medmcqa_rows(read_jsonl(path), path, cop_base=1, labelled=split != "test"))
    if name == "pubmedqa":
        return tuple(_load_pubmedqa(root / "pubmedqa", split))
    if name == "pubmedqa_artificial":
        path = root / "pubmedqa" / "ori_pqaa.json"
        if not path.exists():
            raise _missing(path, name, split)
        with open(path, encoding="utf-8") as f:
            pqaa = json.load(f)
        return tuple(_pubmedqa_record(p, pqaa[p], path) for p in _pqaa_split(list(pqaa), split))
    if name.startswith("mmlu"):
        subjects = _mmlu_subjects(name)
        csv_split = {"validation": "val"}.get(split, split)
        if csv_split not in ("test", "dev", "val"):
            raise KeyError(f"MMLU has splits test / dev / validation, not {split!r}")
        out: list[dict] = []
        for subject in subjects:
            path = root / "mmlu_medical" / csv_split / f"{subject}_{csv_split}.csv"
            if not path.exists():
                raise _missing(path, name, split)
            out.extend(read_mmlu_csv(path, subject, csv_split))
        return tuple(out)
    raise KeyError(f"unknown benchmark {name!r}")


def _mmlu_subjects(name: str) -> tuple[str, ...]:
    if name == "mmlu_medical":
        return MMLU_MEDICAL_SCORED
    if name == "mmlu_medical_all":
        return MMLU_MEDICAL_SUBJECTS
    # "mmlu_medical_genetics" is subject medical_genetics; "mmlu_medical_anatomy" is anatomy.
    subject = name.removeprefix("mmlu_")
    if subject not in MMLU_MEDICAL_SUBJECTS:
        subject = subject.removeprefix("medical_")
    if subject not in MMLU_MEDICAL_SUBJECTS:
        raise KeyError(f"{subject!r} is not one of MEDITRON's MMLU medical subjects {MMLU_MEDICAL_SUBJECTS}")
    return (subject,)


def _load_pubmedqa(folder: pathlib.Path, split: str) -> list[dict]:
    pqal_path, gt_path = folder / "ori_pqal.json", folder / "test_ground_truth.json"
    if not pqal_path.exists() and pqal_path.with_suffix(".json.gz").exists():
        pqal_path = pqal_path.with_suffix(".json.gz")  # the embedded sample ships it compressed
    for p in (pqal_path, gt_path):
        if not p.exists():
            raise _missing(p, "pubmedqa", split)
    with _open_text(pqal_path) as f:
        pqal = json.load(f)
    with open(gt_path, encoding="utf-8") as f:
        truth = json.load(f)
    splits = _pubmedqa_splits(pqal)
    if splits["test"] != list(truth):
        raise BenchmarkFormatError(
            gt_path,
            None,
            None,
            "the replayed PQA-L split does not give these test ids; is ori_pqal.json the original 1000-item file?",
        )
    if split not in splits:
        raise KeyError(f"pubmedqa has splits {sorted(splits)}, not {split!r}")
    out = []
    for pmid in splits[split]:
        answer = truth.get(pmid) if split == "test" else None
        rec = _pubmedqa_record(pmid, pqal[pmid], pqal_path, answer=answer)
        if answer is not None and pqal[pmid].get("final_decision") != answer:
            raise BenchmarkFormatError(
                gt_path, None, pmid, f"label {answer!r} differs from ori_pqal's {pqal[pmid].get('final_decision')!r}"
            )
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------
# Hugging Face hub (the copies MEDITRON loaded). Download, then parse the local snapshot.
# ----------------------------------------------------------------------------------------------

# name -> (repo id, revision, folder inside the snapshot or None). bigbio's datasets are script-based;
# their parquet export lives on the refs/convert/parquet branch, one folder per config.
HUB_SOURCES: dict[str, tuple[str, str | None, str | None]] = {
    "medqa_4opt": ("GBaker/MedQA-USMLE-4-options", None, None),
    "medqa_5opt": ("bigbio/med_qa", "refs/convert/parquet", "med_qa_en_source"),
    "medmcqa": ("openlifescienceai/medmcqa", None, None),
    "pubmedqa": ("bigbio/pubmed_qa", "refs/convert/parquet", "pubmed_qa_labeled_fold0_source"),
    "pubmedqa_artificial": ("qiaojin/PubMedQA", None, "pqa_artificial"),
    "mmlu": ("cais/mmlu", None, None),
}
_HUB_EXTENSIONS = (".parquet", ".jsonl", ".json", ".jsonl.gz")


def hub_snapshot(name: str, *, revision: str | None = None, cache_dir: str | None = None) -> pathlib.Path:
    """Download the hub copy of ``name`` (data files only) and return the local snapshot folder."""
    from huggingface_hub import snapshot_download

    name = canonical_name(name)
    repo, default_revision, folder = HUB_SOURCES[_hub_key(name)]
    # Only the folders read: bigbio's parquet branch and cais/mmlu hold many other configs.
    folders = _mmlu_subjects(name) if name.startswith("mmlu") else ((folder,) if folder else ("",))
    patterns = [f"{f}/*{e}" if f else f"*{e}" for f in folders for e in _HUB_EXTENSIONS]
    path = snapshot_download(
        repo_id=repo,
        repo_type="dataset",
        revision=revision or default_revision,
        cache_dir=cache_dir,
        allow_patterns=patterns,
    )
    return pathlib.Path(path)


def _hub_key(name: str) -> str:
    name = canonical_name(name)
    return "mmlu" if name.startswith("mmlu") else name


def load_benchmark_from_hub(
    name: str,
    split: str,
    *,
    snapshot_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> list[dict]:
    """Records of ``name`` / ``split`` from the hub copy MEDITRON used, normalised like ``load_benchmark``.

    ``snapshot_dir``: an already-downloaded snapshot (tests pass a local copy, so nothing is fetched).
    Hub conventions handled here: MedMCQA ``cop`` is 0-based; MMLU (cais) answers are 0-3 integers,
    lukaemon's are letters in ``target``; PubMedQA from bigbio (``QUESTION``/``CONTEXTS``) or from
    qiaojin (``question``/``context.contexts``).
    """
    name = canonical_name(name)
    split = _canonical_split(name, split)
    key = _hub_key(name)
    root = (
        pathlib.Path(snapshot_dir)
        if snapshot_dir is not None
        else hub_snapshot(name, revision=revision, cache_dir=cache_dir)
    )
    folder = HUB_SOURCES[key][2]
    if key == "mmlu":
        out: list[dict] = []
        for subject in _mmlu_subjects(name):
            files = _hub_files(root, split, subfolder=subject, dev_is_validation=False)
            out.extend(_hub_mmlu(files, subject, split))
        return out
    files = _hub_files(root, split, subfolder=folder, dev_is_validation=True)
    rows = [(f, n, obj) for f in files for n, obj in _hub_rows(f)]
    if key.startswith("medqa"):
        return _medqa_rows(((n, o) for _, n, o in rows), _where(files), split, 4 if key == "medqa_4opt" else 5)
    if key == "medmcqa":
        return _medmcqa_rows(((n, o) for _, n, o in rows), _where(files), cop_base=0, labelled=split != "test")
    out = []
    for f, n, obj in rows:
        obj = _normalise_pubmedqa(obj)
        pmid = str(obj.get("pubid") or obj.get("PMID") or obj.get("id") or f"{split}-{len(out):06d}")
        out.append(_pubmedqa_record(pmid, obj, f, n))
    return out


def _where(files: Sequence[pathlib.Path]) -> pathlib.Path | str:
    return files[0] if len(files) == 1 else ",".join(str(f) for f in files)


def _hub_files(root: pathlib.Path, split: str, subfolder: str | None, dev_is_validation: bool) -> list[pathlib.Path]:
    """Data files of ``split`` in a snapshot: ``{split}-*.parquet``, ``{split}/*.parquet`` (parquet
    export), ``*_{split}.jsonl`` (GBaker), ``data/{split}-*`` ... under ``subfolder`` when given."""
    base = root / subfolder if subfolder else root
    names = {split}
    if split == "validation":
        names |= {"val", "valid"} | ({"dev"} if dev_is_validation else set())
    found = []
    for path in sorted(base.rglob("*")):
        if not path.is_file() or not path.name.endswith(_HUB_EXTENSIONS):
            continue
        parts = [p.lower() for p in path.relative_to(base).parts]
        stem = parts[-1].split(".")[0]
        tokens = set(stem.replace("-", "_").split("_")) | set(parts[:-1])
        if tokens & names:
            found.append(path)
    if not found:
        raise FileNotFoundError(f"no {split!r} data file ({', '.join(_HUB_EXTENSIONS)}) under {base}")
    return found


def _hub_rows(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
    elif path.name.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            head = f.read(1)
        if head == "[":  # a JSON array; otherwise JSON lines with a .json name (MedMCQA's habit)
            with open(path, encoding="utf-8") as f:
                yield from enumerate(json.load(f), start=1)
        else:
            yield from read_jsonl(path)
    else:
        yield from read_jsonl(path)


def _normalise_pubmedqa(obj: Mapping) -> dict:
    if "QUESTION" in obj:
        return dict(obj)
    ctx = obj.get("context") or {}
    return {
        "QUESTION": obj.get("question"),
        "CONTEXTS": list(ctx.get("contexts") or []),
        "LABELS": list(ctx.get("labels") or []),
        "final_decision": obj.get("final_decision"),
        "LONG_ANSWER": obj.get("long_answer"),
        "pubid": obj.get("pubid"),
    }


def _hub_mmlu(files: Sequence[pathlib.Path], subject: str, split: str) -> list[dict]:
    out: list[dict] = []
    for f in files:
        for n, obj in _hub_rows(f):
            if "choices" in obj:  # cais/mmlu: question, choices[4], answer 0..3
                choices = _field(obj, "choices", f, n, kind=list)
                if len(choices) != 4:
                    raise BenchmarkFormatError(f, n, "choices", f"has {len(choices)} entries, expected 4")
                options = dict(zip("ABCD", choices, strict=True))
                ans = _field(obj, "answer", f, n, kind=(int, str))
                letter = "ABCD"[ans] if isinstance(ans, int) and 0 <= ans < 4 else str(ans)
                question = _field(obj, "question", f, n)
            else:  # lukaemon/mmlu: input, A..D, target letter
                options = {k: _field(obj, k, f, n) for k in "ABCD"}
                letter, question = _field(obj, "target", f, n), _field(obj, "input", f, n)
            _check_answer(letter, options, f, n, "answer")
            out.append(
                _mcq_record(
                    f"{subject}-{split}-{len(out):04d}", question, options, letter, subject=subject, source=f"{f}:{n}"
                )
            )
    return out


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def format_mcq(question: str, options: Mapping[str, str] | Sequence[str]) -> str:
    """MEDITRON's ``format_mcq``, character for character (no stripping: its inputs were not stripped)."""
    if not question.endswith("?") and not question.endswith("."):
        question += "?"
    values = list(options.values()) if isinstance(options, Mapping) else list(options)
    lines = "\n".join(f"{LETTERS[i]}. {v}" for i, v in enumerate(values))
    return f"Question: {question}\n\nOptions:\n{lines}"


def question_text(record: Mapping[str, Any]) -> str:
    """The item as MEDITRON shows it: an MCQ block, or PubMedQA's contexts + newline + question."""
    if record["options"]:
        return format_mcq(record["question"], record["options"])
    return f"{record['context']}\n{record['question']}"


@functools.lru_cache(maxsize=4)
def _instructions(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def instruction(benchmark: str, *, cot: bool = False, path: str | os.PathLike | None = None) -> dict[str, str]:
    """``{"system", "user"}`` from MEDITRON's instructions.json (MMLU uses MedMCQA's, as MEDITRON did)."""
    path = os.fspath(path) if path is not None else os.fspath(shared_data_dir() / "meditron_eval" / "instructions.json")
    key = _INSTRUCTION_KEY[benchmark_family(benchmark)] + ("_cot" if cot else "")
    table = _instructions(path)
    if key not in table:
        raise KeyError(f"{path} has no instruction {key!r}")
    return {"system": table[key]["system"], "user": table[key]["user"]}


def select_exemplars(pool: Sequence[Mapping], k: int, seed: int) -> list[Mapping]:
    """The first k rows of ``pool`` after HF ``Dataset.shuffle(seed)`` (a numpy PCG64 permutation)."""
    if k > len(pool):
        raise ValueError(f"{k} exemplars requested from a pool of {len(pool)}")
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[int(i)] for i in order[:k]]


def fewshot_block(exemplars: Sequence[Mapping]) -> str:
    return "\n\n".join(f"{question_text(r)}\n{CUE} {r['answer']}" for r in exemplars)


def render_prompt(
    record: Mapping,
    benchmark: str,
    *,
    exemplars: Sequence[Mapping] = (),
    cot: bool = False,
    instructions_path: str | os.PathLike | None = None,
) -> str:
    """The prompt MEDITRON gives a raw (not finetuned) model: instruction, [exemplars,] item, cue."""
    inst = instruction(benchmark, cot=cot, path=instructions_path)
    body = question_text(record)
    if exemplars:
        body = f"{fewshot_block(exemplars)}\n\n{body}"
    prompt = f"{inst['system']}\n{body}\n{inst['user']}\n"
    # inference.format_prompt drops the last character when shots > 0.
    return prompt[:-1] if exemplars else prompt


def chatml_turn(role: str, text: str) -> str:
    return f"{CHATML_START}{role}\n{text}{CHATML_END}\n"


def render_chat_question(
    record: Mapping, benchmark: str, *, cot: bool = False, instructions_path: str | os.PathLike | None = None
) -> str:
    """The question turn of a finetuned model (MEDITRON.md §4): instruction, item, cue and a newline.

    The newline after the cue is the original's: its SFT prompt field ends in "\n" and is not stripped
    (epfLLM/meditron evaluation/benchmarks.py and inference.py)."""
    inst = instruction(benchmark, cot=cot, path=instructions_path)
    return chatml_turn("question", f"{inst['system']}\n{question_text(record)}\n{inst['user']}\n")


def render_chat_prompt(
    record: Mapping, benchmark: str, *, cot: bool = False, instructions_path: str | os.PathLike | None = None
) -> str:
    """Inference prompt of a finetuned model: the question turn, then the open answer header."""
    return (
        render_chat_question(record, benchmark, cot=cot, instructions_path=instructions_path)
        + f"{CHATML_START}answer\n"
    )


def cot_target(explanation: str, answer: str) -> str:
    """A chain-of-thought SFT answer: ``{explanation}.\\nThe answer is: {answer} ###``.

    The string of the original's ``Benchmark.add_instruction`` with a ``cot_column`` (epfLLM/meditron
    ``evaluation/benchmarks.py``; ``finetune_preprocessing.py`` names the columns: MedMCQA ``exp``,
    PubMedQA ``LONG_ANSWER``). No stripping: a period is appended even after a final period, as there.
    """
    return f"{explanation}.\n{CUE} {answer} ###"


def cot_explanation(record: Mapping, benchmark: str) -> str:
    """The CoT column of a record: MedMCQA's explanation (``exp``), PubMedQA's ``LONG_ANSWER``."""
    family = benchmark_family(benchmark)
    key = {"medmcqa": "explanation", "pubmedqa": "long_answer"}.get(family)
    if key is None:
        raise ValueError(f"{benchmark} has no explanation column for chain-of-thought SFT (MedMCQA and PubMedQA have)")
    text = record.get(key)
    if text is None or not str(text).strip():
        raise ValueError(f"{benchmark} item {record.get('id')} ({record.get('source', '?')}) has no {key}")
    return str(text)


def render_sft(
    record: Mapping, benchmark: str, *, cot: bool = False, instructions_path: str | os.PathLike | None = None
) -> tuple[str, str]:
    """(prompt, target) of one SFT example; the loss goes on the target (the whole answer turn).

    ``cot``: the question turn carries the ``_cot`` instruction (cue "Let's think step by step.") and the
    answer turn is :func:`cot_target` (``finetune_preprocessing.py --cot``)."""
    if record.get("answer") is None:
        raise ValueError(f"{benchmark} item {record.get('id')} has no answer; it cannot be an SFT example")
    answer = str(record["answer"])
    if cot:
        answer = cot_target(cot_explanation(record, benchmark), answer)
    return (
        render_chat_question(record, benchmark, cot=cot, instructions_path=instructions_path),
        chatml_turn("answer", answer),
    )


def has_explanation(record: Mapping) -> bool:
    """MEDITRON's MedMCQA SFT set keeps the rows whose explanation is not "None" (MEDITRON.md §4)."""
    exp = record.get("explanation")
    return exp is not None and str(exp).strip() not in ("", "None")


__all__ = [
    "BenchmarkFormatError",
    "CUE",
    "COT_CUE",
    "HUB_SOURCES",
    "MEDITRON_SEEDS",
    "MMLU_MEDICAL_SCORED",
    "MMLU_MEDICAL_SUBJECTS",
    "benchmark_family",
    "canonical_name",
    "chatml_turn",
    "cot_explanation",
    "cot_target",
    "fewshot_block",
    "format_mcq",
    "has_explanation",
    "hub_snapshot",
    "instruction",
    "load_benchmark",
    "load_benchmark_from_hub",
    "question_text",
    "read_jsonl",
    "read_mmlu_csv",
    "render_chat_prompt",
    "render_chat_question",
    "render_prompt",
    "render_sft",
    "select_exemplars",
]
