"""Attention over one key set with its log-sum-exp, and the exact merge of two such partials.

The building blocks of every kernel that splits a query's keys into disjoint sets (its own
segment, the gist memory, a window band): each set gives ``(output, lse)``, and the merge is the
softmax over their union. Reference-grade (dense scores per set); the blockwise kernels in
``structured.py`` and ``window.py`` compute the same quantities a tile at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gist_jax.model.kernels import NEG


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
