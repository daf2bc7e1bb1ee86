"""Split attention for the KV variants: two exact attention calls merged by log-sum-exp, with
a hand-written backward, so cuDNN's fused kernels serve both parts (``model.attention="split"``).

What a live query of segment i may see is the union of two disjoint key sets
(``structured.py``):

  (a) local: the live tokens of its own segment up to itself, keys at in-segment positions.
      Segments are folded into the batch axis, ``[B * S, Ts, ...]``: plain causal attention
      with key length ``live_i`` (the segment's live tokens, compacted to the front when the
      layout pads a segment, ``SplitKV.local_index_T``);
  (b) memory: the sinks and live gists of segments < i, keys at memory positions. The buffer
      is compacted (live entries first, in buffer order, which is segment order), so memory_i
      is a prefix of length ``c_i`` of one ``[B, C, ...]`` array, ``C = s + (S - 1) * slots``.
      The queries of segments 1..S-1 attend to it broadcast to ``[B * (S - 1), C, ...]``,
      key lengths ``c_i``: a padding mask, no causal part.

The two partial softmaxes merge exactly in float32 (``split_kernel.merge_lse``). Work: exactly the pairs
the dense mask admits, ``sum_i live_i (live_i + 1) / 2 + sum_{i>=1} live_i * c_i`` per
sequence and head (``split_pairs``), against flash's ``(c_i + Ts)^2 / 2`` per segment.

The two calls, their backends and the custom VJP that merges them are ``split_kernel.py``;
this module lays the layout out for them (``SplitKV``) and picks the backend (``backend_for``:
cuDNN where it takes the inputs and passed its self-test, ``cudnn_stats.py``).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.gist import cudnn_stats
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import GistLayout, LayoutShape
from gist_jax.gist.split_kernel import XLA, AttentionBackend, split_attention
from gist_jax.gist.structured import DecomposedKV
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.layers import apply_rope


def backend_for(q_BxTxNxH: jax.Array, name: str | None) -> AttentionBackend:
    """The backend a call runs: ``name`` if given (``xla``/``cudnn``), else cuDNN where it
    takes these inputs and passed its self-test, XLA otherwise."""
    if name == "xla":
        return XLA
    if name == "cudnn" or (name is None and cudnn_stats.usable_for(q_BxTxNxH)):
        return cudnn_stats.backend()
    return XLA


@flax.struct.dataclass
class SplitKV(DecomposedKV):
    """``DecomposedKV``'s memory buffer plus the compaction tables the two calls need. Sits in
    ``AttentionSpec.structure`` (``model.attention="split"``)."""

    local_length_S: jax.Array  # live tokens of segment i (its causal key length)
    local_index_T: jax.Array | None  # layout token at each compacted row; None: identity
    local_inverse_T: jax.Array | None  # compacted row of each layout token
    memory_order_C: jax.Array  # buffer entry at compacted memory row (live first)
    memory_length_S: jax.Array  # c_i: live memory entries segment i sees
    backend: str | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def computed_pairs(cls, layout: GistLayout, comp: CompressionConfig, backend: str, dtype: str,
                       head_dim: int) -> tuple[str, int]:
        """On GPU, cuDNN skips what causality and the key lengths mask: the exact pairs
        (``split_pairs``). XLA: each segment's ``[Ts, Ts]`` square plus segments 1..S-1 against
        the compacted buffer (C = sinks + (S - 1) slots)."""
        del comp, dtype, head_dim
        if backend == "gpu":
            return "split:cudnn", split_pairs(layout)["split"]
        shape = layout.shape
        s, ts = shape.num_segments, shape.segment_tokens
        return "split:xla", s * ts * ts + (s - 1) * ts * memory_rows(shape)

    @classmethod
    def from_arrays(cls, arrays: dict[str, jax.Array], shape: LayoutShape,
                    backend: str | None = None) -> SplitKV:
        base = DecomposedKV.from_arrays(arrays, shape)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        s, ts = shape.num_segments, shape.segment_tokens
        alive_SxTs = arrays["alive"].reshape(s, ts)
        local_index = local_inverse = None
        if not shape.whole_segments:
            # Padding sits before live gists: move each segment's live tokens to its front, in
            # order, so "causal over live tokens" is causal with a key length.
            order_SxTs = jnp.argsort(~alive_SxTs, axis=1, stable=True).astype(jnp.int32)
            local_index = (order_SxTs + ts * jnp.arange(s, dtype=jnp.int32)[:, None]).reshape(-1)
            local_inverse = jnp.argsort(local_index).astype(jnp.int32)
        live_M = base.memory_live_M
        order_C = jnp.argsort(~live_M, stable=True)[:memory_rows(shape)].astype(jnp.int32)
        segment_S = jnp.arange(s, dtype=jnp.int32)
        memory_length_S = jnp.sum(live_M[None, :] & (base.key_segment()[None, :] < segment_S[:, None]),
                                  axis=1, dtype=jnp.int32)
        return cls(**fields, local_length_S=jnp.sum(alive_SxTs, axis=1, dtype=jnp.int32),
                   local_index_T=local_index, local_inverse_T=local_inverse,
                   memory_order_C=order_C, memory_length_S=memory_length_S, backend=backend)

    def compact_memory_kv(self, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, spec: AttentionSpec,
                          inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Live memory entries first, [B, C, K, H], keys rotated at their memory positions,
        gists held fixed under ``stop_gist_memory_gradient`` (sinks stay trainable)."""
        b = k_BxTxKxH.shape[0]
        token_C = jnp.take(self.memory_token_M, self.memory_order_C)
        k_mem = jnp.take(k_BxTxKxH, token_C, axis=1)
        v_mem = jnp.take(v_BxTxKxH, token_C, axis=1)
        position_BxC = jnp.broadcast_to(jnp.take(self.memory_position_M, self.memory_order_C),
                                        (b, token_C.shape[0]))
        k_mem = apply_rope(k_mem, position_BxC, inv_freq)
        if spec.stop_gist_memory_gradient:
            hold_1xCx1x1 = (self.memory_order_C >= self.num_sinks)[None, :, None, None]
            k_mem = jnp.where(hold_1xCx1x1, jax.lax.stop_gradient(k_mem), k_mem)
            v_mem = jnp.where(hold_1xCx1x1, jax.lax.stop_gradient(v_mem), v_mem)
        return k_mem, v_mem

    def attend(self, q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
               spec: AttentionSpec, inv_freq: jax.Array) -> jax.Array:
        """Queries already rotated at ``spec.positions``; keys un-rotated (rotated here at the
        position each part uses). Returns [B, T, N, H] in the value dtype."""
        b, t, n, h = q_BxTxNxH.shape
        s, ts = self.num_segments, self.segment_tokens
        q_BxTxNxH = q_BxTxNxH.astype(k_BxTxKxH.dtype)
        k_rot_BxTxKxH = apply_rope(k_BxTxKxH, spec.positions, inv_freq)
        k_mem, v_mem = self.compact_memory_kv(k_BxTxKxH, v_BxTxKxH, spec, inv_freq)
        q_loc, k_loc, v_loc = q_BxTxNxH, k_rot_BxTxKxH, v_BxTxKxH
        if self.local_index_T is not None:
            q_loc, k_loc, v_loc = (jnp.take(x, self.local_index_T, axis=1) for x in (q_loc, k_loc, v_loc))

        def per_segment(x_BxTx):  # [B, T, ...] -> [B, S, Ts, ...]
            return x_BxTx.reshape((b, s, ts) + x_BxTx.shape[2:])

        out_BxSxTsxNxH = split_attention(
            backend_for(q_BxTxNxH, self.backend), per_segment(q_loc), per_segment(k_loc),
            per_segment(v_loc), jnp.broadcast_to(self.local_length_S, (b, s)), k_mem, v_mem,
            jnp.broadcast_to(self.memory_length_S[1:], (b, s - 1)))
        out_BxTxNxH = out_BxSxTsxNxH.reshape(b, t, n, h)
        if self.local_inverse_T is not None:
            out_BxTxNxH = jnp.take(out_BxTxNxH, self.local_inverse_T, axis=1)
        return out_BxTxNxH.astype(v_BxTxKxH.dtype)


def memory_rows(shape: LayoutShape) -> int:
    """C: compacted memory rows, enough for the last segment's memory (``s + (S-1) * slots``;
    the last segment's own gists are never anyone's memory)."""
    return shape.num_sinks + (shape.num_segments - 1) * shape.slots


def split_pairs(layout: GistLayout) -> dict[str, int]:
    """Query-key pairs per sequence and head, host-side: what split computes (``local`` causal
    triangles over each segment's live tokens, ``memory`` live queries x c_i), the same count
    for the flash layout (``(c_i + Ts)^2 / 2`` per segment, padding rows included) and full
    causal attention over the raw tokens (``n (n + 1) / 2``)."""
    s, ts = layout.num_segments, layout.shape.segment_tokens
    live_S = layout.alive.reshape(s, ts).sum(axis=1).astype(np.int64)
    kept = layout.memory_slot >= 0
    owner = np.where(layout.is_gist[kept], layout.segment[kept], -1)  # sinks: -1, seen by i >= 1
    c_S = np.array([int(np.sum(owner < i)) if i else 0 for i in range(s)], np.int64)
    local = int(np.sum(live_S * (live_S + 1) // 2))
    memory = int(np.sum(live_S * c_S))
    n = layout.num_raw
    return {"local": local, "memory": memory, "split": local + memory,
            "flash": int(np.sum((c_S + ts) * (c_S + ts + 1) // 2)), "full_causal": n * (n + 1) // 2}
