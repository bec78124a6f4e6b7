"""The small public API: ``lm = meditron_jax.load(path)``; ``lm.logits``, ``lm.generate``, ``lm.tokenizer``."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.config import ModelConfig
from meditron_jax.convert import streaming
from meditron_jax.convert.hub import resolve_model_path
from meditron_jax.convert.model_dir import load_model_dir
from meditron_jax.data.vocabulary import Tokenizer
from meditron_jax.infer.engine import Engine
from meditron_jax.infer.sampling import SamplingParams
from meditron_jax.model import Llama


class LanguageModel:
    """A loaded model: config, parameters (on device) and tokenizer."""

    def __init__(self, config: ModelConfig, params, tokenizer: Tokenizer | None):
        self.config = config
        self.params = jax.device_put(params)
        self.tokenizer = tokenizer
        model = Llama(config)
        self._logits = jax.jit(lambda p, t: model.apply({"params": p}, t))
        self._engine: Engine | None = None

    def logits(self, token_ids) -> np.ndarray:
        """float32 next-token logits [batch, length, vocab] for equal-length rows of token ids."""
        tokens = np.asarray(token_ids)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token_ids must be integers shaped [batch, length] (got {tokens.dtype}{tokens.shape})")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        if tokens.shape[1] > self.config.max_position_embeddings:
            # Positions past the context were never trained; refuse as generate does.
            raise ValueError(
                f"token_ids hold {tokens.shape[1]} positions, more than the model's context of "
                f"{self.config.max_position_embeddings} (max_position_embeddings)"
            )
        return np.asarray(self._logits(self.params, jnp.asarray(tokens, jnp.int32)), np.float32)

    def engine(self, **engine_kwargs) -> Engine:
        """The generation engine over this model (built once; keyword arguments build a new one)."""
        if engine_kwargs or self._engine is None:
            engine = Engine(self.config, self.params, self.tokenizer, **engine_kwargs)
            if engine_kwargs:
                return engine
            self._engine = engine
        return self._engine

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        frequency_penalty: float = 0.0,
        stop_strings: Sequence[str] = (),
        seed: int = 0,
    ) -> list[str]:
        """Continuations of text prompts (stopping at EOS); greedy unless temperature > 0."""
        if self.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer; pass tokenizer_path to load()")
        if isinstance(prompts, str):
            raise TypeError("generate() takes a list of prompts, not a single string")
        sampling = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=1.0 if top_p is None else top_p,
            frequency_penalty=frequency_penalty,
            stop_token_ids=(self.tokenizer.eos_id,),
            stop_strings=tuple(stop_strings),
            seed=seed,
        )
        return [per[0].text for per in self.engine().generate(list(prompts), sampling)]


def load(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    tokenizer_path: str | None = None,
    **config_overrides,
) -> LanguageModel:
    """Load a Hugging Face Llama directory, a meditron_jax orbax model directory, or a training run's
    ``MODEL_DIR`` (its newest checkpoint; the tokenizer then comes from ``tokenizer_path``). A Hugging Face
    hub id (``"epfl-llm/meditron-7b"``, ``"owner/name@revision"``) that is not a local path is read from the
    hub cache, downloaded first unless HF_HUB_OFFLINE=1.

    dtype/param_dtype set the compute and storage precision ("float32", "bfloat16"); other keyword
    arguments override ModelConfig fields that do not change the weights (e.g. scan_layers, attention_impl).
    """
    path = resolve_model_path(path)
    overrides = dict(config_overrides)
    if dtype:
        overrides["dtype"] = dtype
    if param_dtype:
        overrides["param_dtype"] = param_dtype
    params, config = load_model_dir(path, lazy=True, **overrides)
    params = streaming.place(params)  # one device, read into it tensor by tensor (HF) or by orbax (the others)
    if tokenizer_path:
        tokenizer_path = resolve_model_path(tokenizer_path)
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
