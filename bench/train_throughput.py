#!/usr/bin/env python
"""Training throughput on this machine's CPU: meditron_jax's sharded train step next to transformers + torch
AdamW on the same shape, against XLA's own float32 matmul rate, and (``--compare_trainer``) against what the
real trainer logs for the same shape.

Shape: a ~134M Llama-2 (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32,000), float32 parameters and
activations, batch 4 × 512, AdamW (MEDITRON's β, eps, weight decay, clip 1.0), random weights; ``--small``
is 4 layers at 2 × 256 for quick checks. Rows:

* meditron_jax: ``meditron_jax.train.step.TrainStep`` on a 1-device mesh with ``make_optimizer``;
* transformers: ``LlamaForCausalLM`` + ``torch.optim.AdamW`` + grad-norm clipping, torch threads = CPUs;
* XLA matmul: a jitted float32 4096² matmul, the machine's reference rate (best of 3, then one after every round);
* MaxText: only with ``MAXTEXT_PYTHON`` (synthetic data, same shape; parsed from its "completed step" lines).

Each row runs in its own process (``--in_process``: all in this one), compiles/warms up first (``--warmup``
steps), then the rows take turns step by step (``--steps`` each; JAX: ``block_until_ready`` on the step's
outputs) and each reports its median and fastest step: on a shared machine, rows run one after another
measure the neighbours' load as much as the code, and rows sharing one process share its heap. Model FLOPs
per token are the trainer's own (``meditron_jax.train.metrics.model_flops_per_token``: 6·N + 12·L·H·Q·T)
and the MFU column divides by the trainer's own peak (``peak_flops_per_device``: on CPU,
``measured_cpu_flops``, a 2048² matmul timed in this process), so it is the number the trainer would print.

``--compare_trainer`` also runs ``meditron_jax.cli.train.main`` in this same process (so it shares the
measured CPU peak) on the tiny recipe with ModelConfig overridden to the bench shape, on a curated folder
built from the replay sample, with ``log_every=1``, and compares the median of its ``metrics.jsonl``
``tokens_per_s`` / ``mfu`` (steps after the first, which includes compiling) with this bench's packed-batch
row, whose steps then run one between every two trainer steps (inside the trainer's checkpoint call, which
its step timing excludes): PASS when within ``--tolerance`` (10%).

    nice -n 5 python bench/train_throughput.py --compare_trainer      # the table in docs/performance.md
    python bench/train_throughput.py --small --steps 2                # quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every row runs with freed memory reused (meditron_jax/host_memory.py; MEDITRON_HOST_MALLOC=default: off).
from meditron_jax.host_memory import reuse_freed_memory  # noqa: E402

HOST_MALLOC_REUSED = reuse_freed_memory()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from meditron_jax.config import ModelConfig, get_config  # noqa: E402
from meditron_jax.train.metrics import (  # noqa: E402
    measured_cpu_flops,
    model_flops_per_token,
    peak_flops_per_device,
)

BENCH = get_config("bench-134m")  # the shape decode_throughput.py measures too


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    batch: int
    seq_len: int
    hidden: int = BENCH.hidden_size
    heads: int = BENCH.num_heads
    mlp: int = BENCH.intermediate_size
    vocab: int = BENCH.vocab_size

    def model_config(self) -> ModelConfig:
        # max_position_embeddings as in gin/models/tiny.gin, which the trainer comparison starts from.
        return ModelConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.mlp,
            num_layers=self.layers,
            num_heads=self.heads,
            num_kv_heads=self.heads,
            max_position_embeddings=1024,
        )

    def gin_bindings(self) -> list[str]:
        return [
            f"--gin.ModelConfig.vocab_size={self.vocab}",
            f"--gin.ModelConfig.hidden_size={self.hidden}",
            f"--gin.ModelConfig.intermediate_size={self.mlp}",
            f"--gin.ModelConfig.num_layers={self.layers}",
            f"--gin.ModelConfig.num_heads={self.heads}",
            f"--gin.ModelConfig.num_kv_heads={self.heads}",
            "--gin.ModelConfig.max_position_embeddings=1024",
            f"--gin.SEQUENCE_LENGTH={self.seq_len}",
            f"--gin.GLOBAL_BATCH={self.batch}",
        ]

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


DEFAULT = Shape(layers=12, batch=4, seq_len=512)
SMALL = Shape(layers=4, batch=2, seq_len=256)
# Optimizer hyperparameters shared by both rows (MEDITRON's AdamW; the LR value does not change the cost).
LR, BETAS, EPS, WD, CLIP = 3e-4, (0.9, 0.95), 1e-5, 0.1, 1.0


def _median_row(times: list[float], shape: Shape, flops_per_token: float, peak: float | None) -> dict:
    step = statistics.median(times)
    row = {
        "step_times_s": [round(t, 4) for t in times],
        "step_time_s": step,
        "best_step_time_s": min(times),
        "tokens_per_s": shape.tokens / step,
        "flops_per_token": flops_per_token,
        "gflops_per_s": flops_per_token * shape.tokens / step / 1e9,
    }
    if peak:
        row["mfu"] = flops_per_token * shape.tokens / step / peak
    return row


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def random_batch(shape: Shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, shape.vocab, (shape.batch, shape.seq_len + 1), dtype=np.int32)


def packed_batch(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
    """The five keys the trainer's pipeline feeds (meditron_jax.data.features.BATCH_KEYS): documents of random
    lengths packed into each row, positions restarting per document, every token weighted."""
    rng = np.random.default_rng(seed)
    tokens = random_batch(shape, seed)
    segments = np.zeros((shape.batch, shape.seq_len), np.int32)
    positions = np.zeros_like(segments)
    for row in range(shape.batch):
        start, doc = 0, 1
        while start < shape.seq_len:
            n = min(int(rng.integers(32, shape.seq_len // 2)), shape.seq_len - start)
            segments[row, start : start + n] = doc
            positions[row, start : start + n] = np.arange(n)
            start, doc = start + n, doc + 1
    return {
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": np.ones((shape.batch, shape.seq_len), np.float32),
        "decoder_segment_ids": segments,
        "decoder_positions": positions,
    }


class OursStepper:
    """meditron_jax's train step on a 1-device mesh, one timed (``block_until_ready``) step per call.

    ``packed``: the trainer's batch (segment ids, positions, weights); else tokens and targets only, the same
    inputs transformers gets."""

    def __init__(
        self, shape: Shape, packed: bool, config: ModelConfig | None = None, compiler_options: dict | None = None
    ):
        from meditron_jax.parallel.mesh import MeshConfig, create_mesh
        from meditron_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
        from meditron_jax.train.step import TrainStep

        self.cfg = shape.model_config() if config is None else config
        mesh = create_mesh(MeshConfig(), jax.devices()[:1])
        opt = OptimizerConfig(peak_lr=LR, warmup_steps=1, train_steps=1000, b1=BETAS[0], b2=BETAS[1], eps=EPS)
        opt = dataclasses.replace(opt, weight_decay=WD, clip_norm=CLIP)
        self.step_fn = TrainStep(
            self.cfg,
            mesh,
            make_optimizer(opt),
            lr_schedule=learning_rate_schedule(opt),
            compiler_options=compiler_options,
        )
        self.state = self.step_fn.init_state(jax.random.PRNGKey(0))
        host = packed_batch(shape)
        if not packed:
            host = {k: host[k] for k in ("decoder_input_tokens", "decoder_target_tokens")}
        self.batch = self.step_fn.shard_batch(host)
        self.times: list[float] = []
        self.loss = float("nan")

    def __call__(self) -> None:
        t = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.times.append(time.perf_counter() - t)
        self.loss = float(metrics["loss"])

    def row(self, shape: Shape, warmup: int, peak: float | None) -> dict:
        row = _median_row(self.times[warmup:], shape, model_flops_per_token(self.cfg, shape.seq_len), peak)
        row["final_loss"] = self.loss
        return row


class TorchStepper:
    """transformers' LlamaForCausalLM + torch AdamW (+ grad-norm clipping) on the same shape, one timed step
    per call."""

    def __init__(self, shape: Shape, threads: int):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        hf_cfg = LlamaConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            intermediate_size=shape.mlp,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.heads,
            max_position_embeddings=1024,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
        self.torch, self.threads = torch, threads
        self.model = LlamaForCausalLM(hf_cfg).float().train()
        # Norm scales without weight decay, as make_optimizer's mask does.
        named = list(self.model.named_parameters())
        groups = [
            {"params": [p for n, p in named if "norm" not in n], "weight_decay": WD},
            {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0},
        ]
        self.optim = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
        self.ids = torch.from_numpy(random_batch(shape)[:, :-1].astype(np.int64))
        self.cfg = shape.model_config()
        self.times: list[float] = []
        self.loss = float("nan")

    def __call__(self) -> None:
        t = time.perf_counter()
        self.optim.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optim.step()
        self.times.append(time.perf_counter() - t)
        self.loss = loss.item()

    def row(self, shape: Shape, warmup: int, peak: float | None) -> dict:
        row = _median_row(self.times[warmup:], shape, model_flops_per_token(self.cfg, shape.seq_len), peak)
        row.update(
            final_loss=self.loss,
            torch_threads=self.threads,
            attn_implementation=self.model.config._attn_implementation,
        )
        return row


def round_robin(steppers: dict, steps: int, warmup: int, matmul: dict | None = None) -> dict[str, list[int]]:
    """Warm every stepper up, then alternate them step by step, so load from other jobs on a shared machine
    falls on all of them alike (running them one after another measures the neighbours as much as the code).
    ``matmul`` (a `bench_matmul` result): one more reference matmul after every round, best of all kept.
    Returns each row's page faults per timed step (all rows share the process and its heap).

    The warm-up rounds alternate too, so the heap settles on the pattern it will be timed in (warmed up row by
    row, each of our rows faulted 0.27–0.85 M times in its first timed round; docs/performance.md, fifth
    round)."""
    faults: dict[str, list[int]] = {key: [] for key in steppers}
    for _ in range(warmup):
        for stepper in steppers.values():
            stepper()
        if matmul is not None:
            bench_matmul(matmul["n"], repeats=1)
    for _ in range(steps):
        for key, stepper in steppers.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            stepper()
            faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        if matmul is not None:
            more = bench_matmul(matmul["n"], repeats=1)["step_times_s"]
            matmul["step_times_s"] += more
            matmul["step_time_s"] = min(matmul["step_times_s"])
    return faults


def make_stepper(key: str, shape: Shape, threads: int):
    if key == "transformers":
        return TorchStepper(shape, threads)
    return OursStepper(shape, packed=key == "ours")


def serve_row(key: str, shape: Shape, warmup: int, threads: int, peak: float | None) -> int:
    """A child process of `round_robin_processes`: warm one row up, then run one step per line read from
    stdin, answering each with a JSON line; when stdin closes, the row's summary."""
    stepper = make_stepper(key, shape, threads)
    for _ in range(warmup):
        stepper()
    stepper.times.clear()
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        stepper()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(json.dumps({"step_s": stepper.times[-1], "faults": faults}), flush=True)
    print(json.dumps({"row": stepper.row(shape, 0, peak)}), flush=True)
    return 0


def _reply(proc: subprocess.Popen, key: str) -> dict:
    """The next JSON line from a row's process (other lines a library prints to stdout are passed on)."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
        print(f"[{key}] {line}", end="", file=sys.stderr)
    raise SystemExit(f"{key}: the row's process ended early (exit {proc.wait()}; see its stderr above)")


def round_robin_processes(keys: list[str], args, peak: float | None, matmul: dict) -> dict[str, dict]:
    """Each row in its own process, taking turns step by step (the parent times the reference matmul after
    every round). In one process the rows share one heap, and a step now and then grew it and page-faulted
    (0.36–0.82 M faults, +50–100% on that step; docs/performance.md, fifth round). A training run has its
    process to itself, and so does each row here."""
    cmd = [sys.executable, __file__, "--warmup", str(args.warmup), "--threads", str(args.threads)]
    cmd += ["--small"] if args.small else []
    cmd += ["--peak", repr(peak)] if peak else []
    procs = {}
    for key in keys:  # one at a time, so that compiles do not overlap
        procs[key] = subprocess.Popen(
            [*cmd, "--serve_row", key], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        _reply(procs[key], key)
    faults: dict[str, list[int]] = {key: [] for key in keys}
    for _ in range(args.steps):
        for key, proc in procs.items():
            proc.stdin.write("step\n")
            proc.stdin.flush()
            faults[key].append(_reply(proc, key)["faults"])
        more = bench_matmul(matmul["n"], repeats=1)["step_times_s"]
        matmul["step_times_s"] += more
        matmul["step_time_s"] = min(matmul["step_times_s"])
    rows = {}
    for key, proc in procs.items():
        proc.stdin.close()
        rows[key] = _reply(proc, key)["row"]
        rows[key]["page_faults_per_step"] = faults[key]
        rows[key]["own_process"] = True
        proc.wait()
    return rows


def bench_matmul(n: int = 4096, repeats: int = 3) -> dict:
    """The machine's reference rate: best of ``repeats`` (what the CPU can do when the neighbours let it)."""
    x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), jax.devices()[0])
    _MATMUL(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _MATMUL(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return {"n": n, "step_times_s": times, "step_time_s": min(times), "flops": 2.0 * n**3}


_MATMUL = jax.jit(lambda a: a @ a)  # one jit, so the reference re-timed every round compiles once


def peak_spread(samples: int = 3) -> list[float]:
    """Fresh re-measurements of the trainer's CPU peak (``measured_cpu_flops`` is cached per process): how
    much the MFU denominator of two separate runs can differ on this machine."""
    return [measured_cpu_flops.__wrapped__() for _ in range(samples)]


_MAXTEXT_STEP = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")


def bench_maxtext(shape: Shape, steps: int, warmup: int, peak: float | None, python: str | None) -> dict:
    if not python:
        return {"error": "not run: MAXTEXT_PYTHON not set"}
    if not Path(python).exists():
        return {"error": f"not run: {python} does not exist"}
    try:
        root = subprocess.run(
            [python, "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except subprocess.CalledProcessError as e:
        return {"error": f"not run: cannot import maxtext with {python}: {e.stderr[-300:]}"}
    workdir = tempfile.mkdtemp(prefix="maxtext_tp_")
    cmd = [
        python,
        "-m",
        "maxtext.trainers.pre_train.train",
        f"{root}/configs/base.yml",
        "run_name=bench_train_throughput",
        f"base_output_directory={workdir}",
        "hardware=cpu",
        "skip_jax_distributed_system=True",  # one process; its CPU path otherwise wants a launcher's job variables
        "dataset_type=synthetic",
        "enable_checkpointing=False",
        f"steps={warmup + 1 + steps}",  # one more: its step times are logged asynchronously (see below)
        f"per_device_batch_size={shape.batch}",
        f"max_target_length={shape.seq_len}",
        f"vocab_size={shape.vocab}",
        f"base_emb_dim={shape.hidden}",
        f"base_num_query_heads={shape.heads}",
        f"base_num_kv_heads={shape.heads}",
        f"base_mlp_dim={shape.mlp}",
        f"base_num_decoder_layers={shape.layers}",
        f"head_dim={shape.hidden // shape.heads}",
        "weight_dtype=float32",
        "dtype=float32",
        "remat_policy=full",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # cwd: a folder of our own; in a shared /tmp a stray module (say attr.py) shadows MaxText's imports.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    found = [(int(s), float(t)) for s, t in _MAXTEXT_STEP.findall(proc.stdout + proc.stderr)]
    # MaxText logs a step's time when the next is dispatched: the first timed line after compiling read 0.28 s
    # for a 11.7 s step (2026-12-01), so one more step is left out.
    times = [t for s, t in found if s >= warmup + 1]
    if not times:
        return {"error": f"MaxText exit {proc.returncode}, no step lines: {(proc.stderr or proc.stdout)[-300:]}"}
    row = _median_row(times, shape, model_flops_per_token(shape.model_config(), shape.seq_len), peak)
    # The table names the remat MaxText ran (its remat_policy=none also means full remat; ours runs none).
    row["note"] = next(a for a in cmd if a.startswith("remat_policy="))
    return row


# -- the trainer agreement check -------------------------------------------------------------------------


def curated_replay(root: Path, max_chars: int = 1_200_000) -> Path:
    """A curated-shard folder (the curation pipeline's format) with the replay sample's text, as
    tests/test_trainer.py builds it."""
    from meditron_jax.data.paths import shared_data_dir

    text = (shared_data_dir() / "gap_replay_sample" / "replay_general" / "input.txt").read_text()[:max_chars]
    (root / "replay").mkdir(parents=True)
    with open(root / "replay" / "train-00000-of-00001.jsonl", "w") as f:
        for i, doc in enumerate(d for d in text.split("\n\n") if d.strip()):
            f.write(json.dumps({"id": str(i), "source": "replay", "text": doc}) + "\n")
    return root


def run_trainer(shape: Shape, steps: int, workdir: Path, between=None) -> dict:
    """The real trainer (``meditron_jax.cli.train.main``) on the bench shape, log_every=1.

    ``between``: called once per trainer step inside the loop's checkpoint call, which the trainer's StepMeter
    excludes from its timing (``with meter.exclude(): ckpts.save(...)``); the bench uses it to run one of its
    own steps between two trainer steps, so both see the same load on a shared machine."""
    import gin

    from meditron_jax.cli.train import main as train_main
    from meditron_jax.train.checkpoints import Checkpoints

    model_dir = workdir / "run"
    data = curated_replay(workdir / "curated")
    argv = [
        "--gin_file=runs/tiny_cpu.gin",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.curated_data_dir.path='{data}'",
        "--gin.TrainConfig.mixture='gap_replay_replay'",
        f"--gin.TRAIN_STEPS={steps}",
        "--gin.TrainConfig.log_every=1",
        "--gin.TrainConfig.checkpoint_every=100000",  # only the forced final save (excluded from timing anyway)
        "--gin.OptimizerConfig.warmup_steps=1",
        *shape.gin_bindings(),
    ]
    original_save = Checkpoints.save

    def save(self, *args, **kwargs):
        if between is not None:
            between()
        return original_save(self, *args, **kwargs)

    gin.clear_config()
    Checkpoints.save = save
    try:
        train_main(argv)
    finally:
        Checkpoints.save = original_save
        gin.clear_config()
    records = [json.loads(line) for line in open(model_dir / "metrics.jsonl")]
    train = [r for r in records if r.get("kind") == "train"]
    stored = json.loads((model_dir / "model_config.json").read_text())
    steady = train[1:]  # step 1 includes compiling
    out = {
        "argv": argv,
        "records": [
            {k: r.get(k) for k in ("step", "tokens_per_s", "mfu", "step_time_s", "input_wait_s")} for r in train
        ],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "step_time_s": statistics.median(r["step_time_s"] for r in steady),
        "best_step_time_s": min(r["step_time_s"] for r in steady),
        "input_wait_s": statistics.median(r["input_wait_s"] for r in steady),
        "model_config": stored,
    }
    if all("mfu" in r for r in steady):
        out["mfu"] = statistics.median(r["mfu"] for r in steady)
    return out


def compare(ours: dict, trainer: dict, tolerance: float) -> dict:
    """trainer ÷ bench for the medians (the criterion) and, as a diagnostic of load drift, the best steps."""
    result = {}
    for key in ("tokens_per_s", "mfu"):
        if key in ours and key in trainer:
            ratio = trainer[key] / ours[key]
            result[key] = {
                "trainer": trainer[key],
                "bench": ours[key],
                "ratio": ratio,
                "pass": abs(ratio - 1) <= tolerance,
            }
    result["best_step_time_s"] = {
        "trainer": trainer["best_step_time_s"],
        "bench": ours["best_step_time_s"],
        "ratio": ours["best_step_time_s"] / trainer["best_step_time_s"],  # as a speed ratio, trainer ÷ bench
        "pass": None,
    }
    return result


# -- output ------------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    ref = results["matmul"]["flops"] / results["matmul"]["step_time_s"]
    theirs = results.get("transformers", {})
    lines = [
        "| implementation | tokens/s | step time s, median (best) | model GFLOP/token | achieved GFLOP/s "
        "| ÷ XLA matmul rate | MFU (trainer's peak) | ours ÷ transformers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, name in (
        ("ours", "meditron_jax TrainStep, packed batch (as the trainer)"),
        ("ours_tokens", "meditron_jax TrainStep, tokens only"),
        ("transformers", "transformers + torch AdamW"),
        ("maxtext", "MaxText"),
    ):
        r = results.get(key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | | |")
            continue
        rate = r["gflops_per_s"] * 1e9
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "—"
        # Only rows timed alternately with transformers' (same load) get the ratio.
        together = "transformers" in r.get("alternated_with", []) and "tokens_per_s" in theirs
        rel = f"{r['tokens_per_s'] / theirs['tokens_per_s']:.2f}" if together else "—"
        if key == "transformers" and "tokens_per_s" in r:
            rel = "1.00"
        if r.get("interleaved_with_trainer"):
            name += ", interleaved with the trainer's steps"
        if r.get("note"):
            name += f" ({r['note']})"
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['step_time_s']:.2f} ({r['best_step_time_s']:.2f}) | "
            f"{r['flops_per_token'] / 1e9:.3f} | {r['gflops_per_s']:.1f} | {rate / ref:.2f} | {mfu} | {rel} |"
        )
    m = results["matmul"]
    peak = results.get("peak_flops")
    lines.append(
        f"| XLA float32 matmul {m['n']}² (reference, best of {len(m['step_times_s'])}) | — | "
        f"{m['step_time_s']:.2f} | — | {ref / 1e9:.1f} | 1.00 | {f'{100 * ref / peak:.0f}%' if peak else '—'} | — |"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="4 layers, batch 2 × 256")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (median reported)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first (the first compiles; the second lets the heap grow)"
    )
    rows = ["ours", "ours_tokens", "transformers", "maxtext"]
    p.add_argument("--rows", nargs="+", default=rows, choices=rows, help="ours: the trainer's packed batch")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    p.add_argument("--maxtext_python", default=os.environ.get("MAXTEXT_PYTHON"))
    p.add_argument("--compare_trainer", action="store_true", help="also run the real trainer and compare")
    p.add_argument("--trainer_steps", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--json", help="write the numbers here")
    p.add_argument(
        "--in_process",
        action="store_true",
        help="all rows in this one process, sharing its heap (before the fifth round; default: one process each)",
    )
    p.add_argument("--serve_row", choices=rows[:3], help=argparse.SUPPRESS)  # a child of round_robin_processes
    p.add_argument("--peak", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_row:
        return serve_row(args.serve_row, SMALL if args.small else DEFAULT, args.warmup, args.threads, args.peak)
    if args.steps < 1 or args.warmup < 0 or args.trainer_steps < 2:
        p.error("--steps must be >= 1, --warmup >= 0 and --trainer_steps >= 2 (its first step compiles)")
    if args.json and os.path.exists(args.json) and os.path.getsize(args.json):
        p.error(f"--json {args.json} exists and is not empty; remove it first")
    if args.compare_trainer and "ours" not in args.rows:
        p.error("--compare_trainer compares with the meditron_jax row: keep 'ours' in --rows")

    shape = SMALL if args.small else DEFAULT
    cfg = shape.model_config()
    devices = jax.devices()
    peak = peak_flops_per_device(devices[:1])  # the trainer's own peak (CPU: measured, cached per process)
    results: dict = {
        "shape": dataclasses.asdict(shape),
        "params": cfg.num_params(),
        "device": f"{devices[0].device_kind} ({os.cpu_count()} CPUs)",
        "peak_flops": peak,
        "load_average_start": _load(),
        "command": " ".join(["python", "bench/train_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(
        f"shape {shape}, {cfg.num_params() / 1e6:.1f}M parameters, {results['device']}, "
        f"load average {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
        flush=True,
    )
    results["matmul"] = bench_matmul()
    if args.compare_trainer:
        # The bench's packed-batch row is measured interleaved with the trainer's steps (see run_trainer).
        print("meditron_jax interleaved with the trainer ...", file=sys.stderr, flush=True)
        stepper = OursStepper(shape, packed=True)
        for _ in range(max(1, args.warmup)):  # compile before the trainer starts
            stepper()
        stepper.times.clear()
        with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
            trainer = run_trainer(shape, args.trainer_steps, Path(tmp), between=stepper)
        ran = ModelConfig.from_dict(trainer["model_config"], "the trainer's model_config.json")
        if ran != cfg:
            raise SystemExit(f"the trainer ran {ran}, not the bench's {cfg}")
        trainer["flops_per_token"] = model_flops_per_token(ran, shape.seq_len)
        # Bench call k runs right after trainer step k; dropping call 1 pairs calls 2..N with the trainer's steps
        # 2..N (its step 1 compiles).
        results["ours"] = stepper.row(shape, 1, peak)
        results["ours"]["interleaved_with_trainer"] = True
        results["trainer"] = trainer
        results["agreement"] = compare(results["ours"], trainer, args.tolerance)
        del stepper
    keys = [k for k in ("ours", "ours_tokens", "transformers") if k in args.rows]
    if args.compare_trainer and "ours" in keys:
        keys.remove("ours")  # measured above, interleaved with the trainer
    if keys and not args.in_process:
        print(f"{', '.join(keys)}, one process each, alternating ...", file=sys.stderr, flush=True)
        for key, row in round_robin_processes(keys, args, peak, results["matmul"]).items():
            results[key] = row | {"alternated_with": [k for k in keys if k != key]}
    elif keys:
        steppers = {key: make_stepper(key, shape, args.threads) for key in keys}
        print(f"{', '.join(steppers)}, alternating in this process ...", file=sys.stderr, flush=True)
        faults = round_robin(steppers, args.steps, args.warmup, results["matmul"])
        for key, stepper in steppers.items():
            results[key] = stepper.row(shape, args.warmup, peak)
            results[key]["alternated_with"] = [k for k in steppers if k != key]
            results[key]["page_faults_per_step"] = faults[key]
        del steppers
    if "maxtext" in args.rows:
        results["maxtext"] = bench_maxtext(shape, args.steps, args.warmup, peak, args.maxtext_python)
    if devices[0].platform == "cpu":
        results["peak_resamples"] = peak_spread()
    results["load_average_end"] = _load()

    print(table(results))
    if "agreement" in results:
        t = results["trainer"]
        print(
            f"\ntrainer (median of steps 2..{args.trainer_steps}, log_every=1): {t['tokens_per_s']:,.0f} tok/s, "
            f"step {t['step_time_s']:.2f} s (input wait {1e3 * t['input_wait_s']:.0f} ms)"
            + (f", MFU {100 * t['mfu']:.1f}%" if "mfu" in t else "")
        )
        for key, a in results["agreement"].items():
            print(
                f"{key}: trainer {a['trainer']:.4g} / bench {a['bench']:.4g} -> {a['ratio']:.3f} "
                + (
                    f"-> {'PASS' if a['pass'] else 'FAIL'} (±{100 * args.tolerance:.0f}%)"
                    if a["pass"] is not None
                    else "(speed ratio of the fastest steps; diagnostic)"
                )
            )
    if results.get("peak_flops"):
        line = f"\nMFU peak (the trainer's, measured once in this process): {results['peak_flops'] / 1e9:.1f} GFLOP/s"
        if results.get("peak_resamples"):
            line += f"; re-measured at the end: {', '.join(f'{x / 1e9:.1f}' for x in results['peak_resamples'])}"
        print(line)
    print(f"\nload average (1/5/15 min): start {results['load_average_start']}, end {results['load_average_end']}")
    results["host_malloc_reused"] = HOST_MALLOC_REUSED
    print(f"freed host memory reused (meditron_jax/host_memory.py, all rows and MaxText): {HOST_MALLOC_REUSED}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
