"""Greedy generation speed of the engine against transformers' ``generate``, same model, same weights.

A ~134M Llama-2-shaped model (preset ``bench-134m``: hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32,000,
float32) with random weights, exported through the project's Hugging Face writer so both sides run the same
numbers. Prompts of 128 random tokens, 64 new tokens, batch 1 and 16, no stop tokens (every row makes all 64).

The two sides **take turns call by call** (engine 64 tokens, transformers 64, engine 1, transformers 1, per
round), so both see the same neighbours on a shared machine. Reported per side: the median and the best over
``--repeats`` rounds of a whole ``generate`` call, new tokens/s end to end, and decode tokens/s with the
prefill taken out (the same call with ``max_new_tokens=1`` subtracted); the ratio is engine / transformers.

Also, in the same process: the memory bandwidth reached here on the same cores (a jitted sum over a 256 MiB
float32 array, between rounds), the bytes one decode step reads by XLA's ``cost_analysis`` of the engine's
compiled decode loop (its body runs once per step; it does not count what the `cpu_native` custom calls
read) against the floor (weights without the embedding table, plus the KV cache), and the tokens/s that
bandwidth allows at the floor. Load average at start and end.

    nice python bench/decode_throughput.py                 # the table in docs/performance.md (decode)
    python bench/decode_throughput.py --batches 1 --repeats 1
    python bench/decode_throughput.py --weight-layout rows   # the dense weights as stored (before panels)

Both sides run on one core by default (``--threads 1``: the process is pinned to one core, and torch gets one
thread): on a shared machine, torch's spinning OpenMP threads lose several-fold to other processes, which
measures the neighbours, not the code. ``cores used`` is each side's process CPU time over its wall time, the
check that it ran on the cores it was given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from cores import cpu_bench_process

CORES = cpu_bench_process()  # before jax starts: XLA sizes its pool from it

# Every row runs with freed memory reused (meditron_jax/host_memory.py; MEDITRON_HOST_MALLOC=default: off).
from meditron_jax.host_memory import reuse_freed_memory  # noqa: E402

HOST_MALLOC_REUSED = reuse_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from meditron_jax.config import get_config  # noqa: E402
from meditron_jax.convert import hf  # noqa: E402
from meditron_jax.infer import Engine, SamplingParams  # noqa: E402
from meditron_jax.model import init_params  # noqa: E402

CONFIG = get_config("bench-134m")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_bandwidth(repeats: int = 3) -> float:
    """Bytes/s of a jitted float32 sum over 256 MiB (read once), best of ``repeats``."""
    x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return x.nbytes / min(timed(lambda: total(x).block_until_ready()) for _ in range(repeats))


def step_bytes(engine: Engine, batch: int, cache_len: int, max_steps: int) -> tuple[float, float, int]:
    """(bytes accessed by one step of the compiled decode loop per cost_analysis, which counts the loop
    body once; the floor: every weight but the embedding table, ``batch`` embedding rows, the K/V cache;
    the compiled program's custom calls, whose operands cost_analysis does not count)."""
    programs = engine.programs
    compiled = programs.lower_decode(engine.params, batch, cache_len, max_steps).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    custom_calls = compiled.as_text().count(" custom-call(")
    weights = sum(x.nbytes for x in jax.tree.leaves(engine.params))
    table = engine.params["embedding"]
    cache = programs.abstract_state(batch, cache_len, max_steps).cache
    floor = weights - table.nbytes + batch * table.nbytes / table.shape[0]
    floor += sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    return float(cost["bytes accessed"]), float(floor), custom_calls


def pubmedqa_items_per_second(n: int) -> None:
    """MEDITRON's top-token decoding (MEDITRON.md §5: greedy, frequency penalty 1.0, stop at ``###`` or EOS,
    a few new tokens) over PubMedQA test items: contexts + question + cue, left-truncated to the 512-token
    context of stories260K, on that model. Items/s after a first pass that compiles the buckets."""
    import meditron_jax
    from meditron_jax.data.benchmarks import load_benchmark, question_text
    from meditron_jax.data.paths import shared_data_dir

    lm = meditron_jax.load(shared_data_dir() / "stories260K_hf")
    tok = lm.tokenizer
    new = 3
    budget = lm.config.max_position_embeddings - new
    prompts = []
    for record in load_benchmark("pubmedqa", "test")[:n]:
        ids = tok.encode(question_text(record) + "\nThe answer is:", bos=True)
        prompts.append(ids if len(ids) <= budget else [ids[0]] + ids[len(ids) - budget + 1 :])
    sp = SamplingParams(max_new_tokens=new, frequency_penalty=1.0, stop_token_ids=(tok.eos_id,), stop_strings=("###",))
    engine = lm.engine()
    engine.generate(prompts, sp)
    start = time.perf_counter()
    engine.generate(prompts, sp)
    seconds = time.perf_counter() - start
    lengths = [len(p) for p in prompts]
    print(
        f"\nPubMedQA top-token on stories260K: {len(prompts)} items (prompts {min(lengths)}-{max(lengths)} tokens, "
        f"{new} new tokens, batches of {engine.max_batch}) in {seconds:.2f} s = {len(prompts) / seconds:.1f} items/s; "
        f"{engine.compile_count} programs compiled"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    ap.add_argument(
        "--pubmedqa",
        type=int,
        default=0,
        metavar="N",
        help="also time N PubMedQA test items, top-token style, on the real stories260K model",
    )
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--weight-layout",
        default="auto",
        choices=("auto", "rows", "panels"),
        help="the engine's dense weights: panel-major for the thin kernel (auto, here) or as stored (rows)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU cores for each side (N: the process pinned to N cores, torch.set_num_threads(N); 0: defaults)",
    )
    args = ap.parse_args(argv)

    if not args.batches:
        if args.pubmedqa:
            pubmedqa_items_per_second(args.pubmedqa)
        return 0
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"model: {CONFIG.num_params() / 1e6:.0f}M parameters, float32; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}; {os.cpu_count()} CPUs")  # fmt: skip
    params = init_params(CONFIG, 0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "model")
        hf.save_hf(params, CONFIG, hf_dir)
        ref = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    engine = Engine(CONFIG, params, max_batch=max(args.batches), weight_layout=args.weight_layout)
    panels = engine.programs.config.weight_panels
    print(f"engine weight layout: {f'panels of {panels} columns' if panels else 'as stored (rows)'}")
    rng = np.random.default_rng(0)
    load_start = os.getloadavg()
    bandwidth = [read_bandwidth()]

    rows = []
    for batch in args.batches:
        prompts = rng.integers(3, CONFIG.vocab_size, (batch, args.prompt_len))

        def ours(n, prompts=prompts):
            return engine.generate_ids(prompts.tolist(), SamplingParams(max_new_tokens=n))

        def theirs(n, prompts=prompts):
            with torch.no_grad():
                return ref.generate(
                    torch.as_tensor(prompts),
                    attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )

        known = set(engine.buckets_used)
        got = np.array([per[0] for per in ours(args.new_tokens)])  # warm-up: compiles
        ((b, w, c, *_),) = engine.buckets_used - known  # the rows the engine really decodes (2 for 1 on CPU)
        want = theirs(args.new_tokens)[:, args.prompt_len :].numpy()
        theirs(1)
        ours(1)
        agree = float((got == want).all(axis=1).mean())
        calls: dict[tuple[str, int], list[float]] = {}
        cpu = {"engine": 0.0, "transformers": 0.0}  # process CPU seconds over each side's calls
        for _ in range(args.repeats):  # take turns: both sides see the same neighbours
            for n in (args.new_tokens, 1):
                for name, fn in (("engine", ours), ("transformers", theirs)):
                    before = time.process_time()
                    calls.setdefault((name, n), []).append(timed(lambda fn=fn, n=n: fn(n)))
                    cpu[name] += time.process_time() - before
            bandwidth.append(read_bandwidth())
        timing = {}
        for name in ("engine", "transformers"):
            full, one = calls[(name, args.new_tokens)], calls[(name, 1)]
            timing[name] = {
                stat: (
                    pick(full),
                    batch * args.new_tokens / pick(full),
                    batch * (args.new_tokens - 1) / (pick(full) - pick(one)),
                )
                for stat, pick in (("median", statistics.median), ("best", min))
            }
            timing[name]["cores"] = cpu[name] / (sum(calls[(name, args.new_tokens)]) + sum(calls[(name, 1)]))
        rows.append((batch, timing, agree, step_bytes(engine, b, c, c - w)))

    if args.pubmedqa:
        pubmedqa_items_per_second(args.pubmedqa)
    bw = max(bandwidth)
    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; {args.repeats} rounds taking "
          f"turns; load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(f"read bandwidth on {len(CORES)} core(s) (jitted sum of 256 MiB): best {bw / 1e9:.1f} GB/s, median "
          f"{statistics.median(bandwidth) / 1e9:.1f} GB/s over {len(bandwidth)} probes")  # fmt: skip
    print(f"{'batch':>5} | {'side':<12} | {'cores used':>10} | {'call s':>13} | {'new tok/s':>13} | "
          f"{'decode tok/s':>13} | ratio (decode)")  # fmt: skip
    print(f"{'':>5} | {'':<12} | {'':>10} | {'median (best)':>13} | {'median (best)':>13} | {'median (best)':>13} |")
    for batch, timing, agree, (cost, floor, custom_calls) in rows:
        for name in ("engine", "transformers"):
            med, best = timing[name]["median"], timing[name]["best"]
            ratio = ""
            if name == "engine":
                t = timing["transformers"]
                ratio = f"{med[2] / t['median'][2]:.2f}x ({best[2] / t['best'][2]:.2f}x)"
            cells = " | ".join(f"{m:>6.{p}f} ({x:.{p}f})" for m, x, p in zip(med, best, (2, 1, 1), strict=True))
            print(f"{batch:>5} | {name:<12} | {timing[name]['cores']:>10.2f} | {cells} | {ratio}")
        print(f"{'':>5}   rows whose greedy output matches transformers token for token: {agree:.0%}")
        unseen = f", not counting the operands of its {custom_calls} custom calls" if custom_calls else ""
        print(f"{'':>5}   decode step reads {cost / 1e6:.0f} MB by cost_analysis{unseen}; floor {floor / 1e6:.0f} "
              f"MB, {floor / batch / 1e6:.1f} MB per token: at {bw / 1e9:.1f} GB/s the floor allows "
              f"{bw * batch / floor:.1f} tok/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
