"""Sharding declared once: logical axis names on params and activations, one rules table.

Modules annotate parameters with ``nn.with_logical_partitioning`` and activations with
``constrain`` (active inside ``activation_mesh``) using the logical names below; only this
table knows which mesh axis each name lands on. Mesh axes: ``data`` (pure data parallel),
``fsdp`` (data parallel with parameters and optimizer state sharded), ``context`` (the sequence
in contiguous blocks of whole segments: context parallelism, ``gist/context_parallel.py``),
``tensor`` (Megatron-style model parallel over heads and MLP).
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")
CONTEXT_AXIS = "context"

# logical name -> mesh axis (or axes, or None = replicated). The first rule that fits wins.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "context"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
BATCH_LENGTH_HEADS = ("activation_batch", "activation_length", "activation_heads",
                      "activation_head_dim")
BATCH_LENGTH_KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads",
                         "activation_head_dim")
BATCH_LENGTH_MLP = ("activation_batch", "activation_length", "activation_mlp")
BATCH_LENGTH_VOCAB = ("activation_batch", "activation_length", "activation_vocab")


_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)
_RULE_OVERRIDES: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "rule_overrides", default=types.MappingProxyType({}))


@contextlib.contextmanager
def activation_mesh(mesh: Mesh) -> Iterator[None]:
    """While tracing under this context, ``constrain`` emits real sharding constraints on
    ``mesh``. (Flax's own mesh hook would also constrain parameter initialisers, which are
    traced with flattened shapes, so the model uses this one instead.)"""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


@contextlib.contextmanager
def override_rules(**mesh_axes: Any) -> Iterator[None]:
    """While tracing under this context, the named logical axes land on other mesh axes (None:
    replicated). For a computation whose axes mean something else than the model's: the AE
    decoder's short sequences are batched over segments by a ``vmap`` that carries the
    ``context`` axis itself, so their own length axis must not be split over it again."""
    unknown = set(mesh_axes) - {name for name, _ in LOGICAL_AXIS_RULES}
    assert not unknown, f"no logical axes {sorted(unknown)} in LOGICAL_AXIS_RULES"
    token = _RULE_OVERRIDES.set(types.MappingProxyType({**_RULE_OVERRIDES.get(), **mesh_axes}))
    try:
        yield
    finally:
        _RULE_OVERRIDES.reset(token)


def _rules() -> tuple[tuple[str, Any], ...]:
    overrides = _RULE_OVERRIDES.get()
    return tuple((name, overrides.get(name, axes)) for name, axes in LOGICAL_AXIS_RULES)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing ``activation_mesh``, or None outside one."""
    return _ACTIVATION_MESH.get()


def context_size() -> int:
    """Devices along the ``context`` axis of the enclosing ``activation_mesh`` (1 outside one):
    above 1, the sequence axis of the activations is split over them."""
    mesh = _ACTIVATION_MESH.get()
    return 1 if mesh is None else int(dict(mesh.shape).get(CONTEXT_AXIS, 1))


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh_shape: Mapping[str, int]) -> PartitionSpec:
    """Drop mesh axes that do not divide their dimension (replicate there instead), so e.g.
    9 heads on tensor=2 still run, and axes the mesh does not have (a mesh built without
    ``context``)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept, size = [], 1
        for name in names:
            if name in mesh_shape and dim % (size * mesh_shape[name]) == 0:
                kept.append(name)
                size *= mesh_shape[name]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def active_mesh_spec(logical_axes: Sequence[str | None],
                     shape: Sequence[int]) -> tuple[Mesh, PartitionSpec] | None:
    """(mesh, mesh spec) of an activation with these logical names inside ``activation_mesh``
    (axes that do not divide a dimension dropped), or None outside it. For ``shard_map``
    around kernels XLA cannot partition (Pallas calls)."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return None
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), _rules())
    assert spec is not None  # a tuple of names always maps to a spec
    return mesh, fit_spec(spec, shape, mesh.shape)


def context_head_specs(q_shape: Sequence[int], kv_shape: Sequence[int]) -> tuple[PartitionSpec, PartitionSpec]:
    """(query spec, key/value spec) of ``[B, T, heads, H]`` activations split over ``context``
    for a ``shard_map`` body: heads stay on ``tensor`` only when both the query and the KV heads
    divide (GQA groups stay whole on a device). Inside ``activation_mesh``."""
    found_q, found_kv = active_mesh_spec(BATCH_LENGTH_HEADS, q_shape), active_mesh_spec(BATCH_LENGTH_KV_HEADS, kv_shape)
    assert found_q is not None and found_kv is not None, "context_head_specs runs inside an activation_mesh"
    q_spec, kv_spec = found_q[1], found_kv[1]
    if kv_spec[2] is None or q_spec[2] is None:
        q_spec = PartitionSpec(q_spec[0], q_spec[1], None, None)
        kv_spec = PartitionSpec(kv_spec[0], kv_spec[1], None, None)
    return q_spec, kv_spec


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside ``activation_mesh``."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), _rules())
    assert spec is not None  # a tuple of names always maps to a spec
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, fit_spec(spec, x.shape, mesh.shape)))


def logical_to_mesh(logical_specs: Any, rules: Any = LOGICAL_AXIS_RULES) -> Any:
    """Tree of logical ``PartitionSpec``s -> tree of mesh ``PartitionSpec``s."""
    return nn.logical_to_mesh(logical_specs, rules)
