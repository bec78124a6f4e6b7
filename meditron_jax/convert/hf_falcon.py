"""Hugging Face Falcon (``FalconForCausalLM``) checkpoints ⇄ meditron_jax parameters.

`convert.hf` hands over here when ``model_type`` is ``falcon`` (import) or ``ModelConfig.family`` is
``falcon`` (export). The one tensor that is not a plain transpose is the fused ``query_key_value``
``[rows, hidden]``, whose rows come in one of three orders (transformers' ``FalconAttention._split_heads``):

* new decoder (40B/180B): per KV group ``g``, its ``heads/kv`` query heads, then ``k_g``, then ``v_g``;
* multi-query (7B): all query heads, then the one key head, then the one value head;
* plain multi-head: per head ``i``: ``q_i``, ``k_i``, ``v_i``.

Splitting and re-fusing are reshapes and slices only, so HF → ours → HF is bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, cast

import ml_dtypes
import numpy as np

from meditron_jax.config import ConfigError, ModelConfig
from meditron_jax.convert import hf

log = logging.getLogger(__name__)

# config.json key → our field (old RW-era spellings in _ALIASES).
_TRANSLATED = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "ffn_hidden_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "layer_norm_epsilon": "layer_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "rope_theta": "rope_theta",
    "parallel_attn": "parallel_attn",
    "new_decoder_architecture": "new_decoder_architecture",
}
_ALIASES = {"n_embed": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads"}
_STRUCTURE = {"num_kv_heads", "n_head_kv", "multi_query", "num_ln_in_parallel_attn"}
# Keys that must hold this value (or be absent): what we implement.
_REQUIRED = {
    "model_type": "falcon",
    "alibi": False,
    "bias": False,
    "activation": "gelu",
    "apply_residual_connection_post_layernorm": False,
}
_IGNORED = hf._IGNORED | {"hidden_dropout", "attention_dropout"}
_WHY = {
    "alibi": "ALiBi Falcons (falcon-rw-*) are not implemented; only rotary Falcons are",
    "bias": "linear-layer biases (falcon-rw-*) are not implemented",
    "activation": "only Falcon's GELU MLP is implemented",
}


def config_from_hf(cfg_json: dict, source: str = "config.json", **overrides) -> ModelConfig:
    """A Falcon config.json as a ``ModelConfig`` (family "falcon"); anything we do not implement is refused."""
    for old, new in _ALIASES.items():
        if old in cfg_json:
            if new in cfg_json and cfg_json[new] != cfg_json[old]:
                raise hf.ConversionError(f"{source}: {old}={cfg_json[old]!r} and {new}={cfg_json[new]!r} disagree")
            cfg_json = {**{k: v for k, v in cfg_json.items() if k != old}, new: cfg_json[old]}
    unknown = sorted(set(cfg_json) - set(_TRANSLATED) - _STRUCTURE - set(_REQUIRED) - _IGNORED)
    if unknown:
        raise hf.ConversionError(f"{source}: unknown Falcon config keys {unknown}; refusing to guess their meaning")
    for key, want in _REQUIRED.items():
        if cfg_json.get(key, want) != want:
            why = _WHY.get(key, f"only {want!r} is supported")
            raise hf.ConversionError(f"{source}: {key}={cfg_json[key]!r}: {why}")
    if cfg_json.get("rope_scaling"):
        raise hf.ConversionError(f"{source}: rope_scaling={cfg_json['rope_scaling']!r} is not implemented")
    rope: Any = cfg_json.get("rope_parameters") or {}
    plain_rope = isinstance(rope, dict) and rope.get("rope_type", "default") == "default"
    if not plain_rope or set(rope) - {"rope_type", "rope_theta"}:
        raise hf.ConversionError(f"{source}: rope_parameters={rope!r}: only default rotary embeddings are implemented")

    # transformers' FalconConfig defaults for absent keys (the published tiiuae configs omit several).
    get = {"parallel_attn": True, "new_decoder_architecture": False, "max_position_embeddings": 2048}
    kwargs: dict[str, Any] = {ours: cfg_json.get(theirs, get.get(theirs)) for theirs, ours in _TRANSLATED.items()}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs["family"] = "falcon"
    kwargs.setdefault("tie_word_embeddings", True)
    kwargs.setdefault("bos_token_id", 11)
    kwargs.setdefault("eos_token_id", 11)
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(kwargs[key], list):
            if not kwargs[key]:
                raise hf.ConversionError(f"{source}: {key}=[] names no token id")
            kwargs[key] = kwargs[key][0]
    if "rope_theta" in rope:
        if "rope_theta" in kwargs and kwargs["rope_theta"] != rope["rope_theta"]:
            raise hf.ConversionError(
                f"{source}: rope_theta={kwargs['rope_theta']!r} and rope_parameters.rope_theta="
                f"{rope['rope_theta']!r} disagree"
            )
        kwargs["rope_theta"] = rope["rope_theta"]
    missing = [
        k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in cfg_json
    ]
    if missing:
        raise hf.ConversionError(f"{source}: missing {missing} (the model's shape)")
    heads = kwargs["num_heads"]
    if "intermediate_size" not in kwargs and isinstance(kwargs["hidden_size"], int):
        kwargs["intermediate_size"] = 4 * kwargs["hidden_size"]  # FalconConfig's default ffn_hidden_size
    kv = cfg_json.get("num_kv_heads", cfg_json.get("n_head_kv"))
    if kwargs["new_decoder_architecture"]:
        if not kwargs["parallel_attn"]:
            raise hf.ConversionError(f"{source}: new_decoder_architecture with parallel_attn=false is not a Falcon")
        kwargs["num_kv_heads"] = heads if kv is None else kv
        n_ln = cfg_json.get("num_ln_in_parallel_attn")
        if n_ln not in (None, 1, 2):
            raise hf.ConversionError(f"{source}: num_ln_in_parallel_attn={n_ln!r} must be 1 or 2")
        kwargs["parallel_norms"] = 2 if n_ln is None else n_ln
    else:
        # The old layouts: multi_query (default true) means one KV head; otherwise one per query head.
        # num_kv_heads is then ignored by transformers, except that plain MHA needs it equal to the heads.
        if cfg_json.get("multi_query", True):
            kwargs["num_kv_heads"] = 1
        else:
            if kv is not None and kv != heads:
                raise hf.ConversionError(f"{source}: num_kv_heads={kv!r} without multi_query must equal {heads}")
            kwargs["num_kv_heads"] = heads
        if cfg_json.get("num_ln_in_parallel_attn") not in (None, 1):
            raise hf.ConversionError(
                f"{source}: num_ln_in_parallel_attn={cfg_json['num_ln_in_parallel_attn']!r} needs "
                "new_decoder_architecture (transformers' old decoder uses one LayerNorm)"
            )
    kwargs.update(overrides)
    try:
        cfg = ModelConfig(**kwargs)
    except ConfigError as e:
        theirs = {v: k for k, v in _TRANSLATED.items()}
        key = e.field if e.field in overrides else theirs.get(e.field, e.field)
        raise hf.ConversionError(
            f"{source}: {key}={e.value!r} ({type(e.value).__name__}) is invalid: {e.allowed}"
        ) from e
    except (TypeError, ValueError) as e:
        raise hf.ConversionError(f"{source}: {e}") from e
    if cast(int, cfg.head_dim) * cfg.num_heads != cfg.hidden_size:
        raise hf.ConversionError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by {cfg.num_heads} heads")
    return cfg


def exportable(cfg: ModelConfig) -> None:
    """Refuse a Falcon config that transformers' FalconForCausalLM cannot express."""
    assert cfg.head_dim is not None
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise hf.ConversionError(
            f"head_dim={cfg.head_dim}: transformers' Falcon needs hidden_size / num_heads "
            f"({cfg.hidden_size} / {cfg.num_heads})"
        )
    if not cfg.new_decoder_architecture:
        if cfg.num_kv_heads not in (1, cfg.num_heads):
            raise hf.ConversionError(
                f"num_kv_heads={cfg.num_kv_heads}: transformers' old Falcon decoder has 1 or num_heads KV heads; "
                "set new_decoder_architecture"
            )
        if cfg.parallel_norms != 1:
            raise hf.ConversionError("parallel_norms=2 needs new_decoder_architecture in transformers' Falcon")


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    exportable(cfg)
    new = cfg.new_decoder_architecture
    return {
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "new_decoder_architecture": new,
        "multi_query": (not new) and cfg.num_kv_heads == 1,
        "parallel_attn": cfg.parallel_attn,
        "num_ln_in_parallel_attn": cfg.parallel_norms if new else None,
        "alibi": False,
        "bias": False,
        "activation": "gelu",
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


# ---------------------------------------------------------------------------------------------------------
# Tensors


def _qkv_rows(cfg: ModelConfig) -> int:
    assert cfg.head_dim is not None
    return (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim


def split_qkv(cfg: ModelConfig, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HF ``query_key_value.weight`` [rows, d] → our query [d, h, hd], key and value [d, kv, hd]."""
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert hd is not None
    g: np.ndarray
    if cfg.new_decoder_architecture:
        g = w.reshape(kv, h // kv + 2, hd, d)
        q, k, v = g[:, :-2].reshape(h, hd, d), g[:, -2], g[:, -1]
    elif kv == 1:
        g = w.reshape(h + 2, hd, d)
        q, k, v = g[:h], g[h : h + 1], g[h + 1 :]
    else:
        g = w.reshape(h, 3, hd, d)
        q, k, v = g[:, 0], g[:, 1], g[:, 2]
    return tuple(np.transpose(x, (2, 0, 1)) for x in (q, k, v))  # type: ignore[return-value]


def fuse_qkv(cfg: ModelConfig, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`split_qkv`."""
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert hd is not None
    q, k, v = (np.transpose(x, (1, 2, 0)) for x in (q, k, v))  # [heads, hd, d]
    if cfg.new_decoder_architecture:
        fused = np.concatenate([q.reshape(kv, h // kv, hd, d), k[:, None], v[:, None]], axis=1)
    elif kv == 1:
        fused = np.concatenate([q, k, v], axis=0)
    else:
        fused = np.stack([q, k, v], axis=1)
    return fused.reshape(-1, d)


def _norm_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our norm, HF LayerNorm) of one layer."""
    if cfg.parallel_attn and cfg.parallel_norms == 2:
        return [("attention_norm", "ln_attn"), ("mlp_norm", "ln_mlp")]
    if cfg.parallel_attn:
        return [("attention_norm", "input_layernorm")]
    return [("attention_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")]


# One entry per HF tensor: (HF name, HF shape, layer or None, our paths, HF → ours, ours → HF).
Entry = tuple[
    str,
    tuple[int, ...],
    "int | None",
    tuple[tuple[str, ...], ...],
    Callable[..., tuple[np.ndarray, ...]],
    Callable[..., np.ndarray],
]


def _entries(cfg: ModelConfig) -> Iterator[Entry]:
    d, f, h, v, vp = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.vocab_size, cfg.padded_vocab_size
    hd = cfg.head_dim
    assert hd is not None

    def same(w):
        return (w,)

    def pad_rows(w):
        return (np.pad(w, ((0, vp - w.shape[0]), (0, 0))),)

    yield "transformer.word_embeddings.weight", (v, d), None, (("embedding",),), pad_rows, lambda e: e[:v]
    for part in ("weight", "bias"):
        ours_name = "scale" if part == "weight" else "bias"
        yield f"transformer.ln_f.{part}", (d,), None, (("final_norm", ours_name),), same, lambda x: x
    if not cfg.tie_word_embeddings:
        yield (
            "lm_head.weight",
            (v, d),
            None,
            (("lm_head",),),
            lambda w: (np.pad(w.T, ((0, 0), (0, vp - w.shape[0]))),),
            lambda x: x[:, :v].T,
        )
    for i in range(cfg.num_layers):
        p = f"transformer.h.{i}."
        yield (
            p + "self_attention.query_key_value.weight",
            (_qkv_rows(cfg), d),
            i,
            (("attention", "query"), ("attention", "key"), ("attention", "value")),
            lambda w: split_qkv(cfg, w),
            lambda q, k, v_: fuse_qkv(cfg, q, k, v_),
        )
        yield (
            p + "self_attention.dense.weight",
            (d, h * hd),
            i,
            (("attention", "out"),),
            lambda w: (w.T.reshape(h, hd, d),),
            lambda x: x.reshape(h * hd, d).T,
        )
        yield p + "mlp.dense_h_to_4h.weight", (f, d), i, (("mlp", "up"),), lambda w: (w.T,), lambda x: x.T
        yield p + "mlp.dense_4h_to_h.weight", (d, f), i, (("mlp", "down"),), lambda w: (w.T,), lambda x: x.T
        for ours, theirs in _norm_names(cfg):
            yield p + f"{theirs}.weight", (d,), i, ((ours, "scale"),), same, lambda x: x
            yield p + f"{theirs}.bias", (d,), i, ((ours, "bias"),), same, lambda x: x


def load_hf_params(path: str, cfg: ModelConfig) -> dict:
    """Read an HF Falcon directory's weights into our (host numpy) parameter tree for ``cfg``."""
    from flax import linen as nn

    from meditron_jax.model import abstract_params

    reader = hf.TensorReader(path)
    dtype = np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(cfg.param_dtype)
    params = hf._map_tree(nn.meta.unbox(abstract_params(cfg)), lambda s: np.empty(s.shape, dtype))
    used = set()
    entries = list(_entries(cfg))
    for n, (name, want, i, ours, to_ours, _) in enumerate(entries):
        kind, shape = reader.info(name)
        if shape != want:
            raise hf.ConversionError(
                f"{path}: tensor {name!r} has shape {shape}, expected {want} for the config in config.json"
            )
        if kind not in hf._FLOAT_DTYPES:
            raise hf.ConversionError(f"{path}: tensor {name!r} has dtype {kind}, expected a floating-point type")
        w = reader.get(name)
        if tuple(w.shape) != want:
            raise hf.ConversionError(f"{path}: tensor {name!r} reads as shape {tuple(w.shape)}, expected {want}")
        tree, idx = hf._layer_dict(params, cfg, i)
        for our_path, value in zip(ours, to_ours(w), strict=True):
            target = hf._get(tree, our_path)
            if idx is None:
                target[...] = value.astype(dtype)
            else:
                target[idx] = value.astype(dtype)
        used.add(name)
        if (n + 1) % max(1, len(entries) // 10) == 0 or n + 1 == len(entries):
            log.info("read %d/%d tensors of %s", n + 1, len(entries), path)
    extra = sorted(
        k
        for k in reader.keys()
        if k not in used
        and not k.endswith(hf._IGNORED_TENSOR_SUFFIXES)
        and not (cfg.tie_word_embeddings and k == "lm_head.weight")
    )
    if extra:
        raise hf.ConversionError(
            f"{path}: unexpected tensors {extra[:8]}{' …' if len(extra) > 8 else ''} "
            "(not part of a Falcon model with this config)"
        )
    return params


def export_tensors(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in HF layout) for every tensor of an HF Falcon checkpoint."""
    exportable(cfg)
    for name, _, i, ours, _, to_hf in _entries(cfg):
        tree, idx = hf._layer_dict(params, cfg, i)
        arrays = [np.asarray(hf._get(tree, p)) for p in ours]
        yield name, to_hf(*(a if idx is None else a[idx] for a in arrays))
