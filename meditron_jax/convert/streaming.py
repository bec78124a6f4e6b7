"""Import without a host copy: parameters read from a checkpoint slice by slice, straight into device shards.

A converted parameter is first a :class:`LazyParam`: its shape, its dtype and, for every layer it stacks, the
checkpoint tensor it comes from and the :class:`Transform` that turns that tensor into our layout. Indexing
it (``p[index]``) reads only what that index needs: a transform maps our index back to a rectangle of the
checkpoint tensor, and safetensors' ``get_slice`` copies just those bytes out of the memory-mapped file
(the file pages it touches are page cache, which the kernel can drop, not memory of the process).
:func:`place` builds each device's shard on its own device, a group of layers at a time, so the host never
holds more than one such group (at most the size of the largest checkpoint tensor) — not the whole model,
nor a whole stacked parameter.

Every step is a copy, transpose, reshape, zero-pad or dtype cast of single elements, so the result is bit
for bit what the whole-tensor conversion (each transform's :meth:`Transform.apply`) gives.

An orbax checkpoint (our model format, a training run) is read differently: its leaves are
:class:`GroupedParam` s (`meditron_jax.convert.orbax.StoredParam`), and :func:`place` hands all of one
checkpoint's to it at once, for one orbax restore straight into the target shardings.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax
import numpy as np

Index = tuple[slice, ...]


class Sliceable(Protocol):
    """A tensor that can be read a rectangle at a time: a numpy array, or safetensors' ``get_slice``."""

    def __getitem__(self, index: Any) -> Any: ...


def normalize(index: Any, shape: Sequence[int]) -> Index:
    """``index`` (a tuple of unit-step slices, possibly shorter than ``shape``, or ``()``) as explicit slices."""
    index = index if isinstance(index, tuple) else (index,)
    out = []
    for k, n in enumerate(shape):
        s = index[k] if k < len(index) else slice(None)
        if not isinstance(s, slice):
            raise TypeError(f"only slices index a lazy parameter (got {s!r})")
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"only unit-step slices index a lazy parameter (got {s!r})")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def _len(s: slice) -> int:
    return s.stop - s.start


def _take(src: Sliceable, *index: slice) -> np.ndarray:
    """``src[index]`` as numpy; an empty slice is asked for as ``0:0`` (safetensors refuses ``n:n`` at the end)."""
    return np.asarray(src[tuple(s if s.stop > s.start else slice(0, 0) for s in index)])


class Transform:
    """How a checkpoint tensor becomes one of our arrays: :meth:`apply` to the whole tensor, or :meth:`read`
    any rectangle of the result from a :class:`Sliceable` source without reading the rest."""

    def out_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        raise NotImplementedError

    def apply(self, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def read(self, src: Sliceable, hf_shape: tuple[int, ...], index: Index) -> np.ndarray:
        """``apply(w)[index]`` for an ``index`` normalised against :meth:`out_shape`."""
        raise NotImplementedError


class Copy(Transform):
    def out_shape(self, hf_shape):
        return hf_shape

    def apply(self, w):
        return w

    def read(self, src, hf_shape, index):
        return _take(src, *index)


class Transpose(Transform):
    """A 2-D ``[out, in]`` projection (PyTorch's Linear) as our ``[in, out]`` kernel."""

    def out_shape(self, hf_shape):
        return hf_shape[::-1]

    def apply(self, w):
        return w.T

    def read(self, src, hf_shape, index):
        return _take(src, index[1], index[0]).T


def _pad_rows(src: Sliceable, rows: slice, cols: slice, have: int) -> np.ndarray:
    """``src[rows, cols]`` where rows past ``have`` (the tensor's real rows) read as zeros."""
    real = slice(min(rows.start, have), min(rows.stop, have))
    part = _take(src, real, cols)
    if _len(real) == _len(rows):
        return part
    out = np.zeros((_len(rows), _len(cols)), part.dtype)
    out[real.start - rows.start : real.stop - rows.start] = part
    return out


class PadRows(Transform):
    """An embedding table ``[vocab, d]`` padded with zero rows to ``rows``."""

    def __init__(self, rows: int):
        self.rows = rows

    def out_shape(self, hf_shape):
        return (self.rows, *hf_shape[1:])

    def apply(self, w):
        return np.pad(w, ((0, self.rows - w.shape[0]), (0, 0)))

    def read(self, src, hf_shape, index):
        return _pad_rows(src, index[0], index[1], hf_shape[0])


class TransposePadCols(Transform):
    """An output head ``[vocab, d]`` as our ``[d, vocab]`` kernel, padded with zero columns to ``cols``."""

    def __init__(self, cols: int):
        self.cols = cols

    def out_shape(self, hf_shape):
        return (hf_shape[1], self.cols)

    def apply(self, w):
        return np.pad(w.T, ((0, 0), (0, self.cols - w.shape[0])))

    def read(self, src, hf_shape, index):
        return _pad_rows(src, index[1], index[0], hf_shape[0]).T


class SplitHeads(Transform):
    """A Q/K/V projection ``[heads·head_dim, d]`` as our ``[d, heads, head_dim]`` kernel (no permutation:
    our rotary embedding uses the Hugging Face half-split convention)."""

    def __init__(self, heads: int, head_dim: int):
        self.heads, self.head_dim = heads, head_dim

    def out_shape(self, hf_shape):
        return (hf_shape[1], self.heads, self.head_dim)

    def apply(self, w):
        return w.T.reshape(w.shape[1], self.heads, self.head_dim)

    def read(self, src, hf_shape, index):
        d, h, k = index
        hd = self.head_dim
        w = _take(src, slice(h.start * hd, h.stop * hd), d)  # whole heads: rows are head-major
        return w.T.reshape(_len(d), _len(h), hd)[:, :, k]


class MergeHeads(Transform):
    """An attention output projection ``[d, heads·head_dim]`` as our ``[heads, head_dim, d]`` kernel."""

    def __init__(self, heads: int, head_dim: int):
        self.heads, self.head_dim = heads, head_dim

    def out_shape(self, hf_shape):
        return (self.heads, self.head_dim, hf_shape[0])

    def apply(self, w):
        return w.T.reshape(self.heads, self.head_dim, w.shape[0])

    def read(self, src, hf_shape, index):
        h, k, d = index
        hd = self.head_dim
        w = _take(src, d, slice(h.start * hd, h.stop * hd))
        return w.T.reshape(_len(h), hd, _len(d))[:, k, :]


class Whole(Transform):
    """Any other conversion ``fn`` (e.g. one part of a fused tensor): reads the whole tensor, converts it,
    then indexes. Exact, but each read costs one whole checkpoint tensor on the host. ``out_shape`` None:
    not known before converting (the parameter's own shape is checked on reading instead)."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], out_shape: tuple[int, ...] | None = None):
        self.fn, self._out_shape = fn, out_shape

    def out_shape(self, hf_shape):
        return self._out_shape

    def apply(self, w):
        return self.fn(w)

    def read(self, src, hf_shape, index):
        return np.asarray(self.fn(_take(src, *(slice(0, n) for n in hf_shape))))[index]


class Source(Protocol):
    """Opens one named checkpoint tensor for sliced reading (e.g. :class:`meditron_jax.convert.hf.TensorReader`)."""

    def sliced(self, name: str) -> contextlib.AbstractContextManager[Sliceable]: ...


class Part:
    """One checkpoint tensor feeding (one layer of) a parameter."""

    def __init__(self, source: Source, name: str, hf_shape: tuple[int, ...], transform: Transform):
        self.source, self.name, self.hf_shape, self.transform = source, name, tuple(hf_shape), transform

    def read(self, index: Index) -> np.ndarray:
        with self.source.sliced(self.name) as src:
            return self.transform.read(src, self.hf_shape, index)


class UnreadParam:
    """What every not-yet-read parameter offers before it is read: its shape, dtype and size in our layout."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)


class LazyParam(UnreadParam):
    """A parameter not read yet. ``parts`` is one :class:`Part` (``stacked=False``) or one per layer along the
    leading axis (``stacked=True``, our scanned layout). ``p[index]`` reads that index; ``np.asarray(p)``
    reads it all."""

    def __init__(self, shape: Sequence[int], dtype: Any, parts: Sequence[Part], stacked: bool):
        self.shape, self.dtype, self.parts, self.stacked = tuple(shape), np.dtype(dtype), list(parts), stacked
        inner = self.shape[1:] if stacked else self.shape
        if stacked and len(self.parts) != self.shape[0]:
            raise ValueError(f"a stacked parameter of shape {self.shape} needs {self.shape[0]} parts")
        if not stacked and len(self.parts) != 1:
            raise ValueError("an unstacked parameter has exactly one part")
        for part in self.parts:
            got = part.transform.out_shape(part.hf_shape)
            if got is not None and tuple(got) != inner:
                raise ValueError(f"tensor {part.name!r} {part.hf_shape} converts to {got}, the parameter is {inner}")

    def __getitem__(self, index: Any) -> np.ndarray:
        index = normalize(index, self.shape)
        if not self.stacked:
            return self._read(self.parts[0], index)
        layers, rest = index[0], index[1:]
        out = np.empty(tuple(_len(s) for s in index), self.dtype)
        for j, layer in enumerate(range(layers.start, layers.stop)):
            out[j] = self._read(self.parts[layer], rest)
        return out

    def _read(self, part: Part, index: Index) -> np.ndarray:
        got = part.read(index)
        if got.shape != tuple(_len(s) for s in index):
            raise ValueError(f"tensor {part.name!r} converts to a different shape than the parameter {self.shape}")
        return got.astype(self.dtype)  # a copy: never a view into a mapped file

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[()]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyParam({self.shape}, {self.dtype}, {len(self.parts)} tensors)"


def _update(buf, chunk, start):
    return jax.lax.dynamic_update_slice_in_dim(buf, chunk, start, 0)


_update_jit = jax.jit(_update, donate_argnums=0)


def _shard_on(p: LazyParam, index: Index, device, max_chunk_bytes: int) -> jax.Array:
    """One device's shard of ``p``: read in groups of layers of at most ``max_chunk_bytes`` (at least one
    layer), each written into a buffer on the device, so the host holds one group at a time. Returns once
    the shard is on the device."""
    shape = tuple(_len(s) for s in index)
    if not p.stacked or math.prod(shape) * p.dtype.itemsize <= max_chunk_bytes or shape[0] <= 1:
        return jax.device_put(p[index], device).block_until_ready()
    per_layer = math.prod(shape[1:]) * p.dtype.itemsize
    group = max(1, max_chunk_bytes // max(per_layer, 1))
    buf = jax.numpy.zeros(shape, p.dtype, device=device)
    first = index[0].start
    for start in range(first, index[0].stop, group):
        stop = min(start + group, index[0].stop)
        chunk = jax.device_put(p[(slice(start, stop), *index[1:])], device)
        buf = _update_jit(buf, chunk, np.int32(start - first))
        del chunk
        # Dispatch is asynchronous and the transfer (or, on CPU, the aliased numpy buffer) holds the host group
        # until the write has run: wait, so that one group at a time is in host memory, not a queue of them.
        buf.block_until_ready()
    return buf


def _key(index: Index) -> tuple:
    return tuple((s.start, s.stop) for s in index)


def place_leaf(x: Any, sharding: jax.sharding.Sharding, max_chunk_bytes: int) -> jax.Array:
    """One parameter (lazy, numpy or jax) as a ``jax.Array`` in ``sharding``; device shards are built one
    at a time and a shard held by several devices is read once and copied between devices."""
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    if not isinstance(x, LazyParam):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    built: dict[tuple, jax.Array] = {}
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(x.shape).items():
        index = normalize(index, x.shape)
        key = _key(index)
        if key in built:
            arrays.append(jax.device_put(built[key], device))
        else:
            built[key] = _shard_on(x, index, device, max_chunk_bytes)
            arrays.append(built[key])
    return jax.make_array_from_single_device_arrays(x.shape, sharding, arrays)


class GroupedParam(UnreadParam):
    """A parameter whose source reads many parameters in one call (an orbax checkpoint restores a whole tree
    straight into its target shardings): :func:`place` hands all leaves of one ``group`` to
    ``group.place(params, shardings)`` together. Indexing one reads it alone onto the host."""

    group: Any


def _is_lazy(x: Any) -> bool:
    return isinstance(x, UnreadParam)


def leaves(tree) -> Iterator[Any]:
    yield from jax.tree.leaves(tree, is_leaf=_is_lazy)


def largest_tensor_bytes(tree) -> int:
    """Bytes of the largest single checkpoint tensor behind a tree of lazy parameters (in our dtype)."""
    sizes = [
        math.prod(part.hf_shape) * leaf.dtype.itemsize
        for leaf in leaves(tree)
        if isinstance(leaf, LazyParam)
        for part in leaf.parts
    ]
    return max(sizes, default=0)


def place(tree, shardings=None, *, max_chunk_bytes: int | None = None):
    """A tree of lazy / numpy / jax parameters as ``jax.Array`` s in ``shardings`` (a matching tree of
    shardings, one sharding for all, or None: the default device). Host memory in use at any time stays
    within about ``max_chunk_bytes`` (default: the largest checkpoint tensor) plus one layer's slice; the
    leaves of a :class:`GroupedParam` group are placed by their group, whose own bound applies."""
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if max_chunk_bytes is None:
        max_chunk_bytes = max(largest_tensor_bytes(tree), 1)
    flat, treedef = jax.tree.flatten(tree, is_leaf=_is_lazy)
    if isinstance(shardings, jax.sharding.Sharding):
        flat_sh = [shardings] * len(flat)
    else:
        flat_sh = treedef.flatten_up_to(shardings)  # type: ignore[attr-defined]
    out: list[Any] = [None] * len(flat)
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(flat):
        if isinstance(x, GroupedParam):
            groups.setdefault(id(x.group), []).append(i)
    for members in groups.values():
        group = flat[members[0]].group
        placed = group.place([flat[i] for i in members], [flat_sh[i] for i in members])
        for i, array in zip(members, placed, strict=True):
            out[i] = array
    for i, (x, s) in enumerate(zip(flat, flat_sh, strict=True)):
        if not isinstance(x, GroupedParam):
            out[i] = place_leaf(x, s, max_chunk_bytes)
    return jax.tree.unflatten(treedef, out)
