"""Training metrics: the FLOPs formula against XLA's own count, peak FLOP/s, the step timer, and a real run
whose console line, metrics.jsonl, TensorBoard events (read back with TensorFlow's reader) and validation
losses (recomputed independently from the saved parameters) agree."""

import json
import os
import time
import types

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax.config import ModelConfig, get_config
from meditron_jax.model import Llama
from meditron_jax.train.metrics import StepMeter, measured_cpu_flops, model_flops_per_token, peak_flops_per_device

from .hf_utils import load_script


def test_flops_per_token_matches_xla_cost_analysis():
    """XLA's cost analysis of forward+backward counts every operation (norms, softmax, the loss too), so it
    may only exceed the model FLOPs, by a little for a model whose matmuls dominate (measured: +0.9%)."""
    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        scan_layers=False,
        attention_impl="xla",
    )
    batch, length = 2, 128
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    params = jax.eval_shape(lambda: Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])

    def loss(p, tok):
        logits = Llama(cfg).apply({"params": p}, tok)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tok[..., None], -1)[..., 0])

    cost = jax.jit(jax.grad(loss)).lower(params, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ratio = cost["flops"] / (batch * length) / model_flops_per_token(cfg, length)
    assert 1.0 <= ratio < 1.03, ratio


def test_flops_per_token_of_llama2_7b_by_hand():
    # Per layer: q,k,v,o 4·4096² + gate/up/down 3·4096·11008; 32 layers; head 32000·4096 (the input
    # embedding is a lookup). Attention: 12·L·d·T.
    n = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32000 * 4096
    assert model_flops_per_token(get_config("llama2-7b"), 4096) == 6 * n + 12 * 32 * 4096 * 4096


def test_peak_flops_per_device():
    tpu = [types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite", process_index=0)] * 4
    assert peak_flops_per_device(tpu) == 197e12
    assert peak_flops_per_device(tpu, override=1e12) == 1e12
    odd = [types.SimpleNamespace(platform="gpu", device_kind="Some GPU 3000", process_index=0)]
    assert peak_flops_per_device(odd) is None
    cpu = jax.devices()  # 8 fake devices share the host's cores
    measured = measured_cpu_flops()
    assert 1e8 < measured < 1e14
    assert peak_flops_per_device(cpu) == pytest.approx(measured / len(cpu))


def test_step_meter_splits_input_wait_and_compute():
    meter = StepMeter()
    for _ in range(3):
        with meter.input():
            time.sleep(0.03)
        time.sleep(0.05)  # "compute"
        with meter.exclude():
            time.sleep(0.1)  # a checkpoint: not part of the step
        meter.steps += 1
    t = meter.read()
    # Sleeps only last at least as long as asked; a loaded machine adds to them.
    assert 0.03 <= t["input_wait_s"] < 0.06, t
    assert 0.05 <= t["compute_s"] < 0.09, t
    assert t["step_time_s"] == pytest.approx(t["input_wait_s"] + t["compute_s"])


# -- a real run ------------------------------------------------------------------------------------------

SOURCES = ("guidelines", "pubmed_abstracts", "pmc_papers")  # replay has no validation split (MEDITRON.md §2)
STEPS, EVAL_STEPS, PEAK = 3, 2, 1e9


@pytest.fixture(scope="module")
def curated(tmp_path_factory, shared_data):
    """All four GAP-REPLAY sources (real replay text stands in for each), with validation splits."""
    root = tmp_path_factory.mktemp("curated")
    sample = shared_data / "gap_replay_sample" / "replay_general"
    for split, name, size in (("train", "input.txt", 40_000), ("validation", "valid.txt", 20_000)):
        text = (sample / name).read_text()[:size]
        docs = [text[i : i + 1000] for i in range(0, size, 1000)]
        for k, source in enumerate((*SOURCES, "replay")):
            if source == "replay" and split == "validation":
                continue
            (root / source).mkdir(exist_ok=True)
            with open(root / source / f"{split}-00000-of-00001.jsonl", "w") as f:
                for i, doc in enumerate(docs[k * 3 :] + docs[: k * 3]):  # different first batches per source
                    f.write(json.dumps({"id": f"{source}-{i}", "source": source, "text": doc}) + "\n")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, curated):
    model_dir = tmp_path_factory.mktemp("metrics") / "run"
    gin.clear_config()
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("meditron_jax").addHandler(handler)
    logging.getLogger("meditron_jax").setLevel(logging.INFO)
    try:
        load_script("train").main(
            [
                "--gin_file=runs/tiny_cpu.gin",
                f"--gin.MODEL_DIR='{model_dir}'",
                f"--gin.curated_data_dir.path='{curated}'",
                "--gin.SEQUENCE_LENGTH=64",
                f"--gin.TRAIN_STEPS={STEPS}",
                "--gin.TrainConfig.log_every=1",
                f"--gin.TrainConfig.eval_every={STEPS}",
                f"--gin.TrainConfig.eval_steps={EVAL_STEPS}",
                f"--gin.TrainConfig.peak_flops_per_device={PEAK}",
                "--gin.OptimizerConfig.warmup_steps=1",
            ]
        )
    finally:
        gin.clear_config()
        logging.getLogger("meditron_jax").removeHandler(handler)
    lines = [json.loads(line) for line in open(model_dir / "metrics.jsonl")]
    return model_dir, lines, [r.getMessage() for r in records]


@pytest.mark.slow  # the module's training run: ~45 s on 2 cores
def test_jsonl_and_console_progress(run):
    model_dir, lines, messages = run
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    cfg = ModelConfig.from_json(model_dir / "model_config.json")  # models/tiny.gin: the 32k vocabulary
    for r in train:
        assert r["perplexity"] == pytest.approx(np.exp(r["loss"]), rel=1e-12)
        assert r["step_time_s"] == pytest.approx(r["input_wait_s"] + r["compute_s"])
        assert r["tokens_per_s"] == pytest.approx(8 * 64 / r["step_time_s"])
        # MFU = model FLOP/s over the peak of all 8 devices (the peak set from gin).
        assert r["mfu"] == pytest.approx(model_flops_per_token(cfg, 64) * r["tokens_per_s"] / (8 * PEAK))
        assert r["learning_rate"] >= 0 and r["grad_norm"] > 0
    progress = [m for m in messages if m.startswith("step 3/3 (100%)")]
    assert len(progress) == 1 and "tok/s" in progress[0] and "MFU" in progress[0] and "ETA" in progress[0]
    assert "input" in progress[0] and "compute" in progress[0]


def _events(model_dir):
    import tensorflow as tf

    values = {}
    (path,) = [os.path.join(model_dir, "tensorboard", f) for f in os.listdir(model_dir / "tensorboard")]
    for event in tf.compat.v1.train.summary_iterator(path):
        for v in event.summary.value:
            assert v.metadata.plugin_data.plugin_name == "scalars" or v.tag in values
            values.setdefault(v.tag, {})[event.step] = float(tf.make_ndarray(v.tensor))
    return values


@pytest.mark.slow  # the module's training run: ~45 s on 2 cores
def test_tensorboard_events_read_back(run):
    model_dir, lines, _ = run
    events = _events(model_dir)
    train = [r for r in lines if r["kind"] == "train"]
    for key in ("loss", "perplexity", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "input_wait_s"):
        assert events[f"train/{key}"] == {r["step"]: float(np.float32(r[key])) for r in train}, key
    (ev,) = [r for r in lines if r["kind"] == "eval"]
    for source in SOURCES:
        assert events[f"eval/gap_replay_{source}/loss"] == {
            STEPS: float(np.float32(ev[f"eval/gap_replay_{source}/loss"]))
        }


@pytest.mark.slow  # the module's training run: ~45 s on 2 cores
def test_validation_loss_per_source_recomputed_independently(run, curated):
    """The eval step's loss against a plain forward pass and log-softmax cross-entropy over the same
    validation batches, with the parameters saved at that step (float32; 1e-5 relative for summation
    order across 8 shards)."""
    import orbax.checkpoint as ocp

    from meditron_jax.data.pipeline import make_iterator

    model_dir, lines, _ = run
    (ev,) = [r for r in lines if r["kind"] == "eval"]
    assert ev["step"] == STEPS
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(model_dir, "checkpoints", str(STEPS), "default"))["params"]
    params = jax.device_get(params)
    apply = jax.jit(Llama(ModelConfig.from_json(model_dir / "model_config.json")).apply)
    gin.clear_config()
    gin.bind_parameter("curated_data_dir.path", str(curated))
    losses = []
    for source in SOURCES:
        task = f"gap_replay_{source}"
        it = make_iterator(task, split="validation", shuffle=False, num_epochs=1, batch_size=8, sequence_length=64)
        num = den = 0.0
        for _ in range(EVAL_STEPS):
            b = next(it)
            logits = apply(
                {"params": params}, b["decoder_input_tokens"], b["decoder_positions"], b["decoder_segment_ids"]
            )
            x = np.asarray(logits, np.float64)
            top = x.max(-1, keepdims=True)
            logp = x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))
            ce = -np.take_along_axis(logp, b["decoder_target_tokens"][..., None], -1)[..., 0]
            num += float((ce * b["decoder_loss_weights"]).sum())
            den += float(b["decoder_loss_weights"].sum())
        np.testing.assert_allclose(ev[f"eval/{task}/loss"], num / den, rtol=1e-5)
        losses.append(num / den)
    assert len(set(losses)) == len(SOURCES)  # each source scored on its own batches
    gin.clear_config()
