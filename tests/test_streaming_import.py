"""Streaming HF import (convert.streaming): bit-for-bit what the eager import gives, in every sharding, while
the host holds about one checkpoint tensor at a time instead of the model.

The eager import (``load_hf_params``) is the reference: it is checked against transformers' PyTorch Llama in
test_hf_parity / test_convert. Equality here is of the raw bits (no tolerance): streaming only slices, pads,
transposes and casts elements, so any difference is a bug.
"""

import json
import os
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn
from safetensors import safe_open
from safetensors.numpy import save_file

from meditron_jax.convert import hf, streaming
from meditron_jax.model import logical_axes
from meditron_jax.parallel import MeshConfig, create_mesh, logical_axis_rules, resolve_rules

from .hf_utils import random_hf_llama
from .multiprocess_utils import ISOLATED, run_alone

MESHES = {
    "fsdp8": {"ici_fsdp": 8},
    "fsdp2-tensor4": {"ici_fsdp": 2, "ici_tensor": 4},
    "data2-fsdp2-tensor2": {"ici_data": 2, "ici_fsdp": 2, "ici_tensor": 2},
    "replicated": {"ici_data": 8},
}


def _shardings(cfg, mesh_kw):
    mesh = create_mesh(MeshConfig(**{"ici_fsdp": 1, "dcn_data": 1, **mesh_kw}))
    rules = resolve_rules(logical_axis_rules(), cfg, dict(mesh.shape)).rules
    return nn.logical_to_mesh_sharding(logical_axes(cfg), mesh, rules)


def _assert_same_bits(eager, streamed, shardings=None):
    flat_e = jax.tree_util.tree_flatten_with_path(eager)[0]
    flat_s = jax.tree.leaves(streamed)
    assert len(flat_e) == len(flat_s)
    flat_sh = jax.tree.leaves(shardings) if shardings is not None else [None] * len(flat_s)
    for (path, e), s, sh in zip(flat_e, flat_s, flat_sh, strict=True):
        name = jax.tree_util.keystr(path)
        assert isinstance(s, jax.Array), name
        if sh is not None:
            assert s.sharding == sh, name
        got = np.asarray(s)
        assert got.dtype == e.dtype and got.shape == e.shape, name
        assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(e).view(np.uint8)), name


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("scan", [True, False])
def test_stories260k_streamed_equals_eager(shared_data, mesh, scan):
    path = str(shared_data / "stories260K_hf")
    cfg = hf.read_hf_config(path, scan_layers=scan)
    eager = hf.load_hf_params(path, cfg)
    sh = _shardings(cfg, MESHES[mesh])
    _assert_same_bits(eager, hf.load_hf_sharded(path, cfg, sh), sh)
    if scan and mesh == "fsdp2-tensor4":
        # One byte per chunk: every device shard of a stacked parameter is written layer by layer on device.
        _assert_same_bits(eager, hf.load_hf_sharded(path, cfg, sh, max_chunk_bytes=1), sh)


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    # Several shard files; untied head; vocab 200 padded to 256, so with tensor=4 one vocab shard holds real
    # and padding rows; GQA (4 heads, 2 KV heads).
    src, _ = random_hf_llama(tmp_path_factory.mktemp("src"), layers=3, tied=False, max_shard_size="40KB")
    return src


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_random_sharded_checkpoint_streamed_equals_eager(random_checkpoint, param_dtype):
    src = random_checkpoint
    cfg = hf.read_hf_config(src, param_dtype=param_dtype)
    eager = hf.load_hf_params(src, cfg)
    sh = _shardings(cfg, MESHES["fsdp2-tensor4"])
    _assert_same_bits(eager, hf.load_hf_sharded(src, cfg, sh), sh)
    if param_dtype == "float32":
        sh = _shardings(cfg, MESHES["data2-fsdp2-tensor2"])
        _assert_same_bits(eager, hf.load_hf_sharded(src, cfg, sh, max_chunk_bytes=1), sh)
    # One device (what meditron_jax.load uses), and the lazy tree read whole on the host.
    _assert_same_bits(eager, hf.load_hf_sharded(src, cfg))
    lazy = hf.lazy_hf_params(src, cfg)
    for (path, e), leaf in zip(jax.tree_util.tree_flatten_with_path(eager)[0], streaming.leaves(lazy), strict=True):
        got = np.ascontiguousarray(np.asarray(leaf))
        assert np.array_equal(got.view(np.uint8), e.view(np.uint8)), jax.tree_util.keystr(path)


def test_pytorch_bin_checkpoint_streams_too(shared_data, tmp_path):
    """A ``pytorch_model.bin`` folder (read whole per tensor, weights_only) gives the same bits."""
    import shutil

    import torch
    from safetensors.torch import load_file

    src = shared_data / "stories260K_hf"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    torch.save(load_file(str(src / "model.safetensors")), tmp_path / "pytorch_model.bin")
    cfg = hf.read_hf_config(str(tmp_path))
    sh = _shardings(cfg, MESHES["fsdp2-tensor4"])
    _assert_same_bits(hf.load_hf_params(str(src), cfg), hf.load_hf_sharded(str(tmp_path), cfg, sh), sh)


def test_bfloat16_checkpoint_into_float32_params(shared_data, tmp_path):
    """A bfloat16 checkpoint read into float32 parameters: the cast happens per slice, with the same bits."""
    import shutil

    from safetensors.numpy import load_file

    src = shared_data / "stories260K_hf"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg = hf.read_hf_config(str(tmp_path), param_dtype="float32")
    eager = hf.load_hf_params(str(tmp_path), cfg)
    assert eager["embedding"].dtype == np.float32
    sh = _shardings(cfg, MESHES["fsdp2-tensor4"])
    _assert_same_bits(eager, hf.load_hf_sharded(str(tmp_path), cfg, sh), sh)


def test_falcon_streamed_equals_eager(tmp_path):
    """Falcon's conversion table (fused QKV split per layout) plugs into the streaming import unchanged."""
    from .test_falcon import random_hf_falcon

    src, _ = random_hf_falcon(tmp_path, "40b-new", tied=False)  # grouped QKV rows, KV heads over tensor
    cfg = hf.read_hf_config(src)
    assert cfg.family == "falcon"
    eager = hf.load_hf_params(src, cfg)
    sh = _shardings(cfg, MESHES["data2-fsdp2-tensor2"])
    _assert_same_bits(eager, hf.load_hf_sharded(src, cfg, sh, max_chunk_bytes=1), sh)


def _rectangles(shape, rng, n=40):
    for _ in range(n):
        index = []
        for size in shape:
            a, b = sorted(rng.integers(0, size + 1, 2))
            index.append(slice(int(a), int(b) if b > a else int(a) + (1 if a < size else 0)))
        yield tuple(index)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_every_transform_reads_any_rectangle_like_apply(tmp_path, dtype):
    """Slices of each transform, read from a numpy array and from safetensors' get_slice, against indexing the
    whole converted tensor; rectangles include partial heads, partial head_dim and the zero-padded rows."""
    rng = np.random.default_rng(0)
    heads, hd, d, vocab = 3, 4, 5, 7
    cases = {
        "copy": (streaming.Copy(), (d,)),
        "transpose": (streaming.Transpose(), (6, d)),
        "pad_rows": (streaming.PadRows(12), (vocab, d)),
        "transpose_pad_cols": (streaming.TransposePadCols(12), (vocab, d)),
        "split_heads": (streaming.SplitHeads(heads, hd), (heads * hd, d)),
        "merge_heads": (streaming.MergeHeads(heads, hd), (d, heads * hd)),
        "whole": (streaming.Whole(lambda w: w[::-1] * 2, (vocab, d)), (vocab, d)),
    }
    tensors = {k: rng.standard_normal(shape).astype(dtype) for k, (_, shape) in cases.items()}
    file = str(tmp_path / "t.safetensors")
    save_file(tensors, file)
    with safe_open(file, framework="numpy") as f:
        for key, (t, shape) in cases.items():
            w = tensors[key]
            whole = t.apply(w)
            assert whole.shape == t.out_shape(shape), key
            for index in _rectangles(whole.shape, rng):
                index = streaming.normalize(index, whole.shape)
                want = whole[index]
                for src in (w, f.get_slice(key)):
                    got = t.read(src, shape, index)
                    got, want_c = np.ascontiguousarray(got), np.ascontiguousarray(want)
                    assert got.shape == want.shape and np.array_equal(got.view(np.uint8), want_c.view(np.uint8)), (
                        key,
                        index,
                    )


def _write_checkpoint(folder, *, layers, hidden, inter, vocab, shard_layers):
    """A random float32 Llama checkpoint written with safetensors directly (several shard files)."""
    folder.mkdir()
    rng = np.random.default_rng(1)

    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    tensors = {
        "model.embed_tokens.weight": r(vocab, hidden),
        "model.norm.weight": r(hidden),
        "lm_head.weight": r(vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, shape in {
            "self_attn.q_proj": (hidden, hidden),
            "self_attn.k_proj": (hidden, hidden),
            "self_attn.v_proj": (hidden, hidden),
            "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden),
            "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter),
            "input_layernorm": (hidden,),
            "post_attention_layernorm": (hidden,),
        }.items():
            tensors[p + n + ".weight"] = r(*shape)
    names = sorted(tensors, key=lambda k: int(k.split(".")[2]) if k.startswith("model.layers.") else -1)
    files: list[list[str]] = [[]]
    for k in names:
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else -1
        if layer >= 0 and layer % shard_layers == 0 and k.endswith("q_proj.weight") and files[-1]:
            files.append([])
        files[-1].append(k)
    weight_map = {}
    for j, group in enumerate(files):
        fname = f"model-{j + 1:05d}-of-{len(files):05d}.safetensors"
        save_file({k: tensors[k] for k in group}, str(folder / fname))
        weight_map.update(dict.fromkeys(group, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder), sum(t.nbytes for t in tensors.values()), max(t.nbytes for t in tensors.values())


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big") / "ckpt"
    return _write_checkpoint(folder, layers=12, hidden=512, inter=1024, vocab=1024, shard_layers=4)


def test_host_memory_is_one_tensor_not_the_model(request):
    """Run alone in a fresh interpreter: tracemalloc counts every thread's allocations, and threads earlier
    tests leave behind (checkpoint writers, input prefetchers) allocated inside the window in the full suite."""
    if os.environ.get(ISOLATED):
        return _host_memory_is_one_tensor_not_the_model(request.getfixturevalue("big_checkpoint"))
    run_alone(__file__, "test_host_memory_is_one_tensor_not_the_model")


def _host_memory_is_one_tensor_not_the_model(big_checkpoint):
    """Peak host (numpy / safetensors) allocations while importing, from tracemalloc: the eager import holds the
    whole model; the streaming one holds a few checkpoint tensors of a ~130 MB, 12-layer model beyond what
    stays allocated as the placed parameters themselves (the CPU backend may keep an aligned numpy buffer as
    the device buffer, zero-copy, so that part is device memory here, not import overhead)."""
    src, total, largest = big_checkpoint
    cfg = hf.read_hf_config(src)
    sh = _shardings(cfg, MESHES["fsdp8"])
    hf.load_hf_sharded(src, cfg, sh)  # compile the on-device layer writes first

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        streamed = hf.load_hf_sharded(src, cfg, sh)
        held, stream_peak = tracemalloc.get_traced_memory()
        del streamed
        tracemalloc.reset_peak()
        eager = hf.load_hf_params(src, cfg)
        eager_peak = tracemalloc.get_traced_memory()[1]
        del eager
    finally:
        tracemalloc.stop()
    assert eager_peak >= total, (eager_peak, total)
    # Layers are read in groups of at most the largest tensor (2 MiB), plus the slice being converted: 1.67 ×
    # largest in every run measured once each write is waited for (before, asynchronous writes queued up to
    # 3.67 × and this failed in CI); 2.5 × leaves room for Python's own allocations.
    assert stream_peak - held <= 2.5 * largest, (stream_peak, held, largest, total)


def test_trainer_init_from_streams_into_the_step_shardings(shared_data, tmp_path):
    """The trainer's init_from path (_resume_or_init): lazy load, vocabulary grown (512 → 600 rows), placed in
    the model-layout shardings, then the step-0 state; equal to the same parameters read onto the host."""
    from meditron_jax.train import OptimizerConfig, TrainStep, make_optimizer
    from meditron_jax.train.trainer import TrainConfig, _initial_params, model_config

    src = str(shared_data / "stories260K_hf")
    cfg = TrainConfig(model_dir=str(tmp_path / "run"), init_from=src, model_overrides={"vocab_size": 600})
    model_cfg = model_config(cfg)
    mesh = create_mesh(MeshConfig(ici_fsdp=2, ici_tensor=4, dcn_data=1))
    step = TrainStep(model_cfg, mesh, make_optimizer(OptimizerConfig(warmup_steps=1, train_steps=2)))
    shardings = nn.logical_to_mesh_sharding(logical_axes(model_cfg), mesh, step.rules)
    placed = _initial_params(cfg, model_cfg, shardings)
    host = jax.tree.map(
        np.asarray, _initial_params(cfg, model_cfg), is_leaf=lambda x: isinstance(x, streaming.LazyParam)
    )
    assert host["embedding"].shape[0] == model_cfg.padded_vocab_size == 640
    _assert_same_bits(host, placed, shardings)
    _assert_same_bits(host, step.state_from_params(placed).params, step.state_shardings.params)


def test_export_holds_one_shard_file_not_the_model(big_checkpoint, tmp_path):
    """save_hf writes each shard file as soon as it is full: peak host allocations stay near one shard
    (8 MiB here) plus a tensor, not the ~130 MB model; the written files equal the source bit for bit."""
    from safetensors.numpy import load_file

    src, total, largest = big_checkpoint
    cfg = hf.read_hf_config(src)
    params = hf.load_hf_params(src, cfg)
    shard = 8 * 2**20
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        hf.save_hf(params, cfg, str(tmp_path / "out"), max_shard_bytes=shard)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= shard + 3 * largest, (peak, shard, largest, total)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) >= total // shard and files[-1].endswith(f"-of-{len(files):05d}.safetensors")
    source = json.loads(open(f"{src}/model.safetensors.index.json").read())["weight_map"]
    assert set(index) == set(source)
    for file in files:
        written = load_file(str(tmp_path / "out" / file))
        original = {}
        for name in written:
            with safe_open(f"{src}/{source[name]}", framework="numpy") as f:
                original[name] = f.get_tensor(name)
        for name, w in written.items():
            assert index[name] == file and np.array_equal(w.view(np.uint8), original[name].view(np.uint8)), name


def test_export_of_sharded_params_gathers_one_layer_and_keeps_nothing(big_checkpoint, tmp_path):
    """save_hf of device-sharded parameters (FSDP over 8): the same files as from host arrays, and no host
    copy left behind on the arrays (np.asarray would cache one per parameter for as long as it lives)."""
    from safetensors.numpy import load_file

    src, total, largest = big_checkpoint
    cfg = hf.read_hf_config(src, scan_layers=False)  # unrolled: every parameter is its own array
    placed = hf.load_hf_sharded(src, cfg, _shardings(cfg, MESHES["fsdp8"]))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        hf.save_hf(placed, cfg, str(tmp_path / "out"), max_shard_bytes=16 * 2**20)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < largest, (kept, largest, total)
    written = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(str(f)))
    source = json.loads(open(f"{src}/model.safetensors.index.json").read())["weight_map"]
    assert set(written) == set(source)
    for name, w in written.items():
        with safe_open(f"{src}/{source[name]}", framework="numpy") as f:
            assert np.array_equal(w.view(np.uint8), f.get_tensor(name).view(np.uint8)), name


MULTI_PROCESS_WORKER = """
import json, sys
from meditron_jax.parallel.distributed import DistributedConfig, initialize
initialize(DistributedConfig(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2])))

import jax, numpy as np
from flax import linen as nn
from meditron_jax.convert import hf
from meditron_jax.model import logical_axes
from meditron_jax.parallel import MeshConfig, create_mesh, logical_axis_rules, resolve_rules

path = sys.argv[3]
cfg = hf.read_hf_config(path)
mesh = create_mesh(MeshConfig.from_flags("fsdp=4", "fsdp=2"))  # parameters split across both processes
shardings = nn.logical_to_mesh_sharding(logical_axes(cfg), mesh, resolve_rules(logical_axis_rules(), cfg,
                                                                                   dict(mesh.shape)).rules)
eager = hf.load_hf_params(path, cfg)
placed = hf.load_hf_sharded(path, cfg, shardings)
shards, split = 0, 0
for e, p in zip(jax.tree.leaves(eager), jax.tree.leaves(placed), strict=True):
    split += not p.is_fully_addressable
    for s in p.addressable_shards:
        got = np.ascontiguousarray(np.asarray(s.data))
        assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(e[s.index]).view(np.uint8)), s.index
        shards += 1
print("RESULT " + json.dumps({"process": jax.process_index(), "shards": shards, "split": split}))
"""


@pytest.mark.slow
def test_two_processes_each_read_their_own_shards(shared_data, tmp_path):
    """Two processes of 4 CPU devices, FSDP=8 across them: each builds only its own devices' shards (the
    parameters are not fully addressable anywhere), and every shard equals the eager import's slice."""
    from .multiprocess_utils import run_two_processes

    script = tmp_path / "worker.py"
    script.write_text(MULTI_PROCESS_WORKER)
    results = run_two_processes(script, tmp_path, str(shared_data / "stories260K_hf"))
    n_leaves = len(
        jax.tree.leaves(
            hf.lazy_hf_params(
                str(shared_data / "stories260K_hf"), hf.read_hf_config(str(shared_data / "stories260K_hf"))
            )
        )
    )
    for r in results:
        assert r["shards"] == 4 * n_leaves and r["split"] == n_leaves, r  # every parameter has an embed axis
