"""MEDITRON's optimizer: AdamW + linear warmup + cosine decay, global-norm gradient clipping.

MEDITRON.md §3: AdamW β1 0.9, β2 0.95, eps 1e-5, weight decay 0.1, clip 1.0; peak LR 3e-4 (7B) / 1.5e-4 (70B);
2,000 warmup steps then cosine. The paper's chosen run sets the cosine horizon to **2 epochs while training
1**, so training stops half-way down the cosine (7B ends near 1.6e-4 with a 10%-of-peak floor): the decay
phase lasts ``horizon_factor × (train_steps − warmup)`` and defaults to that behaviour. Like Megatron, norm
scales get no weight decay.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
import optax


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    peak_lr: float = 3e-4  # 7B; 70B uses 1.5e-4
    warmup_steps: int = 2000
    train_steps: int = 14_252  # 7B: 46.7B tokens / (1,600 × 2,048) tokens per step ≈ one epoch
    # Cosine horizon: the decay phase lasts horizon_factor × (train_steps − warmup_steps), so training ends
    # at 1 / horizon_factor of the way down the cosine (MEDITRON: 2 epochs while training 1 → half-way,
    # 7B ≈ 1.65e-4). decay_steps, if set, is the total schedule length instead (warmup included).
    horizon_factor: float = 2.0
    decay_steps: int | None = None
    end_lr_ratio: float = 0.1  # cosine floor as a fraction of peak (paper: 10%; the README says 1e-6)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    mu_dtype: str | None = None  # e.g. "bfloat16" to halve the first moment's memory

    def __post_init__(self):
        # The schedule's own consistency (horizon vs warmup) is checked when it is built, not here: the trainer
        # sets train_steps from TrainConfig after gin made this object with the default.
        if self.warmup_steps < 0 or self.train_steps <= 0:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be >= 0 and train_steps {self.train_steps} > 0")

    def check_schedule(self) -> None:
        if self.horizon_steps < self.warmup_steps:
            raise ValueError(
                f"OptimizerConfig: cosine horizon {self.horizon_steps} steps (train_steps {self.train_steps}, "
                f"horizon_factor {self.horizon_factor}, decay_steps {self.decay_steps}) is shorter than "
                f"warmup_steps {self.warmup_steps}"
            )

    @property
    def horizon_steps(self) -> int:
        """Total schedule length, warmup included (optax's ``decay_steps``)."""
        if self.decay_steps is not None:
            return int(self.decay_steps)
        return self.warmup_steps + int(round(self.horizon_factor * (self.train_steps - self.warmup_steps)))

    @property
    def end_lr(self) -> float:
        return self.peak_lr * self.end_lr_ratio


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """0 → peak linearly over warmup, then cosine from peak to end_lr at the horizon (flat after it)."""
    config.check_schedule()
    if config.warmup_steps == 0 and config.horizon_steps == 0:
        return optax.constant_schedule(config.peak_lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.peak_lr,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.horizon_steps, config.warmup_steps + 1),
        end_value=config.end_lr,
    )


def decay_mask(params):
    """True for parameters that get weight decay: everything but normalisation scales (Megatron's rule)."""

    def keep(path, _):
        return not any("norm" in str(getattr(k, "key", getattr(k, "name", ""))) for k in path)

    return jax.tree_util.tree_map_with_path(keep, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Megatron-LLM's clipping, which MEDITRON trained with (``megatron/optimizer/clip_grads.py``; torch's
    ``clip_grad_norm_`` is the same): when ``max_norm / (norm + 1e-6)`` is below 1, every gradient is
    multiplied by it, else left as it is.

    One scalar factor, which XLA fuses into the moment updates. optax's ``clip_by_global_norm`` selects
    between g and (g / norm) · max_norm, and XLA:CPU kept that division as a gradient-sized temporary per
    parameter, written once and read by both moments (docs/performance.md). ``update`` takes the norm as
    the extra argument ``global_norm`` when the caller has it (``TrainStep`` does), so that the gradients
    are not read once more, or materialised, to compute it. It must be the norm of what this transformation
    receives: ``TrainStep`` passes its gradients' norm, right when the clip comes first in the chain, as in
    ``make_optimizer``'s.
    """

    def update(updates, state, params=None, *, global_norm=None, **extra_args):
        del params, extra_args
        norm = optax.global_norm(updates) if global_norm is None else global_norm
        factor = jnp.minimum(max_norm / (norm + 1e-6), 1.0)  # 1.0 exactly: unchanged
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(config: OptimizerConfig | None = None) -> optax.GradientTransformation:
    config = OptimizerConfig() if config is None else config
    chain = []
    if config.clip_norm is not None:
        chain.append(clip_by_global_norm(config.clip_norm))
    chain.append(
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
            mu_dtype=None if config.mu_dtype is None else jnp.dtype(config.mu_dtype),
        )
    )
    return optax.chain(*chain)
