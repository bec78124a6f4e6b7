"""Multi-process start-up on CPU: two processes of 4 devices each form one 8-device mesh (DCN data=2 across
processes, ICI fsdp=4 within one), each feeds only its own rows of the global batch, and the sharded step's
loss equals the loss of the whole batch computed on one device."""

import textwrap

import pytest

from .multiprocess_utils import run_two_processes

pytestmark = pytest.mark.slow  # multi-second runs: excluded from the quick `-m "not slow"` loop


WORKER = textwrap.dedent("""
    import json, os, sys
    from meditron_jax.parallel.distributed import DistributedConfig, global_batch, initialize, process_rows
    initialize(DistributedConfig(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2])))

    import jax, jax.numpy as jnp, numpy as np
    from meditron_jax.config import get_config
    from meditron_jax.model import Llama, init_params
    from meditron_jax.parallel import MeshConfig, create_mesh
    from meditron_jax.train import TrainStep, cross_entropy_sums, make_optimizer

    cfg = get_config("tiny")
    params = init_params(cfg, 0)
    rng = np.random.default_rng(0)  # every process draws the same global batch, then keeps its own rows
    toks = rng.integers(0, cfg.vocab_size, (16, 33)).astype(np.int32)
    full = {"decoder_input_tokens": toks[:, :-1], "decoder_target_tokens": toks[:, 1:]}

    mesh = create_mesh(MeshConfig.from_flags("fsdp=-1", "data=2"))
    step = TrainStep(cfg, mesh, make_optimizer(), compiler_options={"xla_backend_optimization_level": 0})
    rows = process_rows(step.batch_sharding, (16, 32))
    batch = global_batch({k: v[rows] for k, v in full.items()}, step.batch_sharding, 16)
    _, metrics = step(step.state_from_params(params), batch)

    logits = jax.jit(lambda p, t: Llama(cfg).apply({"params": p}, t), device=jax.local_devices()[0])(
        params, full["decoder_input_tokens"])
    ce, w = cross_entropy_sums(logits, full["decoder_target_tokens"], np.ones((16, 32), np.float32))
    mesh_procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    print("RESULT " + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                                  "devices": jax.device_count(), "rows": [rows.start, rows.stop],
                                  "loss": float(metrics["loss"]), "ref": float(ce / w),
                                  "data_axis_processes": [sorted(set(mesh_procs[i].ravel().tolist()))
                                                          for i in range(2)]}))
""")


def test_two_cpu_processes_feed_their_own_rows(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    results = run_two_processes(script, tmp_path)
    results.sort(key=lambda r: r["process"])
    assert [r["count"] for r in results] == [2, 2] and results[0]["devices"] == 8
    # DCN data=2 across processes: each data replica lives in one process, which loads half of the batch
    assert results[0]["data_axis_processes"] == [[0], [1]]
    assert [r["rows"] for r in results] == [[0, 8], [8, 16]]
    for r in results:
        assert abs(r["loss"] - r["ref"]) <= 1e-5 * abs(r["ref"]), r
