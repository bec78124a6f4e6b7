"""What a training run reports: loss, perplexity, learning rate, gradient norm, tokens/s, step time split
into input wait and compute, model FLOPs utilisation, validation losses — to the console (a progress line
with ETA), ``metrics.jsonl`` and TensorBoard event files (``tf.summary``)."""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from meditron_jax import fs
from meditron_jax.config import ModelConfig
from meditron_jax.hardware import get_chip

log = logging.getLogger(__name__)


def model_flops_per_token(cfg: ModelConfig, sequence_length: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM formula: 6·N + 12·L·H·Q·T.

    PaLM (Chowdhery et al. 2022, Appendix B "Model FLOPs utilization"): N the parameters that take part in
    matmuls, L layers, H heads, Q head dimension, T sequence length; MaxText computes the same
    (``maxtext_utils.calculate_tflops_training_per_device``). N here is every weight matrix of the layers
    plus the LM head; the input embedding is a table lookup, not a matmul, so it is left out (when the
    head is tied to the embedding, the head counts once). The attention term counts the full T×T score
    matrix, as PaLM does, although causal masking could skip half of it; rematerialisation is not counted
    (that is hardware FLOPs, not model FLOPs).
    """
    d, heads, q = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    assert q is not None  # ModelConfig.__post_init__ fills it in
    attn = d * q * (2 * heads + 2 * cfg.num_kv_heads)  # q, o and k, v projections
    mlp = 3 * d * cfg.intermediate_size  # gate, up, down
    matmul_params = cfg.num_layers * (attn + mlp) + cfg.vocab_size * d
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * heads * q * sequence_length


@functools.cache
def measured_cpu_flops(n: int = 2048, repeats: int = 8) -> float:
    """FLOP/s of this host's CPU on a jitted float32 matmul (best of ``repeats``): a CPU has no data-sheet
    peak to compare against, so MFU on CPU is relative to what XLA reaches on a large dense matmul. 2048² ×
    8 (about a second) rather than a few milliseconds of work: on a shared machine a short probe caught
    whatever load was passing and gave peaks from 160 to 360 GFLOP/s in one hour (docs/performance.md)."""
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), cpu)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops_per_device(devices: Sequence, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: ``override`` (gin ``TrainConfig.peak_flops_per_device``), the chip table's
    dense bf16 figure (meditron_jax.hardware), or on CPU the measured matmul rate shared among the host's
    (possibly fake) CPU devices. None when the chip is unknown (MFU is then not reported)."""
    if override:
        return float(override)
    device = devices[0]
    try:
        chip = get_chip(device.device_kind)
    except KeyError:
        log.warning("no peak FLOP/s known for %r; set TrainConfig.peak_flops_per_device to see MFU", device.device_kind)
        return None
    if chip.peak_bf16_flops:
        return chip.peak_bf16_flops
    local = sum(1 for d in devices if d.process_index == device.process_index)
    return measured_cpu_flops() / max(1, local)


class StepMeter:
    """Wall time of the steps between two log points, split into input wait and compute.

    The loop dispatches steps asynchronously and blocks on a step's output only when it logs, so the
    host fetches batch k+1 while the device runs step k and no step is serialised for the sake of
    measuring. Both ends of an interval are synchronised (the previous log point blocked too), so the
    interval's wall time is exact; ``input_wait`` is the host time spent producing and placing batches
    (time the device may have idled, an upper bound), ``compute`` the rest. Checkpoint and validation
    time is excluded (``exclude``) and reported by their own lines.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._t0 = time.perf_counter()
        self._input = 0.0
        self._excluded = 0.0
        self.steps = 0

    @contextlib.contextmanager
    def input(self):
        t = time.perf_counter()
        yield
        self._input += time.perf_counter() - t

    @contextlib.contextmanager
    def exclude(self):
        t = time.perf_counter()
        yield
        self._excluded += time.perf_counter() - t

    def read(self) -> dict[str, float]:
        """Per-step seconds; call after blocking on the last step's output."""
        n = max(1, self.steps)
        step = (time.perf_counter() - self._t0 - self._excluded) / n
        wait = min(self._input / n, step)
        return {"step_time_s": step, "input_wait_s": wait, "compute_s": step - wait}


class MetricsWriter:
    """Console, ``metrics.jsonl`` and TensorBoard (``MODEL_DIR/tensorboard``); only process 0 writes."""

    def __init__(self, model_dir: str, total_steps: int, *, tensorboard: bool = True):
        self.total_steps = total_steps
        self.active = jax.process_index() == 0
        self.jsonl = os.path.join(model_dir, "metrics.jsonl")
        self._tb = None
        self._started = time.perf_counter()
        self._first_step: int | None = None
        if self.active and tensorboard:
            import tensorflow as tf

            self._tf = tf
            self._tb = tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard"))
            self._meta = _scalar_metadata()

    def _eta(self, step: int) -> str:
        if self._first_step is None:
            self._first_step, self._started = step, time.perf_counter()
            return "?"
        done = step - self._first_step
        if done <= 0:
            return "?"
        left = (time.perf_counter() - self._started) / done * (self.total_steps - step)
        return str(datetime.timedelta(seconds=round(left)))

    def train(self, step: int, record: Mapping[str, float]) -> None:
        if not self.active:
            return
        self._append({"kind": "train", "step": step, **record})
        r = record
        parts = [
            f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)",
            f"loss {r['loss']:.4f}",
            f"ppl {r['perplexity']:.4g}",
            f"lr {r.get('learning_rate', float('nan')):.3g}",
            f"grad_norm {r['grad_norm']:.3f}",
        ]
        if "tokens_per_s" in r:
            parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        if "mfu" in r:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if "step_time_s" in r:
            parts.append(
                f"step {1e3 * r['step_time_s']:.0f} ms (input {1e3 * r['input_wait_s']:.0f} ms, "
                f"compute {1e3 * r['compute_s']:.0f} ms)"
            )
        parts.append(f"ETA {self._eta(step)}")
        log.info(" | ".join(parts))
        self._scalars(step, {f"train/{k}": v for k, v in record.items() if k != "seconds"})

    def eval(self, step: int, losses: Mapping[str, float]) -> None:
        if not self.active or not losses:
            return
        record = {}
        for task, loss in losses.items():
            record[f"eval/{task}/loss"] = loss
            record[f"eval/{task}/perplexity"] = perplexity(loss)
        self._append({"kind": "eval", "step": step, **record})
        log.info(
            "step %d validation: %s",
            step,
            ", ".join(f"{t} loss {v:.4f} ppl {perplexity(v):.4g}" for t, v in losses.items()),
        )
        self._scalars(step, record)

    def _append(self, record: Mapping) -> None:
        with fs.open_file(self.jsonl, "a") as f:  # MODEL_DIR may be gs://...
            f.write(json.dumps(record) + "\n")

    def _scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._tb is None:
            return
        tf = self._tf
        with self._tb.as_default(step=step):
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    # tf.summary.scalar lives in the tensorboard package, which is not a dependency; this is
                    # the op it calls: a float32 tensor summary tagged for TensorBoard's scalars plugin.
                    tf.summary.write(name, tf.constant(value, tf.float32), metadata=self._meta)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _scalar_metadata():
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR,
    )


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
