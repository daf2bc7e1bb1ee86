"""Decomposed attention for the KV variants: no T x T score matrix, same result as the masks.

The dense reference (``specs.parallel_spec`` + ``attention.dot_product_attention``) builds a
``[T, 2T]`` score matrix per head: every layout token against every token rotated at its own
position and again at its memory position. Almost all of it is masked. The mask has only two
non-empty parts, and this module computes each one at its own size:

  (a) local: a query sees the live tokens of its own segment up to itself, keys rotated at
      ``position``. Segments are folded into the batch axis, ``[B * S, Ts, ...]``, so this is
      plain causal attention over ``Ts = L + slots`` tokens (``B * S * Ts^2`` scores: linear
      in the sequence length for a fixed segment length; any causal flash kernel fits here).
  (b) memory: a query of segment i sees the sinks and the live gists of segments < i, keys
      rotated at ``memory_position``. The memory buffer (``memory_buffer_arrays``: sinks, then
      segment-major gist slots; M ~ n / r entries) is gathered once per layer, then a
      ``lax.scan`` over segments with a checkpointed body computes ``Ts x M`` scores for one
      segment at a time (masked to entries of earlier segments), so neither the forward nor
      the backward pass holds more than one segment's memory scores: memory is linear in the
      sequence length. It computes the whole buffer for every segment, up to 2x the FLOPs
      of the exact staircase (segment i needs only the prefix ``[0, s + i * slots)``);
      unrolled static-prefix blocks were tried and measured worse on CPU: peak memory grew
      2.2-2.4x per doubling of the context (XLA keeps several blocks' scores live) and
      compile time grew with the number of segments.

Each part returns its normalised output and its log-sum-exp; the two partial softmaxes are
merged exactly, ``o = (e^l1 o1 + e^l2 o2) / (e^l1 + e^l2)``. Gradients are autodiff of that
merged result (the lse path included), so they are the gradients of the one softmax the dense
path computes. Both position schemes are exact: the local part rotates every key at its
in-segment position, the memory part at its memory position, as the dense mask pairs do.

Selected by ``CompressionConfig.attention_impl = "decomposed"`` (``parallel.kv_parallel``);
the dense path stays the reference (``tests/test_structured_attention.py``). Queries whose
every key is masked (never a live token) get 0 here and a uniform average in the dense path;
nothing live reads them. cuDNN's fused attention cannot serve part (a) here: its backward
ignores the log-sum-exp cotangent the merge needs. ``flash.py`` lays each segment out so that
one causal call needs no merge; that is the GPU path (``attention_impl="flash"``/``"auto"``).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import LayoutShape
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.layers import apply_rope

# Finite "minus infinity": exp(NEG - finite) == 0 without inf - inf = NaN in the merge or its
# gradient (fully masked rows: memory of segment 0, dead slots).
NEG = -1e30


def partial_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                      mask_BxTxS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax attention over one key set: (output [B, T, N, H] float32, lse [B, T, N] float32).
    ``mask_BxTxS`` may be any shape that broadcasts to [B, T, S].

    Rows with no visible key give output 0 and lse ``NEG``. The row max is held constant
    (``stop_gradient``): the lse and the output do not depend on it, so the gradient is exact.
    Probabilities are cast to the value dtype before P @ V, as the dense path does.
    """
    b, t, n, h = q_BxTxNxH.shape
    kv_heads = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
    # The mask enters as an additive float bias (0 / NEG), not a select: a select's derivative
    # keeps its full-size boolean operand as a residual (per step of a scan: S x Ts x M).
    bias_Bx1x1xTxS = jnp.where(mask_BxTxS, 0.0, NEG).astype(jnp.float32)[:, None, None]
    scores_BxKxGxTxS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BxTxKxGxH, k_BxSxKxH,
                                  preferred_element_type=jnp.float32) * (h ** -0.5) + bias_Bx1x1xTxS
    max_BxKxGxT = jax.lax.stop_gradient(jnp.max(scores_BxKxGxTxS, axis=-1))
    # Masked entries: exp(NEG - max) == 0, except in rows with no visible key (max ~ NEG).
    seen_BxKxGxT = max_BxKxGxT > 0.5 * NEG
    unnorm_BxKxGxTxS = jnp.exp(scores_BxKxGxTxS - max_BxKxGxT[..., None])
    sum_BxKxGxT = jnp.sum(unnorm_BxKxGxTxS, axis=-1)  # >= 1: the max entry contributes 1
    lse_BxKxGxT = jnp.where(seen_BxKxGxT, max_BxKxGxT + jnp.log(sum_BxKxGxT), NEG)
    scale_BxKxGxT = jnp.where(seen_BxKxGxT, 1.0, 0.0) / sum_BxKxGxT
    probs_BxKxGxTxS = (unnorm_BxKxGxTxS * scale_BxKxGxT[..., None]).astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BxKxGxTxS, v_BxSxKxH,
                               preferred_element_type=jnp.float32)
    lse_BxTxN = lse_BxKxGxT.transpose(0, 3, 1, 2).reshape(b, t, n)
    return out_BxTxKxGxH.reshape(b, t, n, h), lse_BxTxN


def merge_partials(out1_BxTxNxH: jax.Array, lse1_BxTxN: jax.Array, out2_BxTxNxH: jax.Array,
                   lse2_BxTxN: jax.Array) -> jax.Array:
    """Exact softmax over the union of two disjoint key sets from their partial results."""
    top = jax.lax.stop_gradient(jnp.maximum(lse1_BxTxN, lse2_BxTxN))
    w1, w2 = jnp.exp(lse1_BxTxN - top), jnp.exp(lse2_BxTxN - top)
    out = (w1[..., None] * out1_BxTxNxH + w2[..., None] * out2_BxTxNxH) / (w1 + w2)[..., None]
    return out


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
    def from_arrays(cls, arrays: dict[str, jax.Array], shape: LayoutShape) -> "DecomposedKV":
        memory_slot_T = arrays["memory_slot"]
        size = shape.memory_size
        token_T = jnp.arange(memory_slot_T.shape[0], dtype=jnp.int32)
        # Invert memory_slot (token -> buffer entry); tokens kept nowhere scatter out of range.
        memory_token_M = jnp.zeros(size, jnp.int32).at[
            jnp.where(memory_slot_T >= 0, memory_slot_T, size)].set(token_T, mode="drop")
        return cls(memory_token_M, arrays["buffer_position"], arrays["buffer_live"],
                   shape.num_segments, shape.segment_tokens, shape.num_sinks, shape.slots)

    def key_segment(self) -> jax.Array:
        """[M] segment that owns buffer entry m (sinks: 0); segment i sees entries owned by
        segments < i."""
        return jnp.concatenate([jnp.zeros(self.num_sinks, jnp.int32),
                                jnp.repeat(jnp.arange(self.num_segments, dtype=jnp.int32), self.slots)])

    def memory_kv(self, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, spec: AttentionSpec,
                  inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The memory buffer's keys and values [B, M, K, H], keys rotated at their memory
        positions, gist entries held fixed under ``stop_gist_memory_gradient``."""
        b = k_BxTxKxH.shape[0]
        k_mem_BxMxKxH = jnp.take(k_BxTxKxH, self.memory_token_M, axis=1)
        v_mem_BxMxKxH = jnp.take(v_BxTxKxH, self.memory_token_M, axis=1)
        pos_BxM = jnp.broadcast_to(self.memory_position_M, (b, self.memory_token_M.shape[0]))
        k_mem_BxMxKxH = apply_rope(k_mem_BxMxKxH, pos_BxM, inv_freq)
        if spec.stop_gist_memory_gradient:  # every entry after the sinks is a gist
            hold_M = (jnp.arange(k_mem_BxMxKxH.shape[1]) >= self.num_sinks)[None, :, None, None]
            k_mem_BxMxKxH = jnp.where(hold_M, jax.lax.stop_gradient(k_mem_BxMxKxH), k_mem_BxMxKxH)
            v_mem_BxMxKxH = jnp.where(hold_M, jax.lax.stop_gradient(v_mem_BxMxKxH), v_mem_BxMxKxH)
        return k_mem_BxMxKxH, v_mem_BxMxKxH

    def _memory_scan(self, q_BxTxNxH: jax.Array, k_mem_BxMxKxH: jax.Array,
                     v_mem_BxMxKxH: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Segments 1..S-1 against the whole buffer, masked to entries of earlier segments, in a
        ``lax.scan`` with a checkpointed body: one segment's scores exist at a time, forward
        and backward, so memory is linear in the sequence length. Costs up to 2x the
        staircase's memory FLOPs (masked entries are computed)."""
        b, t, n, h = q_BxTxNxH.shape
        s, ts = self.num_segments, self.segment_tokens
        key_segment_M = self.key_segment()
        q_SxBxTsxNxH = q_BxTxNxH.reshape(b, s, ts, n, h).swapaxes(0, 1)[1:]

        @jax.checkpoint
        def body(carry, x):
            q_i, i = x
            # [1, 1, M], not [B, Ts, M]: scan partial evaluation stores this mask for every
            # step (it depends only on i), which at full size would be an S x Ts x M residual.
            visible_1x1xM = ((key_segment_M < i) & self.memory_live_M)[None, None, :]
            return carry, partial_attention(q_i, k_mem_BxMxKxH, v_mem_BxMxKxH, visible_1x1xM)

        _, (out_SxBxTsxNxH, lse_SxBxTsxN) = jax.lax.scan(
            body, None, (q_SxBxTsxNxH, jnp.arange(1, s, dtype=jnp.int32)))
        return (out_SxBxTsxNxH.swapaxes(0, 1).reshape(b, t - ts, n, h),
                lse_SxBxTsxN.swapaxes(0, 1).reshape(b, t - ts, n))

    def attend(self, q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
               spec: AttentionSpec, inv_freq: jax.Array) -> jax.Array:
        """Queries already rotated at ``spec.positions``; keys un-rotated (rotated here once per
        part, at the position that part uses). Returns [B, T, N, H] in the value dtype."""
        b, t, n, h = q_BxTxNxH.shape
        s, ts = self.num_segments, self.segment_tokens
        k_rot_BxTxKxH = apply_rope(k_BxTxKxH, spec.positions, inv_freq)

        # (a) local: segments folded into the batch axis.
        def fold(x):  # [B, T, ...] -> [B * S, Ts, ...]
            return x.reshape((b * s, ts) + x.shape[2:])

        alive_BSxTs = fold(spec.valid)
        causal_TsxTs = jnp.tril(jnp.ones((ts, ts), bool))
        local_mask = causal_TsxTs[None] & alive_BSxTs[:, None, :]
        out_loc, lse_loc = partial_attention(fold(q_BxTxNxH), fold(k_rot_BxTxKxH),
                                             fold(v_BxTxKxH), local_mask)
        out_loc_BxTxNxH = out_loc.reshape(b, t, n, h)
        lse_loc_BxTxN = lse_loc.reshape(b, t, n)
        if s == 1:
            return out_loc_BxTxNxH.astype(v_BxTxKxH.dtype)

        # (b) memory: keys gathered once, rotated at their memory positions.
        k_mem_BxMxKxH, v_mem_BxMxKxH = self.memory_kv(k_BxTxKxH, v_BxTxKxH, spec, inv_freq)
        outs = [jnp.zeros((b, ts, n, h), jnp.float32)]
        lses = [jnp.full((b, ts, n), NEG, jnp.float32)]
        out_S, lse_S = self._memory_scan(q_BxTxNxH, k_mem_BxMxKxH, v_mem_BxMxKxH)
        outs.append(out_S)
        lses.append(lse_S)
        out = merge_partials(out_loc_BxTxNxH, lse_loc_BxTxN, jnp.concatenate(outs, axis=1),
                             jnp.concatenate(lses, axis=1))
        return out.astype(v_BxTxKxH.dtype)


def structured_spec(arrays: dict[str, jax.Array], comp: CompressionConfig, batch: int,
                    structure: Any, stop_gist_memory_gradient: bool = False) -> AttentionSpec:
    """The ``parallel_spec`` of a structured path: per-token arrays and ``structure`` (an
    object with ``attend``: ``DecomposedKV``, ``flash.PrefixCausalKV``, ``bank.GistBankKV``),
    no masks (``valid`` carries the live tokens; ``mask``/``memory_mask`` stay None)."""
    from gist_jax.gist.specs import embedding_rows

    def per_batch(x):
        return jnp.broadcast_to(x, (batch,) + x.shape)

    return AttentionSpec(
        positions=per_batch(arrays["position"]), valid=per_batch(arrays["alive"]),
        memory_positions=per_batch(arrays["memory_position"]),
        is_gist=per_batch(arrays["is_gist"]),
        gist_slot=per_batch(embedding_rows(arrays["gist_slot"], comp)),
        structure=structure,
        stop_gist_memory_gradient=stop_gist_memory_gradient)
