"""Greedy generation speed of the engine against transformers' ``generate``, same model, same weights.

A ~134M Llama-2-shaped model (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32,000, float32) with random
weights, exported through the project's Hugging Face writer so both sides run the same numbers. Prompts of
128 random tokens, 64 new tokens, batch 1 and 16, no stop tokens (every row makes all 64).

Reported per side: wall time of a whole ``generate`` call (best of ``--repeats``, after a warm-up that
compiles), new tokens/s end to end, and decode tokens/s with the prefill taken out (the time of the same call
with ``max_new_tokens=1`` subtracted). The last column is engine / transformers.

    nice python bench/decode_throughput.py                 # the table in docs/inference.md
    python bench/decode_throughput.py --batches 1 --repeats 1

Both sides run single-threaded by default (``--threads 1``): on a shared machine, torch's spinning OpenMP
threads lose several-fold to other processes, which measures the neighbours, not the code.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _threads_from_argv(argv) -> int:
    """--threads must act before jax is imported (XLA reads its flags once)."""
    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return 1


if _threads_from_argv(None) == 1:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )

import jax  # noqa: E402
import numpy as np  # noqa: E402

from meditron_jax.config import get_config  # noqa: E402
from meditron_jax.convert import hf  # noqa: E402
from meditron_jax.infer import Engine, SamplingParams  # noqa: E402
from meditron_jax.model import init_params  # noqa: E402

CONFIG = get_config("bench-134m")


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


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
        "--threads",
        type=int,
        default=1,
        help="CPU threads for each side (1: XLA single-threaded and torch.set_num_threads(1); 0: defaults)",
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
    engine = Engine(CONFIG, params, max_batch=max(args.batches))
    rng = np.random.default_rng(0)

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

        got = np.array([per[0] for per in ours(args.new_tokens)])  # warm-up: compiles
        want = theirs(args.new_tokens)[:, args.prompt_len :].numpy()
        theirs(1)
        ours(1)
        agree = float((got == want).all(axis=1).mean())
        timing = {}
        for name, fn in (("engine", ours), ("transformers", theirs)):
            total = best_of(lambda fn=fn: fn(args.new_tokens), args.repeats)
            prefill = best_of(lambda fn=fn: fn(1), args.repeats)
            timing[name] = (total, batch * args.new_tokens / total, batch * (args.new_tokens - 1) / (total - prefill))
        rows.append((batch, timing, agree))

    if args.pubmedqa:
        pubmedqa_items_per_second(args.pubmedqa)
    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; best of {args.repeats}")
    print(f"{'batch':>5} | {'side':<12} | {'call s':>7} | {'new tok/s':>9} | {'decode tok/s':>12} | ratio (decode)")
    for batch, timing, agree in rows:
        e, t = timing["engine"], timing["transformers"]
        print(f"{batch:>5} | {'engine':<12} | {e[0]:>7.2f} | {e[1]:>9.1f} | {e[2]:>12.1f} | {e[2] / t[2]:.2f}x")
        print(f"{batch:>5} | {'transformers':<12} | {t[0]:>7.2f} | {t[1]:>9.1f} | {t[2]:>12.1f} |")
        print(f"{'':>5}   rows whose greedy output matches transformers token for token: {agree:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
