"""Mesh shapes (ICI × DCN, -1), validation messages, gin configuration, logical rules and the sharding report.

No compilation here: meshes over the 8 fake CPU devices and libtpu's abstract TPU devices, abstract params.
"""

from pathlib import Path

import gin
import numpy as np
import pytest

from meditron_jax.config import get_config
from meditron_jax.parallel import (
    DEFAULT_RULES,
    MESH_AXES,
    MeshConfig,
    MeshError,
    PipelineConfig,
    create_mesh,
    logical_axis_rules,
    resolve_rules,
    resolve_shape,
)
from meditron_jax.parallel.topology import parse_topology
from meditron_jax.train import TrainStep, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def test_minus_one_takes_the_rest_of_the_devices():
    ici, dcn = resolve_shape(MeshConfig(ici_fsdp=-1, ici_tensor=2), 8)
    assert ici == {"data": 1, "stage": 1, "fsdp": 4, "sequence": 1, "tensor": 2}
    assert dcn == dict.fromkeys(MESH_AXES, 1)
    # DCN: 4 slices of 16 devices; data takes the rest of the slices
    ici, dcn = resolve_shape(MeshConfig(ici_fsdp=-1, ici_tensor=4, dcn_data=-1, dcn_stage=2), 64, num_slices=4)
    assert (ici["fsdp"], ici["tensor"], dcn["data"], dcn["stage"]) == (4, 4, 2, 2)


@pytest.mark.parametrize(
    "cfg, devices, slices, message",
    [
        (MeshConfig(ici_fsdp=2, ici_tensor=2), 8, 1, "ici_fsdp=2 × ici_tensor=2 multiplies to 4, but there are 8"),
        (MeshConfig(ici_fsdp=-1, ici_tensor=3), 8, 1, "do not divide|does not divide"),
        (MeshConfig(ici_fsdp=-1, dcn_data=3), 8, 2, "dcn_data=3 multiplies to 3, but there are 2 slices"),
    ],
)
def test_shape_errors_name_the_fields_and_numbers(cfg, devices, slices, message):
    with pytest.raises(MeshError, match=message):
        resolve_shape(cfg, devices, slices)


def test_config_errors():
    with pytest.raises(MeshError, match="only one ici axis may be -1"):
        MeshConfig(ici_fsdp=-1, ici_data=-1)
    with pytest.raises(MeshError, match="unknown mesh axes"):
        MeshConfig.from_flags("fsdp=-1,model=2")
    with pytest.raises(MeshError, match="must look like axis=size"):
        MeshConfig.from_flags("fsdp")


def test_cpu_mesh_axes_and_order():
    mesh = create_mesh(MeshConfig.from_flags("data=2,fsdp=-1,tensor=2"))
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "stage": 1, "fsdp": 2, "sequence": 1, "tensor": 2}
    # tensor is the innermost (fastest-varying) axis: neighbouring device ids
    ids = np.vectorize(lambda d: d.id)(mesh.devices).reshape(2, 2, 2)
    assert abs(int(ids[0, 0, 1]) - int(ids[0, 0, 0])) == 1


def test_hybrid_mesh_puts_dcn_axes_across_slices():
    """Two v5e-4 slices (abstract TPU devices): data over DCN, fsdp × tensor within a slice."""
    devices = parse_topology("v5e-4", num_slices=2).devices()
    mesh = create_mesh(MeshConfig.from_flags("fsdp=2,tensor=2", "data=2"), devices)
    assert dict(mesh.shape)["data"] == 2
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()  # each data replica is one slice


def test_mesh_from_gin():
    with gin.unlock_config():
        gin.parse_config("MeshConfig.ici_fsdp = 2\nMeshConfig.ici_tensor = -1\nMeshConfig.dcn_data = 1")
    try:
        mesh = create_mesh(MeshConfig())
        assert (mesh.shape["fsdp"], mesh.shape["tensor"]) == (2, 4)
    finally:
        gin.clear_config()


def test_rules_from_gin():
    with gin.unlock_config():
        gin.parse_config('logical_axis_rules.rules = [("batch", "data"), ("embed", None), ("mlp", "tensor")]')
    try:
        assert logical_axis_rules() == (("batch", "data"), ("embed", None), ("mlp", "tensor"))
    finally:
        gin.clear_config()
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        logical_axis_rules([("heads", "model")])


def test_heads_that_do_not_divide_are_an_error():
    cfg = get_config("llama2-13b")
    shape = dict.fromkeys(MESH_AXES, 1) | {"tensor": 16}
    with pytest.raises(MeshError, match=r"tensor=16 does not divide num_heads=40 of llama2-13b.*\[1, 2, 4, 5, 8, 10"):
        resolve_rules(DEFAULT_RULES, cfg, shape, "llama2-13b")


def test_kv_heads_over_more_tensor_shards_are_replicated():
    cfg = get_config("meditron-70b")
    shape = dict.fromkeys(MESH_AXES, 1) | {"tensor": 16, "fsdp": 8}
    resolved = resolve_rules(DEFAULT_RULES, cfg, shape, "meditron-70b")
    assert ("kv_heads", None) in resolved.rules and ("heads", "tensor") in resolved.rules
    assert "tensor=16 > num_kv_heads=8" in resolved.notes[0] and "2 tensor shards" in resolved.notes[0]
    # tensor=8 divides the 8 KV heads: no resolution needed
    assert resolve_rules(DEFAULT_RULES, cfg, shape | {"tensor": 8}).notes == ()


def _report(cfg, mesh_flags, rules=None, devices=None):
    mesh = create_mesh(MeshConfig.from_flags(mesh_flags, "data=1"), devices)
    stages = dict(mesh.shape)["stage"]
    pipeline = PipelineConfig(num_microbatches=stages) if stages > 1 else None
    return TrainStep(cfg, mesh, make_optimizer(), rules=rules, pipeline=pipeline).report()


def test_report_bytes_per_device_and_replication_check():
    cfg = get_config("tiny")
    report = _report(cfg, "fsdp=4,tensor=2")
    vocab_padding = cfg.hidden_size * (cfg.padded_vocab_size - cfg.vocab_size) * 2  # embedding + head rows
    assert report.bytes_total == 4 * (cfg.num_params() + vocab_padding)
    by_path = {leaf.path: leaf for leaf in report.leaves}
    assert by_path["layers/mlp/gate"].bytes_per_device == by_path["layers/mlp/gate"].bytes_total // 8
    assert by_path["layers/mlp/gate"].spec == "(None, ('fsdp', 'sequence'), 'tensor')"
    report.check(0.10)
    assert "per device" in report.table()
    # Rules that shard nothing but the MLP: the check fails and names what is replicated.
    bad = _report(cfg, "fsdp=4,tensor=2", rules=[("batch", ("data", "fsdp")), ("mlp", "tensor")])
    with pytest.raises(MeshError, match="too much of the model is replicated.*embedding"):
        bad.check(0.10)


def test_70b_report_on_a_v5p_pod_mesh():
    """meditron-70b over 128 abstract v5p chips (fsdp 16 × tensor 8): ≈ 1/128 of the bytes per chip."""
    devices = parse_topology("v5p-256").devices()
    report = _report(get_config("meditron-70b"), "fsdp=16,tensor=8", devices=devices)
    assert report.num_devices == 128
    assert report.replication_overhead < 0.01
    report.check(0.01)


def test_pipeline_layout_report_and_bubble():
    cfg = get_config("tiny", num_layers=8)
    report = _report(cfg, "stage=4,fsdp=2")
    by_path = {leaf.path: leaf for leaf in report.leaves}
    assert by_path["layers/mlp/gate"].shape == (1, 4, 2, 64, 172)
    assert by_path["layers/mlp/gate"].spec.startswith("(None, 'stage', None")
    pipe = PipelineConfig(num_microbatches=8)
    assert pipe.bubble_fraction(4) == pytest.approx(3 / 11)
    circ = PipelineConfig(num_microbatches=8, schedule="circular", num_repeats=2)
    assert circ.bubble_fraction(4) == pytest.approx(3 / 19)
    with pytest.raises(MeshError, match="num_layers=8 is not divisible by stage=4 × repeats=4"):
        PipelineConfig(num_microbatches=8, schedule="circular", num_repeats=4).validate(cfg, 4)
    with pytest.raises(MeshError, match="num_microbatches >= stage: 2 < 4"):
        PipelineConfig(num_microbatches=2, schedule="circular").validate(cfg, 4)
    with pytest.raises(MeshError, match="stage=4 but no PipelineConfig"):
        TrainStep(cfg, create_mesh(MeshConfig.from_flags("stage=4,fsdp=2", "data=1")), make_optimizer())


def test_batch_divisibility_errors():
    mesh = create_mesh(MeshConfig.from_flags("fsdp=-1", "data=1"))
    step = TrainStep(get_config("tiny"), mesh, make_optimizer(), grad_accum_steps=2)
    with pytest.raises(MeshError, match="global batch 13 is not divisible by grad_accum_steps=2"):
        step.check_batch(13, 16)
    with pytest.raises(MeshError, match=r"batch of 6 sequences per accumulation step .* 8 batch shards"):
        step.check_batch(12, 16)
    step.check_batch(16, 16)


@pytest.mark.parametrize(
    "name, slices, want",
    [
        ("fsdp.gin", 1, {"fsdp": 128}),
        ("fsdp_tp4.gin", 1, {"fsdp": 32, "tensor": 4}),
        ("meditron70b_tp8_pp8_dp2.gin", 1, {"data": 2, "stage": 8, "tensor": 8}),
        ("multislice_2x_fsdp.gin", 2, {"data": 2, "fsdp": 64}),
    ],
)
def test_gin_mesh_presets_on_a_v5p_256(name, slices, want):
    devices = parse_topology("v5p-128" if slices == 2 else "v5p-256", num_slices=slices).devices()
    with gin.unlock_config():
        gin.parse_config_file(str(ROOT / "gin" / "parallel" / name))
    try:
        mesh = create_mesh(MeshConfig(), devices)
        assert {a: n for a, n in mesh.shape.items() if n > 1} == want
        if "pp8" in name:
            assert PipelineConfig().num_microbatches == 16
            assert PipelineConfig().bubble_fraction(8) == pytest.approx(7 / 23)
    finally:
        gin.clear_config()


def test_gin_rules_preset_is_flagged_as_replicated():
    with gin.unlock_config():
        gin.parse_config_file(str(ROOT / "gin" / "parallel" / "rules_megatron.gin"))
    try:
        rules = logical_axis_rules()
    finally:
        gin.clear_config()
    assert ("embed", ("fsdp", "sequence")) not in rules
    with pytest.raises(MeshError, match="too much of the model is replicated"):
        _report(get_config("tiny"), "fsdp=4,tensor=2", rules=rules).check(0.10)
