"""`layers.dense`: projections as one 2-D matmul over batch × length on XLA:CPU, the plain contraction elsewhere.

The merged form exists for XLA:CPU's speed only (docs/performance.md); these tests check it computes the same
values and gradients as an independent `jnp.einsum`, and that it is chosen only where it is meant to be.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.experimental import topologies

from meditron_jax.model.layers import dense


def _reshapes(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("reshape[")


@pytest.mark.parametrize(
    "x_shape, w_shape, contract, spec",
    [
        ((2, 5, 8), (8, 6), 1, "bld,dv->blv"),
        ((2, 5, 8), (8, 3, 4), 1, "bld,dhk->blhk"),
        ((2, 5, 3, 4), (3, 4, 8), 2, "blhk,hkd->bld"),
    ],
)
def test_values_and_gradients_equal_einsum(x_shape, w_shape, contract, spec):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    cot = jnp.asarray(rng.standard_normal(jnp.einsum(spec, x, w).shape), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * cot)

    ours = jax.value_and_grad(loss(lambda x, w: dense(x, w, contract)), argnums=(0, 1))(x, w)
    ref = jax.value_and_grad(loss(lambda x, w: jnp.einsum(spec, x, w)), argnums=(0, 1))(x, w)
    # Same products summed in possibly another order: float32 rounding only.
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert _reshapes(lambda x, w: dense(x, w, contract), x, w) >= 2  # merged on this CPU backend


def test_preferred_element_type_is_kept():
    x = jnp.ones((2, 3, 4), jnp.bfloat16)
    w = jnp.ones((4, 5), jnp.bfloat16)
    assert dense(x, w, preferred_element_type=jnp.float32).dtype == jnp.float32


def test_plain_contraction_when_tracing_for_tpu():
    """An AOT compile for TPU traces on this CPU host: the mesh's platform decides, not the default backend."""
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = jax.sharding.Mesh(np.array(devices), ("fsdp",))
    x = jax.ShapeDtypeStruct((4, 8, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((16, 32), jnp.float32)
    with jax.set_mesh(mesh):
        jaxpr = str(jax.jit(lambda x, w: dense(x, w)).trace(x, w).jaxpr)
    assert "reshape[" not in jaxpr and "dot_general" in jaxpr


def test_plain_contraction_where_length_is_sharded():
    """conftest gives this process 8 CPU devices; with ``length`` on a 2-device axis the merge would split
    rows across shards, so the plain contraction stays; with ``length`` whole it merges."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("fsdp", "sequence"))
    x, w = jnp.ones((2, 4, 8)), jnp.ones((8, 3))
    with jax.set_mesh(mesh), nn.logical_axis_rules((("batch", "fsdp"), ("length", "sequence"))):
        split = str(jax.make_jaxpr(lambda x, w: dense(x, w))(x, w))
    with jax.set_mesh(mesh), nn.logical_axis_rules((("batch", "fsdp"), ("length", None))):
        whole = str(jax.make_jaxpr(lambda x, w: dense(x, w))(x, w))
    assert "reshape[" not in split
    assert "reshape[" in whole
