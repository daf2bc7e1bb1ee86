"""UniGist's attention without a T x T matrix: a sliding band per query block plus the gist memory.

UniGist (``compression.window`` W > 0, ``specs.windowed_mask``) lets every token see the sinks,
every earlier gist, and the raw tokens from its ``window_start`` (its gist unit's first raw
token minus W). Window starts never decrease along the layout, so the whole layout (segments
play no role) is cut into blocks of ``bq`` query rows, and block j's keys split at its *band
start* ``a_j``, the layout index of the raw token at its first row's window start: every raw
key any of its rows sees lies at or after ``a_j``. The mask then splits into two disjoint
parts, each computed at its own size and merged by log-sum-exp (``partials.merge_partials``'s
identity):

  (a) band: the layout keys ``[a_j, end_j)`` (up to the block's last row), read as a slice of
      one static length ``C = max_j(end_j - a_j)`` (about ``bq + W (1 + 1 / r)``) ending at the
      block's end from keys padded in front by C; the windowed mask is evaluated on per-token
      arrays: at or after ``a_j``, causal, live, and (sink or gist or inside the window);
  (b) memory: the sinks and gists before ``a_j``, read from the memory buffer (sinks, then
      segment-major gist slots; ``DecomposedKV.memory_token_M`` holds each entry's layout
      index): the entries whose layout index is below ``a_j``. Blocks share a static buffer
      bound in at most ``MAX_MEMORY_GROUPS`` groups (bound: the last entry the group's last
      block needs), as in ``structured.py``.

The geometry (``a_j``, C, the group bounds) is static, computed on the host from the layout's
shape (``window_plan``: every slot of a UniGist layout is live, so ``r = L / slots``). Every key
has one position (aligned positions), so keys are rotated once. One ``lax.scan`` per group walks
its blocks; its step is rematerialised (``jax.checkpoint``), so the backward holds one block's
scores at a time and the step's memory stays linear in the sequence length. The gradient is
autodiff's; the dense mask (``specs.parallel_spec``) is the reference (``tests/test_unigist.py``).
Computed against exact score entries: ``gist/window_pairs.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import GistLayout, LayoutShape
from gist_jax.gist.partials import merge_partials
from gist_jax.gist.structured import DecomposedKV, _bias, _partial
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.kernels import NEG
from gist_jax.model.layers import apply_rope

# Query rows per block. The band of a block is about bq + W (1 + 1/r) keys for rows that see on
# average bq / 2 + W (1 + 1/r) of them: a smaller block wastes less of the band's causal edge,
# a larger one makes fewer, larger scan steps. Memory groups: the memory part computes about
# 1 + 1 / groups of its exact staircase, one traced scan per group. bq = 64 with 12 groups keeps
# the computed pairs within 1.13x of exact at 16K-32K for W = 128 .. 2048 (bq = 128 or 8 groups
# reach 1.15-1.21x where W << L; docs/performance.md, UniGist). Read at trace time (tests shrink
# them).
QUERY_BLOCK = 64
MAX_MEMORY_GROUPS = 12


def layout_geometry(shape: LayoutShape, window: int) -> dict[str, np.ndarray]:
    """Host arrays of a UniGist layout from its shape alone (``build_layout``'s, every slot
    live): ``raw_index`` and ``window_start`` [T] (padding raw tokens included), ``raw_layout``
    [padded raw] (layout index of raw token x) and ``memory_token`` [M] (layout index of each
    buffer entry: sinks, then segment-major gist slots)."""
    L, slots, ts = shape.segment_length, shape.slots, shape.segment_tokens
    r = L // slots if slots else 0
    if not slots or r * slots != L:
        raise ValueError(f"UniGist layouts have L / r live slots per segment, got L={L}, slots={slots}")
    seg_T, k_T = np.divmod(np.arange(shape.length, dtype=np.int64), ts)
    unit_T, p_T = np.divmod(k_T, r + 1)
    unit_start_T = seg_T * L + unit_T * r
    raw_T = np.where(p_T < r, unit_start_T + p_T, -1)
    window_start_T = np.maximum(0, unit_start_T - window)
    x = np.arange(shape.padded_raw, dtype=np.int64)
    seg_x, off_x = np.divmod(x, L)
    raw_layout = seg_x * ts + (off_x // r) * (r + 1) + off_x % r
    seg_g, slot_g = np.divmod(np.arange(shape.num_segments * slots, dtype=np.int64), slots)
    memory_token = np.concatenate([raw_layout[:shape.num_sinks], seg_g * ts + slot_g * (r + 1) + r])
    return {"raw_index": raw_T, "window_start": window_start_T, "raw_layout": raw_layout,
            "memory_token": memory_token}


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Static geometry of ``WindowedKV.attend``. Block j holds layout rows ``[j bq, (j+1) bq)``
    (the layout padded to whole blocks); its band is the layout keys ``[(j+1) bq - band, (j+1)
    bq)`` of which those at or after ``band_start[j]`` may be seen; its memory the buffer entries
    ``[0, bound)`` (``groups``: first block, end block, bound) with layout index below
    ``band_start[j]``."""

    query_block: int
    band: int
    band_start: tuple[int, ...]
    groups: tuple[tuple[int, int, int], ...]

    @property
    def num_blocks(self) -> int:
        return len(self.band_start)


def window_plan(shape: LayoutShape, window: int, query_block: int | None = None,
                max_groups: int | None = None) -> WindowPlan:
    """The blocks, band length and memory groups of ``shape`` (defaults read at trace time:
    ``QUERY_BLOCK``, ``MAX_MEMORY_GROUPS``, so tests can shrink them)."""
    return _window_plan(shape, window, min(query_block or QUERY_BLOCK, shape.length),
                        max_groups or MAX_MEMORY_GROUPS)


def windowed_pairs(shape: LayoutShape, window: int) -> dict[str, int]:
    """``{'band', 'memory', 'total'}``: score entries ``WindowedKV.attend`` computes per sequence,
    layer and head (bq x C per block, plus blocks x bq x bound per memory group)."""
    plan = window_plan(shape, window)
    bq = plan.query_block
    band = plan.num_blocks * bq * plan.band
    memory = sum((end - first) * bq * bound for first, end, bound in plan.groups)
    return {"band": int(band), "memory": int(memory), "total": int(band + memory)}


@functools.lru_cache(maxsize=64)
def _window_plan(shape: LayoutShape, window: int, bq: int, max_groups: int) -> WindowPlan:
    geo = layout_geometry(shape, window)
    t = shape.length
    num_blocks = -(-t // bq)
    rows = np.arange(num_blocks) * bq
    # Layout index of the first raw token at or after each row's window start; the band
    # starts at the least over the block's rows (its first row: window starts never decrease).
    first_T = geo["raw_layout"][geo["window_start"]]
    band_start = np.minimum.reduceat(first_T, rows)
    band = int(np.max(rows + bq - band_start))  # to the block's end in the padded layout
    # Memory bound of a block: one past the last buffer entry laid out before its band start
    # (sinks and gists interleave in the layout when sinks > r, so not a plain count).
    token_M = geo["memory_token"]
    order = np.argsort(token_M, kind="stable")
    last_before = np.maximum.accumulate(order)  # the largest entry among the first k by layout
    count = np.searchsorted(token_M[order], band_start, side="left")
    bounds = np.where(count > 0, last_before[np.maximum(count - 1, 0)] + 1, 0)
    first_with_memory = int(np.searchsorted(bounds, 1))  # bounds never decrease
    groups = [(0, first_with_memory, 0)] if first_with_memory else []
    rest = num_blocks - first_with_memory
    if rest > 0:
        size = -(-rest // max_groups)
        for first in range(first_with_memory, num_blocks, size):
            end = min(first + size, num_blocks)
            groups.append((first, end, int(bounds[end - 1])))
    return WindowPlan(bq, band, tuple(int(a) for a in band_start), tuple(groups))


@dataclasses.dataclass(frozen=True)
class ContextWindowPlan:
    """Static geometry per device: ``blocks`` query blocks of ``query_block`` rows (the block's
    layout padded to whole blocks), bands of ``band`` keys, of which the first ``halo`` come
    from the previous device, and each query block's band start (global layout index)."""

    query_block: int
    blocks: int
    band: int
    halo: int
    band_start: tuple[tuple[int, ...], ...]  # [context][blocks]


def context_window_plan(shape: LayoutShape, window: int, context: int,
                        query_block: int | None = None) -> ContextWindowPlan:
    """The plan for ``context`` blocks of a layout split over the mesh's ``context`` axis
    (``context_window.py``; ``QUERY_BLOCK`` read at call time)."""
    return _context_plan(shape, window, context, query_block or QUERY_BLOCK)


@functools.lru_cache(maxsize=64)
def _context_plan(shape: LayoutShape, window: int, context: int, bq: int) -> ContextWindowPlan:
    geo = layout_geometry(shape, window)
    t_local = shape.length // context
    bq = min(bq, t_local)
    blocks = -(-t_local // bq)
    # Layout index of the first raw token at or after each row's window start; a block's band
    # starts at its first row's (window starts never decrease).
    first_T = geo["raw_layout"][geo["window_start"]]
    starts = [np.minimum.reduceat(first_T[c * t_local:(c + 1) * t_local], np.arange(blocks) * bq)
              for c in range(context)]
    ends = [c * t_local + (np.arange(blocks) + 1) * bq for c in range(context)]
    band = int(max(np.max(e - a) for e, a in zip(ends, starts)))
    return ContextWindowPlan(bq, blocks, band, band - bq, tuple(tuple(int(x) for x in a) for a in starts))


@flax.struct.dataclass
class WindowedKV:
    """What the windowed path needs beyond ``AttentionSpec``: the memory buffer (as
    ``DecomposedKV`` builds it), the per-token window arrays, and the static geometry."""

    memory: DecomposedKV
    raw_index_T: jax.Array
    window_start_T: jax.Array
    always_T: jax.Array  # sinks and live gists: seen by every later token
    window: int = flax.struct.field(pytree_node=False)

    @classmethod
    def from_arrays(cls, arrays: dict[str, jax.Array], shape: LayoutShape, window: int) -> WindowedKV:
        always_T = (arrays["is_gist"] & arrays["alive"]) | arrays["is_sink"]
        return cls(DecomposedKV.from_arrays(arrays, shape), arrays["raw_index"],
                   arrays["window_start"], always_T, window)

    @classmethod
    def for_layout(cls, arrays: dict[str, jax.Array], shape: LayoutShape, comp: CompressionConfig) -> WindowedKV:
        return cls.from_arrays(arrays, shape, comp.window)

    @classmethod
    def computed_pairs(cls, layout: GistLayout, comp: CompressionConfig, backend: str, dtype: str,
                       head_dim: int) -> tuple[str, int]:
        """Every query block of bq rows against its band of C layout keys, plus each memory
        group's blocks x bq x the group's buffer bound (``window_plan``)."""
        del backend, dtype, head_dim
        return "windowed", windowed_pairs(layout.shape, comp.window)["total"]

    def plan(self) -> WindowPlan:
        mem = self.memory
        shape = LayoutShape(mem.num_segments, mem.segment_tokens - mem.slots, mem.slots, mem.num_sinks, True)
        return window_plan(shape, self.window)

    def attend(self, q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
               spec: AttentionSpec, inv_freq: jax.Array) -> jax.Array:
        """Queries rotated at ``spec.positions``, keys un-rotated; [B, T, N, H] in the value dtype."""
        mem = self.memory
        b, t, n, h = q_BxTxNxH.shape
        kv_heads = k_BxTxKxH.shape[2]
        g = n // kv_heads
        plan = self.plan()
        bq, c, nblk = plan.query_block, plan.band, plan.num_blocks
        tp = nblk * bq  # the layout padded to whole blocks
        assert spec.valid is not None, "structured_spec sets valid (the live tokens)"
        k_rot_BxTxKxH, v_band_BxTxKxH = apply_rope(k_BxTxKxH, spec.positions, inv_freq), v_BxTxKxH
        if spec.stop_gist_memory_gradient:  # every view of a gist is held (no-leak tests)
            assert spec.is_gist is not None, "structured_spec sets is_gist"
            hold = spec.is_gist[:, :, None, None]
            k_rot_BxTxKxH = jnp.where(hold, jax.lax.stop_gradient(k_rot_BxTxKxH), k_rot_BxTxKxH)
            v_band_BxTxKxH = jnp.where(hold, jax.lax.stop_gradient(v_BxTxKxH), v_BxTxKxH)
        # Aligned positions: a sink's or gist's memory position is its own position.
        k_mem_BxMxKxH, v_mem_BxMxKxH = mem.memory_kv(k_BxTxKxH, v_BxTxKxH, spec, inv_freq)

        # Keys padded by the band length in front (every band slice stays in range; the padding
        # lies before every band start, so it is masked) and to whole blocks behind.
        def keys(x_BxTxKxH: jax.Array) -> jax.Array:  # -> [B, K, C + Tp, H]
            return jnp.pad(x_BxTxKxH, ((0, 0), (c, tp - t), (0, 0), (0, 0))).swapaxes(1, 2)

        consts = {
            "k": keys(k_rot_BxTxKxH), "v": keys(v_band_BxTxKxH),
            "live": jnp.pad(spec.valid, ((0, 0), (c, tp - t)), constant_values=False),
            "always": jnp.pad(self.always_T, (c, tp - t), constant_values=False),
            "raw": jnp.pad(self.raw_index_T, (c, tp - t), constant_values=-1),
            "km": k_mem_BxMxKxH.swapaxes(1, 2), "vm": v_mem_BxMxKxH.swapaxes(1, 2),
            "token_M": mem.memory_token_M, "live_M": mem.memory_live_M,
        }
        q_pad = jnp.pad(q_BxTxNxH, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        rows_J = jnp.arange(nblk, dtype=jnp.int32) * bq
        xs = {
            "q": q_pad.reshape(b, nblk, bq, kv_heads, g, h).transpose(1, 0, 3, 4, 2, 5),
            "q_start": jnp.pad(self.window_start_T, (0, tp - t)).reshape(nblk, bq),
            "row0": rows_J, "slice": rows_J + bq,  # the band [end - C, end) sits at end in the padded keys
            "a": jnp.asarray(plan.band_start, jnp.int32),
        }

        outs = []
        for first, end, bound in plan.groups:
            step = jax.checkpoint(functools.partial(block_out, bound=bound, bq=bq, band=c))

            def body(carry: None, x: dict[str, jax.Array], step: Any = step) -> tuple[None, jax.Array]:
                return carry, step(consts, x)

            group = {key: a[first:end] for key, a in xs.items()}
            outs.append(jax.lax.scan(body, None, group)[1])
        out_JxBxKxGxQxH = jnp.concatenate(outs, axis=0)
        out_BxTxNxH = out_JxBxKxGxQxH.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, n, h)[:, :t]
        return out_BxTxNxH.astype(v_BxTxKxH.dtype)


def block_out(cs: dict[str, jax.Array], x: dict[str, jax.Array], bound: int, bq: int, band: int) -> jax.Array:
    """One query block: its band (``band`` keys of ``cs`` from ``x["slice"]``, the layout keys
    ``[row0 + bq - band, row0 + bq)``, those at or after its band start ``x["a"]`` and visible
    to each row) and its memory (the first ``bound`` buffer entries laid out before ``a``),
    merged by log-sum-exp. ``cs``: the keys and per-key arrays; ``x``: the block's queries, their
    window starts, its first row's layout index ``row0``, ``slice`` and ``a``."""
    def band_of(a: jax.Array, axis: int) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(a, x["slice"], band, axis=axis)

    key_idx_C = x["row0"] + bq - band + jnp.arange(band, dtype=jnp.int32)
    q_idx_Q = x["row0"] + jnp.arange(bq, dtype=jnp.int32)
    visible_QxC = ((key_idx_C[None, :] >= x["a"]) & (key_idx_C[None, :] <= q_idx_Q[:, None])
                   & (band_of(cs["always"], 0)[None, :]
                      | (band_of(cs["raw"], 0)[None, :] >= x["q_start"][:, None])))
    visible_BxQxC = visible_QxC[None] & band_of(cs["live"], 1)[:, None, :]
    o, lse = _partial(x["q"], band_of(cs["k"], 2), band_of(cs["v"], 2), _bias(visible_BxQxC)[:, None, None])
    if bound:
        seen_M = cs["live_M"][:bound] & (cs["token_M"][:bound] < x["a"])
        o_m, lse_m = _partial(x["q"], cs["km"][:, :, :bound], cs["vm"][:, :, :bound], _bias(seen_M))
        o = merge_partials(o, lse, o_m, lse_m)
    return o


__all__ = ["NEG", "QUERY_BLOCK", "ContextWindowPlan", "WindowPlan", "WindowedKV", "block_out",
           "context_window_plan", "layout_geometry", "window_plan"]
