"""The two compiled programs of generation, single-device or sharded on a mesh.

* ``prefill``: run the left-padded prompts through the model once, fill the KV cache, pick the first token.
* ``decode``: a ``while_loop`` of one-token decode steps that stops at a traced step limit or as soon as
  every row is done (stop token or its own ``max_new_tokens``); called again for the next chunk when stop
  strings must be checked on the host. The decode state (KV cache included) is donated, so the cache is
  updated in place: each step writes one slot with ``dynamic_update_slice``, nothing copies the cache.

Shapes are fixed by (batch, prompt length, cache length); sampling knobs are traced scalars, so only the
greedy/filtered switches and the shapes select a compiled program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from meditron_jax import kernels
from meditron_jax.config import ModelConfig
from meditron_jax.infer import sampling
from meditron_jax.kernels import cpu_native
from meditron_jax.model import DENSE_WEIGHTS, Llama, init_cache, logical_axes
from meditron_jax.parallel.mesh import MeshError
from meditron_jax.parallel.rules import logical_axis_rules, logical_to_spec, mesh_axis_size, resolve_rules

MAX_STOP_IDS = 8  # stop-id slots in a program; more ids round up to a multiple (a new program)
WEIGHT_LAYOUTS = ("auto", "rows", "panels")


@flax.struct.dataclass
class DecodeState:
    cache: Any  # the model's "cache" collection (K, V, valid mask, write index per layer)
    token: Any  # [b] last chosen token, not yet fed to the model
    position: Any  # [b, 1] its position
    counts: Any  # [b, vocab] int32 occurrences in the output (frequency penalty)
    out: Any  # [b, max_steps] chosen tokens
    length: Any  # [b] tokens generated per row
    done: Any  # [b] bool
    step: Any  # [] tokens chosen so far (all rows move together)
    keys: Any  # [b] PRNG keys


def inference_rules(rules, config: ModelConfig, mesh: Mesh, model_name: str = "the model"):
    """The training rules, resolved for ``config``, with ``length`` left whole (no sequence parallelism
    when decoding one token at a time)."""
    shape = dict(mesh.shape)
    if shape.get("sequence", 1) > 1 or shape.get("stage", 1) > 1:
        raise MeshError(
            f"generation shards over data/fsdp/tensor only; mesh has sequence={shape.get('sequence', 1)}, "
            f"stage={shape.get('stage', 1)} (make them 1)"
        )
    resolved = resolve_rules(logical_axis_rules() if rules is None else rules, config, shape, model_name)
    out = tuple((name, None if name == "length" else axes) for name, axes in resolved.rules)
    return out, resolved.notes


class Programs:
    """Jitted prefill/decode for one model and (optional) mesh; tracks how many programs were traced."""

    def __init__(
        self,
        config: ModelConfig,
        mesh: Mesh | None = None,
        rules: Sequence | None = None,
        compiler_options: dict | None = None,
        stacked_params: str = "split",
        weight_layout: str = "auto",
    ):
        # Layers unrolled: each layer's KV cache is its own buffer, written in place one slot per step. With
        # scanned layers the layer scan re-stacks every layer's cache as a new output each step (a full
        # copy of the cache per token; measured in tests/test_engine.py::test_kv_cache_is_updated_in_place).
        # Scanned (stacked) parameters reach the unrolled model either split once into per-layer arrays
        # ("split") or sliced per layer inside the program ("slice": no second copy when the caller keeps
        # its stacked device arrays; fused on TPU, but XLA:CPU copies the slices every step).
        if stacked_params not in ("split", "slice"):
            raise ValueError(f"stacked_params must be 'split' or 'slice', got {stacked_params!r}")
        self.input_config = config
        self.config = config.replace(scan_layers=False, weight_panels=weight_panels(weight_layout, config, mesh))
        self.split_layers = config.scan_layers and stacked_params == "split"
        self.slice_layers = config.scan_layers and stacked_params == "slice"
        self.mesh = mesh
        self.model = Llama(self.config)
        self.traces = 0
        self.notes: tuple[str, ...] = ()
        if mesh is not None:
            self.rules, self.notes = inference_rules(rules, config, mesh)
            self.param_shardings = nn.logical_to_mesh_sharding(logical_axes(self.param_config), mesh, self.rules)
            self.batch_shards = mesh_axis_size(dict(mesh.shape), logical_to_spec(("batch",), self.rules)[0])
        else:
            self.rules = ()
            self.param_shardings = None
            self.batch_shards = 1
        self._prefill: dict[tuple, Any] = {}
        self._decode: dict[tuple, Any] = {}
        self._compiler_options = compiler_options  # XLA options, e.g. a lower CPU codegen level in tests

    # -- placement -------------------------------------------------------------------------------------

    def _sharding(self, *names):
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, logical_to_spec(names, self.rules))

    def place_params(self, params):
        """Parameters in the unrolled layout on the device(s); host arrays are copied shard by shard."""
        if self.split_layers:
            params = unstack_layers(params, self.config.num_layers)
        if self.config.weight_panels:
            params = pack_dense_weights(params, self.config.weight_panels, owned=self.split_layers)
        if self.mesh is None:
            return jax.device_put(params)

        def put(x, sharding):
            if isinstance(x, jax.Array):
                return jax.device_put(x, sharding)
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(put, params, self.param_shardings)

    def put(self, x, *names):
        """A host array placed with the given logical axes (replicated without a mesh)."""
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        sharding = self._sharding(*names)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def cache_shardings(self, batch: int, cache_len: int):
        shapes = jax.eval_shape(lambda: init_cache(self.config, batch, cache_len))

        names = {
            "key": ("batch", "kv_heads", None, "head_dim"),  # head-major (model.layers.Attention)
            "value": ("batch", "kv_heads", None, "head_dim"),
            "valid": ("batch", None),
            "index": (),
        }

        def spec(path, leaf):
            axes = names[jax.tree_util.keystr(path[-1:], simple=True)]
            return self._sharding(*axes[len(axes) - leaf.ndim :])  # a one-row cache has no batch axis

        return jax.tree_util.tree_map_with_path(spec, shapes), shapes

    def state_shardings(self, batch: int, cache_len: int) -> DecodeState | None:
        if self.mesh is None:
            return None
        cache, _ = self.cache_shardings(batch, cache_len)
        b = self._sharding("batch")
        b2 = self._sharding("batch", None)
        return DecodeState(
            cache=cache,
            token=b,
            position=b2,
            counts=b2,
            out=b2,
            length=b,
            done=b,
            step=self._sharding(),
            keys=b,
        )

    def check_batch(self, batch: int) -> None:
        if batch % self.batch_shards:
            raise MeshError(f"batch {batch} does not split over the mesh's {self.batch_shards} batch shards")

    # -- programs -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _context(self):
        if self.mesh is None:
            yield
        else:
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                yield

    @property
    def param_config(self) -> ModelConfig:
        """The configuration whose parameter layout the engine holds (stacked when slicing in-program)."""
        return self.input_config if self.slice_layers else self.config

    def _forward(self, params, cache, tokens, positions, segment_ids, mode):
        """Logits at the last position only: the final norm's output is cut to one position before the
        output projection, so prefill never builds [b, length, vocab] logits."""
        if self.slice_layers:
            params = unstack_layers(params, self.config.num_layers)  # static slices, inside the program

        def last_position(next_fun, args, kwargs, context):
            if context.module.name == "final_norm" and context.method_name == "__call__":
                (x,) = args
                return next_fun(x[:, -1:], **kwargs)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(last_position):
            logits, state = self.model.apply(
                {"params": params, "cache": cache}, tokens, positions, segment_ids, mode=mode, mutable=["cache"]
            )
        return logits[:, -1], state["cache"]

    def _prefill_impl(self, params, tokens, real, positions, prompt_index, sample_index, done, source, knobs,
                      stop_ids, max_new, seed, *, cache_len, max_steps, greedy, filtered):  # fmt: skip
        """``source`` None: one prompt row per decode row. Otherwise ``tokens`` holds each distinct prompt
        once and ``source[r]`` names row r's prompt: the prompts run once, then their cache and last
        logits are gathered out to the rows (``n`` samples share one prefill)."""
        self.traces += 1
        b = tokens.shape[0] if source is None else source.shape[0]
        cache = init_cache(self.config, tokens.shape[0], cache_len)
        if self.mesh is not None:
            cache = jax.lax.with_sharding_constraint(cache, self.cache_shardings(tokens.shape[0], cache_len)[0])
        logits, cache = self._forward(params, cache, tokens, positions, real, "prefill")
        if source is not None:
            logits, positions = logits[source], positions[source]
            cache = jax.tree.map(lambda x: x[source] if x.ndim else x, cache)
            if self.mesh is not None:
                cache = jax.lax.with_sharding_constraint(cache, self.cache_shardings(b, cache_len)[0])
        keys = sampling.row_keys(seed, prompt_index, sample_index)
        counts = jnp.zeros((b, self.config.vocab_size), jnp.int32)
        tok = sampling.next_tokens(logits, counts, keys, 0, knobs, greedy=greedy, filtered=filtered)
        state = DecodeState(
            cache=cache,
            token=tok,
            position=positions[:, -1:] + 1,
            counts=counts,
            out=jnp.zeros((b, max_steps), jnp.int32),
            length=jnp.zeros((b,), jnp.int32),
            done=done,
            step=jnp.zeros((), jnp.int32),
            keys=keys,
        )
        return _record(state, tok, stop_ids, max_new)

    def _decode_impl(self, params, state: DecodeState, limit, knobs, stop_ids, max_new, *, greedy, filtered):
        self.traces += 1

        def cond(s):
            return (s.step < limit) & ~jnp.all(s.done)

        def body(s):
            logits, cache = self._forward(
                params, s.cache, s.token[:, None], s.position, jnp.ones_like(s.position), "decode"
            )
            tok = sampling.next_tokens(logits, s.counts, s.keys, s.step, knobs, greedy=greedy, filtered=filtered)
            s = dataclasses.replace(s, cache=cache, position=s.position + 1)
            return _record(s, tok, stop_ids, max_new)

        return jax.lax.while_loop(cond, body, state)

    def prefill_fn(self, batch: int, cache_len: int, max_steps: int, greedy: bool, filtered: bool,
                   prompts: int | None = None):  # fmt: skip
        """``prompts``: distinct prompt rows when decode rows share prompts (None: one per row)."""
        key = (batch, cache_len, max_steps, greedy, filtered, prompts)
        if key not in self._prefill:
            kw: dict[str, Any] = {}
            if self.mesh is not None:
                b, b2, rep = self._sharding("batch"), self._sharding("batch", None), self._sharding()
                knob_sh = dict.fromkeys(("temperature", "top_k", "top_p", "penalty"), rep)
                src = None if prompts is None else b
                kw = {
                    "in_shardings": (self.param_shardings, b2, b2, b2, b, b, b, src, knob_sh, rep, rep, rep),
                    "out_shardings": self.state_shardings(batch, cache_len),
                }
            impl = functools.partial(
                self._prefill_impl, cache_len=cache_len, max_steps=max_steps, greedy=greedy, filtered=filtered
            )
            self._prefill[key] = jax.jit(impl, compiler_options=self._compiler_options, **kw)
        return self._prefill[key]

    def decode_fn(self, batch: int, cache_len: int, greedy: bool, filtered: bool):
        key = (batch, cache_len, greedy, filtered)
        if key not in self._decode:
            kw: dict[str, Any] = {}
            if self.mesh is not None:
                rep = self._sharding()
                state_sh = self.state_shardings(batch, cache_len)
                knob_sh = dict.fromkeys(("temperature", "top_k", "top_p", "penalty"), rep)
                kw = {
                    "in_shardings": (self.param_shardings, state_sh, rep, knob_sh, rep, rep),
                    "out_shardings": state_sh,
                }
            impl = functools.partial(self._decode_impl, greedy=greedy, filtered=filtered)
            self._decode[key] = jax.jit(impl, donate_argnums=(1,), compiler_options=self._compiler_options, **kw)
        return self._decode[key]

    def prefill(self, params, inputs: dict, knobs, stop_ids, max_new, seed, *, cache_len, max_steps, greedy,
                filtered) -> DecodeState:  # fmt: skip
        source = inputs.get("source")
        b = inputs["tokens"].shape[0] if source is None else source.shape[0]
        prompts = None if source is None else inputs["tokens"].shape[0]
        fn = self.prefill_fn(b, cache_len, max_steps, greedy, filtered, prompts)
        args = [inputs[k] for k in ("tokens", "real", "positions", "prompt_index", "sample_index", "done")]
        with self._context():
            return fn(params, *args, source, knobs, stop_ids, max_new, seed)

    def decode(self, params, state: DecodeState, limit, knobs, stop_ids, max_new, *, greedy, filtered):
        b = state.token.shape[0]
        cache_len = _cache_len(state.cache)
        fn = self.decode_fn(b, cache_len, greedy, filtered)
        with self._context():
            return fn(params, state, limit, knobs, stop_ids, max_new)

    def lower_decode(self, abstract_params, batch: int, cache_len: int, max_steps: int, *, greedy=True,
                     filtered=False):  # fmt: skip
        """Lower the decode program for abstract inputs (ahead-of-time compilation)."""
        state = self.abstract_state(batch, cache_len, max_steps)
        knobs = jax.eval_shape(lambda: sampling.SamplingParams().arrays(self.config.vocab_size))
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        stop = jax.ShapeDtypeStruct((MAX_STOP_IDS,), jnp.int32)
        fn = self.decode_fn(batch, cache_len, greedy, filtered)
        with self._context():
            return fn.lower(abstract_params, state, scalar, knobs, stop, scalar)

    def abstract_state(self, batch: int, cache_len: int, max_steps: int) -> DecodeState:
        _, cache = self.cache_shardings(batch, cache_len)
        vocab = self.config.vocab_size
        i32 = jnp.int32
        shapes = DecodeState(
            cache=cache,
            token=jax.ShapeDtypeStruct((batch,), i32),
            position=jax.ShapeDtypeStruct((batch, 1), i32),
            counts=jax.ShapeDtypeStruct((batch, vocab), i32),
            out=jax.ShapeDtypeStruct((batch, max_steps), i32),
            length=jax.ShapeDtypeStruct((batch,), i32),
            done=jax.ShapeDtypeStruct((batch,), jnp.bool_),
            step=jax.ShapeDtypeStruct((), i32),
            keys=jax.eval_shape(lambda: sampling.row_keys(0, jnp.zeros(batch, i32), jnp.zeros(batch, i32))),
        )
        shardings = self.state_shardings(batch, cache_len)
        if shardings is None:
            return shapes
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def weight_panels(layout: str, config: ModelConfig, mesh: Mesh | None) -> int:
    """The engine's ModelConfig.weight_panels for ``layout``: "rows" keeps the dense weights as stored (0);
    "panels" packs them for the thin CPU kernel (its panel width), or raises ValueError saying why it cannot;
    "auto" packs them wherever "panels" can. Packed, decode's products stream each weight panel by panel
    (docs/performance.md, decode, eighth round); prefill's unpack a copy of each piece first (2–7% slower)."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout {layout!r} is not one of {WEIGHT_LAYOUTS}")
    if layout == "rows":
        return 0
    why = _why_not_panels(config, mesh)
    if why and layout == "panels":
        raise ValueError(f"weight_layout 'panels' cannot be used: {why}")
    return 0 if why else cpu_native.panel_width()


def _why_not_panels(config: ModelConfig, mesh: Mesh | None) -> str:
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    if len(devices) != 1 or devices[0].platform != "cpu":
        return f"the thin kernel runs on one CPU device, not {len(devices)} {devices[0].platform} device(s)"
    if config.dtype != "float32":
        return f"the thin kernel computes in float32, the model in {config.dtype}"
    if "xla" in (config.matmul_impl, config.layer_matmul_impl):
        return "matmul_impl 'xla' (or a remat policy that saves dots) keeps XLA's dots"
    if not cpu_native.available():
        return cpu_native.why_unavailable()
    width = cpu_native.panel_width()
    assert config.head_dim is not None  # ModelConfig fills it in
    columns = {
        "num_heads * head_dim": config.num_heads * config.head_dim,
        "num_kv_heads * head_dim": config.num_kv_heads * config.head_dim,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "the padded vocabulary": config.padded_vocab_size,
    }
    for name, n in columns.items():
        if n % width:
            return f"{name} = {n} is not a multiple of the panel width {width}"
    return ""


_pack = jax.jit(kernels.pack_panels, static_argnums=(1, 2))


def pack_dense_weights(params, panels: int, owned: bool = False) -> dict:
    """``params`` with every dense weight (model.DENSE_WEIGHTS) in panel-major order (`kernels.pack_panels`),
    leaf by leaf into new arrays: a caller's own are never changed. ``owned``: the nested dicts are the
    caller's to empty (a tree `unstack_layers` just made), and each leaf is dropped as soon as its packed
    copy exists, so that the split copies and the packed ones never all exist at once."""
    out = {}
    for key in list(params):
        value = params.pop(key) if owned and isinstance(params, dict) else params[key]
        if isinstance(value, Mapping):
            out[key] = pack_dense_weights(value, panels, owned)
        else:
            contract = DENSE_WEIGHTS.get(key)
            out[key] = value if contract is None else _pack(value, panels, contract)
        del value
    return out


@functools.partial(jax.jit, static_argnums=1)
def _split_stacked(leaves: list, num_layers: int) -> list:
    return [tuple(x[i] for i in range(num_layers)) for x in leaves]


def unstack_layers(params, num_layers: int) -> dict:
    """Scanned-layout parameters (``layers`` stacked on axis 0) → ``layers_0 .. layers_{n-1}``.

    Host arrays are sliced as views. Device arrays are sliced by one program for all of them, compiled once
    per process and model shape (a program per leaf cost ~0.15 s of compiling each); until the caller drops
    its stacked arrays, both copies exist. Every container is new (`pack_dense_weights` may empty them); the
    leaves outside ``layers`` are the caller's."""
    if "layers" not in params:
        raise ValueError(f"expected scanned parameters with a 'layers' entry, got keys {sorted(params)}")
    out = {k: jax.tree.map(lambda x: x, v) for k, v in params.items() if k != "layers"}  # new containers
    leaves, treedef = jax.tree.flatten(params["layers"])
    for leaf in leaves:
        if leaf.shape[0] != num_layers:
            raise ValueError(f"stacked layer parameter of shape {leaf.shape} does not have {num_layers} layers")
    # Inside a program (tracers) or on the host, slices are free; device arrays go through one program.
    on_device = [j for j, x in enumerate(leaves) if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)]
    split = {}
    if on_device:
        split = dict(zip(on_device, _split_stacked([leaves[j] for j in on_device], num_layers), strict=True))
    for i in range(num_layers):
        layer = [split[j][i] if j in split else leaf[i] for j, leaf in enumerate(leaves)]
        out[f"layers_{i}"] = jax.tree.unflatten(treedef, layer)
    return out


def _record(state: DecodeState, tok, stop_ids, max_new) -> DecodeState:
    """Store the chosen token for rows still running; finish rows on a stop id or at max_new tokens."""
    live = ~state.done
    out = jax.lax.dynamic_update_slice_in_dim(state.out, jnp.where(live, tok, 0)[:, None], state.step, axis=1)
    length = state.length + live.astype(jnp.int32)
    counts = state.counts.at[jnp.arange(tok.shape[0]), tok].add(live.astype(jnp.int32))
    stopped = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    done = state.done | stopped | (length >= max_new)
    return dataclasses.replace(state, token=tok, out=out, length=length, counts=counts, done=done, step=state.step + 1)


def _cache_len(cache) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(cache)
    for path, leaf in leaves:
        if jax.tree_util.keystr(path[-1:], simple=True) == "valid":
            return int(leaf.shape[-1])
    raise ValueError("cache has no 'valid' mask")


def stop_id_array(ids: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 (never a token) to a multiple of MAX_STOP_IDS slots."""
    slots = max(MAX_STOP_IDS, -(-len(ids) // MAX_STOP_IDS) * MAX_STOP_IDS)
    out = np.full((slots,), -1, np.int32)
    out[: len(ids)] = ids
    return out
