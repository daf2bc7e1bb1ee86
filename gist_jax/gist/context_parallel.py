"""Context parallelism for the KV variants: the sequence in blocks of whole segments, one block
per device of the mesh's ``context`` axis, and only gist K/V crossing devices (UniGist adds its
window's halo: ``context_window.py``).

A segment needs the raw tokens of its own segment and, from earlier segments, only their gists
(plus the sinks). So with the layout split in blocks of whole segments, every per-token layer
(embeddings, projections, MLP, norms) is local, and the one thing a device needs from the
others is the memory buffer: per layer, each device takes the buffer entries its own segments
own (their gist slots; the block holding segment 0 also the sinks) from its local keys and
values and one ``all_gather`` over ``context`` assembles the whole buffer ``[sinks | S *
slots]`` on every device. Its transpose in the backward is a reduce-scatter of the gists'
gradients. Per layer that moves ``2 x (S * slots + blocks x sinks) x kv_heads x head_dim``
values (every block sends its copy of the sinks): about 1 / r of what an all-gather of the
full K/V moves (``tests/test_context_parallel.py`` counts the bytes in the compiled HLO).

Each device then runs the decomposed segment kernel (``structured.segment_attention``) over its
local segments with their global indices: the local part is unchanged, the memory part reads
the gathered buffer. Segment i's memory grows with i, so contiguous blocks would give the last
block most of the memory work. The train step therefore places the segments in
``balanced_order`` (a snake: block c holds segments c, 2C - 1 - c, 2C + c, ...;
``balanced_arrays`` permutes the replicated layout arrays, and the loss takes its labels in
the rows' order, ``specs.raw_row_order``), and past one memory key block each segment runs
only the key blocks its prefix reaches (``structured._seen_blocks``), so every block computes
about its live pairs and all blocks about the same (``memory_pairs`` counts both). Shapes stay
static: the buffer is sized for the last segment (``segment_plan(max_first_segment=)``, one
memory group).

The rest of the step keeps its sequence axis sharded without moving activations: the raw rows
the loss reads are gathered segment by segment (``specs.raw_rows``), the chunked LM loss
scores each block as rows of its own (``model/loss.py``), and the AE decoder runs per segment
on the block that owns the gists (``train/ae.py``). Online TIE's frozen reference passes are
split too: the block-diagonal one stays on the blocks (``train/tie.py``); the causal one needs
every earlier key and gathers each layer's raw K/V (``model/context_causal.py``), forward only.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from gist_jax.gist import structured
from gist_jax.gist.config import CompressionConfig, variant_of
from gist_jax.gist.layout import LayoutShape
from gist_jax.gist.specs import TOKEN_FIELDS, LayoutArrays
from gist_jax.gist.structured import DecomposedKV, rotate_memory, segment_attention, segment_plan
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.layers import apply_rope
from gist_jax.model.sharding import (
    CONTEXT_AXIS,
    active_mesh,
    context_head_specs,
    context_size,
)


def check_context_parallel(comp: CompressionConfig, seq_len: int, context: int) -> None:
    """``mesh.context`` > 1 splits each sequence into blocks of whole segments and moves only gist
    K/V between them (``gist/context_parallel.py``): that needs gists, a parallel (KV) forward,
    a segment count the blocks divide and, for UniGist, a window that reaches no further back
    than the previous block (its halo, ``context_window.py``)."""
    if context == 1:
        return
    variant_of(comp).check_context(comp, seq_len, context)


def splits(shape: LayoutShape, context: int) -> bool:
    """Whether the layout cuts into ``context`` blocks of whole segments (the train step checks
    this up front; an evaluation layout that does not cut runs unsplit, XLA-partitioned)."""
    return shape.whole_segments and shape.num_segments % context == 0


def balanced_order(num_segments: int, context: int) -> np.ndarray:
    """[S]: the global segment that each physical segment holds, block by block. Block c's k-th
    segment is ``k * context + c`` for even k and ``k * context + context - 1 - c`` for odd k (a
    snake), so early and late segments pair up and every block sees about the same memory."""
    s_local = num_segments // context
    k, c = np.meshgrid(np.arange(s_local), np.arange(context))  # [context, s_local]
    return (k * context + np.where(k % 2 == 0, c, context - 1 - c)).reshape(-1).astype(np.int32)


def balanced_arrays(arrays: LayoutArrays, shape: LayoutShape, context: int) -> LayoutArrays:
    """The layout arrays with whole segments in ``balanced_order``: per-token fields permuted,
    ``raw_position`` (layout positions) remapped; buffer fields (indexed by buffer entry) kept.
    A local permutation of replicated arrays, inside the step."""
    ts = shape.segment_tokens
    token_T = (balanced_order(shape.num_segments, context)[:, None] * ts + np.arange(ts)).reshape(-1)
    position_of_T = jnp.asarray(np.argsort(token_T).astype(np.int32))
    out = {k: (v[token_T] if k in TOKEN_FIELDS else v) for k, v in arrays.items()}
    out["raw_position"] = position_of_T[arrays["raw_position"]]
    return out


def memory_pairs(shape: LayoutShape, context: int, order: np.ndarray | None = None,
                 key_block: int | None = None) -> tuple[list[int], list[int]]:
    """(live query-memory pairs per device, pairs each device computes) for one head and one
    sequence of whole segments, with the segments placed by ``order`` (``balanced_order`` by
    default): the load-balance measure. Segment i's ``Ts`` queries see ``sinks + i * slots``
    memory entries (0 for segment 0). A buffer within one key block is computed whole for every
    segment (static shapes); past that, each segment runs the key blocks it reaches."""
    s_local = shape.num_segments // context
    ts, sinks, slots = shape.segment_tokens, shape.num_sinks, shape.slots
    order = balanced_order(shape.num_segments, context) if order is None else order
    bound = sinks + (shape.num_segments - 1) * slots
    kb = key_block or structured.MEMORY_KEY_BLOCK

    def seen(i: int) -> int:
        return 0 if i == 0 else sinks + i * slots

    def computed(i: int) -> int:
        return bound if bound <= kb else min(-(-seen(i) // kb) * kb, -(-bound // kb) * kb)

    blocks = [order[c * s_local:(c + 1) * s_local] for c in range(context)]
    return ([sum(ts * seen(int(i)) for i in b) for b in blocks],
            [sum(ts * computed(int(i)) for i in b) for b in blocks])


@flax.struct.dataclass
class ContextParallelKV:
    """``DecomposedKV`` with the layout's sequence axis split over the mesh's ``context`` axis
    (an ``AttentionSpec.structure``). ``attend`` runs under ``shard_map`` over the whole mesh:
    batch over data/fsdp, blocks of whole segments over context, heads over tensor."""

    inner: DecomposedKV
    segment_order_S: jax.Array  # the global segment each physical segment holds (specs.physical_segments)

    def attend(self, q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
               spec: AttentionSpec, inv_freq: jax.Array) -> jax.Array:
        mesh = active_mesh()
        context = context_size()
        assert mesh is not None and context > 1, "ContextParallelKV runs inside an activation_mesh with context > 1"
        d = self.inner
        if d.num_segments % context:
            raise ValueError(f"{d.num_segments} segments do not split over context={context}")
        q_spec, kv_spec = context_head_specs(q_BxTxNxH.shape, k_BxTxKxH.shape)
        assert q_spec[1] == CONTEXT_AXIS and kv_spec[1] == CONTEXT_AXIS, (q_spec, kv_spec)
        token_spec = PartitionSpec(q_spec[0], CONTEXT_AXIS)
        assert spec.valid is not None, "structured_spec sets valid (the live tokens)"
        local = _local_attention(d, context, spec.stop_gist_memory_gradient)
        return jax.shard_map(
            local, mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, token_spec, token_spec) + (PartitionSpec(),) * 5,
            out_specs=q_spec, check_vma=False,
        )(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, spec.positions, spec.valid, d.memory_token_M,
          d.memory_position_M, d.memory_live_M, self.segment_order_S, inv_freq)


def gather_buffer(k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, memory_token_M: jax.Array,
                  segment_order_S: jax.Array, sinks: int, slots: int) -> jax.Array:
    """Inside ``shard_map``: the whole memory buffer ``[2 (K, V), B, sinks + S * slots, K, H]``
    (un-rotated) on every block, from each block's local keys and values (``[B, T / blocks,
    K, H]``) and one ``all_gather`` over ``context``. ``memory_token_M``: layout index of each
    entry; ``segment_order_S``: the global segment each physical segment holds."""
    block, context = jax.lax.axis_index(CONTEXT_AXIS), jax.lax.axis_size(CONTEXT_AXIS)
    b, t_local, kv_heads, h = k_BxTxKxH.shape
    s = segment_order_S.shape[0]
    s_local = s // context
    slot_J = jnp.arange(slots, dtype=jnp.int32)
    # This block's share: its segments' gist slots, behind the sinks (which live in global
    # segment 0: only its block's copy is read). Indices made local to the block; entries of
    # other blocks (and dead slots, index 0) are clipped and unused.
    global_Sl = jax.lax.dynamic_slice_in_dim(segment_order_S, block * s_local, s_local)
    own_M = memory_token_M[sinks + (global_Sl[:, None] * slots + slot_J).reshape(-1)]
    index_M = jnp.clip(jnp.concatenate([memory_token_M[:sinks], own_M]) - block * t_local, 0, t_local - 1)
    share_2xBxMxKxH = jnp.take(jnp.stack([k_BxTxKxH, v_BxTxKxH]), index_M, axis=2)
    every_Cx2xBxMxKxH = jax.lax.all_gather(share_2xBxMxKxH, CONTEXT_AXIS)
    # Gathered in physical order (block, local segment, slot); the buffer wants global order.
    physical_of_S = jnp.zeros(s, jnp.int32).at[segment_order_S].set(jnp.arange(s, dtype=jnp.int32))
    physical_2xBxGxKxH = every_Cx2xBxMxKxH[:, :, :, sinks:].transpose(1, 2, 0, 3, 4, 5).reshape(
        2, b, s * slots, kv_heads, h)
    gists_2xBxGxKxH = jnp.take(physical_2xBxGxKxH, (physical_of_S[:, None] * slots + slot_J).reshape(-1), axis=2)
    sinks_2xBxKxH = jax.lax.dynamic_index_in_dim(every_Cx2xBxMxKxH, physical_of_S[0] // s_local,
                                                 keepdims=False)[:, :, :sinks]
    return jnp.concatenate([sinks_2xBxKxH, gists_2xBxGxKxH], axis=2)


def _local_attention(d: DecomposedKV, context: int, hold_gists: bool) -> Callable[..., jax.Array]:
    """The per-device body: this block's segments over [own segment | gathered memory]."""
    s, ts, sinks, slots = d.num_segments, d.segment_tokens, d.num_sinks, d.slots
    s_local = s // context
    # One memory group, bounded by the last segment's prefix: past one key block every segment
    # runs only the key blocks it reaches, so the bound sizes the buffer, not the work; each
    # extra group scan kept its own buffer-sized gradients live (8 groups: 3.8x the compiled
    # step memory at 8K tokens on 8 blocks).
    plan = segment_plan(s_local, ts, sinks, slots, max_groups=1, max_first_segment=(context - 1) * s_local)

    def local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, positions_BxT, valid_BxT, memory_token_M,
              memory_position_M, memory_live_M, segment_order_S, inv_freq):
        block = jax.lax.axis_index(CONTEXT_AXIS)
        b, t_local, n, h = q_BxTxNxH.shape
        kv_heads = k_BxTxKxH.shape[2]
        global_Sl = jax.lax.dynamic_slice_in_dim(segment_order_S, block * s_local, s_local)
        buffer_2xBxMxKxH = gather_buffer(k_BxTxKxH, v_BxTxKxH, memory_token_M, segment_order_S, sinks, slots)
        k_mem_BxMxKxH, v_mem_BxMxKxH = rotate_memory(buffer_2xBxMxKxH[0], buffer_2xBxMxKxH[1],
                                                     memory_position_M, sinks, hold_gists, inv_freq)

        def per_segment(x_BxTxKxH):  # -> [S_local, B, K, Ts, H]
            return x_BxTxKxH.reshape(b, s_local, ts, kv_heads, h).transpose(1, 0, 3, 2, 4)

        g = n // kv_heads
        q_SxBxKxGxTsxH = q_BxTxNxH.reshape(b, s_local, ts, kv_heads, g, h).transpose(1, 0, 3, 4, 2, 5)
        k_rot_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, inv_freq)
        out_SxBxKxGxTsxH = segment_attention(
            q_SxBxKxGxTsxH, per_segment(k_rot_BxTxKxH), per_segment(v_BxTxKxH),
            k_mem_BxMxKxH.swapaxes(1, 2), v_mem_BxMxKxH.swapaxes(1, 2),
            valid_BxT.reshape(b, s_local, ts).swapaxes(0, 1), memory_live_M, global_Sl, plan)
        out_BxTxNxH = out_SxBxKxGxTsxH.transpose(1, 0, 4, 2, 3, 5).reshape(b, t_local, n, h)
        return out_BxTxNxH.astype(v_BxTxKxH.dtype)

    return local
