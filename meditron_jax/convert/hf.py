"""Hugging Face Llama checkpoints ⇄ meditron_jax parameters.

Import reads one tensor at a time (safetensors are memory-mapped), so host memory stays near one copy
of the weights; export writes sharded safetensors with an index that ``transformers`` loads.
Nothing is unpickled: safetensors, or PyTorch ``.bin`` files through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from meditron_jax.config import ModelConfig
from meditron_jax.convert.files import atomic_directory, copy_tokenizer_files

# config.json keys we translate, keys that must hold a given value, and keys that do not change the math.
_TRANSLATED = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "rope_theta": "rope_theta",
}
_REQUIRED_VALUES = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
_IGNORED = {
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "pad_token_id",
    "initializer_range",
    "pretraining_tp",
    "attention_dropout",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "rope_scaling",
    "rope_parameters",
    "auto_map",
    "is_decoder",
    "tokenizer_class",
    "id2label",
    "label2id",
    "problem_type",
    "max_sequence_length",
    "_attn_implementation",
    "layer_types",
}
# Non-parameter buffers some old checkpoints carry.
_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, field or tensor."""


def config_from_hf(hf: dict, source: str = "config.json", **overrides) -> ModelConfig:
    unknown = sorted(set(hf) - set(_TRANSLATED) - set(_REQUIRED_VALUES) - _IGNORED)
    if unknown:
        raise ConversionError(f"{source}: unknown config keys {unknown}; refusing to guess their meaning")
    for key, want in _REQUIRED_VALUES.items():
        if key in hf and hf[key] != want:
            raise ConversionError(f"{source}: {key}={hf[key]!r} is not supported (only {want!r})")
    if hf.get("model_type") != "llama":
        raise ConversionError(f"{source}: model_type must be 'llama' (got {hf.get('model_type')!r})")
    if hf.get("rope_scaling"):
        raise ConversionError(f"{source}: rope_scaling={hf['rope_scaling']!r} is not implemented")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"{source}: rope_parameters.rope_type={rope['rope_type']!r} is not implemented")
    extra_rope = sorted(set(rope) - {"rope_type", "rope_theta"})
    if extra_rope:
        raise ConversionError(f"{source}: rope_parameters keys {extra_rope} are not implemented")
    kwargs = {ours: hf[theirs] for theirs, ours in _TRANSLATED.items() if hf.get(theirs) is not None}
    if "rope_theta" in rope:
        kwargs["rope_theta"] = rope["rope_theta"]
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = kwargs[key][0]
    kwargs.setdefault("num_kv_heads", kwargs.get("num_heads"))
    kwargs["rope_theta"] = float(kwargs.get("rope_theta", 10000.0))
    kwargs.update(overrides)
    try:
        return ModelConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{source}: {e}") from e


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def read_hf_config(path: str, **overrides) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} does not exist: not a Hugging Face model directory")
    with open(cfg_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_path}: invalid JSON ({e})") from e
    return config_from_hf(hf, source=cfg_path, **overrides)


class TensorReader:
    """Tensor-by-tensor access to the weights of an HF directory (safetensors or PyTorch, sharded or not)."""

    def __init__(self, path: str):
        self.path = path
        self._where: dict[str, str] = {}
        for index_name, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            index = os.path.join(path, index_name)
            if os.path.isfile(index):
                with open(index) as f:
                    weight_map = json.load(f).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ConversionError(f"{index}: no 'weight_map'")
                self._where = {k: os.path.join(path, v) for k, v in weight_map.items()}
                break
            if os.path.isfile(os.path.join(path, single)):
                self._where = {k: os.path.join(path, single) for k in self._list(os.path.join(path, single))}
                break
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or their index files")
        for f in sorted(set(self._where.values())):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f} is named in the index but does not exist")
        self._open: dict[str, object] = {}

    @staticmethod
    def _list(file: str) -> list[str]:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="numpy") as f:
                return list(f.keys())
        return list(_torch_load(file).keys())

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ConversionError(f"{self.path}: tensor {name!r} is missing")
        file = self._where[name]
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="numpy") as f:
                if name not in f.keys():
                    raise ConversionError(f"{file}: tensor {name!r} is missing (the index says it is here)")
                return f.get_tensor(name)
        if file not in self._open:  # PyTorch shards are loaded whole; keep one at a time
            self._open = {file: _torch_load(file)}
        t = self._open[file][name]
        return t.float().numpy().astype(ml_dtypes.bfloat16) if str(t.dtype) == "torch.bfloat16" else t.numpy()


def _torch_load(file: str):
    import torch

    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def _hf_names(cfg: ModelConfig) -> Iterator[tuple[tuple[str, ...], str, int | None]]:
    """(our path within a layer or the top, HF name, layer index or None)."""
    yield ("embedding",), "model.embed_tokens.weight", None
    yield ("final_norm", "scale"), "model.norm.weight", None
    if not cfg.tie_word_embeddings:
        yield ("lm_head",), "lm_head.weight", None
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        yield ("attention", "query"), p + "self_attn.q_proj.weight", i
        yield ("attention", "key"), p + "self_attn.k_proj.weight", i
        yield ("attention", "value"), p + "self_attn.v_proj.weight", i
        yield ("attention", "out"), p + "self_attn.o_proj.weight", i
        yield ("mlp", "gate"), p + "mlp.gate_proj.weight", i
        yield ("mlp", "up"), p + "mlp.up_proj.weight", i
        yield ("mlp", "down"), p + "mlp.down_proj.weight", i
        yield ("attention_norm", "scale"), p + "input_layernorm.weight", i
        yield ("mlp_norm", "scale"), p + "post_attention_layernorm.weight", i


def _hf_shape(cfg: ModelConfig, ours: tuple[str, ...]) -> tuple[int, ...]:
    d, f, h, kvh, hd, v = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
    )
    return {
        ("embedding",): (v, d),
        ("lm_head",): (v, d),
        ("final_norm", "scale"): (d,),
        ("attention", "query"): (h * hd, d),
        ("attention", "key"): (kvh * hd, d),
        ("attention", "value"): (kvh * hd, d),
        ("attention", "out"): (d, h * hd),
        ("mlp", "gate"): (f, d),
        ("mlp", "up"): (f, d),
        ("mlp", "down"): (d, f),
        ("attention_norm", "scale"): (d,),
        ("mlp_norm", "scale"): (d,),
    }[ours]


def _to_ours(cfg: ModelConfig, ours: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    d, h, kvh, hd, vp = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.padded_vocab_size
    if ours == ("embedding",):
        return np.pad(w, ((0, vp - w.shape[0]), (0, 0)))
    if ours == ("lm_head",):
        return np.pad(w.T, ((0, 0), (0, vp - w.shape[0])))
    if ours == ("attention", "query"):
        return w.T.reshape(d, h, hd)
    if ours in (("attention", "key"), ("attention", "value")):
        return w.T.reshape(d, kvh, hd)
    if ours == ("attention", "out"):
        return w.T.reshape(h, hd, d)
    if ours[0] == "mlp":
        return w.T
    return w


def _to_hf(cfg: ModelConfig, ours: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    d, v = cfg.hidden_size, cfg.vocab_size
    if ours == ("embedding",):
        return w[:v]
    if ours == ("lm_head",):
        return w[:, :v].T
    if ours[0] == "attention" and ours[1] in ("query", "key", "value"):
        return w.reshape(d, -1).T
    if ours == ("attention", "out"):
        return w.reshape(-1, d).T
    if ours[0] == "mlp":
        return w.T
    return w


def _layer_dict(params: dict, cfg: ModelConfig, i: int | None) -> tuple[dict, int | None]:
    """The dict holding a layer's params and the index into its stacked leading axis (None if unrolled)."""
    if i is None:
        return params, None
    if cfg.scan_layers:
        return params["layers"], i
    return params[f"layers_{i}"], None


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def load_hf_params(path: str, cfg: ModelConfig) -> dict:
    """Read an HF Llama directory's weights into our (host numpy) parameter tree for ``cfg``."""
    from flax import linen as nn

    from meditron_jax.model import abstract_params

    reader = TensorReader(path)
    dtype = np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(cfg.param_dtype)
    shapes = nn.meta.unbox(abstract_params(cfg))
    params = _map_tree(shapes, lambda s: np.empty(s.shape, dtype))
    used = set()
    for ours, name, i in _hf_names(cfg):
        w = reader.get(name)
        want = _hf_shape(cfg, ours)
        if tuple(w.shape) != want:
            raise ConversionError(
                f"{path}: tensor {name!r} has shape {tuple(w.shape)}, expected {want} for the config in config.json"
            )
        tree, idx = _layer_dict(params, cfg, i)
        target = _get(tree, ours)
        value = _to_ours(cfg, ours, w).astype(dtype)
        if idx is None:
            target[...] = value
        else:
            target[idx] = value
        used.add(name)
    extra = sorted(
        k
        for k in reader.keys()
        if k not in used
        and not k.endswith(_IGNORED_TENSOR_SUFFIXES)
        and not (cfg.tie_word_embeddings and k == "lm_head.weight")
    )
    if extra:
        raise ConversionError(
            f"{path}: unexpected tensors {extra[:8]}{' …' if len(extra) > 8 else ''} "
            "(not part of a Llama model with this config)"
        )
    return params


def _map_tree(tree, fn):
    if isinstance(tree, dict):
        return {k: _map_tree(v, fn) for k, v in tree.items()}
    return fn(tree)


def save_hf(
    params: dict,
    cfg: ModelConfig,
    out_dir: str,
    *,
    dtype: str | None = None,
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write ``params`` as an HF Llama directory. Written to a temporary folder, then renamed into place."""
    from safetensors.numpy import save_file

    dtype = dtype or cfg.param_dtype
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    with atomic_directory(out_dir) as tmp:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        total = 0
        for ours, name, i in _hf_names(cfg):
            tree, idx = _layer_dict(params, cfg, i)
            w = np.asarray(_get(tree, ours))
            w = w if idx is None else w[idx]
            w = np.ascontiguousarray(_to_hf(cfg, ours, w).astype(np_dtype))
            if size and size + w.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = w
            size += w.nbytes
            total += w.nbytes
        n = len(shards)
        weight_map = {}
        for k, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        if n > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg, dtype), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, f, indent=2)
        copy_tokenizer_files(tokenizer_dir, tmp)
