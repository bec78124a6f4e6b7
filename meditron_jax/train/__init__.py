"""Training: MEDITRON's optimizer and the sharded train step (a loop calls `TrainStep`)."""

from meditron_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from meditron_jax.train.step import BATCH_KEYS, TrainState, TrainStep, cross_entropy_sums

__all__ = [
    "BATCH_KEYS",
    "OptimizerConfig",
    "TrainState",
    "TrainStep",
    "cross_entropy_sums",
    "learning_rate_schedule",
    "make_optimizer",
]
