"""Benchmark readers and MEDITRON's prompt formats, on the real files in the shared data (no TensorFlow).

Expected strings are written out by hand from the raw files (see ../shared/data/SOURCES.md) and from
MEDITRON's evaluation code, not produced by the code under test.
"""

import csv
import json

import numpy as np
import pytest

from meditron_jax.data import benchmarks as bm

MEDQA_SYSTEM = (
    "You are a medical doctor taking the US Medical Licensing Examination. You need to demonstrate your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, disease, "
    "patient care, and modes of therapy. Show your ability to apply the knowledge essential for medical practice. "
    "For the following multiple-choice question, select one correct answer from A to E. Base your answer on the "
    "current and standard practices referenced in medical guidelines."
)
MEDMCQA_SYSTEM = (
    "You are a medical doctor answering realworld medical entrance exam questions. Based on your understanding of "
    "basic and clinical science, medical knowledge, and mechanisms underlying health, disease, patient care, and "
    "modes of therapy, answer the following multiple-choice question. Select one correct answer from A to D. Base "
    "your answer on the current and standard practices referenced in medical guidelines."
)
PUBMEDQA_SYSTEM = (
    "As an expert doctor in clinical science and medical knowledge, can you tell me if the following "
    "statement is correct? Answer yes, no, or maybe."
)
MEDQA_FIRST = (
    "Question: A junior orthopaedic surgery resident is completing a carpal tunnel repair with the department "
    "chairman as the attending physician. During the case, the resident inadvertently cuts a flexor tendon. The "
    "tendon is repaired without complication. The attending tells the resident that the patient will do fine, and "
    "there is no need to report this minor complication that will not harm the patient, as he does not want to make "
    "the patient worry unnecessarily. He tells the resident to leave this complication out of the operative report. "
    "Which of the following is the correct next action for the resident to take?\n\nOptions:\n"
    "A. Disclose the error to the patient and put it in the operative report\n"
    "B. Tell the attending that he cannot fail to disclose this mistake\n"
    "C. Report the physician to the ethics committee\n"
    "D. Refuse to dictate the operative report"
)
MEDMCQA_FIRST = (
    "Question: Which of the following is not true for myelinated nerve fibers:?\n\nOptions:\n"
    "A. Impulse through myelinated fibers is slower than non-myelinated fibers\n"
    "B. Membrane currents are generated at nodes of Ranvier\n"
    "C. Saltatory conduction of impulses is seen\n"
    "D. Local anesthesia is effective only when the nerve is not covered by myelin sheath"
)
ANATOMY_FIRST = (
    "Question: A lesion causing compression of the facial nerve at the stylomastoid foramen will cause "
    "ipsilateral?\n\nOptions:\nA. paralysis of the facial muscles.\n"
    "B. paralysis of the facial muscles and loss of taste.\n"
    "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
    "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation."
)
# PubMedQA test item 21214884 (position 279 of test_ground_truth.json), label "no".
PUBMEDQA_21214884 = (
    "Using polymerase chain reaction techniques, we evaluated the presence of HPV infection in human breast milk "
    "collected from 21 HPV-positive and 11 HPV-negative mothers.\n"
    "Of the 32 studied human milk specimens, no 'high-risk' HPV 16, 18, 31, 33, 35, 39, 45, 51, 52, 56, 58 or 58 "
    "DNA was detected.\n"
    "Can 'high-risk' human papillomaviruses (HPVs) be detected in human breast milk?"
)

# SOURCES.md §4: subject -> (test, dev, val) rows.
MMLU_COUNTS = {
    "anatomy": (135, 5, 14),
    "clinical_knowledge": (265, 5, 29),
    "college_biology": (144, 5, 16),
    "college_medicine": (173, 5, 22),
    "medical_genetics": (100, 5, 11),
    "professional_medicine": (272, 5, 31),
    "virology": (166, 5, 18),
    "nutrition": (306, 5, 33),
    "high_school_biology": (310, 5, 32),
    "high_school_chemistry": (203, 5, 22),
    "college_chemistry": (100, 5, 8),
}


def _letters(records):
    out = {}
    for r in records:
        out[r["answer"]] = out.get(r["answer"], 0) + 1
    return out


# ------------------------------------------------------------------ counts from the real files


def test_medqa_counts_and_answers(shared_data):
    test4 = bm.load_benchmark("medqa_4opt", "test")
    assert len(test4) == 1273
    assert _letters(test4) == {"A": 353, "B": 309, "C": 346, "D": 265}
    assert len(bm.load_benchmark("medqa_5opt", "test")) == 1273
    assert len(bm.load_benchmark("medqa_4opt", "dev")) == 1272
    assert len(bm.load_benchmark("medqa_5opt", "validation")) == 1272
    first = test4[0]
    assert first["answer"] == "B"
    assert first["options"]["B"] == "Tell the attending that he cannot fail to disclose this mistake"
    assert set(bm.load_benchmark("medqa_5opt", "test")[0]["options"]) == set("ABCDE")
    assert {r["meta_info"] for r in test4} == {"step1", "step2&3"}


def test_medmcqa_counts_cop_is_one_based(shared_data):
    dev = bm.load_benchmark("medmcqa", "validation")
    assert len(dev) == 4183
    assert _letters(dev) == {"A": 1348, "B": 1085, "C": 925, "D": 825}  # cop = 1, 2, 3, 4
    assert dev[0]["id"] == "45258d3d-b974-44dd-a161-c3fccbdadd88"
    assert dev[0]["answer"] == "A" and dev[0]["subject"] == "Physiology"


def test_pubmedqa_splits_replay_the_official_split(shared_data):
    test = bm.load_benchmark("pubmedqa", "test")
    truth = json.loads((shared_data / "pubmedqa" / "test_ground_truth.json").read_text())
    assert [r["id"] for r in test] == list(truth)
    assert len(test) == 500 and _letters(test) == {"yes": 276, "no": 169, "maybe": 55}
    assert all(r["answer"] == truth[r["id"]] and r["options"] == {} for r in test)
    train, val = bm.load_benchmark("pubmedqa", "train"), bm.load_benchmark("pubmedqa", "validation")
    assert (len(train), len(val)) == (450, 50)  # bigbio pubmed_qa_labeled_fold0
    ids = [r["id"] for r in test + train + val]
    assert len(set(ids)) == 1000


def test_mmlu_counts_per_subject(shared_data):
    for subject, (n_test, n_dev, n_val) in MMLU_COUNTS.items():
        assert len(bm.load_benchmark(f"mmlu_{subject}", "test")) == n_test, subject
        assert len(bm.load_benchmark(f"mmlu_{subject}", "dev")) == n_dev, subject
        assert len(bm.load_benchmark(f"mmlu_{subject}", "validation")) == n_val, subject
    scored = bm.load_benchmark("mmlu_medical", "test")
    assert len(bm.MMLU_MEDICAL_SCORED) == 9 and len(scored) == 1871
    assert not any("chemistry" in r["subject"] for r in scored)
    assert len(bm.load_benchmark("mmlu_medical_all", "test")) == 2174
    assert bm.load_benchmark("mmlu_anatomy", "test")[0]["answer"] == "A"


# ------------------------------------------------------------------ prompts


def test_mcq_question_blocks(shared_data):
    assert bm.question_text(bm.load_benchmark("medqa_4opt", "test")[0]) == MEDQA_FIRST
    assert bm.question_text(bm.load_benchmark("medmcqa", "dev")[0]) == MEDMCQA_FIRST
    assert bm.question_text(bm.load_benchmark("mmlu_anatomy", "test")[0]) == ANATOMY_FIRST
    # "?" only when the question does not end in "?" or "." (MEDITRON format_mcq)
    assert bm.format_mcq("Is it?", ["x"]) == "Question: Is it?\n\nOptions:\nA. x"
    assert bm.format_mcq("It is.", ["x", "y"]) == "Question: It is.\n\nOptions:\nA. x\nB. y"


def test_pubmedqa_question_block(shared_data):
    item = next(r for r in bm.load_benchmark("pubmedqa", "test") if r["id"] == "21214884")
    assert item["answer"] == "no"
    assert bm.question_text(item) == PUBMEDQA_21214884


def test_zero_shot_prompt(shared_data):
    record = bm.load_benchmark("medqa_4opt", "test")[0]
    assert bm.render_prompt(record, "medqa_4opt") == f"{MEDQA_SYSTEM}\n{MEDQA_FIRST}\nThe answer is:\n"
    cot = bm.render_prompt(record, "medqa_4opt", cot=True)
    assert cot == f"{MEDQA_SYSTEM}\n{MEDQA_FIRST}\nLet's think step by step.\n"
    # MMLU is asked with MedMCQA's instruction, as MEDITRON did.
    assert (
        bm.render_prompt(bm.load_benchmark("mmlu_anatomy", "test")[0], "mmlu_medical_anatomy")
        == f"{MEDMCQA_SYSTEM}\n{ANATOMY_FIRST}\nThe answer is:\n"
    )


def test_few_shot_prompt_draws_like_hf_shuffle(shared_data):
    pool = bm.load_benchmark("medqa_4opt", "dev")
    # HF Dataset.shuffle(seed=1234) on 1272 rows puts rows 1241, 767, 826 first (numpy PCG64 permutation).
    chosen = bm.select_exemplars(pool, 3, 1234)
    assert chosen == [pool[1241], pool[767], pool[826]]
    assert bm.select_exemplars(pool, 3, 1234) == chosen  # deterministic
    assert bm.select_exemplars(pool, 3, 432) != chosen
    record = bm.load_benchmark("medqa_4opt", "test")[0]
    prompt = bm.render_prompt(record, "medqa_4opt", exemplars=chosen)
    blocks = [f"{bm.question_text(r)}\nThe answer is: {r['answer']}" for r in chosen]
    assert prompt == MEDQA_SYSTEM + "\n" + "\n\n".join(blocks) + "\n\n" + MEDQA_FIRST + "\nThe answer is:"
    assert pool[1241]["question"].startswith("A 14-year-old boy is brought to the office by his parents")
    assert pool[1241]["answer"] == "D"


def test_chatml_prompt_and_sft_pair(shared_data):
    record = bm.load_benchmark("medmcqa", "dev")[0]
    question_turn = f"<|im_start|>question\n{MEDMCQA_SYSTEM}\n{MEDMCQA_FIRST}\nThe answer is:\n<|im_end|>\n"
    assert bm.render_chat_prompt(record, "medmcqa") == question_turn + "<|im_start|>answer\n"
    assert bm.render_sft(record, "medmcqa") == (question_turn, "<|im_start|>answer\nA<|im_end|>\n")
    item = next(r for r in bm.load_benchmark("pubmedqa", "test") if r["id"] == "21214884")
    assert bm.render_sft(item, "pubmedqa")[1] == "<|im_start|>answer\nno<|im_end|>\n"
    assert bm.render_sft(item, "pubmedqa")[0] == (
        f"<|im_start|>question\n{PUBMEDQA_SYSTEM}\n{PUBMEDQA_21214884}\nThe answer is:\n<|im_end|>\n"
    )


# ------------------------------------------------------------------ malformed rows


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


GOOD_MEDQA = {
    "question": "Q?",
    "answer": "b",
    "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
    "meta_info": "step1",
    "answer_idx": "B",
}


def test_malformed_rows_name_file_line_field(tmp_path):
    root = tmp_path / "data"
    path = _write(root / "medqa" / "phrases_no_exclude_test.jsonl", json.dumps(GOOD_MEDQA) + "\n{not json\n")
    with pytest.raises(bm.BenchmarkFormatError, match=r"phrases_no_exclude_test\.jsonl:2: is not valid JSON"):
        bm.load_benchmark("medqa_4opt", "test", data_dir=root)
    _write(path, json.dumps(GOOD_MEDQA) + "\n" + json.dumps({**GOOD_MEDQA, "answer_idx": "E"}) + "\n")
    with pytest.raises(bm.BenchmarkFormatError, match=r":2: field 'answer_idx' answer 'E' is not among"):
        bm.load_benchmark("medqa_4opt", "test", data_dir=root)
    del_q = {k: v for k, v in GOOD_MEDQA.items() if k != "question"}
    _write(path, json.dumps(del_q) + "\n")
    with pytest.raises(bm.BenchmarkFormatError, match=r":1: field 'question' is missing"):
        bm.load_benchmark("medqa_4opt", "test", data_dir=root)
    _write(path, json.dumps({**GOOD_MEDQA, "answer": "c"}) + "\n")
    with pytest.raises(bm.BenchmarkFormatError, match=r"field 'answer' 'c' differs from option B"):
        bm.load_benchmark("medqa_4opt", "test", data_dir=root)

    _write(root / "mmlu_medical" / "test" / "anatomy_test.csv", 'q1,a,b,c,d,A\n"q, 2",a,b,c,d\n')
    with pytest.raises(bm.BenchmarkFormatError, match=r"anatomy_test\.csv:2: has 5 columns, expected 6"):
        bm.load_benchmark("mmlu_anatomy", "test", data_dir=root)
    _write(root / "mmlu_medical" / "test" / "anatomy_test.csv", "q1,a,b,c,d,F\n")
    with pytest.raises(bm.BenchmarkFormatError, match=r"anatomy_test\.csv:1: field 'answer' answer 'F'"):
        bm.load_benchmark("mmlu_anatomy", "test", data_dir=root)

    row = {"id": "x", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 5}
    _write(root / "medmcqa" / "dev.json", json.dumps(row) + "\n")
    with pytest.raises(bm.BenchmarkFormatError, match=r"dev\.json:1: field 'cop' 5 is outside 1\.\.4"):
        bm.load_benchmark("medmcqa", "dev", data_dir=root)


# ------------------------------------------------------------------ hub copies (local snapshots only)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any download attempt would fail loudly


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _same_items(a, b):
    return [(r["question"], r["options"], r["answer"]) for r in a] == [
        (r["question"], r["options"], r["answer"]) for r in b
    ]


def test_hub_medmcqa_cop_is_zero_based(shared_data, tmp_path, offline):
    local = bm.load_benchmark("medmcqa", "dev")[:40]
    raw = [json.loads(line) for line in (shared_data / "medmcqa" / "dev.json").read_text().splitlines()[:40]]
    hub_rows = [{**r, "cop": r["cop"] - 1} for r in raw]  # the hub copy numbers options from 0
    _parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", hub_rows)
    _parquet(tmp_path / "data" / "train-00000-of-00001.parquet", hub_rows[:3])
    hub = bm.load_benchmark_from_hub("medmcqa", "validation", snapshot_dir=tmp_path)
    assert _same_items(hub, local)
    assert [r["id"] for r in hub] == [r["id"] for r in local]
    assert len(bm.load_benchmark_from_hub("medmcqa", "train", snapshot_dir=tmp_path)) == 3
    # Reading the original (1-based) file as if it were the hub copy must not pass silently.
    _parquet(tmp_path / "bad" / "data" / "validation-0.parquet", [{**raw[0], "cop": 4}])
    with pytest.raises(bm.BenchmarkFormatError, match="field 'cop' 4 is outside 0..3"):
        bm.load_benchmark_from_hub("medmcqa", "validation", snapshot_dir=tmp_path / "bad")


def test_hub_medqa_and_mmlu_layouts(shared_data, tmp_path, offline):
    lines = (shared_data / "medqa" / "phrases_no_exclude_test.jsonl").read_text().splitlines()[:25]
    _write(tmp_path / "gbaker" / "phrases_no_exclude_test.jsonl", "\n".join(lines) + "\n")
    hub = bm.load_benchmark_from_hub("medqa_4opt", "test", snapshot_dir=tmp_path / "gbaker")
    assert _same_items(hub, bm.load_benchmark("medqa_4opt", "test")[:25])

    # bigbio med_qa_en_source parquet export: options as a list of {key, value}.
    five = [json.loads(x) for x in (shared_data / "medqa" / "test.jsonl").read_text().splitlines()[:10]]
    rows = [{**r, "options": [{"key": k, "value": v} for k, v in r["options"].items()]} for r in five]
    _parquet(tmp_path / "bigbio" / "med_qa_en_source" / "test" / "0000.parquet", rows)
    hub5 = bm.load_benchmark_from_hub("medqa_5opt", "test", snapshot_dir=tmp_path / "bigbio")
    assert _same_items(hub5, bm.load_benchmark("medqa_5opt", "test")[:10])

    # cais/mmlu: {subject}/{split}-*.parquet, choices list, answer 0..3 (dev is not validation here).
    with open(shared_data / "mmlu_medical" / "test" / "anatomy_test.csv", encoding="utf-8", newline="") as f:
        csv_rows = list(csv.reader(f))
    cais = [{"question": r[0], "subject": "anatomy", "choices": r[1:5], "answer": "ABCD".index(r[5])} for r in csv_rows]
    _parquet(tmp_path / "cais" / "anatomy" / "test-00000-of-00001.parquet", cais)
    _parquet(tmp_path / "cais" / "anatomy" / "dev-00000-of-00001.parquet", cais[:5])
    hub_mmlu = bm.load_benchmark_from_hub("mmlu_anatomy", "test", snapshot_dir=tmp_path / "cais")
    assert len(hub_mmlu) == 135 and _same_items(hub_mmlu, bm.load_benchmark("mmlu_anatomy", "test"))
    with pytest.raises(FileNotFoundError, match="no 'validation' data file"):
        bm.load_benchmark_from_hub("mmlu_anatomy", "validation", snapshot_dir=tmp_path / "cais")


def test_hub_pubmedqa_layouts(shared_data, tmp_path, offline):
    pqal = json.loads((shared_data / "pubmedqa" / "ori_pqal.json").read_text())
    test = bm.load_benchmark("pubmedqa", "test")[:20]
    bigbio = [dict(pqal[r["id"]]) for r in test]
    _parquet(tmp_path / "bigbio" / "pubmed_qa_labeled_fold0_source" / "test" / "0000.parquet", bigbio)
    hub = bm.load_benchmark_from_hub("pubmedqa", "test", snapshot_dir=tmp_path / "bigbio")
    assert [(r["question"], r["context"], r["answer"]) for r in hub] == [
        (r["question"], r["context"], r["answer"]) for r in test
    ]
    qiaojin = [
        {
            "pubid": int(r["id"]),
            "question": pqal[r["id"]]["QUESTION"],
            "context": {"contexts": pqal[r["id"]]["CONTEXTS"], "labels": pqal[r["id"]]["LABELS"]},
            "long_answer": pqal[r["id"]]["LONG_ANSWER"],
            "final_decision": r["answer"],
        }
        for r in test
    ]
    _parquet(tmp_path / "qiaojin" / "pqa_artificial" / "train-00000-of-00001.parquet", qiaojin)
    art = bm.load_benchmark_from_hub("pubmedqa_artificial", "train", snapshot_dir=tmp_path / "qiaojin")
    assert [r["id"] for r in art] == [r["id"] for r in test]
    assert [bm.question_text(r) for r in art] == [bm.question_text(r) for r in test]


def test_hub_snapshot_is_the_only_network_call(monkeypatch):
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("offline")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(RuntimeError, match="offline"):
        bm.load_benchmark_from_hub("pubmedqa", "test")
    assert calls[0]["repo_id"] == "bigbio/pubmed_qa" and calls[0]["revision"] == "refs/convert/parquet"
    assert calls[0]["repo_type"] == "dataset"
    assert "pubmed_qa_labeled_fold0_source/*.parquet" in calls[0]["allow_patterns"]
    with pytest.raises(RuntimeError, match="offline"):
        bm.load_benchmark_from_hub("mmlu_anatomy", "test")
    assert calls[1]["repo_id"] == "cais/mmlu" and "anatomy/*.parquet" in calls[1]["allow_patterns"]


def test_exemplar_pool_must_be_large_enough():
    with pytest.raises(ValueError, match="5 exemplars requested from a pool of 3"):
        bm.select_exemplars([{}] * 3, 5, 0)
    assert np.array_equal(np.random.default_rng(7).permutation(10)[:2], [bm.select_exemplars(list(range(10)), 2, 7)][0])
