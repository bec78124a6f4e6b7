"""Decode speed work kept honest: the cache-reading attention equals the reference attention, the compiled
decode step neither transposes nor copies the KV cache, and ``n`` samples share one prefill without
changing a token."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meditron_jax
from meditron_jax.infer import Engine, SamplingParams
from meditron_jax.kernels import xla as xla_attention

FAST = {"compiler_options": {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}}
PROMPTS = ["Once upon a time", "Lily", "The little dog ran to the park and saw a big red ball. He"]


@pytest.fixture(scope="module")
def stories(shared_data):
    return meditron_jax.load(shared_data / "stories260K_hf")


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("filled", [1, 17, 64])
def test_head_major_attention_equals_masked_attention(heads, kv_heads, filled):
    """Left padding (invalid slots at the front), a filled prefix, empty slots after it, GQA. Reference:
    `masked_attention` on the token-major cache. float32 on both sides; 1e-5 covers the different
    summation order."""
    b, kv_len, d = 3, 64, 16
    rng = np.random.default_rng(filled)
    q = jnp.asarray(rng.standard_normal((b, 2, heads, d)), jnp.float32)  # two new tokens
    k = jnp.asarray(rng.standard_normal((b, kv_len, kv_heads, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kv_len, kv_heads, d)), jnp.float32)
    slots = np.arange(kv_len)
    pad = np.array([0, min(3, filled - 1), filled - 1])  # row 2: only the newest slot is real
    mask = (slots[None, None, :] >= pad[:, None, None]) & (slots[None, None, :] < filled)
    mask = jnp.asarray(np.repeat(mask, 2, axis=1))
    want = xla_attention.masked_attention(q, k, v, mask, 0.25)
    head_major = (jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3)))
    got = jax.jit(lambda q, k, v, m: xla_attention.head_major_attention(q, k, v, m, 0.25))(q, *head_major, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _shapes(hlo: str, op: str) -> list[str]:
    return re.findall(rf"= (\w+\[[\d,]*\])\S* {op}\(", hlo)


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_neither_transposes_nor_copies_the_cache(stories, batch):
    """The compiled decode loop (cache 256) has no transpose and no copy whose result is as big as one
    layer's K or V cache (token-major: a transpose + copy of K and of V per layer and step; head-major
    with a unit batch axis: two copies of each at batch 1), and its temporaries stay below one layer's K
    and V (batch 4: 299 KB token-major, against 262 KB)."""
    eng = Engine(stories.config, stories.params, **FAST)
    cache_len = 256
    compiled = eng.programs.lower_decode(eng.params, batch, cache_len, 64).compile()
    hlo = compiled.as_text()
    cfg = stories.config
    layer_cache = batch * cache_len * cfg.num_kv_heads * cfg.head_dim

    def elements(shape):
        return int(np.prod([int(x) for x in shape[shape.index("[") + 1 : -1].split(",") if x]))

    # Cache-sized and with a cache_len axis (the tied output head's transpose is another matter).
    big = [
        s
        for op in ("transpose", "copy")
        for s in _shapes(hlo, op)
        if elements(s) >= layer_cache and str(cache_len) in s[s.index("[") + 1 : -1].split(",")
    ]
    assert not big, big
    assert "dynamic-update-slice" in hlo  # the one-slot write, in place
    mem = compiled.memory_analysis()
    assert mem.temp_size_in_bytes < 2 * layer_cache * 4, (mem.temp_size_in_bytes, 2 * layer_cache * 4)


def test_n_samples_share_one_prefill(stories):
    """n=3 greedy samples of 3 prompts: the prefill program runs the 3 distinct prompts (bucket 4), not the
    9 rows, and every sample equals the n=1 result, which equals each prompt run alone (frequency penalty
    1.0, so the rows' own counts matter)."""
    eng = Engine(stories.config, stories.params, stories.tokenizer, max_batch=16, **FAST)
    sp = SamplingParams(max_new_tokens=12, frequency_penalty=1.0)
    one = eng.generate_ids(PROMPTS, sp)
    many = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, frequency_penalty=1.0, n=3))
    assert [[c.token_ids for c in per] for per in many] == [[ids[0]] * 3 for ids in one]
    shared = [key for key in eng.programs._prefill if key[-1] is not None]
    assert [(key[0], key[-1]) for key in shared] == [(16, 4)]  # 9 rows → batch bucket 16, 3 prompts → 4
    alone = Engine(stories.config, stories.params, stories.tokenizer, max_batch=1, **FAST)
    assert [alone.generate_ids([p], sp)[0] for p in PROMPTS] == one
