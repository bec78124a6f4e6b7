"""SeqIO tasks: vocabulary with added tokens, GAP-REPLAY shards, benchmark evaluation and SFT tasks."""

import gzip
import json
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
import seqio
import tensorflow as tf

from meditron_jax.data import benchmarks as bm
from meditron_jax.data import tasks
from meditron_jax.data.seqio_vocab import meditron_vocabulary
from meditron_jax.data.vocabulary import CHATML_TOKENS, MEDITRON_EXTRA_TOKENS, Tokenizer

EOS = 2


# ------------------------------------------------------------------ fixtures


def _raw_documents(shared, per_source=4):
    """A few real documents per GAP-REPLAY source, crudely extracted from the raw sample files."""
    sample = shared / "gap_replay_sample"
    with zipfile.ZipFile(sample / "guidelines_cdc" / "mmsu_art_en_txt_json.zip") as z:
        cdc = json.loads(z.read(z.namelist()[0]))
    # Documents are cut to a few thousand characters to keep the tests quick.
    guidelines = [t[:5000] for t in list(cdc.values())[:per_source]]
    abstracts = []
    with gzip.open(sample / "pubmed_abstracts" / "medline16n0902.xml.gz") as f:
        for _, el in ET.iterparse(f):
            if el.tag == "MedlineCitation":
                title = el.findtext(".//ArticleTitle") or ""
                abstract = " ".join("".join(a.itertext()) for a in el.iter("AbstractText"))
                if abstract:
                    abstracts.append(f"{title}\n{abstract}")
                el.clear()
                if len(abstracts) == per_source:
                    break
    papers = []
    for path in sorted((sample / "pmc_papers").glob("*.nxml"))[:2]:
        body = " ".join(ET.parse(path).getroot().find(".//body").itertext())
        # Marker tokens as the curated papers carry them (MEDITRON.md §2).
        papers.append("# Introduction\n" + body[:3000] + " [bib_ref] Some cited title, Smith [/bib_ref]")
    wiki = (sample / "replay_general" / "valid.txt").read_text(encoding="utf-8").split("\n = ")
    replay = [w.strip()[:3000] for w in wiki[1 : per_source + 1]]
    return {"guidelines": guidelines, "pubmed_abstracts": abstracts, "pmc_papers": papers, "replay": replay}


@pytest.fixture(scope="module")
def curated(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("curated")
    docs = _raw_documents(shared_data)
    for source, texts in docs.items():
        (root / source).mkdir()
        # Replay has no validation split (MEDITRON.md §2); the others hold out their last document.
        parts = [("train", texts)] if source == "replay" else [("train", texts[:-1]), ("validation", texts[-1:])]
        for split, part in parts:
            with open(root / source / f"{split}-00000-of-00001.jsonl", "w", encoding="utf-8") as f:
                for i, text in enumerate(part):
                    f.write(json.dumps({"id": f"{source}-{split}-{i}", "source": source, "text": text}) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tasks.CURATED_ENV, str(root))
        yield root, docs


@pytest.fixture(scope="module")
def tok(shared_data):
    return Tokenizer(
        shared_data / "llama2_tokenizer" / "tokenizer.model", extra_tokens=MEDITRON_EXTRA_TOKENS + CHATML_TOKENS
    )


def _examples(task_name, split, sequence_length=None, every=None):
    """The task's examples; ``every=n`` keeps examples 0, n, 2n... (before tokenizing: quicker)."""
    shard = seqio.ShardInfo(0, every) if every else None
    ds = seqio.get_mixture_or_task(task_name).get_dataset(
        sequence_length=sequence_length, split=split, shuffle=False, shard_info=shard, try_in_mem_cache=False
    )
    return list(ds.as_numpy_iterator())


# ------------------------------------------------------------------ vocabulary


def test_tf_tokenization_matches_tokenizer(tok, shared_data):
    vocab = meditron_vocabulary(chatml=True)
    assert vocab.vocab_size == 32019 and meditron_vocabulary().vocab_size == 32017
    assert (vocab.eos_id, vocab.pad_id, vocab.bos_id) == (2, 0, 1)
    texts = [
        "",
        "plain text",
        " leading",
        "a\n\nb  c ",
        "naïve é😀 ½→∞",
        "<|im_start|>question\nWhat?<|im_end|>\n<|im_start|>answer\nB<|im_end|>\n",
        "see [bib_ref] Title, Smith [/bib_ref] and [fig_ref] Figure 1: x [/fig_ref].",
        "[table]a[/table][formula]x^2[/formula]",
        "x<|im_end|>",
        "[/bib]ing",
        "<CLS><SEP>t<EOD><MASK><PAD>",
    ]
    batch = vocab.encode_tf(tf.constant(texts))
    for text, ids in zip(texts, batch, strict=True):
        assert ids.numpy().tolist() == tok.encode(text, bos=False), text
        assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == tok.encode(text, bos=False)
    assert vocab.encode("[bib_ref]") == [32005] and vocab.encode("<|im_end|>") == [32018]
    # Plain text is plain Llama-2: the llama2.c golden ids (encoded with BOS).
    golden = json.loads((shared_data / "goldens" / "llama2_tokenizer_expected_ids.json").read_text())
    assert len(golden["cases"]) == 5
    for case in golden["cases"]:
        assert [1] + vocab.encode_tf(tf.constant(case["prompt"])).numpy().tolist() == case["expected_ids"]


# ------------------------------------------------------------------ registry


def test_registry_names():
    names = set(seqio.TaskRegistry.names())
    for source in tasks.GAP_REPLAY_SOURCES:
        assert f"gap_replay_{source}" in names
    for b in ("medqa_4opt", "medqa_5opt", "medmcqa", "pubmedqa", "mmlu_medical_anatomy"):
        for variant in ("", "_3shot", "_5shot", "_3shot_seed432", "_cot", "_chat"):
            assert f"{b}{variant}_eval" in names, (b, variant)
    assert {"medqa_sft", "medmcqa_sft", "pubmedqa_sft"} <= names
    mmlu = seqio.get_mixture_or_task("mmlu_medical_eval")
    assert sorted(t.name for t in mmlu.tasks) == sorted(f"mmlu_medical_{s}_eval" for s in bm.MMLU_MEDICAL_SCORED)
    assert len(mmlu.tasks) == 9


def test_gap_replay_rates_follow_meditron_and_gin():
    import gin

    mix = seqio.get_mixture_or_task("gap_replay")
    rates = {t.name: mix.get_rate(t) for t in mix.tasks}
    assert rates == {
        "gap_replay_guidelines": 0.002,
        "gap_replay_pubmed_abstracts": 0.117,
        "gap_replay_pmc_papers": 0.872,
        "gap_replay_replay": 0.009,
    }
    with gin.unlock_config():
        gin.bind_parameter("gap_replay_rates.replay", 0.05)
    try:
        assert mix.get_rate(seqio.get_mixture_or_task("gap_replay_replay")) == 0.05
    finally:
        gin.clear_config()


# ------------------------------------------------------------------ GAP-REPLAY tasks


@pytest.mark.slow
def test_gap_replay_task_tokenizes_appends_eos_and_splits(curated, tok):
    root, docs = curated
    length = 256
    streams = {}
    for source in tasks.GAP_REPLAY_SOURCES:
        train = docs[source] if source == "replay" else docs[source][:-1]
        pieces = [ex["targets"] for ex in _examples(f"gap_replay_{source}", "train", {"targets": length})]
        assert all(0 < len(p) <= length for p in pieces)
        assert max(len(p) for p in pieces) == length  # long documents were cut, not trimmed
        # Consecutive pieces of one document reassemble it; each document ends with EOS.
        streams[source] = np.concatenate(pieces).tolist()
        expected = [t for text in train for t in tok.encode(text, bos=False, eos=True)]
        assert streams[source] == expected, source
        assert streams[source].count(EOS) == len(train)
    assert 32005 in streams["pmc_papers"] and 32006 in streams["pmc_papers"]  # [bib_ref] [/bib_ref]
    val = _examples("gap_replay_guidelines", "validation", {"targets": 1 << 20})
    assert len(val) == 1 and val[0]["targets"][-1] == EOS
    assert seqio.get_mixture_or_task("gap_replay_replay").splits == ("train",)


def test_split_to_sequence_length_keeps_every_token():
    def lengths(n, length):
        ds = tf.data.Dataset.from_tensors({"targets": tf.range(1, n + 1)})
        out = [ex["targets"] for ex in tasks.split_to_sequence_length(ds, {"targets": length}).as_numpy_iterator()]
        assert np.concatenate(out).tolist() == list(range(1, n + 1))
        return [len(p) for p in out]

    assert lengths(10, 4) == [4, 4, 2]
    assert lengths(8, 4) == [4, 4]
    assert lengths(9, 4) == [4, 3, 2]  # not [4, 4, 1]: a last piece is never the EOS alone
    assert lengths(1, 4) == [1] and lengths(3, 4) == [3]


@pytest.mark.slow
def test_gap_replay_tfrecord_shards_read_the_same(curated, tmp_path, monkeypatch):
    root, docs = curated
    source = "pubmed_abstracts"
    (tmp_path / source).mkdir()
    with tf.io.TFRecordWriter(str(tmp_path / source / "train-00000-of-00001.tfrecord")) as w:
        for i, text in enumerate(docs[source][:-1]):
            feats = {
                k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
                for k, v in (("id", str(i)), ("source", source), ("text", text))
            }
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    jsonl = [ex["targets"].tolist() for ex in _examples(f"gap_replay_{source}", "train", {"targets": 128})]
    monkeypatch.setenv(tasks.CURATED_ENV, str(tmp_path))
    tfrec = [ex["targets"].tolist() for ex in _examples(f"gap_replay_{source}", "train", {"targets": 128})]
    assert tfrec == jsonl


def test_malformed_curated_lines_are_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(tasks.CURATED_ENV, str(tmp_path))
    (tmp_path / "guidelines").mkdir()
    shard = tmp_path / "guidelines" / "train-00000-of-00001.jsonl"
    good = json.dumps({"id": "1", "source": "guidelines", "text": "ok"})
    shard.write_text(good + "\n{broken\n")
    with pytest.raises(tf.errors.OpError, match=r"train-00000-of-00001\.jsonl:2: not valid JSON"):
        _examples("gap_replay_guidelines", "train")
    shard.write_text(good + "\n" + json.dumps({"id": "2", "source": "guidelines"}) + "\n")
    with pytest.raises(tf.errors.OpError, match=r"jsonl:2: field 'text' is missing"):
        _examples("gap_replay_guidelines", "train")
    with pytest.raises(FileNotFoundError, match="no curated shards for 'guidelines' split 'validation'"):
        _examples("gap_replay_guidelines", "validation")


# ------------------------------------------------------------------ benchmark tasks

EVAL_COUNTS = {"medqa_4opt": 1273, "medqa_5opt": 1273, "medmcqa": 4183, "pubmedqa": 500}


def test_every_eval_task_reads_the_real_files(shared_data):
    from tests.test_benchmarks import MMLU_COUNTS

    counts = dict(EVAL_COUNTS)
    counts.update({f"mmlu_medical_{s}": n for s, (n, _, _) in MMLU_COUNTS.items()})
    for bench, expected in counts.items():
        task = seqio.get_mixture_or_task(f"{bench}_eval")
        split = tasks.EVAL_SPLIT[bench]
        source = task.source.get_dataset(split=split, shuffle=False)
        assert int(source.cardinality()) == expected, bench
    # The MMLU-Medical mixture: the 9 scored subjects, 1871 items.
    mix = seqio.get_mixture_or_task("mmlu_medical_eval")
    assert sum(int(t.source.get_dataset(split="test", shuffle=False).cardinality()) for t in mix.tasks) == 1871


def test_eval_task_examples_carry_prompt_tokens_and_gold(tok):
    from tests.test_benchmarks import ANATOMY_FIRST, MEDMCQA_SYSTEM

    examples = _examples("mmlu_medical_anatomy_eval", "test")
    assert len(examples) == 135  # the whole tokenized task
    first = examples[0]
    prompt = f"{MEDMCQA_SYSTEM}\n{ANATOMY_FIRST}\nThe answer is:\n"
    assert first["inputs_pretokenized"].decode() == prompt
    assert first["inputs"].tolist() == tok.encode(prompt, bos=False)
    assert first["answer"] == b"A" and first["targets"].tolist() == tok.encode("A", bos=False)
    answers = [e["answer"].decode() for e in examples]
    assert answers == [r["answer"] for r in bm.load_benchmark("mmlu_anatomy", "test")]


def _first_source_row(task_name, split):
    # The rendered example before tokenization: cheap, the prompts are checked, not the tokenizer.
    task = seqio.get_mixture_or_task(task_name)
    return next(task.source.get_dataset(split=split, shuffle=False).take(1).as_numpy_iterator())


def test_few_shot_and_chat_eval_tasks(shared_data, tok):
    from tests.test_benchmarks import MEDQA_FIRST

    text = _first_source_row("medqa_4opt_3shot_eval", "test")["inputs"].decode()
    assert text.endswith("\n\n" + MEDQA_FIRST + "\nThe answer is:")
    assert text.count("\nThe answer is: ") == 3
    seeds = {_first_source_row(f"medqa_4opt_3shot_seed{s}_eval", "test")["inputs"] for s in bm.MEDITRON_SEEDS}
    assert len(seeds) == 3 and text.encode() in seeds  # the default 3-shot task is seed 1234
    five = _first_source_row("pubmedqa_5shot_eval", "test")["inputs"].decode()
    assert five.count("\nThe answer is: ") == 5  # exemplars from PubMedQA's train split (fold 0)
    chat = _examples("medmcqa_chat_eval", "validation", every=1000)[0]
    prompt = chat["inputs_pretokenized"].decode()
    assert prompt.startswith("<|im_start|>question\n") and prompt.endswith("<|im_end|>\n<|im_start|>answer\n")
    assert chat["inputs"].tolist() == tok.encode(prompt, bos=False)
    assert chat["inputs"][0] == 32017 and 32018 in chat["inputs"].tolist()
    # MedMCQA few-shot draws from its train split, which the shared data does not hold.
    with pytest.raises(FileNotFoundError, match="load_benchmark_from_hub"):
        _first_source_row("medmcqa_3shot_eval", "validation")


def test_sft_task_pairs(tok):
    examples = _examples("medmcqa_sft", "test", every=1000)  # its benchmark rows (validation: a train holdout)
    record = bm.load_benchmark("medmcqa", "dev")[0]
    prompt, target = bm.render_sft(record, "medmcqa")
    assert examples[0]["targets"].tolist() == tok.encode(target, bos=False)
    assert examples[0]["inputs"].tolist() == tok.encode(prompt, bos=False)
    # Tokenizing the two turns apart gives the tokens of the whole conversation (they meet at <|im_start|>).
    assert tok.encode(prompt + target, bos=False) == examples[0]["inputs"].tolist() + examples[0]["targets"].tolist()
    rows = tasks.sft_rows("medqa", "validation")
    assert len(rows) == 1272 and rows[0]["targets"].endswith("<|im_end|>\n")
    with pytest.raises(FileNotFoundError, match="train"):
        tasks.sft_rows("medqa", "train")  # MedQA's train split is not in the shared data
