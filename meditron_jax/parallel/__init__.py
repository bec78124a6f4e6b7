"""Parallelism: device mesh, logical sharding rules, pipeline schedules, multi-host start-up, TPU AOT compile."""

from meditron_jax.parallel.mesh import MESH_AXES, MeshConfig, MeshError, create_mesh, resolve_shape
from meditron_jax.parallel.pipeline import PipelineConfig
from meditron_jax.parallel.rules import DEFAULT_RULES, logical_axis_rules, resolve_rules, sharding_report

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MeshConfig",
    "MeshError",
    "PipelineConfig",
    "create_mesh",
    "logical_axis_rules",
    "resolve_rules",
    "resolve_shape",
    "sharding_report",
]
