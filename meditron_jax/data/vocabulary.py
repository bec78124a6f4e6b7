"""The Llama-2 SentencePiece tokenizer plus added tokens, with a SeqIO view for the data pipelines.

MEDITRON checkpoints extend the 32,000 SentencePiece pieces with tokens that SentencePiece does not
know (Megatron specials, ``[bib_ref]``-style markers, ChatML ``<|im_start|>``): they get the ids after
the base vocabulary and are matched as whole strings before the rest of the text is encoded.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence

# MEDITRON.md §1: the 17 ids after the 32,000 Llama pieces, in order, then the two ChatML tokens of SFT.
MEGATRON_SPECIALS = ("<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>")
MARKER_TOKENS = (
    "[bib_ref]",
    "[/bib_ref]",
    "[fig_ref]",
    "[/fig_ref]",
    "[bib]",
    "[/bib]",
    "[fig]",
    "[/fig]",
    "[table]",
    "[/table]",
    "[formula]",
    "[/formula]",
)
MEDITRON_EXTRA_TOKENS = MEGATRON_SPECIALS + MARKER_TOKENS
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


class Tokenizer:
    """Encode/decode text for a Llama model; ``seqio_vocabulary`` is the SeqIO view of the base pieces."""

    def __init__(self, model_path: str | os.PathLike, extra_tokens: Sequence[str] = ()):
        import sentencepiece

        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model {model_path} does not exist")
        self.model_path = model_path
        # SentencePiece itself, not through SeqIO: importing SeqIO imports TensorFlow (~9 s per process),
        # which generation and evaluation never use.
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.base_vocab_size = self._sp.get_piece_size()
        self.extra_tokens = tuple(extra_tokens)
        if len(set(self.extra_tokens)) != len(self.extra_tokens):
            raise ValueError(f"duplicate added tokens in {self.extra_tokens}")
        self._extra_to_id = {t: self.base_vocab_size + i for i, t in enumerate(self.extra_tokens)}
        self._split = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(self.extra_tokens, key=len, reverse=True)) + ")")
            if self.extra_tokens
            else None
        )

    @functools.cached_property
    def seqio_vocabulary(self):
        """SeqIO's vocabulary over the same pieces (without the added tokens), for tf.data pipelines."""
        import seqio

        return seqio.SentencePieceVocabulary(self.model_path)

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.extra_tokens)

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        # Llama's SentencePiece model has no pad piece; 0 (<unk>) is what SeqIO pads with.
        return max(self._sp.pad_id(), 0)

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        ids: list[int] = [self.bos_id] if bos else []
        pieces = self._split.split(text) if self._split else [text]
        for piece in pieces:
            if not piece:
                continue
            if piece in self._extra_to_id:
                ids.append(self._extra_to_id[piece])
            else:
                # Each chunk gets SentencePiece's dummy-prefix space, as HF's legacy Llama tokenizer (the one
                # Llama-2 and MEDITRON ship) does; decode() removes it again, so round trips are exact.
                ids.extend(self._sp.encode_as_ids(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        out: list[str] = []
        run: list[int] = []
        special = {self.bos_id, self.eos_id}
        for i in (int(x) for x in ids):
            if i >= self.base_vocab_size:
                if i >= self.vocab_size:
                    raise ValueError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
                out.append(self._sp.decode_ids(run))
                run = []
                out.append(self.extra_tokens[i - self.base_vocab_size])
            elif not (skip_special and i in special):
                run.append(i)
        out.append(self._sp.decode_ids(run))
        return "".join(out)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a Hugging Face model directory: ``tokenizer.model`` plus its added tokens."""
        path = os.fspath(path)
        model = os.path.join(path, "tokenizer.model")
        return cls(model, extra_tokens=read_added_tokens(path))


def read_added_tokens(path: str) -> tuple[str, ...]:
    """Added tokens (ids past the SentencePiece pieces) from an HF directory, ordered by id.

    Reads ``added_tokens.json`` or ``tokenizer_config.json``'s ``added_tokens_decoder``; ids below the
    base vocabulary (HF lists <unk>, <s>, </s> there too) are ignored. Gaps are an error.
    """
    found: dict[int, str] = {}
    added = os.path.join(path, "added_tokens.json")
    cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(added):
        with open(added) as f:
            found = {int(i): t for t, i in json.load(f).items()}
    elif os.path.isfile(cfg):
        with open(cfg) as f:
            dec = json.load(f).get("added_tokens_decoder", {})
        found = {int(i): v["content"] for i, v in dec.items()}
    if not found:
        return ()
    import sentencepiece

    base = sentencepiece.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model")).get_piece_size()
    extra = sorted((i, t) for i, t in found.items() if i >= base)
    for k, (i, t) in enumerate(extra):
        if i != base + k:
            raise ValueError(f"{path}: added token {t!r} has id {i}, expected {base + k} (ids must be contiguous)")
    return tuple(t for _, t in extra)
