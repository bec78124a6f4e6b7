"""Training batches shared by the sharding-equivalence tests."""

import numpy as np


def packed_batch(seed: int, vocab: int, batch: int, length: int) -> dict[str, np.ndarray]:
    """A packed training batch: two documents per row, some padding, non-trivial loss weights."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    seg = np.ones((batch, length), np.int32)
    seg[:, length // 2 :] = 2
    seg[::3, -3:] = 0
    pos = np.tile(np.concatenate([np.arange(length // 2), np.arange(length - length // 2)]), (batch, 1))
    return {
        "decoder_input_tokens": toks[:, :-1],
        "decoder_target_tokens": toks[:, 1:],
        "decoder_loss_weights": (seg > 0).astype(np.float32),
        "decoder_segment_ids": seg,
        "decoder_positions": pos.astype(np.int32),
    }
