"""Model configuration and the named presets (Llama-1/2, Falcon and MEDITRON sizes, tiny test models)."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any

import gin
import numpy as np

REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "minimal")
DOT_SAVING_REMAT_POLICIES = ("dots", "dots_with_no_batch_dims", "minimal")
ATTENTION_IMPLS = ("auto", "pallas_tpu", "pallas_gpu", "cudnn", "cpu_native", "xla_blockwise", "xla")
MATMUL_IMPLS = ("auto", "cpu_native", "xla")
# ModelConfig fields that change how the model computes, not what it is (or the weights' shapes, except
# scan_layers, which stacks the layers' parameters).
EXECUTION_FIELDS = (
    "param_dtype",
    "dtype",
    "scan_layers",
    "remat_policy",
    "attention_impl",
    "matmul_impl",
    "loss_chunk_size",
    "rope_in_compute_dtype",
    "weight_panels",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus the knobs that change how (not what) the model computes."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Embedding/head rows are padded to this multiple so the vocab axis can be sharded (MEDITRON's
    # 32,017 tokens divide by nothing useful). Padded logits are sliced off before anyone sees them.
    vocab_pad_multiple: int = 128
    # Model family: "llama" (Llama-1, Llama-2, MEDITRON) or "falcon" (FalconForCausalLM: LayerNorm with bias,
    # GELU MLP). The Falcon-only fields below keep their defaults for Llama.
    family: str = "llama"
    parallel_attn: bool = False  # attention and MLP both read the block input; their outputs are summed
    parallel_norms: int = 1  # with parallel_attn: 1 LayerNorm feeding both (Falcon-7B) or 2, ln_attn/ln_mlp (40B)
    # HF's Falcon-40B/180B layout: the fused query_key_value tensor grouped per KV head (conversion only).
    new_decoder_architecture: bool = False
    layer_norm_eps: float = 1e-5
    # Execution options.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmuls
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"
    # The dense layers' products: "auto" runs the large float32 ones on one CPU device through the compiled
    # kernel (kernels.matmul), everything else through XLA; "xla" always XLA; "cpu_native" forces the kernel.
    matmul_impl: str = "auto"
    # Training loss: sequence positions per chunk of the fused output head + cross-entropy, so the float32
    # [tokens, vocab] logits never exist in full (meditron_jax.model.loss). 0: one chunk (the exact default);
    # a chunk sums the loss and the head's gradient in another order (rounding-level differences).
    loss_chunk_size: int = 0
    # RoPE's rotation in the compute dtype (Hugging Face's way: cos/sin cast to it) instead of float32: no float32
    # [tokens, heads, head_dim] temporaries in a bfloat16 model. Changes bfloat16 numerics, so off by default.
    rope_in_compute_dtype: bool = False
    # The inference engine's own layout of the dense weights (never set it by hand; training refuses it): 0,
    # as stored ([in, out]); otherwise panel-major in panels of this many columns, which the thin CPU kernel
    # streams without cache conflicts (kernels.pack_panels; Engine's weight_layout).
    weight_panels: int = 0

    def __post_init__(self):
        _check_types(self)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.matmul_impl not in MATMUL_IMPLS:
            raise ValueError(f"matmul_impl {self.matmul_impl!r} is not one of {MATMUL_IMPLS}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} {getattr(self, name)!r} must be float32, bfloat16 or float16")
        _check_family(self)

    @property
    def layer_matmul_impl(self) -> str:
        """``matmul_impl`` as the decoder layers use it. Under a remat policy that saves dot outputs, "auto"
        keeps XLA's dots: a kernel's product is not a dot to the policy, so it would be recomputed."""
        if self.matmul_impl == "auto" and self.remat_policy in DOT_SAVING_REMAT_POLICIES:
            return "xla"
        return self.matmul_impl

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count of the unpadded model (what the paper calls 7B / 70B)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        assert self.head_dim is not None  # __post_init__ fills it in
        attn = d * self.head_dim * (self.num_heads * 2 + self.num_kv_heads * 2)
        head = 0 if self.tie_word_embeddings else v * d
        if self.family == "falcon":  # GELU MLP (2 matrices); LayerNorms have a scale and a bias
            norms = self.parallel_norms if self.parallel_attn else 2
            return self.num_layers * (attn + 2 * d * f + norms * 2 * d) + v * d + head + 2 * d
        per_layer = attn + 3 * d * f + 2 * d
        return self.num_layers * per_layer + v * d + head + d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelConfig field(s) {unknown}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: str) -> ModelConfig:
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of ModelConfig fields, got {type(d).__name__}")
        return cls.from_dict(d, source=path)


class ConfigError(ValueError):
    """A ModelConfig field of the wrong type or out of range; ``field`` names it (callers map it to their key)."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} ({type(value).__name__}) is invalid: {allowed}")


# Type and range of every field, checked where a config enters (JSON, gin, Python): a string "false" is not
# False, 2.5 layers are not 2, and NaN is not a norm epsilon.
_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "max_position_embeddings",
    "vocab_pad_multiple",
    "parallel_norms",
)
_TOKEN_IDS = ("bos_token_id", "eos_token_id")
_POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps", "layer_norm_eps")
_BOOLS = (
    "tie_word_embeddings",
    "scan_layers",
    "parallel_attn",
    "new_decoder_architecture",
    "rope_in_compute_dtype",
)
_STRINGS = ("param_dtype", "dtype", "remat_policy", "attention_impl", "matmul_impl", "family")
FAMILIES = ("llama", "falcon")
# Fields that only Falcon reads, with the value a Llama config must keep.
_FALCON_ONLY = {"parallel_attn": False, "parallel_norms": 1, "new_decoder_architecture": False, "layer_norm_eps": 1e-5}


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_types(cfg: ModelConfig) -> None:
    for name in _POSITIVE_INTS + ("head_dim",):
        v = getattr(cfg, name)
        if name == "head_dim" and v is None:
            continue
        if not _is_int(v) or v < 1:
            raise ConfigError(name, v, "must be a positive integer")
        object.__setattr__(cfg, name, int(v))
    if not _is_int(cfg.loss_chunk_size) or cfg.loss_chunk_size < 0:
        raise ConfigError("loss_chunk_size", cfg.loss_chunk_size, "must be a non-negative integer (0: no chunking)")
    object.__setattr__(cfg, "loss_chunk_size", int(cfg.loss_chunk_size))
    if not _is_int(cfg.weight_panels) or cfg.weight_panels < 0:
        raise ConfigError("weight_panels", cfg.weight_panels, "must be a non-negative integer (0: as stored)")
    object.__setattr__(cfg, "weight_panels", int(cfg.weight_panels))
    for name in _TOKEN_IDS:
        v = getattr(cfg, name)
        if not _is_int(v) or v < 0:
            raise ConfigError(name, v, "must be a non-negative integer token id")
        if v >= cfg.vocab_size:
            raise ConfigError(name, v, f"must be below vocab_size {cfg.vocab_size}")
        object.__setattr__(cfg, name, int(v))
    for name in _POSITIVE_FLOATS:
        v = getattr(cfg, name)
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ConfigError(name, v, "must be a finite positive number")
        object.__setattr__(cfg, name, float(v))
    for name in _BOOLS:
        v = getattr(cfg, name)
        if not isinstance(v, (bool, np.bool_)):
            raise ConfigError(name, v, "must be a boolean (JSON true/false)")
        object.__setattr__(cfg, name, bool(v))
    for name in _STRINGS:
        v = getattr(cfg, name)
        if not isinstance(v, str):
            raise ConfigError(name, v, "must be a string")


def _check_family(cfg: ModelConfig) -> None:
    if cfg.family not in FAMILIES:
        raise ConfigError("family", cfg.family, f"must be one of {FAMILIES}")
    if cfg.family == "llama":
        for name, default in _FALCON_ONLY.items():
            if getattr(cfg, name) != default:
                raise ConfigError(
                    name, getattr(cfg, name), f"applies to family 'falcon' only (Llama keeps {default!r})"
                )
        return
    if cfg.rms_norm_eps != 1e-5:
        raise ConfigError("rms_norm_eps", cfg.rms_norm_eps, "Falcon has no RMSNorm; set layer_norm_eps")
    if cfg.parallel_norms not in (1, 2):
        raise ConfigError("parallel_norms", cfg.parallel_norms, "must be 1 or 2")
    if cfg.parallel_norms == 2 and not cfg.parallel_attn:
        raise ConfigError("parallel_norms", 2, "two LayerNorms feed attention and MLP in parallel: set parallel_attn")
    if cfg.new_decoder_architecture and not cfg.parallel_attn:
        raise ConfigError(
            "new_decoder_architecture", True, "Falcon's new decoder is always parallel: set parallel_attn"
        )


# MEDITRON's vocabulary: 32,000 Llama pieces + 5 Megatron specials + 12 marker tokens (MEDITRON.md §1).
MEDITRON_VOCAB_SIZE = 32017

_LLAMA2_7B = ModelConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    max_position_embeddings=4096,
)
_LLAMA2_13B = ModelConfig(
    hidden_size=5120,
    intermediate_size=13824,
    num_layers=40,
    num_heads=40,
    num_kv_heads=40,
    max_position_embeddings=4096,
)
_LLAMA2_70B = ModelConfig(
    hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8, max_position_embeddings=4096
)

# Llama-1 (Touvron et al. 2023a): MHA, a 2,048 context, RMSNorm eps 1e-6; same code as Llama-2.
_LLAMA1: dict[str, Any] = dict(max_position_embeddings=2048, rms_norm_eps=1e-6)
# Falcon (Almazrouei et al. 2023; tiiuae/falcon-* config.json): 65,024-token vocabulary, a 2,048 context, GELU
# MLP of 4 × hidden, tied head, bos = eos = 11. 7B: multi-query, one LayerNorm; 40B/180B: the new decoder,
# 8 KV groups and two LayerNorms. All rotary (ALiBi Falcons are refused on import).
_FALCON: dict[str, Any] = dict(
    family="falcon",
    vocab_size=65024,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    bos_token_id=11,
    eos_token_id=11,
    parallel_attn=True,
)
_FALCON_NEW: dict[str, Any] = dict(_FALCON, parallel_norms=2, new_decoder_architecture=True, num_kv_heads=8)

PRESETS: dict[str, ModelConfig] = {
    "llama1-7b": ModelConfig(
        hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, **_LLAMA1
    ),
    "llama1-13b": ModelConfig(
        hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40, **_LLAMA1
    ),
    "llama1-33b": ModelConfig(
        hidden_size=6656, intermediate_size=17920, num_layers=60, num_heads=52, num_kv_heads=52, **_LLAMA1
    ),
    "llama1-65b": ModelConfig(
        hidden_size=8192, intermediate_size=22016, num_layers=80, num_heads=64, num_kv_heads=64, **_LLAMA1
    ),
    "falcon-7b": ModelConfig(
        hidden_size=4544, intermediate_size=4 * 4544, num_layers=32, num_heads=71, num_kv_heads=1, **_FALCON
    ),
    "falcon-40b": ModelConfig(
        hidden_size=8192, intermediate_size=4 * 8192, num_layers=60, num_heads=128, **_FALCON_NEW
    ),
    "falcon-180b": ModelConfig(
        hidden_size=14848, intermediate_size=4 * 14848, num_layers=80, num_heads=232, **_FALCON_NEW
    ),
    "llama2-7b": _LLAMA2_7B,
    "llama2-13b": _LLAMA2_13B,
    "llama2-70b": _LLAMA2_70B,
    # The released meditron-7b config has a 2048 context; meditron-70b keeps 4096 (MEDITRON.md §1).
    "meditron-7b": _LLAMA2_7B.replace(vocab_size=MEDITRON_VOCAB_SIZE, max_position_embeddings=2048),
    "meditron-70b": _LLAMA2_70B.replace(vocab_size=MEDITRON_VOCAB_SIZE),
    # Test sizes: MHA, GQA and MQA, small enough for a CPU.
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=172,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        max_position_embeddings=1024,
    ),
    "tiny-mha": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        max_position_embeddings=1024,
    ),
    "tiny-mqa": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        max_position_embeddings=1024,
    ),
    # Falcon's two layouts at test size: multi-query with one LayerNorm (7B), grouped KV with two (40B).
    "tiny-falcon-mqa": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        max_position_embeddings=1024,
        family="falcon",
        parallel_attn=True,
    ),
    "tiny-falcon": ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=256,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        max_position_embeddings=1024,
        family="falcon",
        parallel_attn=True,
        parallel_norms=2,
        new_decoder_architecture=True,
    ),
    # The ~134M Llama-2 shape the CPU benchmarks share (bench/train_throughput.py, bench/decode_throughput.py).
    "bench-134m": ModelConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        max_position_embeddings=2048,
    ),
    # 100M-ish: large enough to exercise sharding and kernels for real, small enough to compile on CPU.
    "small": ModelConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        max_position_embeddings=2048,
    ),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """A named preset, with field overrides (e.g. ``get_config("meditron-7b", dtype="bfloat16")``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# Gin: `TrainConfig.model = @ModelConfig()` with `ModelConfig.<field> = ...` in gin/models/*.gin. Registered
# as an external configurable so direct Python calls of ModelConfig never pick up gin bindings.
gin.external_configurable(ModelConfig, name="ModelConfig", module="meditron_jax")
