"""Sharding declared once: logical axis names on params and activations, one rules table.

Modules annotate parameters with ``nn.with_logical_partitioning`` and activations with
``constrain`` using the logical names below; only this table knows which mesh axis each name
lands on. Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters
and optimizer state sharded), ``tensor`` (Megatron-style model parallel over heads and MLP).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated). The first rule that fits wins.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
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


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh + rules context."""
    return nn.with_logical_constraint(x, tuple(logical_axes))


def logical_to_mesh(logical_specs: Any, rules=LOGICAL_AXIS_RULES) -> Any:
    """Tree of logical ``PartitionSpec``s -> tree of mesh ``PartitionSpec``s."""
    return nn.logical_to_mesh(logical_specs, rules)


def axis_rules(rules=LOGICAL_AXIS_RULES):
    """Context manager that activates the rules table for ``constrain`` inside a trace."""
    return nn.logical_axis_rules(rules)
