"""Orbax exports and training-run checkpoints restored straight into their device shards (``lazy=True`` +
``streaming.place``): bit for bit what the host restore (``load_model_dir`` without ``lazy``) gives, in
the requested shardings, while the host holds about one device shard at a time instead of the model.

The host restore is the reference: it is what the API and the trainer used before, and test_convert /
test_reliability_cli check it against the Hugging Face import and transformers. Equality is of raw bits.
"""

import os
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from meditron_jax.config import get_config
from meditron_jax.convert import orbax, streaming
from meditron_jax.convert.model_dir import RUN_CHECKPOINTS, RUN_CONFIG_FILE, load_model_dir
from meditron_jax.model import init_params
from meditron_jax.parallel import pipeline as pp

from .multiprocess_utils import ISOLATED, run_alone
from .test_streaming_import import MESHES, _assert_same_bits, _shardings

CFG = get_config("tiny").replace(num_layers=4)


def _bf16(cfg):
    return cfg.replace(param_dtype="bfloat16")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "m")
    orbax.save_orbax(init_params(CFG, 3), CFG, path)
    return path


def _write_run(folder, params, *, step=5):
    """A training run's MODEL_DIR as the trainer writes it: its ModelConfig and an orbax CheckpointManager
    step of the whole train state (optimizer moments beside the parameters)."""
    import orbax.checkpoint as ocp

    os.makedirs(folder, exist_ok=True)
    CFG.to_json(os.path.join(folder, RUN_CONFIG_FILE))
    state = {
        "step": np.int32(step),
        "params": params,
        "opt_state": {"mu": jax.tree.map(np.zeros_like, params), "nu": jax.tree.map(np.ones_like, params)},
    }
    with ocp.CheckpointManager(
        os.path.join(folder, RUN_CHECKPOINTS), item_handlers=ocp.StandardCheckpointHandler()
    ) as m:
        m.save(step, args=ocp.args.StandardSave(state))
        m.wait_until_finished()
    return str(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A plain run, and a pipelined one (circular, 2 repeats × 2 stages × 1 layer) saved from device arrays
    with the stages split over 2 devices (so its chunks are per-stage, as a real pipelined run's are)."""
    base = tmp_path_factory.mktemp("runs")
    params = init_params(CFG, 4)
    plain = _write_run(base / "plain", params)
    mesh = jax.make_mesh((2, 4), ("stage", "fsdp"))
    piped = pp.to_pipeline_params(params, 2, 2)

    def put(path, x):
        spec = P(None, "stage") if jax.tree_util.keystr(path).startswith("['layers']") else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    pipelined = _write_run(base / "pipelined", jax.tree_util.tree_map_with_path(put, piped))
    return {"plain": plain, "pipelined": pipelined}


def _lazy_equals_eager(path, shardings=None, **overrides):
    eager, cfg = load_model_dir(path, **overrides)
    lazy, lazy_cfg = load_model_dir(path, lazy=True, **overrides)
    assert lazy_cfg == cfg
    for leaf in streaming.leaves(lazy):
        assert isinstance(leaf, orbax.StoredParam), leaf
    _assert_same_bits(eager, streaming.place(lazy, shardings), shardings)
    return eager, lazy, cfg


@pytest.mark.parametrize("mesh", MESHES)
def test_export_restores_into_shards_bit_for_bit(export, mesh):
    _lazy_equals_eager(export, _shardings(CFG, MESHES[mesh]))


def test_export_cast_and_one_device(export):
    """Into bfloat16 parameters (cast shard by shard as orbax reads, as the host restore casts), on a mesh
    and on one device (what meditron_jax.load uses); a leaf read on the host alone gives the same bits."""
    eager, lazy, cfg = _lazy_equals_eager(
        export, _shardings(_bf16(CFG), MESHES["fsdp2-tensor4"]), param_dtype="bfloat16"
    )
    assert eager["embedding"].dtype == np.dtype("bfloat16")
    _assert_same_bits(eager, streaming.place(lazy))
    got = np.asarray(lazy["layers"]["mlp"]["gate"])
    want = eager["layers"]["mlp"]["gate"]
    assert np.array_equal(got.view(np.uint8), np.asarray(want).view(np.uint8))
    assert np.array_equal(lazy["embedding"][3:7].view(np.uint8), np.asarray(eager["embedding"])[3:7].view(np.uint8))


@pytest.mark.parametrize("kind", ["plain", "pipelined"])
@pytest.mark.parametrize("mesh", ["fsdp8", "data2-fsdp2-tensor2"])
def test_run_restores_into_shards_bit_for_bit(runs, kind, mesh):
    _lazy_equals_eager(runs[kind], _shardings(CFG, MESHES[mesh]))


def test_reading_a_run_prints_no_orbax_notices(runs, caplog, recwarn):
    """A run's item (``<step>/default``) read eagerly, lazily and placed: orbax's "Metadata file does not exist"
    (the step's metadata is one level up, where the trainer wrote it) and its advice to pass shardings were
    printed on every read of the main job; neither applies. Other warnings still get through."""
    import logging

    caplog.set_level(logging.INFO)
    load_model_dir(runs["plain"])
    lazy, _ = load_model_dir(runs["plain"], lazy=True)
    streaming.place(lazy)
    orbax_lines = [r.getMessage() for r in caplog.records if r.name == "absl" and r.levelno >= logging.WARNING]
    assert not [m for m in orbax_lines if "Metadata file does not exist" in m], orbax_lines
    assert not [w for w in recwarn if "Sharding info not provided" in str(w.message)]
    logging.getLogger("absl").warning("Metadata file does not exist: outside a read")  # the filter is scoped
    assert any(r.getMessage().endswith("outside a read") for r in caplog.records)


def test_pipelined_run_cast_and_layer_sharded_targets(runs):
    """A pipelined run read into bfloat16, and into shardings that split the layer axis: over 2 devices (the
    repeats axis of the stored [2, 2, 1, ...] layout takes the split) and over 4 (it does not divide the
    repeats: each device reads its slices of all layers, then keeps its own)."""
    path = runs["pipelined"]
    _lazy_equals_eager(path, _shardings(_bf16(CFG), MESHES["fsdp2-tensor4"]), param_dtype="bfloat16")
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    for axis in ("a", "b"):
        lazy, _ = load_model_dir(path, lazy=True)
        split = NamedSharding(mesh, P(axis))
        sh = jax.tree.map(
            lambda p, split=split: split if p.shape[0] == CFG.num_layers else NamedSharding(mesh, P()),
            lazy,
            is_leaf=lambda x: isinstance(x, orbax.StoredParam),
        )
        _assert_same_bits(load_model_dir(path)[0], streaming.place(lazy, sh), sh)
    stacked = lazy["layers"]["mlp"]["up"]
    assert stacked.stored_shape == (2, 2, 1, *stacked.shape[1:]) and stacked.shape[0] == CFG.num_layers
    a = orbax._stored_sharding(NamedSharding(mesh, P("a")), stacked.stored_shape, stacked.shape)
    b = orbax._stored_sharding(NamedSharding(mesh, P("b")), stacked.stored_shape, stacked.shape)
    assert tuple(a.spec)[:3] == ("a", None, None) and tuple(b.spec)[:3] == (None, None, None)


def test_a_layout_without_a_matching_stored_sharding_is_read_on_the_host(runs, monkeypatch):
    """Where no stored-layout sharding maps onto the target's (``_stored_sharding`` None: not a NamedSharding,
    or an unforeseen layout), the parameter is read onto the host alone and placed from there: same bits."""
    real = orbax._stored_sharding
    monkeypatch.setattr(
        orbax, "_stored_sharding", lambda sh, stored, shape: None if stored != shape else real(sh, stored, shape)
    )
    _lazy_equals_eager(runs["pipelined"], _shardings(CFG, MESHES["fsdp2-tensor4"]))
    assert orbax._stored_sharding(_shardings(CFG, MESHES["fsdp8"])["embedding"], (2, 3, 512, 64), (6, 512, 32)) is None


def test_trainer_init_from_a_run_and_an_export(runs, export, tmp_path):
    """The trainer's init_from path (lazy, vocabulary grown 512 → 600 rows, placed in the step's shardings)
    from a pipelined run and from an export: equal to the same parameters read onto the host."""
    from flax import linen as nn

    from meditron_jax.model import logical_axes
    from meditron_jax.parallel import MeshConfig, create_mesh, logical_axis_rules, resolve_rules
    from meditron_jax.train.trainer import TrainConfig, _initial_params, model_config

    for src in (runs["pipelined"], export):
        cfg = TrainConfig(model_dir=str(tmp_path / "run"), init_from=src, model_overrides={"vocab_size": 600})
        model_cfg = model_config(cfg)
        mesh = create_mesh(MeshConfig(ici_fsdp=2, ici_tensor=4, dcn_data=1))
        rules = resolve_rules(logical_axis_rules(), model_cfg, dict(mesh.shape)).rules
        shardings = nn.logical_to_mesh_sharding(logical_axes(model_cfg), mesh, rules)
        placed = _initial_params(cfg, model_cfg, shardings)
        host = jax.tree.map(np.asarray, _initial_params(cfg, model_cfg), is_leaf=streaming._is_lazy)
        assert host["embedding"].shape[0] == model_cfg.padded_vocab_size == 640
        _assert_same_bits(host, placed, shardings)


def test_lazy_load_keeps_the_checkpoint_errors(export, runs, tmp_path):
    want = r"does not match the model config: parameter \['embedding'\] has shape \(512, 64\)"
    with pytest.raises(ValueError, match=want):
        load_model_dir(export, lazy=True, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"default: a parameter of shape \(512, 64\) does not fit the run's model"):
        load_model_dir(runs["plain"], lazy=True, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    with pytest.raises(FileNotFoundError, match=r"no finished checkpoint of step 7 \(it has \[5\]\)"):
        load_model_dir(runs["plain"], lazy=True, step=7)


def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def test_host_memory_is_one_shard_not_the_model(tmp_path):
    """Run alone in a fresh interpreter (the RSS of earlier tests' threads and caches would count), with
    glibc serving every allocation over 64 KiB by mmap and unmapping it when freed, so that RssAnon is what
    is live: not meditron_jax.host_memory's keep-everything settings, under which a freed buffer stays
    resident and the next one reuses it unseen."""
    from meditron_jax.host_memory import GLIBC_SETTINGS, OPT_OUT

    if os.environ.get(ISOLATED):
        return _host_memory_is_one_shard_not_the_model(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in GLIBC_SETTINGS}
    env.update({OPT_OUT: "default", "MALLOC_MMAP_THRESHOLD_": str(64 << 10)})
    run_alone(__file__, "test_host_memory_is_one_shard_not_the_model", env)


def _host_memory_is_one_shard_not_the_model(tmp_path):
    """Peak RssAnon (sampled every 2 ms) while restoring a ~270 MB, 11-layer unrolled export saved from host
    arrays (one chunk per parameter, the worst case: a device shard's read decodes its whole chunk) into
    FSDP over 8 CPU devices. The placed parameters are host memory on this backend, so the restore's own
    cost is the peak minus what stays placed. The host restore's cost is the model; the sharded one's a few
    parameters."""
    cfg = get_config("tiny").replace(
        vocab_size=8192, hidden_size=640, intermediate_size=2560, num_layers=11, num_heads=10, num_kv_heads=10
    )
    cfg = cfg.replace(scan_layers=False)
    params = init_params(cfg, 0)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    largest = max(x.nbytes for x in jax.tree.leaves(params))
    path = str(tmp_path / "m")
    orbax.save_orbax(params, cfg, path)
    del params
    sh = _shardings(cfg, MESHES["fsdp8"])

    def measure(fn):
        import gc

        gc.collect()
        base = _status()["RssAnon"]
        peak = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _status()["RssAnon"])
                time.sleep(0.002)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            placed = jax.block_until_ready(fn())
        finally:
            done.set()
            t.join()
        peak[0] = max(peak[0], _status()["RssAnon"])
        held = sum(s.data.nbytes for leaf in jax.tree.leaves(placed) for s in leaf.addressable_shards)
        del placed
        return peak[0] - base - held

    sharded = measure(lambda: streaming.place(load_model_dir(path, lazy=True, scan_layers=False)[0], sh))
    eager = measure(lambda: streaming.place(load_model_dir(path, scan_layers=False)[0], sh))
    # Saving the placed parameters (what meditron-convert --to orbax now does) copies them to the host in
    # batches of ~transfer_bytes, each written before the next, instead of all at once.
    placed = jax.block_until_ready(streaming.place(load_model_dir(path, lazy=True, scan_layers=False)[0], sh))
    saved = measure(lambda: orbax.save_orbax(placed, cfg, str(tmp_path / "again"), transfer_bytes=32 << 20) or {})
    again = load_model_dir(str(tmp_path / "again"), scan_layers=False)[0]
    _assert_same_bits(again, placed)
    mib = {k: round(v / 2**20) for k, v in dict(model=total, largest=largest, eager=eager, sharded=sharded).items()}
    print("restore cost over placed, MiB:", mib, "save cost:", round(saved / 2**20))  # shown with -s
    assert total > 250e6, total
    # The host restore holds the model (less what the CPU backend takes over zero-copy as device buffers).
    assert eager >= total / 2, (eager, total)
    # Reads of at most the largest chunk (20 MiB, one whole parameter here) in flight, each decoded whole.
    assert sharded <= 3 * largest and sharded <= total / 5, (sharded, largest, total)
    assert saved <= 4 * (32 << 20) and saved <= total / 2, (saved, total)


MULTI_PROCESS_WORKER = """
import json, sys
from meditron_jax.parallel.distributed import DistributedConfig, initialize
initialize(DistributedConfig(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2])))

import jax, numpy as np
from flax import linen as nn
from meditron_jax.convert import streaming
from meditron_jax.convert.model_dir import load_model_dir
from meditron_jax.model import logical_axes
from meditron_jax.parallel import MeshConfig, create_mesh, logical_axis_rules, resolve_rules

results = {"process": jax.process_index()}
for name, path in (("export", sys.argv[3]), ("pipelined", sys.argv[4])):
    ref = np.load(f"{name}.npz")  # the host restore, made by the test in one process
    cfg = load_model_dir(path, lazy=True)[1]
    host = [ref[str(i)] for i in range(len(ref.files))]
    mesh = create_mesh(MeshConfig.from_flags("fsdp=4", "fsdp=2"))  # parameters split across both processes
    rules = resolve_rules(logical_axis_rules(), cfg, dict(mesh.shape)).rules
    shardings = nn.logical_to_mesh_sharding(logical_axes(cfg), mesh, rules)
    placed = streaming.place(load_model_dir(path, lazy=True)[0], shardings)
    shards, split = 0, 0
    for e, p, s in zip(jax.tree.leaves(host), jax.tree.leaves(placed), jax.tree.leaves(shardings), strict=True):
        assert p.sharding == s
        split += not p.is_fully_addressable
        for shard in p.addressable_shards:
            got = np.ascontiguousarray(np.asarray(shard.data))
            want = np.ascontiguousarray(np.asarray(e)[shard.index])
            assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (name, shard.index)
            shards += 1
    results[name] = {"shards": shards, "split": split, "leaves": len(host)}
print("RESULT " + json.dumps(results))
"""


@pytest.mark.slow
def test_two_processes_each_restore_their_own_shards(export, runs, tmp_path):
    """Two processes of 4 CPU devices, FSDP=8 across them, from an export and a pipelined run: each process
    holds only its own 4 shards of every parameter (none is fully addressable), equal to the host restore's."""
    from .multiprocess_utils import run_two_processes

    script = tmp_path / "worker.py"
    script.write_text(MULTI_PROCESS_WORKER)
    for name, path in (("export", export), ("pipelined", runs["pipelined"])):
        # The host restore needs one process (orbax wants shardings to restore device arrays in several).
        host = jax.tree.leaves(load_model_dir(path)[0])
        np.savez(tmp_path / f"{name}.npz", **{str(i): np.asarray(x) for i, x in enumerate(host)})
    for r in run_two_processes(script, tmp_path, export, runs["pipelined"]):
        for name in ("export", "pipelined"):
            got = r[name]
            assert got["shards"] == 4 * got["leaves"] and got["split"] == got["leaves"], (name, r)
