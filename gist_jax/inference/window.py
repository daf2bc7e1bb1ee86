"""UniGist inference (``compression.window`` W > 0): a rolling window cache.

UniGist has no chunks: the stream is gist unit after gist unit (r raw tokens, then the gist
that summarises them), and every token sees, causally, the sinks, every earlier gist and the
raw tokens from its ``window_start`` = (first raw index of its unit) - W
(``gist_jax.gist.specs.windowed_mask``). So the cache (``cache.Cache`` with ``window`` set)
keeps:

* memory: the sinks and every gist fed so far, at ``s + unit`` (the same slots as the
  training layout's memory buffer), written as soon as they are computed;
* a ring of ``W + r`` raw tokens at ``raw % (W + r)``: the next token (raw token n, or the gist
  after raw n - 1) reaches back at most to ``n - r - W``, so the last ``W + r`` non-sink raw
  tokens are all it can see; older ones are overwritten (dropped), in prefill and decoding.

Positions are aligned, one per key, so keys are stored rotated and never re-rotated. A chunk
of any length (prefill: any multiple of r raw tokens, their gists included; decoding: one
layout token) attends to ``[memory ; ring]`` with a per-query mask (its own window) and to
itself with the windowed mask, then writes its sinks and gists to memory and the raw tokens
that stay in the window to the ring. The chunk's segment structure only survives in the
counters (``segment``, ``offset``, as for chunked inference, so the decode loop is shared) and
in the per-slot gist embedding row (slot within its segment).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gist_jax.inference.cache import Cache, Plan
from gist_jax.inference.model_step import rotate_keys, run_decoder
from gist_jax.model.attention import AttentionSpec, LayerMemory
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import Params


def stream_items(plan: Plan, index_BxC: jax.Array) -> dict[str, jax.Array]:
    """Per layout token of the stream (global index, gists included): raw index (-1 for a
    gist), gist unit, position, window start, gist embedding row and memory slot (``M``:
    never kept). Unit u is layout tokens ``u (r + 1) .. u (r + 1) + r``, its gist last."""
    r, s = plan.ratio, plan.num_sinks
    unit, within = jnp.divmod(index_BxC, r + 1)
    is_gist = within == r
    raw = jnp.where(is_gist, -1, unit * r + within)
    position = jnp.where(is_gist, (unit + 1) * r, raw)
    window_start = jnp.maximum(unit * r - plan.window, 0)
    row = unit % plan.gists if plan.per_slot_embedding else jnp.zeros_like(unit)
    is_sink = ~is_gist & (raw < s)
    memory_slot = jnp.where(is_gist, s + unit, jnp.where(is_sink, raw, plan.memory_size))
    return {"raw": raw, "is_gist": is_gist, "is_sink": is_sink, "position": position.astype(jnp.int32),
            "window_start": window_start, "row": row.astype(jnp.int32), "memory_slot": memory_slot}


def stream_index(plan: Plan, cache: Cache) -> jax.Array:
    """[B] layout tokens fed so far (the counters keep the chunked meaning: segment, offset)."""
    return cache.segment * plan.segment_tokens + cache.offset


def feed(cfg: ModelConfig, plan: Plan, params: Params, cache: Cache, tokens_BxC: jax.Array,
         valid_BxC: jax.Array) -> tuple[jax.Array, Cache]:
    """Feed each row its next C layout tokens (valid ones first; a gist's id is ignored); any C,
    across segment boundaries. Returns logits ``[B, C, V]`` and the updated cache."""
    b, c = tokens_BxC.shape
    start_B = stream_index(plan, cache)
    it = stream_items(plan, start_B[:, None] + jnp.arange(c)[None, :])
    raw_BxC, start_BxC = it["raw"], it["window_start"]
    always_BxC = it["is_gist"] | it["is_sink"]
    # Own chunk: causal, and a key is a sink, a gist or a raw token inside the query's window.
    causal_CxC = jnp.tril(jnp.ones((c, c), bool))
    own_BxCxC = causal_CxC[None] & (always_BxC[:, None, :] | (raw_BxC[:, None, :] >= start_BxC[:, :, None]))
    # Cache: every filled memory slot; ring entries inside the query's window (empty: -1).
    ring_BxCxW = cache.seg_pos[:, None, :] >= start_BxC[:, :, None]
    mem_BxCxM = jnp.broadcast_to(cache.mem_valid[:, None, :], (b, c, cache.mem_valid.shape[1]))
    memory = LayerMemory(jnp.concatenate([cache.mem_k, cache.seg_k], axis=2),
                         jnp.concatenate([cache.mem_v, cache.seg_v], axis=2))
    spec = AttentionSpec(positions=it["position"], mask=own_BxCxC, valid=valid_BxC,
                         prefix_valid=jnp.concatenate([cache.mem_valid, cache.seg_pos >= 0], axis=1),
                         prefix_mask=jnp.concatenate([mem_BxCxM, ring_BxCxW], axis=2),
                         is_gist=it["is_gist"], gist_slot=it["row"])
    logits, _, (k, v) = run_decoder(cfg, params, tokens_BxC, spec, memory)
    k_rot = rotate_keys(cfg, k, it["position"])
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, c))
    is_raw = valid_BxC & (raw_BxC >= 0)
    raw_count = cache.raw_count + is_raw.sum(axis=1).astype(jnp.int32)
    mem_slot = jnp.where(valid_BxC, it["memory_slot"], plan.memory_size)  # out of range: dropped
    # The ring keeps the last W + r non-sink raw tokens; their slots are distinct, so no write
    # of this chunk collides with another that stays.
    ring = plan.live_tokens
    stays = is_raw & ~it["is_sink"] & (raw_BxC >= raw_count[:, None] - ring)
    ring_slot = jnp.where(stays, raw_BxC % ring, ring)
    cache = cache.replace(
        mem_k=cache.mem_k.at[:, rows, mem_slot].set(k_rot.astype(cache.mem_k.dtype), mode="drop"),
        mem_v=cache.mem_v.at[:, rows, mem_slot].set(v.astype(cache.mem_v.dtype), mode="drop"),
        mem_valid=cache.mem_valid.at[rows, mem_slot].set(True, mode="drop"),
        seg_k=cache.seg_k.at[:, rows, ring_slot].set(k_rot.astype(cache.seg_k.dtype), mode="drop"),
        seg_v=cache.seg_v.at[:, rows, ring_slot].set(v.astype(cache.seg_v.dtype), mode="drop"),
        seg_pos=cache.seg_pos.at[rows, ring_slot].set(raw_BxC, mode="drop"))
    segment, offset = jnp.divmod(start_B + valid_BxC.sum(axis=1).astype(jnp.int32), plan.segment_tokens)
    return logits, cache.replace(segment=segment.astype(jnp.int32), offset=offset.astype(jnp.int32),
                                 raw_count=raw_count)


def chunk_raw_offsets(plan: Plan, chunk: int) -> list[int]:
    """Layout order of ``chunk`` raw tokens (a multiple of r): raw offsets, -1 for each gist."""
    r = plan.ratio
    order: list[int] = []
    for u in range(chunk // r):
        order += list(range(u * r, (u + 1) * r)) + [-1]
    return order
