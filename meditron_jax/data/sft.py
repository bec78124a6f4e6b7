"""SFT examples → training rows: one example per row (MEDITRON), or packed with the same examples per step.

What the original did (epfLLM/Megatron-LLM, run by MEDITRON's ``finetuning/sft.py`` with
``--variable_seq_lengths --data_type instruction``): ``instruction_collator`` puts every example in its own
row, padded (to the batch's longest rounded up to 16, at most ``--seq_length`` 2,048), and cuts longer ones
on the right (losing their answer); ``finetune.py``'s ``loss_func`` is Σ mask·CE / Σ mask over the
micro-batch, i.e. a mean over answer tokens. Here:

* rows are padded to the full sequence length (static shapes; the padding carries no loss and, with
  segment id 0, no attention), so a batch of 64 rows is the original's batch of 64 examples;
* examples longer than the sequence length are counted and logged, then dropped (default: what the
  original's right cut amounts to once the answer is gone) or cut on the left of the prompt
  (``truncate_prompt_left``: the answer stays whole) or refused (``error``);
* the training step's loss is Σ w·CE / Σ w over the whole global batch (``train/step.py``), the
  original's answer-token mean; packing changes only where tokens sit, not that sum, so a packed step
  over the same examples has the same loss (segment ids keep examples from attending to each other).

Packing per step (``examples_per_batch``): each step's examples are packed first-fit into a fixed number
of rows, so a step holds exactly the examples an unpacked step would, in fewer rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf

log = logging.getLogger(__name__)

PROMPT, ANSWER = 1, 2  # role of a token; never 0, which packing reads as padding
OVERLONG_POLICIES = ("drop", "truncate_prompt_left", "error")
ROW_KEYS = (
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
)


def concat_turns(ex):
    """inputs + targets -> one token sequence and each token's role (PROMPT, ANSWER)."""
    return {
        "tokens": tf.concat([ex["inputs"], ex["targets"]], 0),
        "role": tf.concat([tf.fill(tf.shape(ex["inputs"]), PROMPT), tf.fill(tf.shape(ex["targets"]), ANSWER)], 0),
    }


def to_model(ex, pack: bool, bos_id: int):
    """{tokens, role[, tokens_segment_ids, tokens_positions]} -> the decoder features of one row."""
    tokens = ex["tokens"]
    segments = ex["tokens_segment_ids"] if pack else None
    out = {
        "decoder_target_tokens": tokens,
        "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(tokens, sequence_id=segments, bos_id=bos_id),
        "decoder_loss_weights": tf.cast(tf.equal(ex["role"], ANSWER), tf.int32),
    }
    if pack:
        out["decoder_segment_ids"] = segments
        out["decoder_positions"] = ex["tokens_positions"]
    return out


def check_policy(policy: str) -> None:
    if policy not in OVERLONG_POLICIES:
        raise ValueError(f"make_dataset.sft_overlong={policy!r}; expected one of {OVERLONG_POLICIES}")


def length_report(examples: tf.data.Dataset, length: int) -> dict[str, int]:
    """One pass over {tokens, role} examples: how many, how many longer than ``length``, how many of those
    have an answer turn that alone is longer (they cannot be kept by cutting the prompt), the longest."""

    def step(acc, ex):
        n = tf.size(ex["tokens"], out_type=tf.int64)
        answer = tf.reduce_sum(tf.cast(tf.equal(ex["role"], ANSWER), tf.int64))
        over = tf.cast(n > length, tf.int64)
        return (
            acc[0] + 1,
            acc[1] + over,
            acc[2] + over * tf.cast(answer > length, tf.int64),
            tf.maximum(acc[3], n),
        )

    zero = tf.constant(0, tf.int64)
    total, over, answer_over, longest = examples.reduce((zero, zero, zero, zero), step)
    return {
        "examples": int(total),
        "overlong": int(over),
        "answer_overlong": int(answer_over),
        "longest": int(longest),
    }


def report_overlong(name: str, split: str, report: dict[str, int], length: int, policy: str) -> None:
    """The log line of a split's lengths; ``error`` raises instead when any example is too long."""
    over = report["overlong"]
    where = f"SFT {name} {split!r}"
    if over and policy == "error":
        raise ValueError(
            f"{where}: {over} of {report['examples']} examples are longer than the sequence length {length} "
            f"(longest {report['longest']} tokens); set make_dataset.sft_overlong to 'drop' or "
            "'truncate_prompt_left', or raise the sequence length"
        )
    if not over:
        log.info(
            "%s: all %d examples fit in %d tokens (longest %d)", where, report["examples"], length, report["longest"]
        )
        return
    if policy == "drop":
        fate = "dropped"
    else:
        kept = over - report["answer_overlong"]
        fate = f"{kept} cut on the left of the prompt, {report['answer_overlong']} dropped (answer alone too long)"
    log.warning(
        "%s: %d of %d examples are longer than %d tokens (longest %d): %s (make_dataset.sft_overlong=%r)",
        where,
        over,
        report["examples"],
        length,
        report["longest"],
        fate,
        policy,
    )


def fit_to_length(examples: tf.data.Dataset, length: int, policy: str) -> tf.data.Dataset:
    """Apply the overlong policy so that every example has at most ``length`` tokens."""
    check_policy(policy)
    if policy == "truncate_prompt_left":
        answer_fits = lambda ex: tf.reduce_sum(tf.cast(tf.equal(ex["role"], ANSWER), tf.int32)) <= length  # noqa: E731
        return examples.filter(answer_fits).map(lambda ex: {k: v[-length:] for k, v in ex.items()})
    # "error" was refused before building (report_overlong); filtering keeps shapes safe all the same.
    return examples.filter(lambda ex: tf.size(ex["tokens"]) <= length)


def unpacked_rows(examples: tf.data.Dataset, length: int, bos_id: int) -> tf.data.Dataset:
    """One example per row, padded to ``length``: segment id 1 on its tokens, 0 on padding."""

    def row(ex):
        tokens, role = ex["tokens"], ex["role"]
        n = tf.size(tokens)
        pad = [[0, length - n]]
        out = {
            "decoder_target_tokens": tf.pad(tokens, pad),
            "decoder_input_tokens": tf.pad(tf.concat([[bos_id], tokens[:-1]], 0), pad),
            "decoder_loss_weights": tf.pad(tf.cast(tf.equal(role, ANSWER), tf.int32), pad),
            "decoder_segment_ids": tf.pad(tf.ones([n], tf.int32), pad),
            "decoder_positions": tf.pad(tf.range(n, dtype=tf.int32), pad),
        }
        return {k: tf.ensure_shape(v, [length]) for k, v in out.items()}

    return examples.map(row, num_parallel_calls=tf.data.AUTOTUNE)


def stream_packed_rows(examples: tf.data.Dataset, length: int, bos_id: int) -> tf.data.Dataset:
    """Examples packed in stream order into rows of ``length`` (a row's examples vary in number)."""
    packed = seqio.utils.trim_and_pack_dataset(examples, {"tokens": length, "role": length})
    return packed.map(lambda ex: to_model(ex, True, bos_id), num_parallel_calls=tf.data.AUTOTUNE)


def pack_examples(
    tokens: Sequence[np.ndarray], roles: Sequence[np.ndarray], rows: int, length: int, bos_id: int
) -> dict[str, np.ndarray]:
    """First-fit packing of examples (in order) into ``rows`` rows of ``length`` tokens.

    Raises ValueError when they do not fit: a step must hold all of its examples."""
    out = {k: np.zeros((rows, length), np.int32) for k in ROW_KEYS}
    used = np.zeros(rows, np.int64)
    segments = np.zeros(rows, np.int64)
    for i, (tok, role) in enumerate(zip(tokens, roles, strict=True)):
        n = len(tok)
        fits = np.nonzero(used + n <= length)[0]
        if n > length or not len(fits):
            raise ValueError(
                f"packing SFT examples: example {i} of {len(tokens)} ({n} tokens) does not fit in {rows} rows of "
                f"{length} tokens (filled {used.tolist()}); give a step more rows (TrainConfig.global_batch, "
                "the rows of a packed step) or fewer examples (make_dataset.examples_per_batch), or pack=False"
            )
        r, a = int(fits[0]), int(used[fits[0]])
        segments[r] += 1
        out["decoder_target_tokens"][r, a : a + n] = tok
        out["decoder_input_tokens"][r, a] = bos_id
        out["decoder_input_tokens"][r, a + 1 : a + n] = tok[:-1]
        out["decoder_loss_weights"][r, a : a + n] = role == ANSWER
        out["decoder_segment_ids"][r, a : a + n] = segments[r]
        out["decoder_positions"][r, a : a + n] = np.arange(n)
        used[r] += n
    return out


def packed_steps(
    examples: tf.data.Dataset, length: int, rows: int, examples_per_step: int, bos_id: int, drop_remainder: bool
) -> tf.data.Dataset:
    """Batches of ``rows`` rows, each holding exactly ``examples_per_step`` examples (fewer in a last,
    partial batch when ``drop_remainder`` is False)."""
    groups = examples.padded_batch(
        examples_per_step, padded_shapes={"tokens": [None], "role": [None]}, drop_remainder=drop_remainder
    )

    def pack(tokens, role):
        lengths = (role > 0).sum(axis=1)
        packed = pack_examples(
            [t[:n] for t, n in zip(tokens, lengths, strict=True)],
            [r[:n] for r, n in zip(role, lengths, strict=True)],
            rows,
            length,
            bos_id,
        )
        return [packed[k] for k in ROW_KEYS]

    def to_batch(group):
        arrays = tf.numpy_function(pack, [group["tokens"], group["role"]], [tf.int32] * len(ROW_KEYS))
        return {k: tf.ensure_shape(v, [rows, length]) for k, v in zip(ROW_KEYS, arrays, strict=True)}

    return groups.map(to_batch)
