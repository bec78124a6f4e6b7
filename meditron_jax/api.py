"""The small public API: ``lm = meditron_jax.load(path)``; ``lm.logits``, ``lm.generate``, ``lm.tokenizer``."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.config import ModelConfig
from meditron_jax.convert import hf, orbax
from meditron_jax.data.vocabulary import Tokenizer
from meditron_jax.infer.generate import generate_ids
from meditron_jax.model import Llama


class LanguageModel:
    """A loaded model: config, parameters (on device) and tokenizer."""

    def __init__(self, config: ModelConfig, params, tokenizer: Tokenizer | None):
        self.config = config
        self.params = jax.device_put(params)
        self.tokenizer = tokenizer
        model = Llama(config)
        self._logits = jax.jit(lambda p, t: model.apply({"params": p}, t))

    def logits(self, token_ids) -> np.ndarray:
        """float32 next-token logits [batch, length, vocab] for equal-length rows of token ids."""
        tokens = np.asarray(token_ids)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token_ids must be integers shaped [batch, length] (got {tokens.dtype}{tokens.shape})")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return np.asarray(self._logits(self.params, jnp.asarray(tokens, jnp.int32)), np.float32)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> list[str]:
        """Continuations of text prompts; greedy unless temperature > 0."""
        if self.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer; pass tokenizer_path to load()")
        if isinstance(prompts, str):
            raise TypeError("generate() takes a list of prompts, not a single string")
        ids = [self.tokenizer.encode(p, bos=True) for p in prompts]
        out = generate_ids(
            self.config,
            self.params,
            ids,
            max_new_tokens=max_new_tokens,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        texts = []
        for prompt_ids, new_ids in zip(ids, out, strict=True):
            # Decode with the prompt so SentencePiece keeps the space that starts the continuation.
            prefix = self.tokenizer.decode(prompt_ids)
            full = self.tokenizer.decode(prompt_ids + new_ids)
            texts.append(full[len(prefix) :] if full.startswith(prefix) else self.tokenizer.decode(new_ids))
        return texts


def load(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    tokenizer_path: str | None = None,
    **config_overrides,
) -> LanguageModel:
    """Load a Hugging Face Llama directory or a meditron_jax orbax model directory.

    dtype/param_dtype set the compute and storage precision ("float32", "bfloat16"); other keyword
    arguments override ModelConfig fields that do not change the weights (e.g. scan_layers, attention_impl).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory (expected a Hugging Face or meditron_jax model)")
    overrides = dict(config_overrides)
    if dtype:
        overrides["dtype"] = dtype
    if param_dtype:
        overrides["param_dtype"] = param_dtype
    if orbax.is_orbax_model(path):
        stored = ModelConfig.from_json(os.path.join(path, orbax.CONFIG_FILE))
        params, config = orbax.load_orbax(path, stored.replace(**overrides))
    else:
        config = hf.read_hf_config(path, **overrides)
        params = hf.load_hf_params(path, config)
    tok_dir = tokenizer_path or path
    tokenizer = None
    if os.path.isfile(os.path.join(tok_dir, "tokenizer.model")):
        tokenizer = Tokenizer.from_dir(tok_dir)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"{tok_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}"
            )
    elif tokenizer_path:
        raise FileNotFoundError(f"{tokenizer_path} has no tokenizer.model")
    return LanguageModel(config, params, tokenizer)
