"""The generation engine against independent references: transformers' greedy decoding (with MEDITRON's
frequency penalty as a hand-written LogitsProcessor), transformers' temperature/top-k/top-p warpers for the
sampled distribution, and each prompt generated alone for batching, bucketing and stopping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers

import meditron_jax
from meditron_jax.infer import Engine, SamplingParams
from meditron_jax.infer import sampling as sampling_lib
from meditron_jax.kernels import cpu_native

from .hf_utils import random_hf_llama

# LLVM's codegen level does not change the arithmetic; level 0 cuts CPU compile time.
FAST = {"compiler_options": {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}}
PROMPTS = ["Once upon a time", "Lily", "The little dog ran to the park and saw a big red ball. He"]


@pytest.fixture(scope="module")
def stories(shared_data):
    return meditron_jax.load(shared_data / "stories260K_hf")


@pytest.fixture(scope="module")
def stories_hf(shared_data):
    # One torch thread: on a busy 2-core machine, spinning OpenMP threads make a tiny model's generate
    # several times slower. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield transformers.LlamaForCausalLM.from_pretrained(str(shared_data / "stories260K_hf"), dtype=torch.float32).eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(stories):
    return Engine(stories.config, stories.params, stories.tokenizer, max_batch=8, stop_check_every=4, **FAST)


class GeneratedFrequencyPenalty(transformers.LogitsProcessor):
    """vLLM's frequency penalty, written for transformers: subtract penalty × count of each token in the
    generated part (the prompt does not count)."""

    def __init__(self, prompt_len, penalty):
        self.prompt_len, self.penalty = prompt_len, penalty

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.penalty * counts


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_greedy_matches_transformers(stories, stories_hf, engine, penalty):
    """Token for token, 40 new tokens, three prompts of different lengths in one batch vs HF one by one."""
    ids = [stories.tokenizer.encode(p, bos=True) for p in PROMPTS]
    got = engine.generate_ids(ids, SamplingParams(max_new_tokens=40, frequency_penalty=penalty))
    for prompt, (ours,) in zip(ids, got, strict=True):
        with torch.no_grad():
            ref = stories_hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=40,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                logits_processor=transformers.LogitsProcessorList([GeneratedFrequencyPenalty(len(prompt), penalty)]),
            )[0, len(prompt) :].tolist()
        assert ours == ref
    if penalty:  # the penalty really changes the continuation of this model (it loves to repeat)
        plain = engine.generate_ids(ids, SamplingParams(max_new_tokens=40))
        assert plain != got


def _hf_filtered_probs(logits, temperature, top_k, top_p):
    """The sampled distribution as transformers' warpers define it (temperature, then top-k, then top-p)."""
    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    if top_k is not None:
        warpers.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(transformers.TopPLogitsWarper(top_p))
    scores = torch.tensor(logits[None], dtype=torch.float32)
    for w in warpers:
        scores = w(None, scores)
    return torch.softmax(scores, -1)[0].double().numpy()


def test_greedy_tokens_equal_numpys_argmax():
    """First maximum per row, NaN counted as the maximum, as np.argmax: ties, infinities and NaNs placed on
    purpose, and random rows at the decode shape."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((12, 37)).astype(np.float32)
    rows[0, [5, 20]] = 9.0  # a tie: the first wins
    rows[1] = -np.inf  # nothing but -inf: index 0
    rows[2, [3, 30]] = np.inf
    rows[3, 17] = np.nan
    rows[4, [8, 25]] = np.nan
    rows[5, 2], rows[5, 11] = np.inf, np.nan  # NaN beats +inf, as in np.argmax
    rows[6] = 0.0
    rows[7, -1] = 50.0
    wide = rng.standard_normal((16, 32000)).astype(np.float32)
    for logits in (rows, wide):
        got = np.asarray(jax.jit(sampling_lib.greedy_tokens)(jnp.asarray(logits)))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))


@pytest.mark.parametrize(
    "temperature, top_k, top_p, penalty",
    [(0.7, None, 1.0, 0.0), (1.0, 4, 1.0, 0.0), (1.3, None, 0.8, 0.0), (0.9, 6, 0.7, 0.0), (1.0, None, 0.9, 1.0)],
)
def test_sampled_frequencies_match_filtered_softmax(temperature, top_k, top_p, penalty):
    """60,000 draws from fixed logits: filtered-out tokens never appear; the rest pass a chi-square test
    against transformers' warped softmax (fixed seed, so deterministic; p > 1e-3)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, 16).astype(np.float32)
    counts = np.zeros(16, np.int32)
    counts[np.argsort(-logits)[:2]] = [1, 2]  # the penalty pushes down the two likeliest tokens
    draws = 60_000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, frequency_penalty=penalty)
    keys = sampling_lib.row_keys(jnp.uint32(7), jnp.arange(draws, dtype=jnp.int32), jnp.zeros(draws, jnp.int32))
    toks = jax.jit(sampling_lib.next_tokens, static_argnames=("greedy", "filtered"))(
        jnp.broadcast_to(logits, (draws, 16)),
        jnp.broadcast_to(counts, (draws, 16)),
        keys,
        3,
        params.arrays(16),
        greedy=False,
        filtered=params.filtered,
    )
    observed = np.bincount(np.asarray(toks), minlength=16)
    expected = _hf_filtered_probs(logits - penalty * counts, temperature, top_k, top_p)
    assert np.all(observed[expected == 0] == 0)
    kept = expected > 0
    if top_k is not None or top_p < 1:
        assert kept.sum() < 16  # the filter is really active
    _, pvalue = scipy.stats.chisquare(observed[kept], expected[kept] / expected[kept].sum() * draws)
    assert pvalue > 1e-3, (observed, expected * draws)
    assert 0.5 * np.abs(observed / draws - expected).sum() < 0.01  # total variation


@pytest.mark.slow
def test_batched_rows_equal_rows_alone(stories, engine):
    sp = SamplingParams(max_new_tokens=24, frequency_penalty=1.0)
    together = engine.generate(PROMPTS, sp)
    alone = Engine(stories.config, stories.params, stories.tokenizer, max_batch=1, **FAST)
    for prompt, (c,) in zip(PROMPTS, together, strict=True):
        assert alone.generate([prompt], sp)[0][0] == c


def test_stop_token_and_stop_string_end_rows_early(stories, engine):
    base = engine.generate(PROMPTS, SamplingParams(max_new_tokens=40))
    ids0 = base[0][0].token_ids
    text0 = base[0][0].text
    assert base[0][0].finish_reason == "length" and len(ids0) == 40
    # A stop id: the row ends at its first occurrence, the id kept, the text without it.
    stop_id = ids0[6]
    first = ids0.index(stop_id)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=40, stop_token_ids=(stop_id,)))
    c0 = out[0][0]
    assert c0.token_ids == ids0[: first + 1] and c0.finish_reason == "stop"
    assert c0.text == text0[: len(c0.text)] and len(c0.text) < len(text0)
    # A stop string: text cut right before it; ids end with the token that completed it.
    word = "girl"
    assert word in text0
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=40, stop_strings=("zzz", word)))
    c0 = out[0][0]
    assert c0.finish_reason == "stop" and c0.text == text0[: text0.index(word)]
    assert c0.token_ids == ids0[: len(c0.token_ids)]
    assert word in stories.tokenizer.decode(c0.token_ids)
    assert word not in stories.tokenizer.decode(c0.token_ids[:-1])
    for got, want in zip(out[1:], base[1:], strict=True):  # rows without the word are unaffected
        assert got[0] == want[0] or word in want[0].text


def test_finished_batches_stop_decoding(engine):
    """A batch whose rows all stop after one token runs one step, not max_new_tokens."""
    eng = engine
    first = eng.generate(["Once upon a time"], SamplingParams(max_new_tokens=1))[0][0].token_ids[0]
    out = eng.generate(["Once upon a time"], SamplingParams(max_new_tokens=500, stop_token_ids=(first,)))[0][0]
    assert out.token_ids == [first] and out.finish_reason == "stop"
    assert eng.last_decode_steps == 1


@pytest.mark.slow
def test_n_samples_differ_and_are_reproducible(stories, engine):
    sp = SamplingParams(max_new_tokens=16, temperature=1.0, n=4, seed=3)
    out = engine.generate(PROMPTS[:2], sp)
    assert [len(per) for per in out] == [4, 4]
    assert len({tuple(c.token_ids) for c in out[0]}) > 1
    assert engine.generate(PROMPTS[:2], sp) == out
    assert engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=16, temperature=1.0, n=4, seed=4)) != out
    # A row's randomness depends on (seed, prompt index, sample index), not on the batch it ran in.
    small = Engine(stories.config, stories.params, stories.tokenizer, max_batch=1, **FAST)
    assert small.generate(PROMPTS[:1], sp)[0] == out[0]


@pytest.mark.slow
def test_compiles_once_per_bucket(stories):
    rng = np.random.default_rng(1)
    lengths = [1, 3, 5, 9, 14, 17, 22, 30, 41, 60]
    prompts = [list(rng.integers(3, 500, n)) for n in lengths]
    eng = Engine(stories.config, stories.params, max_batch=5, length_buckets=(16, 64), **FAST)
    out = eng.generate(prompts, SamplingParams(max_new_tokens=5))
    assert [len(per[0].token_ids) for per in out] == [5] * 10
    # Sorted by length, cut into batches of 5: [1..14] → (5 rows, 16 tokens), [17..60] → (5, 64).
    assert {(b, w) for b, w, *_ in eng.buckets_used} == {(5, 16), (5, 64)}
    assert eng.compile_count == 2 * 2  # one prefill + one decode program per bucket
    # New lengths in the same buckets, another max_new_tokens in the same bucket, a penalty: nothing new.
    eng.generate(prompts[::-1], SamplingParams(max_new_tokens=9, frequency_penalty=0.5))
    assert eng.compile_count == 4
    short = prompts[:5]
    eng.generate(short, SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9))
    assert eng.compile_count == 6  # sampling with a filter is its own program
    eng.generate(short, SamplingParams(max_new_tokens=5, temperature=1.3, top_p=0.5, top_k=7, seed=2))
    assert eng.compile_count == 6  # new temperature / top-p / top-k values are traced


def test_results_in_prompt_order(stories, engine):
    sp = SamplingParams(max_new_tokens=40)
    forward = engine.generate(PROMPTS, sp)
    backward = engine.generate(PROMPTS[::-1], sp)
    assert forward == backward[::-1]


def test_stacked_params_sliced_in_program_give_the_same_tokens(stories, engine):
    """The no-copy layout (stacked parameters sliced inside the program, the TPU default) against the
    split-once layout the CPU uses by default."""
    sliced = Engine(stories.config, stories.params, stories.tokenizer, max_batch=8, stacked_params="slice", **FAST)
    assert "layers" in sliced.params and "layers_0" in engine.params
    sp = SamplingParams(max_new_tokens=40, frequency_penalty=1.0)
    assert sliced.generate(PROMPTS, sp) == engine.generate(PROMPTS, sp)


def test_kv_cache_is_updated_in_place(stories):
    """The compiled decode loop aliases its whole state (KV cache included) to the output and needs far
    less temporary memory than one copy of the cache."""
    eng = Engine(stories.config, stories.params)
    P = eng.programs
    batch, cache_len = 8, 1024
    compiled = P.lower_decode(eng.params, batch, cache_len, 64).compile()
    mem = compiled.memory_analysis()
    state = P.abstract_state(batch, cache_len, 64)
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.cache))
    assert mem.alias_size_in_bytes >= cache_bytes
    assert mem.temp_size_in_bytes < cache_bytes / 4, (mem.temp_size_in_bytes, cache_bytes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_p": 0.0}, r"top_p=0.0: must lie in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5"),
        ({"temperature": float("nan")}, "temperature=nan: must be a finite number"),
        ({"temperature": -1.0}, "temperature=-1.0: must be >= 0"),
        ({"top_k": 0}, "top_k=0: must be None or an int >= 1"),
        ({"n": 0}, "n=0: must be at least 1"),
        ({"max_new_tokens": 0}, "max_new_tokens=0: must be at least 1"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty=inf: must be a finite number"),
        ({"stop_strings": "###"}, "must be a tuple of strings"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts(stories, engine):
    with pytest.raises(
        ValueError, match=r"prompt 1 \(3 tokens\) \+ max_new_tokens \(510\) exceeds the model's context"
    ):
        engine.generate([[1], [1, 2, 3]], SamplingParams(max_new_tokens=510))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match=r"token ids \[512\] outside \[0, 512\)"):
        engine.generate([[1, 512]], SamplingParams())
    with pytest.raises(TypeError, match="not a single string"):
        engine.generate("Once", SamplingParams())
    no_tok = Engine(stories.config, stories.params, **FAST)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        no_tok.generate(["Once"], SamplingParams())
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        no_tok.generate([[1]], SamplingParams(stop_strings=("###",)))


def test_panel_major_weights_give_transformers_tokens(tmp_path):
    """The engine's default layout on one CPU device, the dense weights packed in panels for the thin kernel
    (decode's rows of 1 and 3; prefill's 3 × 16 rows), against transformers' greedy decoding of a random
    Llama whose widths divide into panels (AVX2's 16 columns and AVX-512's 32), token for token; and the
    same tokens with the weights as stored."""
    path, hf = random_hf_llama(tmp_path, hidden=64, inter=128, vocab=256, heads=4, kv_heads=2)
    model = meditron_jax.load(path)
    packed = Engine(model.config, model.params, max_batch=4, **FAST)
    assert packed.programs.config.weight_panels == cpu_native.panel_width()
    wq = packed.params["layers_0"]["attention"]["query"]
    assert not np.array_equal(np.asarray(wq), np.asarray(model.params["layers"]["attention"]["query"][0]))
    rng = np.random.default_rng(0)
    ids = [[1, *rng.integers(3, 256, n).tolist()] for n in (15, 4, 9)]
    sp = SamplingParams(max_new_tokens=24)
    got = packed.generate_ids(ids, sp)
    assert [packed.generate_ids([p], sp)[0] for p in ids] == got
    for prompt, (ours,) in zip(ids, got, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert ours == ref[0, len(prompt) :].tolist()
    rows = Engine(model.config, model.params, max_batch=4, weight_layout="rows", **FAST)
    assert rows.programs.config.weight_panels == 0
    assert rows.generate_ids(ids, sp) == got


def test_weight_layout_panels_says_why_it_cannot(stories):
    """ "panels" insists and names what stands in the way; "auto" then keeps the weights as stored."""
    with pytest.raises(ValueError, match="intermediate_size = 172 is not a multiple of the panel width"):
        Engine(stories.config, stories.params, weight_layout="panels", **FAST)
    with pytest.raises(ValueError, match="the thin kernel computes in float32, the model in bfloat16"):
        Engine(stories.config.replace(dtype="bfloat16"), stories.params, weight_layout="panels", **FAST)
    with pytest.raises(ValueError, match="weight_layout 'columns' is not one of"):
        Engine(stories.config, stories.params, weight_layout="columns", **FAST)
    assert Engine(stories.config, stories.params, **FAST).programs.config.weight_panels == 0


def test_training_refuses_the_engines_weight_layout():
    from meditron_jax.config import get_config
    from meditron_jax.model import Llama, init_params

    cfg = get_config("tiny-mha", weight_panels=16)
    params = init_params(cfg.replace(weight_panels=0))
    with pytest.raises(ValueError, match="weight_panels is the inference engine's weight layout"):
        Llama(cfg).apply({"params": params}, jnp.ones((1, 4), jnp.int32))


def test_packing_a_tree_it_owns_drops_each_weight_once_packed():
    """`pack_dense_weights` leaves the caller's tree alone, or with ``owned`` (the tree `unstack_layers` just
    made) empties it as it goes, so that the unpacked copies can be freed one by one; same result either way:
    the dense weights packed (unpacking gives the stored layer back), the rest untouched."""
    from meditron_jax.config import get_config
    from meditron_jax.infer.programs import pack_dense_weights, unstack_layers
    from meditron_jax.kernels import unpack_panels
    from meditron_jax.model import init_params

    cfg = get_config("tiny-mha")
    stacked = init_params(cfg)
    split = unstack_layers(stacked, cfg.num_layers)
    kept = pack_dense_weights(split, 16)
    assert "layers_0" in split
    owned = pack_dense_weights(split, 16, owned=True)
    assert split == {}
    assert "scale" in stacked["final_norm"] and "query" in stacked["layers"]["attention"]  # the caller's tree
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), kept, owned))
    out = kept["layers_1"]["attention"]["out"]  # [heads, head_dim, embed], two contracted axes
    np.testing.assert_array_equal(
        np.asarray(unpack_panels(out, 16, contract=2)), stacked["layers"]["attention"]["out"][1]
    )
    assert not np.array_equal(np.asarray(out), stacked["layers"]["attention"]["out"][1])
    assert kept["embedding"] is stacked["embedding"]


def test_stacked_device_weights_are_split_by_one_program():
    """The engine's unrolled layout from stacked device arrays: every layer's slice of every leaf, by one
    compiled program per model shape (it was one per leaf, ~0.15 s of start-up each), reused by the next
    engine; host arrays stay numpy views."""
    from meditron_jax.config import get_config
    from meditron_jax.infer.programs import _split_stacked, unstack_layers
    from meditron_jax.model import init_params

    cfg = get_config("tiny-mha").replace(num_layers=3)  # a shape no other test splits: the cache starts without it
    host = init_params(cfg)
    on_device = jax.device_put(host)
    before = _split_stacked._cache_size()
    for _ in range(2):
        split = unstack_layers(on_device, cfg.num_layers)
        assert _split_stacked._cache_size() == before + 1
    assert sorted(k for k in split if k.startswith("layers_")) == [f"layers_{i}" for i in range(cfg.num_layers)]
    for i in range(cfg.num_layers):
        jax.tree.map(
            lambda got, want, i=i: np.testing.assert_array_equal(got, want[i]), split[f"layers_{i}"], host["layers"]
        )
    views = unstack_layers(host, cfg.num_layers)
    assert np.shares_memory(views["layers_1"]["mlp"]["up"], host["layers"]["mlp"]["up"])
    assert _split_stacked._cache_size() == before + 1
