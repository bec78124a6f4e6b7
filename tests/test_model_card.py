"""The Hugging Face export's model card and hub upload: the card's front matter and sections from a run's
operative config and meditron-eval's results, the upload (HfApi mocked: nothing leaves the machine), and a
model fine-tuned here from a hub id, exported with its card, generating in transformers exactly the greedy
tokens it generates in meditron_jax."""

import importlib
import json
import shutil

import numpy as np
import pytest
import yaml

from meditron_jax.config import get_config
from meditron_jax.convert import hub, model_card

from .hf_utils import random_hf_llama
from .test_hub import populate

# Handwritten: a macro used by a binding, a configurable reference, a scoped binding and a multi-line value.
OPERATIVE = """# Macros:
TRAIN_STEPS = 30
MODEL_DIR = '/runs/sft'
TrainConfig.train_steps = %TRAIN_STEPS
TrainConfig.model_dir = %MODEL_DIR
TrainConfig.mixture = 'gap_replay'
TrainConfig.init_from = 'epfl-llm/meditron-7b'
TrainConfig.global_batch = 64
OptimizerConfig.peak_lr = 2e-05
gap_replay_rates.guidelines = 0.25
gap_replay_rates.replay = 0.75
train.config = @TrainConfig()
eval/make_dataset.split = 'validation'
logical_axis_rules.rules = \\
    (('batch', ('data', 'fsdp')),
     ('length', 'sequence'))
"""

RESULTS_MD = "| benchmark | strategy | n | accuracy % |\n|---|---|---|---|\n| pubmedqa | top_token | 4 | 50.0 |\n"


def _eval_dir(tmp_path, checkpoint="x"):
    d = tmp_path / "eval_top_token"
    d.mkdir()
    rows = [{"benchmark": "pubmedqa", "strategy": "top_token", "shots": 0, "n": 4, "accuracy": 0.5}]
    (d / "results.json").write_text(json.dumps({"config": {"checkpoint": checkpoint}, "results": rows}))
    (d / "results.md").write_text(RESULTS_MD)
    return d


def _front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_operative_config_is_read_with_macros_substituted():
    b = model_card.parse_operative_config(OPERATIVE)
    assert b["TrainConfig.train_steps"] == 30 and b["TrainConfig.model_dir"] == "/runs/sft"
    assert b["train.config"] == "@TrainConfig()" and b["eval/make_dataset.split"] == "validation"
    assert b["logical_axis_rules.rules"] == (("batch", ("data", "fsdp")), ("length", "sequence"))
    with pytest.raises(ValueError, match="run/operative_config.gin: not a gin config"):
        model_card.parse_operative_config("TrainConfig.x = (", "run/operative_config.gin")


def test_card_front_matter_and_sections(tmp_path):
    cfg = get_config("tiny")
    ev = model_card.read_eval_results(str(_eval_dir(tmp_path)))
    text = model_card.render(
        cfg,
        name="me/tiny-meditron",
        source="a meditron_jax training run (step 30)",
        operative_config=OPERATIVE,
        eval_results=[ev],
        base_model="epfl-llm/meditron-7b",
        datasets=["epfl-llm/guidelines"],
        repo_id="me/tiny-meditron",
    )
    meta = _front_matter(text)
    assert meta["license"] == "llama2" and meta["language"] == ["en"]
    assert meta["base_model"] == "epfl-llm/meditron-7b" and meta["datasets"] == ["epfl-llm/guidelines"]
    assert {"medical", "llama-2"} <= set(meta["tags"])
    assert f"| hidden size | {cfg.hidden_size} |" in text and f"| layers | {cfg.num_layers} |" in text
    # Shares normalised from the rates (0.25 / 0.75 of the whole).
    assert "| guidelines | 25.0% |" in text and "| replay | 75.0% |" in text
    assert "| `TrainConfig.train_steps` | `30` |" in text and "| `OptimizerConfig.peak_lr` | `2e-05` |" in text
    assert RESULTS_MD.strip() in text and "`meditron-eval` of `x` (eval_top_token" in text
    assert 'from_pretrained("me/tiny-meditron")' in text
    bare = model_card.render(cfg, name="x", source="a Hugging Face folder")
    assert "base_model" not in _front_matter(bare) and "Not recorded" in bare


def test_eval_results_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .*results.json"):
        model_card.read_eval_results(str(tmp_path))
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'results' list"):
        model_card.read_eval_results(str(tmp_path))


def test_card_datasets_follow_the_sft_sources():
    from meditron_jax.cli.convert import SFT_TRAIN_BENCHMARK, mixture_datasets
    from meditron_jax.data.benchmarks import HUB_SOURCES
    from meditron_jax.data.tasks import SFT_SOURCES

    assert {k: v.train for k, v in SFT_SOURCES.items()} == SFT_TRAIN_BENCHMARK
    assert mixture_datasets("pubmedqa_pqal_sft") == [HUB_SOURCES["pubmedqa"][0]]
    assert mixture_datasets("gap_replay") == ["epfl-llm/guidelines"]
    assert mixture_datasets("something_else") == []


@pytest.fixture
def tiny_hf(tmp_path, shared_data):
    src, _ = random_hf_llama(tmp_path / "src")
    shutil.copy(shared_data / "llama2_tokenizer" / "tokenizer.model", tmp_path / "src" / "tokenizer.model")
    return src


def test_push_to_hub_uploads_the_export_with_its_card(tmp_path, tiny_hf, monkeypatch, capsys):
    import huggingface_hub

    from meditron_jax.cli import convert

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(importlib.import_module("huggingface_hub.constants"), "HF_HUB_OFFLINE", False)
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        # What the folder holds at upload time, minus what the ignore patterns keep local.
        from huggingface_hub.utils import filter_repo_objects

        names = sorted(p.name for p in __import__("pathlib").Path(kw["folder_path"]).iterdir())
        kept = list(filter_repo_objects(names, ignore_patterns=kw["ignore_patterns"]))
        calls.append(("upload_folder", kw["repo_id"], kw, kept))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    out = tmp_path / "hf"
    ev = _eval_dir(tmp_path, checkpoint=tiny_hf)
    argv = ["--to", "hf", "--input", tiny_hf, "--output", str(out), "--eval_results", str(ev)]
    assert convert.main([*argv, "--push_to_hub", "me/tiny", "--private"]) == 0
    (c_name, c_repo, c_kw), (u_name, u_repo, u_kw, kept) = calls
    assert (c_name, c_repo, c_kw["private"], c_kw["exist_ok"], c_kw["repo_type"]) == (
        "create_repo",
        "me/tiny",
        True,
        True,
        "model",
    )
    assert (u_name, u_repo, u_kw["folder_path"], u_kw["repo_type"]) == ("upload_folder", "me/tiny", str(out), "model")
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
        "README.md",
        "generation_config.json",
    } <= set(kept)
    assert not any(n.startswith(".") for n in kept)  # the local marker (absolute paths) stays here
    assert "uploaded" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert RESULTS_MD.strip() in card and _front_matter(card)["license"] == "llama2"
    # Refused before any conversion: a bad repository id, an offline hub, hub flags for --to orbax.
    for bad, match in [("me/tiny@main", "not a hub repository id"), ("tiny", "not a hub repository id")]:
        with pytest.raises(ValueError, match=match):
            convert.main([*argv, "--overwrite", "--push_to_hub", bad])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        convert.main([*argv, "--overwrite", "--push_to_hub", "me/tiny"])
    with pytest.raises(ValueError, match="--push_to_hub applies to --to hf"):
        convert.main(["--to", "orbax", "--input", tiny_hf, "--output", str(tmp_path / "o"), "--push_to_hub", "me/t"])
    assert len(calls) == 2


@pytest.mark.slow
def test_fine_tuned_from_a_hub_id_exports_a_card_and_generates_the_same_in_transformers(
    tmp_path, shared_data, monkeypatch
):
    import gin
    import torch
    import transformers

    import meditron_jax
    from meditron_jax.cli import convert, train
    from meditron_jax.infer.sampling import SamplingParams

    # The base model is a hub id served from a local cache: a random Llama with Llama-2's 32,000-token vocabulary.
    base = "meditron-test/tiny-llama"
    src, _ = random_hf_llama(tmp_path / "base", heads=8, kv_heads=4, hidden=64, inter=172, vocab=32000, seed=3)
    shutil.copy(shared_data / "llama2_tokenizer" / "tokenizer.model", tmp_path / "base" / "tokenizer.model")
    populate(tmp_path / "hf_cache", base, src)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub._resolved.clear()

    run = tmp_path / "sft"
    gin.clear_config()
    try:
        train.main(
            [
                "--gin_file=runs/sft_pubmedqa_pqal.gin",
                f"--gin.MODEL_DIR='{run}'",
                f"--gin.INIT_FROM='{base}'",
                "--gin.TRAIN_STEPS=2",
                "--gin.WARMUP_STEPS=1",
                "--gin.SEQUENCE_LENGTH=512",
                "--gin.GLOBAL_BATCH=8",
                "--gin.OptimizerConfig.peak_lr=5e-3",
                "--gin.TrainConfig.checkpoint_every=2",
                "--gin.TrainConfig.log_every=1",
            ]
        )
    finally:
        gin.clear_config()
    out = tmp_path / "hf"
    assert (
        convert.main(
            ["--to", "hf", "--input", str(run), "--output", str(out), "--eval_results", str(_eval_dir(tmp_path))]
        )
        == 0
    )

    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["base_model"] == base and meta["datasets"] == ["bigbio/pubmed_qa"] and meta["license"] == "llama2"
    assert "| `TrainConfig.train_steps` | `2` |" in card and "`'pubmedqa_pqal_sft'`" in card
    assert "(step 2)" in card and "| vocabulary | 32,019 |" in card

    lm = meditron_jax.load(out)
    prompt = "<|im_start|>question\nDo statins reduce mortality in elderly patients?<|im_end|>\n<|im_start|>answer\n"
    ours = lm.engine().generate([prompt], SamplingParams(max_new_tokens=24, stop_token_ids=(lm.tokenizer.eos_id,)))
    ours_ids = ours[0][0].token_ids
    ids = lm.tokenizer.encode(prompt, bos=True)
    # The card says AutoTokenizer: it reads the export's tokenizer_config.json and gives the same ids.
    assert transformers.AutoTokenizer.from_pretrained(out)(prompt)["input_ids"] == ids
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
        # The greedy paths only mean something if the logits agree: max |difference| 1e-4 in float32.
        np.testing.assert_allclose(model(torch.tensor([ids])).logits[0].numpy(), lm.logits([ids])[0], atol=1e-4)
    assert len(ours_ids) > 1 and ours_ids == theirs


def test_card_follows_init_from_to_the_pretraining_run(tmp_path):
    from meditron_jax.cli.convert import _earlier_stages

    pre = tmp_path / "pretrain"
    pre.mkdir()
    (pre / "operative_config.gin").write_text(OPERATIVE)  # gap_replay, from epfl-llm/meditron-7b, 30 steps
    sft = f"TrainConfig.mixture = 'pubmedqa_pqal_sft'\nTrainConfig.init_from = '{pre}'\nTrainConfig.train_steps = 3\n"
    stages = _earlier_stages(model_card.parse_operative_config(sft))
    assert [(folder, b["TrainConfig.init_from"]) for folder, _, b in stages] == [(str(pre), "epfl-llm/meditron-7b")]
    text = model_card.render(
        get_config("tiny"), name="x", source="run", operative_config=sft, earlier_stages=[s[:2] for s in stages]
    )
    assert f"### Earlier stage: `{pre}` (30 steps)" in text and "| guidelines | 25.0% |" in text
    assert "SeqIO mixture `pubmedqa_pqal_sft`" in text
