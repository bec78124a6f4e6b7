"""The lm-evaluation-harness adapter gives lm-eval's own Hugging Face model's log-likelihoods.

Both run the real stories260K model (ours from the same HF folder) in float32 on a local multiple-choice
task over the shared MedQA file; per-choice log-likelihoods must agree to 1e-4 (float32 round-off of
two independent implementations). The HF tokenizer of this folder adds no BOS, so ours is told not to
either: identical token ids on both sides.
"""

import os
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="meditron-hf-datasets-"))

import lm_eval  # noqa: E402
import pytest  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from meditron_jax.eval import lm_eval_adapter  # noqa: E402

LIMIT = 8


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return lm_eval_adapter.write_local_tasks(tmp_path_factory.mktemp("tasks"))


def _loglikelihoods(model, model_args, tasks_dir, task):
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        limit=LIMIT,
        task_manager=TaskManager(include_path=str(tasks_dir)),
        log_samples=True,
        batch_size=8,
        device="cpu",
    )
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples], out["results"][task]


@pytest.mark.slow
def test_registered_and_matches_hf_model(shared_data, tasks_dir):
    assert get_model("meditron_jax") is lm_eval_adapter.MeditronJaxLM
    path = shared_data / "stories260K_hf"
    ours, our_metrics = _loglikelihoods(
        "meditron_jax", f"path={path},add_bos_token=False,dtype=float32", tasks_dir, "meditron_medqa_4opt"
    )
    ref, ref_metrics = _loglikelihoods(
        "hf", f"pretrained={path},dtype=float32,add_bos_token=False", tasks_dir, "meditron_medqa_4opt"
    )
    assert len(ours) == len(ref) == LIMIT and all(len(x) == 4 for x in ours)
    for a, b in zip(ours, ref, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    assert our_metrics["acc,none"] == ref_metrics["acc,none"]


@pytest.mark.slow
def test_rolling_matches_hf_and_generation(shared_data):
    from lm_eval.models.huggingface import HFLM

    path = str(shared_data / "stories260K_hf")
    # a 16-token window so the text spans several rolling windows
    ours = lm_eval_adapter.MeditronJaxLM(path=path, batch_size=2, max_length=16, add_bos_token=False)
    ref = HFLM(pretrained=path, dtype="float32", add_bos_token=False, max_length=16, device="cpu", batch_size=2)
    texts = ["Once upon a time there was a little girl named Lily. She liked to play outside in the sun.", "Tom ran."]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert ref.tok_encode(texts[0]) == ours.tok_encode(texts[0])  # same ids, so any difference is the model
    for a, b in zip(ours.loglikelihood_rolling(reqs), ref.loglikelihood_rolling(reqs, disable_tqdm=True), strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    gen_reqs = [
        Instance("generate_until", {}, ("Once upon a time", {"until": ["."], "max_gen_toks": 12}), 0),
        Instance("generate_until", {}, ("Lily and Tom", {"until": ["\n"], "max_gen_toks": 6}), 1),
    ]
    got = ours.generate_until(gen_reqs)
    want = ref.generate_until(gen_reqs, disable_tqdm=True)
    # greedy: the same text as lm-eval's hf model, except that HFLM decodes the new tokens alone, which drops
    # SentencePiece's leading space ("always"); the engine decodes them after the prompt (" always")
    assert [g.lstrip(" ") for g in got] == [w.lstrip(" ") for w in want], (got, want)
    assert got[1].startswith(" ")
    assert "." not in got[0] and got[0].strip()


def test_write_local_tasks_keeps_other_files(tmp_path):
    lm_eval_adapter.write_local_tasks(tmp_path)
    lm_eval_adapter.write_local_tasks(tmp_path)  # same content again: fine
    (tmp_path / "meditron_pubmedqa.yaml").write_text("mine")
    with pytest.raises(FileExistsError, match="meditron_pubmedqa.yaml exists"):
        lm_eval_adapter.write_local_tasks(tmp_path)
    assert (tmp_path / "meditron_pubmedqa.yaml").read_text() == "mine"
    rows = (tmp_path / "pubmedqa_test.jsonl").read_text().splitlines()
    assert len(rows) == 500
