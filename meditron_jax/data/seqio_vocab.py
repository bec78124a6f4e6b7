"""A SeqIO vocabulary for Llama-2 SentencePiece plus added tokens (MEDITRON markers, ChatML).

``seqio.SentencePieceVocabulary`` cannot give ids past the SentencePiece pieces, so the 17 MEDITRON
tokens (ids 32000-32016) and ChatML's ``<|im_start|>``/``<|im_end|>`` (32017, 32018) would be split into
ordinary pieces. This vocabulary matches them as whole strings first, exactly as
:class:`meditron_jax.data.vocabulary.Tokenizer` does (its ``encode(text, bos=False)`` is the Python
path here), and does the same in TensorFlow so tokenization runs inside ``tf.data`` with no Python
call: the pipeline stays fast and its iterator can be checkpointed.

Text between added tokens is encoded like Tokenizer: each piece on its own, with SentencePiece's
dummy-prefix space (HF's legacy Llama tokenizer, which Llama-2 and MEDITRON ship, does the same).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence

import seqio
import tensorflow as tf
import tensorflow_text as tf_text

from meditron_jax.data.paths import shared_path
from meditron_jax.data.vocabulary import CHATML_TOKENS, MEDITRON_EXTRA_TOKENS, Tokenizer


class AddedTokensVocabulary(seqio.Vocabulary):
    """SentencePiece ids, then ``extra_tokens`` at ``base_vocab_size + i``. Pads with 0, EOS is ``</s>``."""

    def __init__(self, sentencepiece_model_file: str | os.PathLike, extra_tokens: Sequence[str] = ()):
        self._model_file = os.fspath(sentencepiece_model_file)
        self._extra_tokens = tuple(extra_tokens)
        self._tok: Tokenizer | None = None  # loaded lazily: registering tasks must not need the file
        super().__init__(extra_ids=0)

    # --- Python side -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tok is None:
            self._tok = Tokenizer(self._model_file, extra_tokens=self._extra_tokens)
        return self._tok

    @property
    def extra_tokens(self) -> tuple[str, ...]:
        return self._extra_tokens

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def unk_id(self) -> int:
        return self.tokenizer._sp.unk_id()

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, bos=False)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) != self.pad_id])

    # --- TensorFlow side ---------------------------------------------------------------------
    @functools.cached_property
    def _tf_state(self):
        # Plain Python values only: tensors made here would leak between tf.data function graphs.
        pattern = "(" + "|".join(re.escape(t) for t in sorted(self._extra_tokens, key=len, reverse=True)) + ")"
        return self.tokenizer.seqio_vocabulary.sp_model, pattern

    # Nothing here to convert. make_dataset already traces its tasks without AutoGraph; this covers a task
    # used through SeqIO directly, whose tokenize AutoGraph converts.
    @tf.autograph.experimental.do_not_convert
    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        s = tf.convert_to_tensor(s, dtype=tf.string)
        ids = self._encode_strings(tf.reshape(s, [-1]))
        return ids[0] if s.shape.rank == 0 else ids

    @functools.cached_property
    def _encode_strings(self):
        # One traced function per vocabulary and process, called from every tf.data map that tokenizes: each
        # SeqIO task traced its ~800 ops again, 0.5-1 s per source per pipeline (docs/performance.md).
        # Explicit TF control flow only, so no AutoGraph (it would convert tf_text's tokenizer for nothing).
        return tf.function(self._encode_flat, input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)

    def _encode_flat(self, batch: tf.Tensor) -> tf.RaggedTensor:
        model, pattern = self._tf_state
        sp = tf_text.SentencepieceTokenizer(model=model, out_type=tf.int32)
        if not self._extra_tokens:
            return sp.tokenize(batch).with_row_splits_dtype(tf.int64)
        # Most text holds no added token: skip the splitting machinery (3x slower) for it.
        found = tf.reduce_any(tf.strings.regex_full_match(batch, f"(?s).*{pattern}.*"))
        return tf.cond(
            found,
            lambda: self._encode_batch(batch, sp, pattern),
            lambda: sp.tokenize(batch).with_row_splits_dtype(tf.int64),
        )

    def _encode_batch(self, batch, sp, pattern) -> tf.RaggedTensor:
        # Split on the added tokens, keeping them as pieces of their own.
        pieces = tf_text.regex_split(batch, pattern, pattern)
        flat = pieces.flat_values
        # Which added token a piece is (a [pieces, added tokens] comparison; there are at most 19).
        matches = tf.equal(tf.expand_dims(flat, 1), tf.constant(self._extra_tokens)[tf.newaxis, :])
        is_added = tf.reduce_any(matches, axis=1)
        added = tf.cast(tf.argmax(tf.cast(matches, tf.int32), axis=1), tf.int32) + self.tokenizer.base_vocab_size
        # Every other piece is encoded on its own, dummy-prefix space included (Tokenizer.encode).
        plain = sp.tokenize(tf.where(is_added, tf.constant(""), flat))
        single = tf.RaggedTensor.from_row_lengths(tf.boolean_mask(added, is_added), tf.cast(is_added, tf.int64))
        per_piece = tf.concat([plain, single], axis=1)  # one of the two is empty on every row
        return tf.RaggedTensor.from_row_splits(per_piece, pieces.row_splits).merge_dims(1, 2)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        # Decoding is for logging and evaluation only, so a Python call is acceptable here.
        def decode(arr):
            arr = arr.numpy()
            if arr.ndim == 1:
                return self._decode(arr.tolist()).encode("utf-8")
            return [self._decode(row.tolist()).encode("utf-8") for row in arr]

        out = tf.py_function(decode, [ids], tf.string)
        out.set_shape(ids.shape[:-1])
        return out

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, AddedTokensVocabulary)
            and self._model_file == other._model_file
            and self._extra_tokens == other._extra_tokens
        )

    def __hash__(self) -> int:
        return hash((self._model_file, self._extra_tokens))

    def __getstate__(self):
        # Gin deep-copies configurable arguments; keep only what rebuilds the vocabulary.
        return {"_model_file": self._model_file, "_extra_tokens": self._extra_tokens, "_extra_ids": 0}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tok = None

    def __str__(self) -> str:
        return f"AddedTokensVocabulary({self._model_file}, +{len(self._extra_tokens)} added tokens)"

    def write_tokenizer_files(self, out_dir: str | os.PathLike) -> None:
        """``tokenizer.model`` and ``added_tokens.json`` as in a Hugging Face Llama directory, so that a folder
        holding them (e.g. a training run's MODEL_DIR) loads with :meth:`Tokenizer.from_dir`."""
        import json

        from meditron_jax import fs  # out_dir may be gs://... (a training run's MODEL_DIR)

        out_dir = os.fspath(out_dir)
        fs.copy(self._model_file, fs.join(out_dir, "tokenizer.model"))
        base = self.tokenizer.base_vocab_size
        added = {tok: base + i for i, tok in enumerate(self._extra_tokens)}
        fs.write_text(fs.join(out_dir, "added_tokens.json"), json.dumps(added, indent=2))


def default_model_file() -> str:
    """Llama-2's tokenizer.model in the shared data (the one setting; may not exist at import)."""
    return os.fspath(shared_path("llama2_tokenizer", "tokenizer.model", must_exist=False))


@functools.lru_cache(maxsize=8)
def meditron_vocabulary(model_file: str | None = None, chatml: bool = False) -> AddedTokensVocabulary:
    """MEDITRON's 32,017-token vocabulary (pretraining, raw-model evaluation), or 32,019 with ChatML (SFT)."""
    extra = MEDITRON_EXTRA_TOKENS + (CHATML_TOKENS if chatml else ())
    return AddedTokensVocabulary(model_file or default_model_file(), extra)
