"""Compiled memory of the attention paths, 1k to 32k tokens, plus CPU time of the XLA paths.

Memory: ``compiled.memory_analysis().temp_size_in_bytes`` of one jitted forward+backward
(``value_and_grad`` of a sum over the attention output), compiled but never run, so 32k references that
would need ~100 GiB are measured without allocating anything. The reference and blockwise paths are
compiled for the host CPU and for a TPU topology (via libtpu, no TPU needed); the Mosaic flash kernel for
the TPU topology. Time: wall clock of the same step on this machine's CPU, best of ``--repeats``.

    python bench/attention_memory.py                 # the table in docs/kernels.md
    python bench/attention_memory.py --lengths 1024 2048 --time-lengths 512
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only use of libtpu next to other jobs
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from meditron_jax.kernels import attention  # noqa: E402

GiB = 2**30


def step(impl):
    def loss(q, k, v, seg):
        out = attention(q, k, v, causal=True, segment_ids=seg, impl=impl)
        return out.astype(jnp.float32).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def specs(args, length, devices):
    sharding = None if devices is None else NamedSharding(Mesh(devices, ("d",)), P())
    dt = jnp.dtype(args.dtype)
    q = jax.ShapeDtypeStruct((args.batch, length, args.heads, args.head_dim), dt, sharding=sharding)
    kv = jax.ShapeDtypeStruct((args.batch, length, args.kv_heads, args.head_dim), dt, sharding=sharding)
    seg = jax.ShapeDtypeStruct((args.batch, length), jnp.int32, sharding=sharding)
    return q, kv, kv, seg


_HBM_OOM = re.compile(r"memory required for HLO temporaries \(([0-9.]+)([KMGT])\)")


def temp_bytes(impl, args, length, devices=None):
    """Temp bytes, and whether they exceed the TPU's HBM (libtpu then refuses, quoting the size)."""
    shapes = specs(args, length, devices)
    try:
        if devices is None:
            compiled = step(impl).lower(*shapes).compile()
        else:
            with jax.set_mesh(Mesh(devices, ("d",))):
                compiled = step(impl).lower(*shapes).compile()
    except jax.errors.JaxRuntimeError as err:
        match = _HBM_OOM.search(str(err))
        if not match:
            raise
        return float(match.group(1)) * 2 ** (10 * " KMGT".index(match.group(2))), True
    return compiled.memory_analysis().temp_size_in_bytes, False


def fmt_bytes(measured):
    n, oom = measured
    text = f"{n / GiB:.3f} GiB" if n >= GiB / 8 else f"{n / 2**20:.1f} MiB"
    return text + " (exceeds HBM)" if oom else text


def ratio(measured, ref):
    return f"{measured[0] / ref[0]:.4f}" if ref[0] else "n/a"


def memory_table(args):
    from jax.experimental import topologies

    tpu = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices[:1]
    print(
        f"\nCompiled temp memory of one forward+backward, batch {args.batch}, heads {args.heads}/{args.kv_heads} "
        f"(q/kv), head_dim {args.head_dim}, {args.dtype}, causal, packed segment ids. "
        f"TPU = {tpu[0].device_kind} ({args.topology}).\n"
    )
    print(
        "| seq len | reference (CPU) | blockwise (CPU) | blockwise / reference | reference (TPU) "
        "| flash, Mosaic (TPU) | flash / reference |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        t0 = time.time()
        ref_cpu = temp_bytes("xla", args, length)
        bw_cpu = temp_bytes("xla_blockwise", args, length)
        ref_tpu = temp_bytes("xla", args, length, tpu)
        flash_tpu = temp_bytes("pallas_tpu", args, length, tpu)
        print(
            f"| {length} | {fmt_bytes(ref_cpu)} | {fmt_bytes(bw_cpu)} | {ratio(bw_cpu, ref_cpu)} | "
            f"{fmt_bytes(ref_tpu)} | {fmt_bytes(flash_tpu)} | {ratio(flash_tpu, ref_tpu)} |",
            flush=True,
        )
        print(f"  ({time.time() - t0:.0f}s to compile)", file=sys.stderr, flush=True)


def time_table(args):
    print(
        f"\nCPU wall time of one forward+backward ({os.cpu_count()} cores), batch {args.batch}, heads "
        f"{args.heads}/{args.kv_heads}, head_dim {args.head_dim}, float32, causal, packed segment ids; "
        f"best of {args.repeats}.\n"
    )
    print("| seq len | reference | blockwise | blockwise/reference |")
    print("|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for length in args.time_lengths:
        q = jnp.asarray(rng.standard_normal((args.batch, length, args.heads, args.head_dim)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((args.batch, length, args.kv_heads, args.head_dim)), jnp.float32)
        v = jnp.asarray(rng.standard_normal(k.shape), jnp.float32)
        seg = jnp.asarray(np.repeat(np.arange(4), length // 4)[None].repeat(args.batch, 0), jnp.int32)
        times = {}
        for impl in ("xla", "xla_blockwise"):
            fn = step(impl)
            jax.block_until_ready(fn(q, k, v, seg))
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, k, v, seg))
                best = min(best, time.perf_counter() - t0)
            times[impl] = best
        print(
            f"| {length} | {times['xla'] * 1e3:.0f} ms | {times['xla_blockwise'] * 1e3:.0f} ms | "
            f"{times['xla_blockwise'] / times['xla']:.2f} |",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--time-lengths", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    if args.lengths:
        memory_table(args)
    if args.time_lengths:
        time_table(args)


if __name__ == "__main__":
    main()
