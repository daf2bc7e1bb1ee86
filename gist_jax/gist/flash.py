"""Gist attention as one causal flash-attention call per segment (cuDNN on NVIDIA GPUs).

The decomposed path (``structured.py``) needs the log-sum-exp of its segment-local part to
merge it with the memory part. cuDNN's fused attention returns that log-sum-exp
(``return_residual=True``) but its backward drops the lse cotangent (jax 0.10,
``_dot_product_attention_bwd_rule`` keeps only ``grad_output[0]``), so the merge would train
on wrong gradients. This module needs no merge. What a query of segment i may see is

    memory_i (sinks + live gists of segments < i)   +   its own segment up to itself,

and if the memory is laid out *in front of* the segment, that is exactly a causal mask:

    position   0 .. c_i-1        c_i .. c_i+Ts-1          c_i+Ts .. E-1
    keys       memory_i          segment i (in order)     unused
    queries    unused            segment i (in order)     unused

Query ``c_i + j`` sees keys ``<= c_i + j``: the whole memory and segment tokens ``<= j``.
``jax.nn.dot_product_attention(is_causal=True)`` with per-row sequence lengths ``c_i + Ts``
then computes every segment at once, segments folded into the batch axis, with the kernel's
own forward and backward (``implementation="cudnn"`` skips the masked half and the padded
tail). Dead gist slots (per-segment ratios) only ever sit at the tail of a segment, after
every live token, so causality already hides them from live queries. Padding up to whole
segments does not: it sits before the last segment's live gists, which causality would let
see it, so a layout with padding (``LayoutShape.whole_segments`` False) runs ``decomposed``
instead (``forward.resolve_gist_kernel``). The memory is compacted (live entries first,
in buffer order, which is segment order), so memory_i is a prefix of length ``c_i``. Exact for
both position schemes: local keys are rotated at their in-segment positions, memory keys at
their memory positions, as in the dense masks.

Cost: the leading ``c_i`` rows are padding queries, so a segment costs ``(c_i + Ts)^2 / 2``
score pairs instead of the exact ``Ts^2 / 2 + c_i * Ts``: at 16K tokens, L = 2048, r = 8,
12% more attention FLOPs; at 32K, 36% (docs/performance.md). The gathered q/k/v are
``E = M + Ts`` rows per segment. Off GPU (or in float32, or with a head size cuDNN does not
take) the same call runs XLA's implementation, which materialises each segment's ``E x E``
scores: right for tests, but ``decomposed`` is the better choice there (``model.attention=
"auto"`` picks this path on GPU in bf16/fp16 and ``decomposed`` otherwise).
"""

from __future__ import annotations

from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import GistLayout
from gist_jax.gist.split import split_pairs
from gist_jax.gist.structured import DecomposedKV
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.kernels import cudnn_runs
from gist_jax.model.layers import apply_rope

Kernel = Literal["xla", "cudnn"]  # ``jax.nn.dot_product_attention``'s implementations


def kernel_for(q_BxTxNxH: jax.Array) -> Kernel:
    """``cudnn`` where cuDNN's fused attention takes these inputs, else ``xla``."""
    return "cudnn" if cudnn_runs(jax.default_backend(), q_BxTxNxH.dtype, q_BxTxNxH.shape[-1]) else "xla"


@flax.struct.dataclass
class PrefixCausalKV(DecomposedKV):
    """``DecomposedKV``'s memory buffer and geometry, attended as memory-prefix + causal
    segment in one ``jax.nn.dot_product_attention`` call. ``implementation`` None picks
    ``kernel_for`` at trace time."""

    implementation: Kernel | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def computed_pairs(cls, layout: GistLayout, comp: CompressionConfig, backend: str, dtype: str,
                       head_dim: int) -> tuple[str, int]:
        """cuDNN: causal rows of length c_i + Ts per segment, ``sum_i (c_i + Ts)(c_i + Ts + 1) / 2``
        (its tile granularity is not modelled); XLA: each segment's whole ``[E, E]`` square,
        E = memory size + Ts."""
        del comp
        shape = layout.shape
        if not cudnn_runs(backend, dtype, head_dim):
            return "flash:xla", shape.num_segments * (shape.memory_size + shape.segment_tokens) ** 2
        return "flash:cudnn", split_pairs(layout)["flash"]  # c_i counted once, beside split's own pairs

    def extended_indices(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Where each row of the per-segment ``[memory_i | segment i | unused]`` sequence comes
        from. Returns (key source [S, E] into ``concat(memory [M], tokens [T])``, query source
        [S, E] into tokens, row length ``c_i + Ts`` [S], output row [T] into ``[S * E]``)."""
        s, ts = self.num_segments, self.segment_tokens
        m = self.memory_token_M.shape[0]
        e = m + ts
        live_M = self.memory_live_M
        order_M = jnp.argsort(jnp.logical_not(live_M), stable=True)  # live first, in buffer order
        segment_S = jnp.arange(s, dtype=jnp.int32)
        count_S = jnp.sum(live_M[None, :] & (self.key_segment()[None, :] < segment_S[:, None]),
                          axis=1, dtype=jnp.int32)
        row_E = jnp.arange(e, dtype=jnp.int32)
        own_SxE = row_E[None, :] - count_S[:, None]  # index inside segment i's tokens
        is_own_SxE = (own_SxE >= 0) & (own_SxE < ts)
        token_SxE = segment_S[:, None] * ts + jnp.clip(own_SxE, 0, ts - 1)
        memory_SxE = jnp.take(order_M, jnp.minimum(row_E, m - 1))[None, :]
        key_src_SxE = jnp.where(is_own_SxE, m + token_SxE,
                                jnp.where(row_E[None, :] < count_S[:, None], memory_SxE, 0))
        query_src_SxE = jnp.where(is_own_SxE, token_SxE, 0)
        out_row_T = ((segment_S * e + count_S)[:, None] + jnp.arange(ts, dtype=jnp.int32)[None, :])
        return key_src_SxE, query_src_SxE, count_S + ts, out_row_T.reshape(-1)

    def attend(self, q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
               spec: AttentionSpec, inv_freq: jax.Array) -> jax.Array:
        """Queries already rotated at ``spec.positions``; keys un-rotated. Returns
        [B, T, N, H] in the value dtype."""
        b, _, n, h = q_BxTxNxH.shape
        s = self.num_segments
        e = self.memory_token_M.shape[0] + self.segment_tokens
        k_rot_BxTxKxH = apply_rope(k_BxTxKxH, spec.positions, inv_freq)
        k_mem_BxMxKxH, v_mem_BxMxKxH = self.memory_kv(k_BxTxKxH, v_BxTxKxH, spec, inv_freq)
        key_src_SxE, query_src_SxE, length_S, out_row_T = self.extended_indices()

        def extend(x_BxWxCxH, src_SxE):  # -> [B * S, E, C, H]
            x = jnp.take(x_BxWxCxH, src_SxE.reshape(-1), axis=1)
            return x.reshape((b * s, e) + x_BxWxCxH.shape[2:])

        k_ext = extend(jnp.concatenate([k_mem_BxMxKxH, k_rot_BxTxKxH], axis=1), key_src_SxE)
        v_ext = extend(jnp.concatenate([v_mem_BxMxKxH, v_BxTxKxH], axis=1), key_src_SxE)
        q_ext = extend(q_BxTxNxH.astype(k_ext.dtype), query_src_SxE)
        length_BS = jnp.tile(length_S, b)
        out_BSxExNxH = jax.nn.dot_product_attention(
            q_ext, k_ext, v_ext, is_causal=True, query_seq_lengths=length_BS,
            key_value_seq_lengths=length_BS,
            implementation=self.implementation or kernel_for(q_ext))  # GQA native: N % K == 0
        out_BxTxNxH = jnp.take(out_BSxExNxH.reshape(b, s * e, n, h), out_row_T, axis=1)
        return out_BxTxNxH.astype(v_BxTxKxH.dtype)
