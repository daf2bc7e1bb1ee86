"""Device mesh from config, batch checks, and logical-axis -> NamedSharding resolution.

The rules table lives in ``gist_jax/model/sharding.py``; this module only applies it to a concrete
mesh. A dimension that a mesh axis does not divide is replicated along that axis instead of
failing (e.g. SmolLM2's 9 heads on tensor=2), and ``describe`` reports where that happened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gist_jax.errors import ConfigError
from gist_jax.model.sharding import LOGICAL_AXIS_RULES, MESH_AXES, fit_spec, logical_to_mesh
from gist_jax.train.config import MeshConfig

BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    sizes = cfg.sizes()
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if num_devices % known:
            raise ConfigError(f"mesh {sizes} cannot fill {num_devices} devices: the fixed axes "
                              f"multiply to {known}, which does not divide {num_devices}")
        sizes = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh {sizes} has {math.prod(sizes.values())} devices but "
                          f"{num_devices} are available; make mesh.data * mesh.fsdp * mesh.context * mesh.tensor "
                          f"equal {num_devices} or set one axis to -1")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over all (global) devices; with several processes, ``jax.devices()`` is global."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - topology-unaware fallback (CPU, odd shapes)
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, microbatches: int, mesh: Mesh) -> None:
    per_micro = global_batch // microbatches
    dp = data_parallel_size(mesh)
    if per_micro % dp:
        raise ConfigError(
            f"step.batch_size={global_batch} / step.microbatches={microbatches} = {per_micro} "
            f"sequences per microbatch do not divide over the {dp} data-parallel devices "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a batch that is a "
            f"multiple of {dp * microbatches}")


def shardings_for(logical_specs: Any, abstract: Any, mesh: Mesh,
                  rules: tuple[tuple[str, Any], ...] = LOGICAL_AXIS_RULES) -> Any:
    """Tree of NamedShardings for ``abstract`` (arrays or ShapeDtypeStructs) from its logical
    PartitionSpecs."""
    mesh_specs = logical_to_mesh(logical_specs, rules)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh.shape)),
                        mesh_specs, abstract, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
