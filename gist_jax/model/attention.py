"""Grouped-query attention with explicit positions and an explicit attention specification.

The model never invents positions or masks: whoever lays out the tokens (plain causal LM,
gist layouts, decoding) builds an ``AttentionSpec`` and the attention layer obeys it. That is
what lets compression plug in without touching the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Self

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gist_jax.model.causal import causal_attention, dot_product_attention
from gist_jax.model.config import ModelConfig
from gist_jax.model.context_causal import context_causal_attention, split_over_context
from gist_jax.model.layers import apply_rope, kernel_init, rope_inverse_frequencies
from gist_jax.model.matmul import projection_dot_general
from gist_jax.model.remat import ATTN_OUT, QKV_PROJ
from gist_jax.model.sharding import BATCH_LENGTH_HEADS, BATCH_LENGTH_KV_HEADS, constrain


class AttentionStructure(Protocol):
    """What ``AttentionSpec.structure`` holds: an attention that needs no dense masks
    (``gist/structured.py``, ``flash.py``, ``split.py``, ``bank.py``). Queries arrive rotated at
    ``spec.positions``, keys un-rotated; returns [B, T, N, H] in the value dtype."""

    def attend(self, q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
               spec: AttentionSpec, inv_freq: jax.Array) -> jax.Array: ...


@flax.struct.dataclass
class AttentionSpec:
    """Where every token sits, what it is, and what every query may see.

    positions:       [B, T] RoPE position of each token, as query and as key of its own part.
    mask:            [B, T, T] bool, query t may see key s (keys rotated at ``positions``);
                     None means causal.
    valid:           [B, T] bool, False for padding tokens, which no query attends to.
    memory_positions [B, T] (optional): a second position for every key, used where a token is
                     seen as memory by a later segment (gist compression, "compressed" scheme).
    memory_mask:     [B, T, T] bool: pairs that see the key rotated at ``memory_positions``.
                     Disjoint from ``mask``.
    prefix_valid:    [B, M] bool (optional): slots of an external per-layer KV memory (carried
                     between segments) that are filled; the memory itself is a model input.
    prefix_mask:     [B, T, M] bool (optional): per query, which external memory slots it sees,
                     used instead of ``prefix_valid`` where visibility differs between the
                     queries of one call (UniGist's sliding window in a cached chunk).
    is_gist:         [B, T] bool (optional): gist tokens (own embedding, own projections).
    gist_slot:       [B, T] int (optional): row of the gist embedding table for each gist.
    structure:       (optional) a pytree with ``attend(q_rot, k, v, spec, inv_freq)`` that
                     computes this attention without dense masks (``gist/structured.py``);
                     used instead of ``mask``/``memory_mask`` when there is no external memory.
    stop_gist_memory_gradient: hold the gist memory fixed (no gradient through the memory
                     view's gist keys/values); used by truncation and the no-leak tests.
    """

    positions: jax.Array
    mask: jax.Array | None = None
    valid: jax.Array | None = None
    memory_positions: jax.Array | None = None
    memory_mask: jax.Array | None = None
    prefix_valid: jax.Array | None = None
    prefix_mask: jax.Array | None = None
    is_gist: jax.Array | None = None
    gist_slot: jax.Array | None = None
    structure: AttentionStructure | None = None
    stop_gist_memory_gradient: bool = flax.struct.field(pytree_node=False, default=False)

    if TYPE_CHECKING:  # added by flax.struct.dataclass at runtime
        def replace(self, **updates: Any) -> Self: ...

    @classmethod
    def causal(cls, batch: int, length: int, valid: jax.Array | None = None) -> AttentionSpec:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        return cls(positions=positions, valid=valid)

    def is_plain_causal(self) -> bool:
        """Causal by index with at most key padding: a plain causal kernel computes this spec
        (``causal.causal_attention``) without building ``dense_mask``."""
        return self.mask is None and self.memory_positions is None and self.structure is None

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


@flax.struct.dataclass
class LayerMemory:
    """External keys/values seen before the current tokens (one layer, or stacked over layers).

    Keys are stored already rotated at their memory positions, so a cache never re-rotates.
    """

    k_BxMxKxH: jax.Array
    v_BxMxKxH: jax.Array


class Attention(nn.Module):
    """GQA over up to three key sets, each with its own mask, merged in one softmax:
    an external memory (sequential/cached processing), the tokens themselves rotated at their
    own positions, and the same tokens rotated at their memory positions (parallel gist path).
    """

    cfg: ModelConfig

    def _proj(self, heads: int, axes: tuple[str, str, str], name: str) -> nn.DenseGeneral:
        cfg = self.cfg
        return nn.DenseGeneral(
            (heads, cfg.head_dim), use_bias=cfg.qkv_bias, dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype, kernel_init=kernel_init(axes), dot_general=projection_dot_general,
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]), name=name,
        )

    def _qkv(self, x_BxTxE: jax.Array, spec: AttentionSpec, prefix: str) -> list[jax.Array]:
        cfg = self.cfg
        q_axes, kv_axes = ("embed", "q_heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        return [self._proj(cfg.num_heads, q_axes, f"{prefix}q_proj")(x_BxTxE),
                self._proj(cfg.num_kv_heads, kv_axes, f"{prefix}k_proj")(x_BxTxE),
                self._proj(cfg.num_kv_heads, kv_axes, f"{prefix}v_proj")(x_BxTxE)]

    @nn.compact
    def __call__(self, x_BxTxE: jax.Array, spec: AttentionSpec,
                 memory: LayerMemory | None = None) -> jax.Array:
        cfg = self.cfg
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = self._qkv(x_BxTxE, spec, "")
        if cfg.gist_projections:
            # Gist tokens use their own projections (Activation Beacon); raw tokens the base ones.
            gist_qkv = self._qkv(x_BxTxE, spec, "gist_")
            assert spec.is_gist is not None, "gist projections need spec.is_gist"
            is_gist = spec.is_gist[:, :, None, None]
            q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = (
                jnp.where(is_gist, g, b) for g, b in zip(gist_qkv, (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)))
        q_BxTxNxH = checkpoint_name(q_BxTxNxH, QKV_PROJ[0])
        k_BxTxKxH = checkpoint_name(k_BxTxKxH, QKV_PROJ[1])
        v_BxTxKxH = checkpoint_name(v_BxTxKxH, QKV_PROJ[2])
        # Un-rotated keys and values, for whoever builds a memory from them (sequential path).
        self.sow("intermediates", "kv", (k_BxTxKxH, v_BxTxKxH))

        inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q_BxTxNxH = constrain(apply_rope(q_BxTxNxH, spec.positions, inv_freq), BATCH_LENGTH_HEADS)
        if spec.structure is not None and memory is None:
            out_BxTxNxH = spec.structure.attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, spec, inv_freq)
            return self._o_proj(checkpoint_name(out_BxTxNxH, ATTN_OUT))
        if spec.is_plain_causal() and memory is None and cfg.kernels.causal != "dense":
            # No gists, no memory: the fast causal kernel (model.attention's causal part), O(T) memory.
            k_rot_BxTxKxH = constrain(apply_rope(k_BxTxKxH, spec.positions, inv_freq),
                                      BATCH_LENGTH_KV_HEADS)
            if split_over_context(q_BxTxNxH):  # TIE's reference pass under context parallelism
                out_BxTxNxH = context_causal_attention(q_BxTxNxH, k_rot_BxTxKxH, v_BxTxKxH, spec.valid)
            else:
                out_BxTxNxH = causal_attention(q_BxTxNxH, k_rot_BxTxKxH, v_BxTxKxH, spec.valid,
                                               impl=cfg.kernels.causal)
            return self._o_proj(checkpoint_name(out_BxTxNxH, ATTN_OUT))
        keys, values, masks = [], [], []
        b, t = spec.positions.shape
        if memory is not None:
            assert spec.prefix_valid is not None, "an external memory needs spec.prefix_valid"
            keys.append(memory.k_BxMxKxH)
            values.append(memory.v_BxMxKxH)
            masks.append(spec.prefix_mask if spec.prefix_mask is not None else
                         jnp.broadcast_to(spec.prefix_valid[:, None, :], (b, t, spec.prefix_valid.shape[1])))
        keys.append(constrain(apply_rope(k_BxTxKxH, spec.positions, inv_freq), BATCH_LENGTH_KV_HEADS))
        values.append(v_BxTxKxH)
        masks.append(spec.dense_mask())
        if spec.memory_positions is not None:
            # Dense path: memory positions come with their mask (a structured spec has none,
            # and took the structure's path above unless an external memory is given).
            assert spec.memory_mask is not None, "spec.memory_positions without spec.memory_mask"
            k_mem, v_mem = apply_rope(k_BxTxKxH, spec.memory_positions, inv_freq), v_BxTxKxH
            if spec.stop_gist_memory_gradient:
                assert spec.is_gist is not None, "stop_gist_memory_gradient needs spec.is_gist"
                hold = spec.is_gist[:, :, None, None]
                k_mem = jnp.where(hold, jax.lax.stop_gradient(k_mem), k_mem)
                v_mem = jnp.where(hold, jax.lax.stop_gradient(v_mem), v_mem)
            keys.append(k_mem)
            values.append(v_mem)
            memory_mask = spec.memory_mask
            if spec.valid is not None:
                memory_mask = memory_mask & spec.valid[:, None, :]
            masks.append(memory_mask)

        def cat(xs):
            return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=1 if xs[0].ndim == 4 else 2)

        out_BxTxNxH = dot_product_attention(q_BxTxNxH, cat(keys), cat(values), cat(masks))
        out_BxTxNxH = checkpoint_name(out_BxTxNxH, ATTN_OUT)
        return self._o_proj(out_BxTxNxH)

    def _o_proj(self, out_BxTxNxH: jax.Array) -> jax.Array:
        cfg = self.cfg
        return nn.DenseGeneral(
            cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype, dot_general=projection_dot_general,
            kernel_init=kernel_init(("q_heads", "head_dim", "embed")), name="o_proj",
        )(out_BxTxNxH)
