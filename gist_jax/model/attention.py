"""Grouped-query attention with explicit positions and an explicit attention specification.

The model never invents positions or masks: whoever lays out the tokens (plain causal LM,
gist layouts, decoding) builds an ``AttentionSpec`` and the attention layer obeys it. That is
what lets compression plug in without touching the model.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from gist_jax.model.config import ModelConfig
from gist_jax.model.layers import apply_rope, kernel_init, rope_inverse_frequencies
from gist_jax.model.remat import ATTN_OUT, QKV_PROJ
from gist_jax.sharding import BATCH_LENGTH_HEADS, BATCH_LENGTH_KV_HEADS, constrain


@flax.struct.dataclass
class AttentionSpec:
    """Where every token sits and what every query may see.

    positions: [B, T] int RoPE position of each token (as query and as key).
    mask:      [B, T, S] bool, True where query t may attend key s; None means causal.
    valid:     [B, T] bool, False for padding tokens, which no query attends to.
    """

    positions: jax.Array
    mask: jax.Array | None = None
    valid: jax.Array | None = None

    @classmethod
    def causal(cls, batch: int, length: int, valid: jax.Array | None = None) -> "AttentionSpec":
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        return cls(positions=positions, valid=valid)

    def dense_mask(self) -> jax.Array:
        """[B, T, T] boolean mask: the explicit mask (or causal) minus padded keys."""
        b, t = self.positions.shape
        if self.mask is None:
            mask_BxTxS = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        else:
            mask_BxTxS = self.mask
        if self.valid is not None:
            mask_BxTxS = mask_BxTxS & self.valid[:, None, :]
        return mask_BxTxS


def dot_product_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                          mask_BxTxS: jax.Array) -> jax.Array:
    """Dense reference attention (materialises [T, S] scores); softmax in float32.

    A fully masked query row (padding) gets a uniform average instead of NaN, so padding
    never poisons gradients.
    """
    b, t, n, h = q_BxTxNxH.shape
    kv_heads = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
    scores_BxKxGxTxS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BxTxKxGxH, k_BxSxKxH,
                                  preferred_element_type=jnp.float32) * (h ** -0.5)
    big_negative = jnp.finfo(jnp.float32).min
    scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS, big_negative)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BxKxGxTxS, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(b, t, n, h)


class Attention(nn.Module):
    cfg: ModelConfig

    def _proj(self, heads: int, axes: tuple[str, str, str], name: str) -> nn.DenseGeneral:
        cfg = self.cfg
        return nn.DenseGeneral(
            (heads, cfg.head_dim), use_bias=cfg.qkv_bias, dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype, kernel_init=kernel_init(axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]), name=name,
        )

    @nn.compact
    def __call__(self, x_BxTxE: jax.Array, spec: AttentionSpec) -> jax.Array:
        cfg = self.cfg
        q_BxTxNxH = self._proj(cfg.num_heads, ("embed", "q_heads", "head_dim"), "q_proj")(x_BxTxE)
        k_BxTxKxH = self._proj(cfg.num_kv_heads, ("embed", "kv_heads", "head_dim"), "k_proj")(x_BxTxE)
        v_BxTxKxH = self._proj(cfg.num_kv_heads, ("embed", "kv_heads", "head_dim"), "v_proj")(x_BxTxE)
        q_BxTxNxH = checkpoint_name(q_BxTxNxH, QKV_PROJ[0])
        k_BxTxKxH = checkpoint_name(k_BxTxKxH, QKV_PROJ[1])
        v_BxTxKxH = checkpoint_name(v_BxTxKxH, QKV_PROJ[2])

        inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q_BxTxNxH = constrain(apply_rope(q_BxTxNxH, spec.positions, inv_freq), BATCH_LENGTH_HEADS)
        k_BxTxKxH = constrain(apply_rope(k_BxTxKxH, spec.positions, inv_freq), BATCH_LENGTH_KV_HEADS)

        out_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, spec.dense_mask())
        out_BxTxNxH = checkpoint_name(out_BxTxNxH, ATTN_OUT)
        return nn.DenseGeneral(
            cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype,
            kernel_init=kernel_init(("q_heads", "head_dim", "embed")), name="o_proj",
        )(out_BxTxNxH)
