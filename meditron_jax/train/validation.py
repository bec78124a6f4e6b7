"""Periodic validation loss per task of the training mixture (per GAP-REPLAY source, per SFT task).

The first ``eval_steps`` batches of each task's ``validation`` split are read once, unshuffled, and kept
on the host, so every evaluation scores the same tokens and the curves are comparable across steps.
"""

from __future__ import annotations

import itertools
import logging

import jax
import numpy as np

from meditron_jax.parallel import distributed

log = logging.getLogger(__name__)


def validation_tasks(mixture: str) -> list[str]:
    """Tasks of ``mixture`` (or the task itself) that have a ``validation`` split."""
    import seqio

    import meditron_jax.data.tasks  # noqa: F401  (registers the tasks)

    provider = seqio.get_mixture_or_task(mixture)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    return sorted(t.name for t in tasks if "validation" in t.splits)


class Validation:
    def __init__(self, step_fn, mixture: str, eval_steps: int, global_batch: int, check_batch=None, **data_kwargs):
        from meditron_jax.data.pipeline import make_iterator

        self.step_fn = step_fn
        self.global_batch = global_batch
        self.batches: dict[str, list] = {}
        tasks = validation_tasks(mixture)
        if not tasks:
            log.warning("mixture %r has no task with a validation split: no validation loss", mixture)
        for task in tasks:
            try:
                it = make_iterator(
                    task, split="validation", shuffle=False, num_epochs=1, batch_size=global_batch, **data_kwargs
                )
                batches = list(itertools.islice(it, eval_steps))
            except Exception as e:  # noqa: BLE001 - e.g. no curated validation shards for this source
                # First line only: gin appends "In call to configurable ..." lines that say nothing here.
                reason = (str(e).splitlines() or [""])[0]
                log.warning("no validation loss for %s: %s: %s", task, type(e).__name__, reason)
                continue
            if not batches:
                log.warning(
                    "validation split of %s is smaller than one batch of %d rows: not evaluated", task, global_batch
                )
                continue
            if check_batch is not None:
                for b in batches:
                    check_batch(b, task)
            self.batches[task] = batches
        if self.batches:
            log.info(
                "validation: %s",
                ", ".join(f"{t} ({len(b)} batch{'es' if len(b) > 1 else ''})" for t, b in self.batches.items()),
            )

    def run(self, params) -> dict[str, float]:
        """Token-weighted mean loss per task: Σ w·CE / Σ w over its batches."""
        sums = {}
        for task, batches in self.batches.items():
            total = None
            for b in batches:
                batch = distributed.global_batch(b, self.step_fn.batch_sharding, self.global_batch)
                s = self.step_fn.eval_loss(params, batch)
                total = s if total is None else jax.tree.map(lambda x, y: x + y, total, s)
            sums[task] = total
        out = {}
        for task, (num, den) in jax.device_get(sums).items():
            out[task] = float(np.asarray(num) / max(float(den), 1.0))
        return out
