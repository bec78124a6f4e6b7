#!/usr/bin/env python
"""Peak host memory of importing a Hugging Face checkpoint: the eager import next to the streaming one.

Writes a synthetic float32 Llama checkpoint (default 2.0 GiB in 6 safetensors shard files) under /tmp,
then imports it twice, each time in a fresh process with 8 fake CPU devices and FSDP over all 8:

* eager: ``load_hf_params`` (the whole model as one host tree) then placed shard by shard with
  ``jax.make_array_from_callback``, which is what the trainer's ``init_from`` did before;
* stream: ``load_hf_sharded`` (``convert.streaming``): each device shard read from the files by slices.

and the orbax model format (``--modes orbax-export-eager,orbax-export,orbax-eager,orbax-sharded``, in that
order: the orbax-export row writes the export, next to the checkpoint, that the two restore rows read):

* orbax-export-eager / orbax-export: ``meditron-convert --to orbax`` before (``load_hf_params`` whole on the
  host, saved from there) and now (streamed into FSDP shards over the 8 devices, saved from there);
* orbax-eager: ``load_model_dir`` of the export onto the host, then placed with ``make_array_from_callback``;
* orbax-sharded: ``load_model_dir(lazy=True)`` + ``streaming.place``: orbax restores each device's shards.

Each child records, after its imports and device start-up, a baseline; then the peak of VmHWM (all resident
memory) and, sampled every 2 ms by a thread, RssAnon (process memory) and RssFile (mapped file pages).
On the CPU backend the "devices" are host memory, so the placed parameters themselves show up as RssAnon:
the import's own cost is the peak RssAnon minus the baseline minus the placed bytes. RssFile pages are the
memory-mapped safetensors bytes touched; they are clean page cache the kernel can drop at any time, which
is why the table reports them apart from RssAnon.

    python bench/import_memory.py                 # 2.0 GiB checkpoint, both paths, table
    python bench/import_memory.py --layers 16     # 3.5 GiB
    python bench/import_memory.py --keep DIR      # write (or reuse) the checkpoint in DIR and keep it
    python bench/import_memory.py --modes orbax-export-eager,orbax-export,orbax-eager,orbax-sharded
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def write_checkpoint(folder: Path, *, layers: int, hidden: int, inter: int, vocab: int, heads: int) -> dict:
    """A random float32 Llama checkpoint, one shard file per two layers (embedding and head in their own)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.random(shape, dtype=np.float32) - 0.5

    groups: list[dict] = [
        {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)},
        {"lm_head.weight": (vocab, hidden)},
    ]
    for i in range(layers):
        if i % 2 == 0:
            groups.append({})
        p = f"model.layers.{i}."
        groups[-1].update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (hidden, hidden),
                p + "self_attn.v_proj.weight": (hidden, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    weight_map, total, largest = {}, 0, 0
    for j, group in enumerate(groups):
        fname = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: r(*shape) for k, shape in group.items()}
        save_file(tensors, str(folder / fname))
        weight_map.update(dict.fromkeys(tensors, fname))
        total += sum(t.nbytes for t in tensors.values())
        largest = max(largest, *(t.nbytes for t in tensors.values()))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return {"total_bytes": total, "largest_tensor_bytes": largest, "files": len(groups)}


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Peak RssAnon / RssFile, read every ``interval`` s (RSS grows only as pages are written, ~GB/s, so a
    2 ms interval misses at most a few MB of a peak)."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak_anon, self.peak_file, self._done = interval, 0, 0, threading.Event()

    def run(self):
        while not self._done.is_set():
            s = _status()
            self.peak_anon = max(self.peak_anon, s["RssAnon"])
            self.peak_file = max(self.peak_file, s["RssFile"])
            time.sleep(self.interval)

    def stop(self):
        self._done.set()
        self.join()
        s = _status()
        self.peak_anon = max(self.peak_anon, s["RssAnon"])
        self.peak_file = max(self.peak_file, s["RssFile"])


def child(mode: str, path: str) -> dict:
    import jax
    import numpy as np
    from flax import linen as nn

    from meditron_jax.convert import hf
    from meditron_jax.model import logical_axes
    from meditron_jax.parallel import MeshConfig, create_mesh, logical_axis_rules, resolve_rules

    cfg = hf.read_hf_config(path)
    mesh = create_mesh(MeshConfig(ici_fsdp=8, dcn_data=1))
    rules = resolve_rules(logical_axis_rules(), cfg, dict(mesh.shape)).rules
    shardings = nn.logical_to_mesh_sharding(logical_axes(cfg), mesh, rules)
    jax.block_until_ready(jax.device_put(np.zeros(8, np.float32), shardings["final_norm"]["scale"]))
    if mode.startswith("export"):
        # Export of parameters sharded over the 8 devices: one layer gathered at a time, each file written
        # when full (256 MiB); "export-1file" puts everything in one file: what the old save_hf held always.
        placed = jax.block_until_ready(hf.load_hf_sharded(path, cfg, shardings))
    base = _status()
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # restart VmHWM from the current RSS
    sampler = Sampler()
    sampler.start()
    tracemalloc.start()
    t0 = time.perf_counter()
    from meditron_jax.convert import orbax, streaming
    from meditron_jax.convert.model_dir import load_model_dir

    export_dir = path.rstrip("/") + "-orbax"
    if mode.startswith("orbax-export"):
        shutil.rmtree(export_dir, ignore_errors=True)
    if mode.startswith("export"):
        out = tempfile.mkdtemp(prefix="import-memory-export-", dir="/tmp")
        try:
            shard = 2**40 if mode == "export-1file" else 256 * 2**20
            hf.save_hf(placed, cfg, os.path.join(out, "hf"), max_shard_bytes=shard)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    elif mode == "eager":
        host = hf.load_hf_params(path, cfg)
        placed = jax.tree.map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), host, shardings
        )
        jax.block_until_ready(placed)
        del host
    elif mode == "orbax-export-eager":
        # What meditron-convert --to orbax did: the HF import whole on the host, saved from there.
        host = hf.load_hf_params(path, cfg)
        orbax.save_orbax(host, cfg, export_dir)
        del host
        placed = {}
    elif mode == "orbax-export":
        # meditron-convert --to orbax now: streamed into FSDP shards over the devices, saved from there.
        lazy, _ = load_model_dir(path, lazy=True)
        placed = jax.block_until_ready(streaming.place(lazy, shardings))
        orbax.save_orbax(placed, cfg, export_dir)
    elif mode == "orbax-eager":
        # An orbax export restored onto the host, then placed (what load_model_dir + place did before).
        host, _ = load_model_dir(export_dir)
        placed = jax.tree.map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), host, shardings
        )
        jax.block_until_ready(placed)
        del host
    elif mode == "orbax-sharded":
        lazy, _ = load_model_dir(export_dir, lazy=True)
        placed = jax.block_until_ready(streaming.place(lazy, shardings))
    else:
        placed = jax.block_until_ready(hf.load_hf_sharded(path, cfg, shardings))
    seconds = time.perf_counter() - t0
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    sampler.stop()
    end = _status()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = _status()
    placed_bytes = sum(s.data.nbytes for leaf in jax.tree.leaves(placed) for s in leaf.addressable_shards)
    return {
        "mode": mode,
        "seconds": seconds,
        "baseline_rss": base["VmRSS"],
        "peak_rss_over_baseline": end["VmHWM"] - base["VmRSS"],
        "peak_anon_over_baseline": sampler.peak_anon - base["RssAnon"],
        "peak_file_over_baseline": sampler.peak_file - base["RssFile"],
        "placed_bytes": 0 if mode.startswith("export") else placed_bytes,
        "export_chunks": _chunks(export_dir) if mode.startswith("orbax") else None,
        "end_anon_over_baseline": end["RssAnon"] - base["RssAnon"],
        "end_anon_after_malloc_trim": trimmed["RssAnon"] - base["RssAnon"],
        "peak_traced": traced_peak,
    }


def _chunks(export_dir: str) -> str:
    """The stored chunk shape of the export's embedding (how finely orbax can read it back)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(os.path.join(export_dir, "params")).item_metadata.tree["embedding"]
    return f"{tuple(meta.shape)} in chunks of {tuple(meta.storage.chunk_shape)}"


def run_child(mode: str, path: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, path], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"{mode} import failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(info: dict, rows: list[dict]) -> str:
    big = info["largest_tensor_bytes"]
    lines = [
        f"checkpoint: {info['total_bytes'] / GIB:.2f} GiB float32 in {info['files']} safetensors files; "
        f"largest tensor {big / 2**20:.0f} MiB; 8 CPU devices, FSDP=8",
        f"{'path':<18} {'peak RSS':>10} {'peak anon':>10} {'placed':>9} {'cost':>12} {'÷ largest':>10} "
        f"{'peak file':>10} {'traced':>9} {'seconds':>8}",
    ]
    for r in rows:
        cost = r["peak_anon_over_baseline"] - r["placed_bytes"]
        lines.append(
            f"{r['mode']:<18} {r['peak_rss_over_baseline'] / GIB:>8.2f}Gi {r['peak_anon_over_baseline'] / GIB:>8.2f}Gi "
            f"{r['placed_bytes'] / GIB:>7.2f}Gi {cost / GIB:>10.2f}Gi {cost / big:>10.1f} "
            f"{r['peak_file_over_baseline'] / GIB:>8.2f}Gi {r['peak_traced'] / GIB:>7.2f}Gi {r['seconds']:>8.1f}"
        )
    lines.append(
        "peak RSS / peak anon: over the baseline after imports; placed: the parameters on the (CPU) devices; "
        "cost = peak anon − placed; peak file: mapped checkpoint pages (page cache); export rows: "
        "save_hf of the placed parameters (placed before the baseline); orbax-export rows: meditron-convert --to "
        "orbax before (eager) and now (placed: the model on the CPU devices while orbax saves it); orbax-eager / "
        "orbax-sharded: restoring the orbax-export output onto the host then placing / straight into shards; "
        "traced: peak of live Python/numpy "
        "allocations (tracemalloc), which RSS overstates when the allocator keeps freed pages"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--modes", default="eager,stream,export-1file,export")
    parser.add_argument("--keep", default=None, help="write the checkpoint here (reused if present) and keep it")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="import-memory-", dir="/tmp")) / "ckpt"
    shape = dict(layers=args.layers, hidden=args.hidden, inter=args.inter, vocab=args.vocab, heads=args.heads)
    try:
        info_file = folder / "bench_info.json"
        if info_file.is_file():
            info = json.loads(info_file.read_text())
        else:
            t0 = time.perf_counter()
            info = write_checkpoint(folder, **shape)
            info_file.write_text(json.dumps(info))
            print(f"wrote {info['total_bytes'] / GIB:.2f} GiB to {folder} in {time.perf_counter() - t0:.0f} s")
        rows = []
        for mode in args.modes.split(","):
            rows.append(run_child(mode, str(folder)))
            print(json.dumps(rows[-1]), flush=True)
        print(f"load average {os.getloadavg()[0]:.1f}")
        print(table(info, rows))
        if args.json:
            Path(args.json).write_text(json.dumps({"checkpoint": info, "shape": shape, "rows": rows}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(folder.parent, ignore_errors=True)
        shutil.rmtree(str(folder).rstrip("/") + "-orbax", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
