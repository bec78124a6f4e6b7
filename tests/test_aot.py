"""TPU topology names and ahead-of-time compilation of the full train step for a small TPU slice (libtpu)."""

import json

import pytest

from meditron_jax.cli import aot_compile
from meditron_jax.hardware import GiB, get_chip
from meditron_jax.parallel.topology import parse_topology


@pytest.mark.parametrize(
    "name, chip, chips, shape",
    [
        ("v5p-128", "v5p", 64, (4, 4, 4)),  # v4/v5p names count TensorCores, two per chip
        ("v5p-256", "v5p", 128, (4, 4, 8)),
        ("v4-256", "v4", 128, (4, 4, 8)),
        ("v4-8", "v4", 4, (2, 2, 1)),
        ("v5e-16", "v5e", 16, (4, 4)),  # v5e/v6e names count chips
        ("v5litepod-256", "v5e", 256, (16, 16)),
        ("v6e-64", "v6e", 64, (8, 8)),
        ("v5p:4x4x8", "v5p", 128, (4, 4, 8)),
    ],
)
def test_topology_names(name, chip, chips, shape):
    topo = parse_topology(name)
    assert (topo.chip.name, topo.num_chips, topo.shape) == (chip, chips, shape)


@pytest.mark.parametrize(
    "name, message",
    [
        ("v5p-127", "not a multiple of 2"),
        ("v4-96", "no standard v4 slice shape"),
        ("v5p:4x4", "3-D"),
        ("a100:8", "needs a TPU chip"),
        ("tpu-128", "expected an accelerator type"),
    ],
)
def test_bad_topology_names(name, message):
    with pytest.raises((ValueError, KeyError), match=message):
        parse_topology(name)


def test_topology_devices_are_chips():
    devices = parse_topology("v4-8").devices()  # megacore: one device per chip, not per TensorCore
    assert len(devices) == 4 and devices[0].device_kind == "TPU v4"
    assert get_chip(devices[0].device_kind).hbm_bytes == 32 * GiB


def _run(capsys, *flags):
    code = aot_compile.main(list(flags))
    lines = capsys.readouterr().out.strip().splitlines()
    return code, lines, json.loads(lines[-1])


@pytest.mark.slow
def test_aot_compile_tiny_for_v5e_slice(capsys):
    code, lines, result = _run(
        capsys,
        "--model",
        "tiny",
        "--topology",
        "v5e-4",
        "--seq_len",
        "128",
        "--global_batch",
        "8",
        "--mesh",
        "fsdp=2,tensor=2",
        "--report",
    )
    assert code == 0 and result["fits"] is True
    assert result["num_chips"] == 4 and result["hbm_bytes"] == int(15.75 * GiB)
    for key in ("argument_bytes", "temp_bytes", "output_bytes", "total_bytes", "params_bytes_per_chip"):
        assert result[key] > 0, key
    assert result["total_bytes"] == (
        result["argument_bytes"] + result["output_bytes"] - result["alias_bytes"] + result["temp_bytes"]
    )
    assert any("-> fits" in line for line in lines)
    assert any(line.startswith("layers/mlp/gate") for line in lines)  # the --report table


def test_aot_compile_that_does_not_fit_exits_nonzero(capsys):
    """A pipelined (stage=2) configuration whose activations cannot fit 16 GiB: says so, exits 3."""
    code, lines, result = _run(
        capsys,
        "--model",
        "tiny",
        "--topology",
        "v5e-4",
        "--seq_len",
        "4096",
        "--global_batch",
        "512",
        "--mesh",
        "stage=2,fsdp=2",
        "--pipeline_microbatches",
        "2",
        "--remat",
        "none",
    )
    assert code == 3 and result["fits"] is False
    assert result["total_bytes"] > result["hbm_bytes"]
    assert "bubble" in result["pipeline"]
    assert any("DOES NOT FIT" in line for line in lines)


def test_aot_invalid_mesh_is_reported(capsys):
    code, _, result = _run(
        capsys,
        "--model",
        "llama2-13b",
        "--topology",
        "v5p-32",
        "--seq_len",
        "128",
        "--global_batch",
        "16",
        "--mesh",
        "tensor=16",
    )
    assert code == 1 and result["fits"] is False
    assert "tensor=16 does not divide num_heads=40 of llama2-13b" in result["error"]
