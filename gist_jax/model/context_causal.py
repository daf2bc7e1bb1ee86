"""Plain causal attention with the sequence split over the mesh's ``context`` axis: each block's
queries against an all-gather of every block's keys and values.

Under context parallelism (``gist/context_parallel.py``) the gist passes move only gist K/V, but
a pass with no gists (TIE's full-attention reference) needs every earlier key. This runs it
inside ``shard_map``: per layer one ``all_gather`` of K and V over ``context``, then the
blockwise kernel (``causal.blockwise_causal_attention``) with the block's first index as a
traced ``q_offset``, so a block computes only the key blocks at or below its diagonal. An
all-gather rather than a ring: the reference pass is forward-only (stop-gradient), its K/V are
one layer's at a time, and it keeps the kernel whole; a ring would hold 1 / blocks of them at
the cost of ``blocks`` exchanges per layer. Differentiable too (the kernel's ``custom_vjp``):
the gather's transpose reduce-scatters the keys' and values' gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gist_jax.model import causal
from gist_jax.model.sharding import (
    BATCH_LENGTH_HEADS,
    CONTEXT_AXIS,
    active_mesh,
    active_mesh_spec,
    context_head_specs,
)

# Names this module's collectives in the compiled HLO's op metadata (``bench.collectives``).
GATHER_SCOPE = "causal_kv_gather"


def split_over_context(q_BxTxNxH: jax.Array) -> bool:
    """Whether the activations' length axis lands on ``context`` (> 1 device, dividing T): not
    outside an activation mesh, nor where ``sharding.override_rules`` keeps the length whole."""
    found = active_mesh_spec(BATCH_LENGTH_HEADS, q_BxTxNxH.shape)
    return found is not None and found[1][1] == CONTEXT_AXIS


def context_causal_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                             valid_BxT: jax.Array | None = None, block: int | None = None) -> jax.Array:
    """``causal.causal_attention`` (q and k rotated) of a sequence split in contiguous blocks
    over ``context`` (``split_over_context`` holds). Returns [B, T, N, H] in the value dtype."""
    mesh = active_mesh()
    assert mesh is not None and split_over_context(q_BxTxNxH), "the length axis is not on context"
    q_spec, kv_spec = context_head_specs(q_BxTxNxH.shape, k_BxTxKxH.shape)
    if valid_BxT is None:
        valid_BxT = jnp.ones(q_BxTxNxH.shape[:2], bool)
    size = block or causal.DEFAULT_BLOCK  # read at trace time (tests shrink it)

    def local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, valid_BxT):
        t_local = q_BxTxNxH.shape[1]
        with jax.named_scope(GATHER_SCOPE):
            k_BxSxKxH, v_BxSxKxH, valid_BxS = (jax.lax.all_gather(x, CONTEXT_AXIS, axis=1, tiled=True)
                                               for x in (k_BxTxKxH, v_BxTxKxH, valid_BxT))
        return causal.blockwise_causal_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS, block=size,
                                                 q_offset=jax.lax.axis_index(CONTEXT_AXIS) * t_local)

    token_spec = PartitionSpec(q_spec[0], CONTEXT_AXIS)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, token_spec),
                         out_specs=q_spec, check_vma=False)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, valid_BxT)
