"""Decomposed attention for the KV variants: no T x T score matrix, same result as the masks.

The dense reference (``specs.parallel_spec`` + ``causal.dot_product_attention``) builds a
``[T, 2T]`` score matrix per head: every layout token against every token rotated at its own
position and again at its memory position. Almost all of it is masked. The mask has only two
non-empty parts, and this module computes each one at its own size:

  (a) local: a query sees the live tokens of its own segment up to itself, keys rotated at
      ``position``: causal attention over ``Ts = L + slots`` tokens per segment, one
      ``lax.scan`` over segments (``B * S * Ts^2 / 2`` scores up to block granularity: linear
      in the sequence length for a fixed segment length).
  (b) memory: a query of segment i sees the sinks and the live gists of segments < i, keys
      rotated at ``memory_position``. The memory buffer (``memory_buffer_arrays``: sinks, then
      segment-major gist slots; M ~ n / r entries) is gathered once per layer; segment i's
      memory is its prefix ``[0, s + i * slots)``. Segments share a static bound in at most
      ``MAX_MEMORY_GROUPS`` groups (one ``lax.scan`` each), so the memory part computes about
      (groups + 1) / groups of the exact staircase, not the whole buffer for every segment.
      A prefix longer than ``MEMORY_KEY_BLOCK`` runs a key block at a time (online softmax
      forward, blockwise backward), so a scan step holds ``Ts x MEMORY_KEY_BLOCK`` scores
      however long the context.

Both parts run in ``segment_attention``, a ``custom_vjp``: the forward computes each part's
normalised output and log-sum-exp and merges them exactly, ``o = (e^l1 o1 + e^l2 o2) /
(e^l1 + e^l2)``; the backward is each part's flash backward called with the *merged* output and
lse (the ring-attention identity: no lse cotangent needed), scores recomputed block by block, so
neither pass holds more than one block's scores (memory linear in the sequence length). The
local part splits each segment into ``QUERY_BLOCK`` row blocks that see only the own keys up to
their last row (block-causal skipping). Why a hand-written backward: autodiff of the softmax
spent most of the step on score-sized reductions and transposes on XLA CPU (profiled in
``docs/performance.md``). Both position schemes are exact: the local part rotates every key at
its in-segment position, the memory part at its memory position, as the dense mask pairs do.

Selected by ``model.attention = "decomposed"`` (``forward.kv_parallel``);
the dense path stays the reference (``tests/test_structured_attention.py``). Queries whose
every key is masked (never a live token) get 0 here and a uniform average in the dense path;
nothing live reads them. cuDNN's fused attention cannot serve part (a) here: its backward
ignores the log-sum-exp cotangent the merge needs. ``flash.py`` lays each segment out so that
one causal call needs no merge; that is the GPU path (``model.attention="flash"``/``"auto"``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import GistLayout, LayoutShape
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.kernels import NEG
from gist_jax.model.layers import apply_rope

# -- the segment kernel: local and memory parts at their own sizes, one softmax, flash backward --

# Query rows per block inside a segment. Block j sees own keys [0, end_j) only (the causal
# triangle at block granularity: Ts = 576 in 2 blocks computes 3/4 of the square, not all).
QUERY_BLOCK = 288
# Segments that share one static memory bound (that of their last segment): at most this many
# groups, so the memory part computes at most (groups + 1) / groups of the exact staircase
# (the whole buffer for every segment computed 2x) with a bounded number of traced scans.
MAX_MEMORY_GROUPS = 8
# Memory keys per block: a scan step holds Ts x this many memory scores, not Ts x the whole
# prefix (which grows with the context); a prefix within one block runs as one plain softmax.
MEMORY_KEY_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """Static geometry of ``segment_attention`` (hashable: a ``custom_vjp`` nondiff argument).
    ``query_blocks``: (first row, end row) per block of a segment; ``groups``: (first segment,
    end segment, memory bound) per memory scan; segment i's memory is the buffer prefix
    ``[0, num_sinks + i * slots)`` (sinks, then earlier segments' slots), masked by liveness."""

    num_sinks: int
    slots: int
    query_blocks: tuple[tuple[int, int], ...]
    groups: tuple[tuple[int, int, int], ...]
    key_block: int = 1 << 30  # memory keys per block (``MEMORY_KEY_BLOCK``)


def segment_plan(num_segments: int, segment_tokens: int, num_sinks: int, slots: int,
                 query_block: int | None = None, max_groups: int | None = None,
                 max_first_segment: int = 0) -> SegmentPlan:
    """Segments 1..S-1 in at most ``max_groups`` contiguous groups of equal size, each bounded
    by its last segment's memory prefix. Defaults read at trace time (``QUERY_BLOCK``,
    ``MAX_MEMORY_GROUPS``), so tests can shrink them.

    ``max_first_segment`` > 0: the ``num_segments`` are one block of a longer sequence (context
    parallelism, ``context_parallel.py``), their global indices traced and at most
    ``max_first_segment + num_segments - 1``. Every local segment may then have a memory, and
    each group's bound is the largest any block may need: shapes are static. Past one key
    block, each segment runs only the key blocks its own prefix reaches (a dynamic trip count),
    so the bound sizes the buffer, not the work."""
    bq = min(query_block or QUERY_BLOCK, segment_tokens)
    blocks = tuple((r, min(r + bq, segment_tokens)) for r in range(0, segment_tokens, bq))
    groups = []
    start = 0 if max_first_segment else 1
    if num_segments > start:
        size = -(-(num_segments - start) // (max_groups or MAX_MEMORY_GROUPS))
        for first in range(start, num_segments, size):
            end = min(first + size, num_segments)
            groups.append((first, end, num_sinks + (max_first_segment + end - 1) * slots))
    return SegmentPlan(num_sinks, slots, blocks, tuple(groups), MEMORY_KEY_BLOCK)


def _bias(mask: jax.Array) -> jax.Array:
    """0 where visible, ``NEG`` where not, by arithmetic on scalars: a ``where`` would broadcast
    a ``NEG`` array that scan partial evaluation hoists and materialises at score size."""
    return (mask.astype(jnp.float32) - 1.0) * -NEG


def _local_bias(r0: int, r1: int, valid_BxTs: jax.Array) -> jax.Array:
    """[B, 1, 1, r1 - r0, r1]: rows r0..r1 of a segment against its own keys 0..r1."""
    causal_QxR = jnp.arange(r1)[None, :] <= (r0 + jnp.arange(r1 - r0))[:, None]
    return _bias(causal_QxR[None] & valid_BxTs[:, None, :r1])[:, None, None]


def _memory_bias(i: jax.Array, bound: int, live_M: jax.Array, plan: SegmentPlan,
                 start: jax.Array | int = 0) -> jax.Array:
    """[bound]: of the buffer entries ``start .. start + bound``, those segment i (global
    index) sees: live, owned by a segment < i; segment 0 sees none (its sinks are its own raw
    tokens, in the local part). ``live_M`` must cover ``start + bound`` entries."""
    seen = jnp.where(i > 0, plan.num_sinks + i * plan.slots, 0)
    live = jax.lax.dynamic_slice_in_dim(live_M, start, bound)
    return _bias(live & (start + jnp.arange(bound) < seen))


def _key_blocks(bound: int, plan: SegmentPlan) -> int:
    return -(-bound // plan.key_block)


def _padded_memory(km: jax.Array, vm: jax.Array, live: jax.Array, bound: int,
                   plan: SegmentPlan) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The buffer prefix ``[0, bound)`` padded with dead entries to whole key blocks."""
    size = _key_blocks(bound, plan) * plan.key_block
    pad = ((0, 0), (0, 0), (0, size - bound), (0, 0))
    return (jnp.pad(km[:, :, :bound], pad), jnp.pad(vm[:, :, :bound], pad),
            jnp.pad(live[:bound], (0, size - bound)))


def _memory_partial(q, km, vm, live, i, bound, plan):
    """Segment i's queries over its memory prefix ``[0, bound)``: ``_partial``'s (out, lse),
    in key blocks of ``plan.key_block`` with an online softmax when the prefix is longer (only
    the blocks segment i reaches: ``_seen_blocks``)."""
    if bound <= plan.key_block:
        return _partial(q, km[:, :, :bound], vm[:, :, :bound], _memory_bias(i, bound, live, plan))
    kb = plan.key_block

    def body(j, carry):
        m, l, o = carry
        start = j * kb
        k_j = jax.lax.dynamic_slice_in_dim(km, start, kb, axis=2)
        v_j = jax.lax.dynamic_slice_in_dim(vm, start, kb, axis=2)
        s = jnp.einsum("BKGQH,BKCH->BKGQC", q, k_j, preferred_element_type=jnp.float32)
        s = s * q.shape[-1] ** -0.5 + _memory_bias(i, kb, live, plan, start)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)  # 0 once a block holds a seen key: masked blocks before it drop
        e = jnp.exp(s - m_new[..., None])
        o = alpha[..., None] * o + jnp.einsum("BKGQC,BKCH->BKGQH", e.astype(v_j.dtype), v_j,
                                              preferred_element_type=jnp.float32)
        return m_new, alpha * l + jnp.sum(e, axis=-1), o

    rows = q.shape[:-1]
    init = (jnp.full(rows, NEG, jnp.float32), jnp.zeros(rows, jnp.float32), jnp.zeros(q.shape, jnp.float32))
    m, l, o = jax.lax.fori_loop(0, _seen_blocks(i, bound, plan), body, init)
    seen = (m > 0.5 * NEG).astype(jnp.float32)
    l = jnp.where(seen > 0, l, 1.0)  # a segment that reaches no block (segment 0) ran none: l = 0
    return o * (seen / l)[..., None], m + jnp.log(l) * seen


def _seen_blocks(i: jax.Array, bound: int, plan: SegmentPlan) -> jax.Array:
    """Key blocks holding any entry segment i sees (traced): the blocks past them are masked
    whole and add exactly nothing (forward: weight 0 after a seen key; backward: zero
    gradients), so a segment early in the sequence skips them."""
    seen = jnp.where(i > 0, plan.num_sinks + i * plan.slots, 0)
    return jnp.minimum(-(-seen // plan.key_block), _key_blocks(bound, plan))


def memory_part_pairs(plan: SegmentPlan, ts: int, first: int, end: int, bound: int) -> int:
    """Host-side count of the memory part's score entries for segments ``first .. end - 1`` of one
    group (``_seen_blocks``' trip counts): the whole bound each within one key block; past it,
    the key blocks each segment's prefix reaches."""
    kb = plan.key_block
    if bound <= kb:
        return (end - first) * ts * bound
    seen = [plan.num_sinks + i * plan.slots if i else 0 for i in range(first, end)]
    return sum(ts * kb * min(-(-n // kb), -(-bound // kb)) for n in seen)


def _memory_partial_backward(q, km, vm, live, i, bound, plan, lse, do, delta):
    """``_partial_backward`` over the memory prefix, a key block at a time: (dq, dk, dv) with
    dk / dv ``[B, K, bound, H]``."""
    if bound <= plan.key_block:
        return _partial_backward(q, km[:, :, :bound], vm[:, :, :bound], _memory_bias(i, bound, live, plan),
                                 lse, do, delta)
    kb = plan.key_block

    def body(j, carry):
        dq, dk, dv = carry
        start = j * kb
        k_j = jax.lax.dynamic_slice_in_dim(km, start, kb, axis=2)
        v_j = jax.lax.dynamic_slice_in_dim(vm, start, kb, axis=2)
        dq_j, dk_j, dv_j = _partial_backward(q, k_j, v_j, _memory_bias(i, kb, live, plan, start), lse, do, delta)
        return (dq + dq_j, jax.lax.dynamic_update_slice_in_dim(dk, dk_j, start, axis=2),
                jax.lax.dynamic_update_slice_in_dim(dv, dv_j, start, axis=2))

    zeros = jnp.zeros(km.shape[:2] + (_key_blocks(bound, plan) * kb, km.shape[-1]), jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(0, _seen_blocks(i, bound, plan), body,
                                   (jnp.zeros(q.shape, jnp.float32), zeros, zeros))
    return dq, dk[:, :, :bound], dv[:, :, :bound]


def _partial(q_BxKxGxQxH: jax.Array, k_BxKxCxH: jax.Array, v_BxKxCxH: jax.Array,
             bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax over one key set: (out float32 [B, K, G, Q, H], lse [B, K, G, Q]); rows that
    see nothing give 0 and an lse below ``NEG / 2``. Normalised after P @ V (one score-sized
    pass less than normalising P)."""
    s = jnp.einsum("BKGQH,BKCH->BKGQC", q_BxKxGxQxH, k_BxKxCxH, preferred_element_type=jnp.float32)
    s = s * q_BxKxGxQxH.shape[-1] ** -0.5 + bias  # |s| << 1e22: masked entries are exactly NEG
    m = jnp.max(s, axis=-1)
    e = jnp.exp(s - m[..., None])  # masked: exp(NEG - m) == 0 wherever a key is seen
    l = jnp.sum(e, axis=-1)
    o = jnp.einsum("BKGQC,BKCH->BKGQH", e.astype(v_BxKxCxH.dtype), v_BxKxCxH,
                   preferred_element_type=jnp.float32)
    seen = (m > 0.5 * NEG).astype(jnp.float32)
    return o * (seen / l)[..., None], m + jnp.log(l) * seen


def _partial_backward(q_BxKxGxQxH: jax.Array, k_BxKxCxH: jax.Array, v_BxKxCxH: jax.Array, bias: jax.Array,
                      lse_BxKxGxQ: jax.Array, do_BxKxGxQxH: jax.Array,
                      delta_BxKxGxQ: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flash backward of one key set from the *merged* statistics (P = exp(s - lse), delta =
    rowsum(dO * O)): (dq [B, K, G, Q, H], dk [B, K, C, H], dv), float32. The dK / dV
    contractions keep the score-sized operand on the right in its own layout
    (``BKGQH,BKGQC->BKHC``), so XLA never transposes a score-sized array."""
    scale = q_BxKxGxQxH.shape[-1] ** -0.5
    do = do_BxKxGxQxH.astype(v_BxKxCxH.dtype)
    s = jnp.einsum("BKGQH,BKCH->BKGQC", q_BxKxGxQxH, k_BxKxCxH, preferred_element_type=jnp.float32)
    # Rows that see nothing: lse -> -NEG, so every entry is exp(-huge) == 0.
    lse = jnp.where(lse_BxKxGxQ > 0.5 * NEG, lse_BxKxGxQ, -NEG)
    p = jnp.exp(s * scale + bias - lse[..., None])
    dp = jnp.einsum("BKGQH,BKCH->BKGQC", do, v_BxKxCxH, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta_BxKxGxQ[..., None])).astype(q_BxKxGxQxH.dtype)
    dv_BxKxHxC = jnp.einsum("BKGQH,BKGQC->BKHC", do, p.astype(v_BxKxCxH.dtype),
                            preferred_element_type=jnp.float32)
    dk_BxKxHxC = jnp.einsum("BKGQH,BKGQC->BKHC", q_BxKxGxQxH, ds, preferred_element_type=jnp.float32)
    dq = jnp.einsum("BKGQC,BKCH->BKGQH", ds, k_BxKxCxH, preferred_element_type=jnp.float32)
    return dq * scale, dk_BxKxHxC.swapaxes(2, 3) * scale, dv_BxKxHxC.swapaxes(2, 3)


def _local_forward(q, k, v, valid, plan):
    """Every segment against its own keys, block-causal: scan over segments, blocks unrolled."""
    def body(carry, x):
        q_i, k_i, v_i, valid_i = x
        parts = [_partial(q_i[:, :, :, r0:r1], k_i[:, :, :r1], v_i[:, :, :r1],
                          _local_bias(r0, r1, valid_i)) for r0, r1 in plan.query_blocks]
        return carry, tuple(jnp.concatenate(xs, axis=3) for xs in zip(*parts))

    return jax.lax.scan(body, None, (q, k, v, valid))[1]


def _memory_forward(q, km, vm, live, segment_index, plan):
    """Segments of the groups against their memory prefix: one scan per group, at the group's
    bound; local segment j is global segment ``segment_index[j]``."""
    outs, lses = [], []
    for first, end, bound in plan.groups:
        km_g, vm_g, live_g = (_padded_memory(km, vm, live, bound, plan) if bound > plan.key_block
                              else (km, vm, live))

        def body(carry, x, bound=bound, km_g=km_g, vm_g=vm_g, live_g=live_g):
            q_i, i = x
            return carry, _memory_partial(q_i, km_g, vm_g, live_g, i, bound, plan)

        _, (o, l) = jax.lax.scan(body, None, (q[first:end], segment_index[first:end]))
        outs.append(o)
        lses.append(l)
    return jnp.concatenate(outs, axis=0), jnp.concatenate(lses, axis=0)


def _forward(q, k, v, km, vm, valid, live, segment_index, plan):
    """(out float32 [S, B, K, G, Ts, H], lse [S, B, K, G, Ts]) of the one merged softmax."""
    # The masks depend only on layout arrays. Under the layer scan's partial evaluation such
    # values count as known and are hoisted out as residuals, materialised at score size;
    # tying them to q here keeps them inside the loops, where XLA fuses them into the scores.
    q, valid, live = jax.lax.optimization_barrier((q, valid, live))
    out, lse = _local_forward(q, k, v, valid, plan)
    if not plan.groups:
        return out, lse
    g0 = plan.groups[0][0]  # segments before it have no memory part
    o_mem, l_mem = _memory_forward(q, km, vm, live, segment_index, plan)
    o_loc, l_loc = out[g0:], lse[g0:]
    top = jnp.maximum(l_loc, l_mem)
    w_loc, w_mem = jnp.exp(l_loc - top), jnp.exp(l_mem - top)
    total = w_loc + w_mem
    o = (w_loc[..., None] * o_loc + w_mem[..., None] * o_mem) / total[..., None]
    return (jnp.concatenate([out[:g0], o], axis=0),
            jnp.concatenate([lse[:g0], top + jnp.log(total)], axis=0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def segment_attention(q_SxBxKxGxTsxH: jax.Array, k_SxBxKxTsxH: jax.Array, v_SxBxKxTsxH: jax.Array,
                      km_BxKxMxH: jax.Array, vm_BxKxMxH: jax.Array, valid_SxBxTs: jax.Array,
                      live_M: jax.Array, segment_index_S: jax.Array, plan: SegmentPlan) -> jax.Array:
    """Each query of segment i over one softmax of [its segment's live keys up to itself (keys
    ``k``, rotated at in-segment positions) | live memory entries of segments < i (``km``,
    rotated at memory positions)]. Returns float32 [S, B, K, G, Ts, H]; rows that see nothing
    give 0. Forward: the two parts at their own sizes, merged by log-sum-exp. Backward: each
    part's flash backward with the merged output and lse (no lse cotangent: the ring-attention
    identity), scores recomputed per block; residuals are inputs, output and lse (O(T)).
    ``segment_index_S`` (int32 [S]): the global index of each local segment (``arange(S)`` on
    one device; a context block's segments under context parallelism)."""
    return _forward(q_SxBxKxGxTsxH, k_SxBxKxTsxH, v_SxBxKxTsxH, km_BxKxMxH, vm_BxKxMxH,
                    valid_SxBxTs, live_M, segment_index_S, plan)[0]


def _segment_attention_fwd(q, k, v, km, vm, valid, live, segment_index, plan):
    out, lse = _forward(q, k, v, km, vm, valid, live, segment_index, plan)
    return out, (q, k, v, km, vm, valid, live, segment_index, out, lse)


def _segment_attention_bwd(plan, residuals, dout):
    q, k, v, km, vm, valid, live, segment_index, out, lse = residuals
    dout = dout.astype(jnp.float32)
    delta = jnp.sum(dout * out, axis=-1)  # rowsum(dO * O) of the merged softmax
    ts = q.shape[4]

    def local_body(carry, x):
        q_i, k_i, v_i, valid_i, lse_i, do_i, delta_i = x
        dq_i = jnp.zeros(q_i.shape, jnp.float32)
        dk_i = dv_i = jnp.zeros(k_i.shape, jnp.float32)
        for r0, r1 in plan.query_blocks:
            rows = slice(r0, r1)
            dq_b, dk_b, dv_b = _partial_backward(
                q_i[:, :, :, rows], k_i[:, :, :r1], v_i[:, :, :r1], _local_bias(r0, r1, valid_i),
                lse_i[:, :, :, rows], do_i[:, :, :, rows], delta_i[:, :, :, rows])
            pad = ((0, 0), (0, 0), (0, ts - r1), (0, 0))
            dq_i = dq_i.at[:, :, :, rows].set(dq_b)
            dk_i, dv_i = dk_i + jnp.pad(dk_b, pad), dv_i + jnp.pad(dv_b, pad)
        return carry, (dq_i, dk_i, dv_i)

    _, (dq, dk, dv) = jax.lax.scan(local_body, None, (q, k, v, valid, lse, dout, delta))
    dkm = dvm = jnp.zeros(km.shape, jnp.float32)
    dq_mem = []
    for first, end, bound in plan.groups:
        km_g, vm_g, live_g = (_padded_memory(km, vm, live, bound, plan) if bound > plan.key_block
                              else (km, vm, live))

        def memory_body(carry, x, bound=bound, km_g=km_g, vm_g=vm_g, live_g=live_g):
            dk_acc, dv_acc = carry
            q_i, lse_i, do_i, delta_i, i = x
            dq_i, dk_m, dv_m = _memory_partial_backward(q_i, km_g, vm_g, live_g, i, bound, plan, lse_i,
                                                        do_i, delta_i)
            return (dk_acc + dk_m, dv_acc + dv_m), dq_i

        zeros = jnp.zeros(km.shape[:2] + (bound, km.shape[-1]), jnp.float32)
        xs = tuple(x[first:end] for x in (q, lse, dout, delta, segment_index))
        (dk_g, dv_g), dq_g = jax.lax.scan(memory_body, (zeros, zeros), xs)
        pad = ((0, 0), (0, 0), (0, km.shape[2] - bound), (0, 0))
        dkm, dvm = dkm + jnp.pad(dk_g, pad), dvm + jnp.pad(dv_g, pad)
        dq_mem.append(dq_g)
    if dq_mem:
        g0 = plan.groups[0][0]
        dq = dq + jnp.concatenate([jnp.zeros_like(dq[:g0])] + dq_mem, axis=0)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dkm.astype(km.dtype),
            dvm.astype(vm.dtype), None, None, None)


segment_attention.defvjp(_segment_attention_fwd, _segment_attention_bwd)


def rotate_memory(k_mem_BxMxKxH: jax.Array, v_mem_BxMxKxH: jax.Array, memory_position_M: jax.Array,
                  num_sinks: int, hold_gists: bool, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The memory buffer's un-rotated keys rotated at their memory positions; with
    ``hold_gists`` (``stop_gist_memory_gradient``) every entry after the sinks, a gist, is held
    fixed (no gradient through the memory view)."""
    b, m = k_mem_BxMxKxH.shape[:2]
    k_mem_BxMxKxH = apply_rope(k_mem_BxMxKxH, jnp.broadcast_to(memory_position_M, (b, m)), inv_freq)
    if hold_gists:
        hold_M = (jnp.arange(m) >= num_sinks)[None, :, None, None]
        k_mem_BxMxKxH = jnp.where(hold_M, jax.lax.stop_gradient(k_mem_BxMxKxH), k_mem_BxMxKxH)
        v_mem_BxMxKxH = jnp.where(hold_M, jax.lax.stop_gradient(v_mem_BxMxKxH), v_mem_BxMxKxH)
    return k_mem_BxMxKxH, v_mem_BxMxKxH


@flax.struct.dataclass
class DecomposedKV:
    """What the decomposed path needs beyond ``AttentionSpec``'s per-token arrays: the memory
    buffer (sinks, then ``slots`` gist slots per segment) as indices into the layout, and the
    static segment geometry. Sits in ``AttentionSpec.structure``; ``Attention`` calls
    ``attend`` instead of building dense masks."""

    memory_token_M: jax.Array  # layout index of buffer entry m (0 for an empty entry)
    memory_position_M: jax.Array  # RoPE position of buffer entry m as memory
    memory_live_M: jax.Array  # entry m is filled (live sink or live gist)
    num_segments: int = flax.struct.field(pytree_node=False)
    segment_tokens: int = flax.struct.field(pytree_node=False)
    num_sinks: int = flax.struct.field(pytree_node=False)
    slots: int = flax.struct.field(pytree_node=False)

    @classmethod
    def from_arrays(cls, arrays: dict[str, jax.Array], shape: LayoutShape) -> DecomposedKV:
        memory_slot_T = arrays["memory_slot"]
        size = shape.memory_size
        token_T = jnp.arange(memory_slot_T.shape[0], dtype=jnp.int32)
        # Invert memory_slot (token -> buffer entry); tokens kept nowhere scatter out of range.
        memory_token_M = jnp.zeros(size, jnp.int32).at[
            jnp.where(memory_slot_T >= 0, memory_slot_T, size)].set(token_T, mode="drop")
        return cls(memory_token_M, arrays["buffer_position"], arrays["buffer_live"],
                   shape.num_segments, shape.segment_tokens, shape.num_sinks, shape.slots)

    @classmethod
    def for_layout(cls, arrays: dict[str, jax.Array], shape: LayoutShape, comp: CompressionConfig) -> Any:
        """The structure ``forward.kv_parallel`` puts in the spec (every gist kernel has this)."""
        del comp
        return cls.from_arrays(arrays, shape)

    @classmethod
    def computed_pairs(cls, layout: GistLayout, comp: CompressionConfig, backend: str, dtype: str,
                       head_dim: int) -> tuple[str, int]:
        """(what ran, score entries computed per sequence, layer and head) on ``backend``: each
        segment's query blocks against its keys up to the block's last row, plus every memory
        group's segments against the group's buffer bound (past one memory key block, the key
        blocks each segment's own prefix reaches). ``flops.attention_pairs`` asks every gist
        kernel this."""
        del comp, backend, dtype, head_dim
        shape = layout.shape
        s, ts = shape.num_segments, shape.segment_tokens
        plan = segment_plan(s, ts, shape.num_sinks, shape.slots)
        local = s * sum((r1 - r0) * r1 for r0, r1 in plan.query_blocks)
        return "decomposed", local + sum(memory_part_pairs(plan, ts, *group) for group in plan.groups)

    def key_segment(self) -> jax.Array:
        """[M] segment that owns buffer entry m (sinks: 0); segment i sees entries owned by
        segments < i."""
        return jnp.concatenate([jnp.zeros(self.num_sinks, jnp.int32),
                                jnp.repeat(jnp.arange(self.num_segments, dtype=jnp.int32), self.slots)])

    def memory_kv(self, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, spec: AttentionSpec,
                  inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The memory buffer's keys and values [B, M, K, H], keys rotated at their memory
        positions, gist entries held fixed under ``stop_gist_memory_gradient``."""
        k_mem_BxMxKxH = jnp.take(k_BxTxKxH, self.memory_token_M, axis=1)
        v_mem_BxMxKxH = jnp.take(v_BxTxKxH, self.memory_token_M, axis=1)
        return rotate_memory(k_mem_BxMxKxH, v_mem_BxMxKxH, self.memory_position_M, self.num_sinks,
                             spec.stop_gist_memory_gradient, inv_freq)

    def attend(self, q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
               spec: AttentionSpec, inv_freq: jax.Array) -> jax.Array:
        """Queries already rotated at ``spec.positions``; keys un-rotated (rotated here once per
        part, at the position that part uses). Returns [B, T, N, H] in the value dtype."""
        b, t, n, h = q_BxTxNxH.shape
        s, ts = self.num_segments, self.segment_tokens
        kv_heads = k_BxTxKxH.shape[2]
        g = n // kv_heads
        k_rot_BxTxKxH = apply_rope(k_BxTxKxH, spec.positions, inv_freq)
        # Memory keys gathered once per layer, rotated at their memory positions (outside the
        # kernel: autodiff transposes the gather, the rotation and the held-memory switch).
        k_mem_BxMxKxH, v_mem_BxMxKxH = self.memory_kv(k_BxTxKxH, v_BxTxKxH, spec, inv_freq)

        def per_segment(x_BxTxKxH):  # -> [S, B, K, Ts, H]
            return x_BxTxKxH.reshape(b, s, ts, kv_heads, h).transpose(1, 0, 3, 2, 4)

        q_SxBxKxGxTsxH = q_BxTxNxH.reshape(b, s, ts, kv_heads, g, h).transpose(1, 0, 3, 4, 2, 5)
        assert spec.valid is not None, "structured_spec sets valid (the live tokens)"
        valid_SxBxTs = spec.valid.reshape(b, s, ts).swapaxes(0, 1)
        plan = segment_plan(s, ts, self.num_sinks, self.slots)
        out_SxBxKxGxTsxH = segment_attention(
            q_SxBxKxGxTsxH, per_segment(k_rot_BxTxKxH), per_segment(v_BxTxKxH),
            k_mem_BxMxKxH.swapaxes(1, 2), v_mem_BxMxKxH.swapaxes(1, 2), valid_SxBxTs,
            self.memory_live_M, jnp.arange(s, dtype=jnp.int32), plan)
        out_BxTxNxH = out_SxBxKxGxTsxH.transpose(1, 0, 4, 2, 3, 5).reshape(b, t, n, h)
        return out_BxTxNxH.astype(v_BxTxKxH.dtype)
