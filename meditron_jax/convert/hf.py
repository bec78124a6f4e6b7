"""Hugging Face Llama checkpoints ⇄ meditron_jax parameters.

Each HF tensor maps to one of our parameters through a table (:func:`_hf_names`, :func:`_transform`). The
eager import (:func:`load_hf_params`) builds the whole tree on the host; the streaming one
(:func:`lazy_hf_params` + `streaming.place`, or :func:`load_hf_sharded`) reads each device's slice of each
tensor straight into that device's shard, so the host holds about one tensor, never the model. Export writes
sharded safetensors with an index that ``transformers`` loads, one shard file at a time.
Nothing is unpickled: safetensors, or PyTorch ``.bin`` files through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np

from meditron_jax.config import ConfigError, ModelConfig
from meditron_jax.convert import streaming
from meditron_jax.convert.files import TOKENIZER_FILES, OutputKind, atomic_directory, copy_tokenizer_files

log = logging.getLogger(__name__)

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
_HF_KEY = {ours: theirs for theirs, ours in _TRANSLATED.items()}
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
    if not isinstance(hf, dict):
        raise ConversionError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type") == "falcon":
        from meditron_jax.convert import hf_falcon

        return hf_falcon.config_from_hf(hf, source, **overrides)
    unknown = sorted(set(hf) - set(_TRANSLATED) - set(_REQUIRED_VALUES) - _IGNORED)
    if unknown:
        raise ConversionError(f"{source}: unknown config keys {unknown}; refusing to guess their meaning")
    for key, want in _REQUIRED_VALUES.items():
        if key in hf and hf[key] != want:
            raise ConversionError(f"{source}: {key}={hf[key]!r} is not supported (only {want!r})")
    if hf.get("model_type") != "llama":
        raise ConversionError(f"{source}: model_type must be 'llama' or 'falcon' (got {hf.get('model_type')!r})")
    if hf.get("rope_scaling"):
        raise ConversionError(f"{source}: rope_scaling={hf['rope_scaling']!r} is not implemented")
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConversionError(f"{source}: rope_parameters={rope!r} must be an object")
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"{source}: rope_parameters.rope_type={rope['rope_type']!r} is not implemented")
    extra_rope = sorted(set(rope) - {"rope_type", "rope_theta"})
    if extra_rope:
        raise ConversionError(f"{source}: rope_parameters keys {extra_rope} are not implemented")
    kwargs = {ours: hf[theirs] for theirs, ours in _TRANSLATED.items() if hf.get(theirs) is not None}
    if "rope_theta" in rope:
        top = hf.get("rope_theta")
        if top is not None and (top != rope["rope_theta"] or type(top) is str):
            raise ConversionError(
                f"{source}: rope_theta={top!r} and rope_parameters.rope_theta={rope['rope_theta']!r} disagree"
            )
        kwargs["rope_theta"] = rope["rope_theta"]
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(kwargs.get(key), list):
            if not kwargs[key]:
                raise ConversionError(f"{source}: {key}=[] names no token id")
            kwargs[key] = kwargs[key][0]
    if "num_heads" in kwargs:
        kwargs.setdefault("num_kv_heads", kwargs["num_heads"])
    kwargs.update(overrides)
    try:
        return ModelConfig(**kwargs)
    except ConfigError as e:
        # Name the key as the file spells it; an override is named as our field.
        key = e.field if e.field in overrides else _HF_KEY.get(e.field, e.field)
        raise ConversionError(f"{source}: {key}={e.value!r} ({type(e.value).__name__}) is invalid: {e.allowed}") from e
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{source}: {e}") from e


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    if cfg.family == "falcon":
        from meditron_jax.convert import hf_falcon

        return hf_falcon.config_to_hf(cfg, dtype)
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


# safetensors dtype names and their item sizes; floating ones are what a Llama checkpoint may hold.
_ST_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "float16", "bfloat16", "float32", "float64")
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


def safetensors_header(file: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors file's header, checked against the file before any tensor
    data is read: every declared byte range must hold exactly its shape × dtype and lie inside the file."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{file}: {size} bytes, too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(_MAX_HEADER_BYTES, size - 8):
            raise ConversionError(f"{file}: header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{file}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{file}: safetensors header is not a JSON object")
    data_bytes = size - 8 - n
    out, ranges = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{file}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise ConversionError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ST_ITEMSIZE:
            raise ConversionError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ConversionError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise ConversionError(f"{where}: data_offsets {offsets!r} lie outside the file's {data_bytes} data bytes")
        want = int(np.prod(shape, dtype=np.int64)) * _ST_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != want:
            raise ConversionError(
                f"{where}: shape {tuple(shape)} of {dtype} needs {want} bytes, "
                f"the header gives {offsets[1] - offsets[0]}"
            )
        out[name] = (dtype, tuple(shape))
        ranges.append((offsets[0], offsets[1], name))
    ranges.sort()
    for (_, end_a, a), (start_b, _, b) in zip(ranges[:-1], ranges[1:], strict=True):
        if start_b < end_a:
            raise ConversionError(f"{file}: tensors {a!r} and {b!r} overlap in the file")
    return out


class TensorReader:
    """Tensor-by-tensor access to the weights of an HF directory (safetensors or PyTorch, sharded or not).

    :meth:`info` answers a tensor's dtype and shape from the file header (nothing else is read), so a caller
    checks them before :meth:`get` reads the data."""

    def __init__(self, path: str):
        self.path = path
        self._where: dict[str, str] = {}
        self._headers: dict[str, dict] = {}
        self._open: dict[str, object] = {}
        for index_name, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            index = os.path.join(path, index_name)
            if os.path.isfile(index):
                with open(index) as f:
                    try:
                        weight_map = json.load(f).get("weight_map")
                    except (json.JSONDecodeError, AttributeError) as e:
                        raise ConversionError(f"{index}: not a JSON object with a 'weight_map'") from e
                if not isinstance(weight_map, dict):
                    raise ConversionError(f"{index}: no 'weight_map'")
                for k, v in weight_map.items():
                    if not isinstance(v, str) or os.path.isabs(v) or os.path.normpath(v).startswith(".."):
                        raise ConversionError(f"{index}: tensor {k!r} points to {v!r}, not a file of this folder")
                self._where = {k: os.path.join(path, v) for k, v in weight_map.items()}
                break
            if os.path.isfile(os.path.join(path, single)):
                self._where = {k: os.path.join(path, single) for k in self._list(os.path.join(path, single))}
                break
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or their index files")
        for file in sorted(set(self._where.values())):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file} is named in the index but does not exist")

    def _header(self, file: str) -> dict:
        if file not in self._headers:
            self._headers[file] = safetensors_header(file)
        return self._headers[file]

    def _list(self, file: str) -> list[str]:
        if file.endswith(".safetensors"):
            return list(self._header(file))
        return list(self._torch_file(file).keys())

    def _torch_file(self, file: str):
        if file not in self._open:  # PyTorch shards are memory-mapped whole; keep one at a time
            self._open = {file: _torch_load(file)}
        return self._open[file]

    def keys(self) -> list[str]:
        return list(self._where)

    def _file_of(self, name: str) -> str:
        if name not in self._where:
            raise ConversionError(f"{self.path}: tensor {name!r} is missing")
        file = self._where[name]
        if file.endswith(".safetensors") and name not in self._header(file):
            raise ConversionError(f"{file}: tensor {name!r} is missing (the index says it is here)")
        return file

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(dtype name, shape) of a tensor, without reading its data."""
        file = self._file_of(name)
        if file.endswith(".safetensors"):
            return self._header(file)[name]
        t = self._torch_file(file)[name]
        return str(t.dtype).removeprefix("torch."), tuple(t.shape)

    def get(self, name: str) -> np.ndarray:
        file = self._file_of(name)
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="numpy") as f:
                return f.get_tensor(name)
        t = self._torch_file(file)[name]
        return t.float().numpy().astype(ml_dtypes.bfloat16) if str(t.dtype) == "torch.bfloat16" else t.numpy()

    @contextlib.contextmanager
    def sliced(self, name: str) -> Iterator[streaming.Sliceable]:
        """The tensor for reading rectangles of it (``src[a:b, c:d]``): from safetensors only the bytes of
        that rectangle are copied; a PyTorch tensor is read whole. The file is unmapped afterwards."""
        file = self._file_of(name)
        if not file.endswith(".safetensors"):
            yield self.get(name)
            return
        from safetensors import safe_open

        with safe_open(file, framework="numpy") as f:
            yield f.get_slice(name)


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


def _head_dim(cfg: ModelConfig) -> int:
    assert cfg.head_dim is not None  # ModelConfig.__post_init__ fills it in
    return cfg.head_dim


def _hf_shape(cfg: ModelConfig, ours: tuple[str, ...]) -> tuple[int, ...]:
    d, f, h, kvh, hd, v = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        _head_dim(cfg),
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


def _transform(cfg: ModelConfig, ours: tuple[str, ...]) -> streaming.Transform:
    """How the HF tensor of ``ours`` (a path from :func:`_hf_names`) becomes our array. The eager import
    applies it to whole tensors, the streaming one reads slices through it."""
    h, kvh, hd, vp = cfg.num_heads, cfg.num_kv_heads, _head_dim(cfg), cfg.padded_vocab_size
    table: dict[tuple[str, ...], streaming.Transform] = {
        ("embedding",): streaming.PadRows(vp),
        ("lm_head",): streaming.TransposePadCols(vp),
        ("attention", "query"): streaming.SplitHeads(h, hd),
        ("attention", "key"): streaming.SplitHeads(kvh, hd),
        ("attention", "value"): streaming.SplitHeads(kvh, hd),
        ("attention", "out"): streaming.MergeHeads(h, hd),
        ("mlp", "gate"): streaming.Transpose(),
        ("mlp", "up"): streaming.Transpose(),
        ("mlp", "down"): streaming.Transpose(),
    }
    return table.get(ours, streaming.Copy())


def _to_ours(cfg: ModelConfig, ours: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    return _transform(cfg, ours).apply(w)


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


def _param_dtype(cfg: ModelConfig) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(cfg.param_dtype)


def _check_tensor(reader: TensorReader, path: str, cfg: ModelConfig, ours: tuple[str, ...], name: str) -> tuple:
    """The tensor's HF shape, checked from the file header: a wrong or oversized tensor is refused before
    it is read."""
    kind, shape = reader.info(name)
    want = _hf_shape(cfg, ours)
    if shape != want:
        raise ConversionError(
            f"{path}: tensor {name!r} has shape {shape}, expected {want} for the config in config.json"
        )
    if kind not in _FLOAT_DTYPES:
        raise ConversionError(f"{path}: tensor {name!r} has dtype {kind}, expected a floating-point type")
    return want


def _check_no_extra(reader: TensorReader, path: str, cfg: ModelConfig, used: set[str]) -> None:
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
            f"(not part of a {'Falcon' if cfg.family == 'falcon' else 'Llama'} model with this config)"
        )


def load_hf_params(path: str, cfg: ModelConfig) -> dict:
    """Read an HF Llama directory's weights into our (host numpy) parameter tree for ``cfg``: the whole
    model on the host. :func:`lazy_hf_params` + :func:`streaming.place` load straight into device shards."""
    from flax import linen as nn

    from meditron_jax.model import abstract_params

    if cfg.family == "falcon":
        from meditron_jax.convert import hf_falcon

        return hf_falcon.load_hf_params(path, cfg)
    reader = TensorReader(path)
    dtype = _param_dtype(cfg)
    shapes = nn.meta.unbox(abstract_params(cfg))
    params = _map_tree(shapes, lambda s: np.empty(s.shape, dtype))
    used = set()
    names = list(_hf_names(cfg))
    for n, (ours, name, i) in enumerate(names):
        want = _check_tensor(reader, path, cfg, ours, name)
        w = reader.get(name)
        if tuple(w.shape) != want:  # the library disagrees with the header it was given
            raise ConversionError(f"{path}: tensor {name!r} reads as shape {tuple(w.shape)}, expected {want}")
        if (n + 1) % max(1, len(names) // 10) == 0 or n + 1 == len(names):
            log.info("read %d/%d tensors of %s", n + 1, len(names), path)
        tree, idx = _layer_dict(params, cfg, i)
        target = _get(tree, ours)
        value = _to_ours(cfg, ours, w).astype(dtype)
        if idx is None:
            target[...] = value
        else:
            target[idx] = value
        used.add(name)
    _check_no_extra(reader, path, cfg, used)
    return params


def _stream_entries(
    path: str, cfg: ModelConfig, reader: TensorReader
) -> Iterator[tuple[tuple[str, ...], str, int | None, tuple, streaming.Transform]]:
    """(our path within a layer or the top, HF name, layer or None, checked HF shape, transform) of every
    tensor: the table the streaming import consumes. Llama's transforms read slices; a family whose
    conversion is a table of whole-tensor functions (Falcon's fused QKV) reads each tensor whole."""
    if cfg.family == "falcon":
        from meditron_jax.convert import hf_falcon

        for name, want, i, our_paths, to_ours, _ in hf_falcon._entries(cfg):
            kind, shape = reader.info(name)
            if shape != want:
                raise ConversionError(
                    f"{path}: tensor {name!r} has shape {shape}, expected {want} for the config in config.json"
                )
            if kind not in _FLOAT_DTYPES:
                raise ConversionError(f"{path}: tensor {name!r} has dtype {kind}, expected a floating-point type")
            for j, our_path in enumerate(our_paths):
                yield our_path, name, i, want, streaming.Whole(_nth(to_ours, j))
        return
    for ours, name, i in _hf_names(cfg):
        yield ours, name, i, _check_tensor(reader, path, cfg, ours, name), _transform(cfg, ours)


def _nth(fn: Callable[[np.ndarray], tuple[np.ndarray, ...]], j: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda w: fn(w)[j]


def lazy_hf_params(path: str, cfg: ModelConfig) -> dict:
    """Our parameter tree for ``cfg`` with :class:`streaming.LazyParam` leaves over an HF directory.

    Every tensor's header is checked here (names, shapes, dtypes, nothing left over); no data is read until
    a leaf is indexed, e.g. by :func:`streaming.place`."""
    from flax import linen as nn

    from meditron_jax.model import abstract_params

    reader = TensorReader(path)
    dtype = _param_dtype(cfg)
    shapes = nn.meta.unbox(abstract_params(cfg))
    parts: dict[tuple[str, ...], list[streaming.Part]] = {}
    for ours, name, i, want, transform in _stream_entries(path, cfg, reader):
        where = () if i is None else ("layers",) if cfg.scan_layers else (f"layers_{i}",)
        parts.setdefault(where + ours, []).append(streaming.Part(reader, name, want, transform))
    _check_no_extra(reader, path, cfg, {part.name for ps in parts.values() for part in ps})

    def lazy(keys: tuple[str, ...], shape) -> streaming.LazyParam:
        stacked = cfg.scan_layers and keys[0] == "layers"
        if keys not in parts:
            raise ConversionError(f"{path}: no tensor of the checkpoint gives our parameter {'/'.join(keys)}")
        return streaming.LazyParam(shape.shape, dtype, parts[keys], stacked)

    return _map_tree_with_path(shapes, lazy)


def load_hf_sharded(path: str, cfg: ModelConfig, shardings=None, *, max_chunk_bytes: int | None = None) -> dict:
    """An HF Llama directory's weights as ``jax.Array`` s in ``shardings`` (a tree like the params, or one
    sharding; None: the default device), read straight into each device's shard: the host holds at most
    about one checkpoint tensor at a time, never the model."""
    return streaming.place(lazy_hf_params(path, cfg), shardings, max_chunk_bytes=max_chunk_bytes)


def _map_tree_with_path(tree, fn, keys: tuple[str, ...] = ()):
    if isinstance(tree, dict):
        return {k: _map_tree_with_path(v, fn, keys + (k,)) for k, v in tree.items()}
    return fn(keys, tree)


def _map_tree(tree, fn):
    if isinstance(tree, dict):
        return {k: _map_tree(v, fn) for k, v in tree.items()}
    return fn(tree)


def _looks_like_hf_export(folder: str, names: set[str]) -> bool:
    """Only what :func:`save_hf` writes (an output of an older version, before the marker file). The same
    names come from ``transformers``' save_pretrained, whose config.json records its version; ours does not."""
    shard = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors$")
    ours = {"config.json", "generation_config.json", "model.safetensors.index.json", *TOKENIZER_FILES}
    if "config.json" not in names or not all(n in ours or shard.match(n) for n in names):
        return False
    try:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "transformers_version" not in cfg


HF_OUTPUT = OutputKind("hf_model", "Hugging Face model folder", _looks_like_hf_export)


def host_array(x, index: int | None = None) -> np.ndarray:
    """``x[index]`` (or ``x``) on the host. Of a device array only that layer is gathered, shard by shard, and
    nothing stays behind: ``np.asarray`` of a sharded ``jax.Array`` keeps its host copy alive as long as the
    array, which in an export would pile up the whole model on the host."""
    import jax

    if index is not None:
        x = x[index]
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    out = np.empty(x.shape, x.dtype)
    for shard in x.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
    return out


def _export_tensors(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in HF layout) of every tensor :func:`save_hf` writes."""
    if cfg.family == "falcon":
        from meditron_jax.convert import hf_falcon

        yield from hf_falcon.export_tensors(params, cfg)
        return
    for ours, name, i in _hf_names(cfg):
        tree, idx = _layer_dict(params, cfg, i)
        yield name, _to_hf(cfg, ours, host_array(_get(tree, ours), idx))


def save_hf(
    params: dict,
    cfg: ModelConfig,
    out_dir: str,
    *,
    dtype: str | None = None,
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    inputs: Sequence[str] = (),
    overwrite: bool = False,
    record: dict | None = None,
) -> None:
    """Write ``params`` as an HF Llama directory. Written to a temporary folder, then renamed into place;
    ``out_dir`` must be new, empty or a previous HF export (else ``overwrite``), and none of ``inputs``."""
    from safetensors.numpy import save_file

    dtype = dtype or cfg.param_dtype
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    inputs = [*inputs, *([tokenizer_dir] if tokenizer_dir else [])]
    with atomic_directory(out_dir, HF_OUTPUT, inputs=inputs, overwrite=overwrite, record=record) as tmp:
        # Each shard file is written as soon as it is full, so the host holds one shard (≤ max_shard_bytes)
        # and not the whole model; the files get their "-of-N" names once N is known.
        written: list[tuple[str, list[str], int]] = []  # (temporary name, tensor names, bytes)
        shard: dict[str, np.ndarray] = {}
        size = total = 0

        def flush() -> None:
            nonlocal shard, size
            part = f".shard-{len(written):05d}.safetensors"
            save_file(shard, os.path.join(tmp, part), metadata={"format": "pt"})
            written.append((part, list(shard), size))
            shard, size = {}, 0

        for name, w in _export_tensors(params, cfg):
            w = np.ascontiguousarray(w, dtype=np_dtype)  # one copy: cast and row-major together
            if size and size + w.nbytes > max_shard_bytes:
                flush()
            shard[name] = w
            size += w.nbytes
            total += w.nbytes
            del w
        if shard or not written:
            flush()
        n = len(written)
        weight_map = {}
        for k, (part, names, nbytes) in enumerate(written):
            fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(tmp, part), os.path.join(tmp, fname))
            weight_map.update(dict.fromkeys(names, fname))
            log.info("wrote %s (%d/%d, %.2f GiB)", fname, k + 1, n, nbytes / 2**30)
        if n > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg, dtype), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, f, indent=2)
        copy_tokenizer_files(tokenizer_dir, tmp)
