"""Generation: the batched, bucketed engine (single device or sharded), sampling, TPU AOT compile."""

from meditron_jax.infer.engine import Completion, Engine
from meditron_jax.infer.generate import generate_ids, left_pad
from meditron_jax.infer.sampling import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "generate_ids", "left_pad"]
