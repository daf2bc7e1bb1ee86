"""The decoder: embedding, a stack of pre-norm blocks (scanned or unrolled), final norm, head.

Parameter tree (unscanned): ``embed/embedding``, ``layers_{i}/{attn,mlp,attn_norm,mlp_norm}``,
``final_norm/scale``, ``lm_head/kernel`` (untied only). Scanned: ``layers/...`` with a leading
``layers`` axis on every leaf. ``stack_layers`` / ``unstack_layers`` convert between the two,
so checkpoints and importers can work in either layout.
"""

from __future__ import annotations

from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from gist_jax.model.attention import Attention, AttentionSpec, LayerMemory
from gist_jax.model.config import ModelConfig
from gist_jax.model.layers import Mlp, RMSNorm, kernel_init
from gist_jax.model.matmul import projection_dot_general
from gist_jax.model.remat import REMAT_POLICIES
from gist_jax.model.sharding import BATCH_LENGTH_EMBED, BATCH_LENGTH_VOCAB, constrain

Params = dict[str, Any]


class Block(nn.Module):
    """Pre-norm transformer block; returns ``(x, None)`` so it can be the body of ``nn.scan``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxE: jax.Array, spec: AttentionSpec,
                 memory: LayerMemory | None = None) -> tuple[jax.Array, None]:
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.storage_dtype,  # noqa: E731
                                    name=name)
        x_BxTxE = x_BxTxE + Attention(cfg, name="attn")(norm("attn_norm")(x_BxTxE), spec, memory)
        x_BxTxE = x_BxTxE + Mlp(cfg, name="mlp")(norm("mlp_norm")(x_BxTxE))
        return constrain(x_BxTxE, BATCH_LENGTH_EMBED), None


def _block_class(cfg: ModelConfig) -> type[nn.Module]:
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy == "none":
        return Block
    # Under scan, XLA cannot CSE across iterations, so prevent_cse is unnecessary there.
    return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


class Decoder(nn.Module):
    """Decoder-only LM.

    Inputs beyond tokens: gist tokens (``spec.is_gist``) take rows of the gist embedding table;
    ``input_embeds`` replaces the embedding wherever ``input_embeds_mask`` is True (everywhere
    if no mask), which is how recurrent memory and tests feed embeddings; ``memory`` is an
    external KV memory with a leading layer axis (sequential gist processing, caches).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT: jax.Array, spec: AttentionSpec, *,
                 input_embeds_BxTxE: jax.Array | None = None,
                 input_embeds_mask_BxT: jax.Array | None = None,
                 memory: LayerMemory | None = None,
                 return_hidden: bool = False, head: bool = True
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Float32 logits ``[B, T, V]``; ``(logits, hidden)`` with ``return_hidden``; with
        ``head=False`` only the final-norm hidden states ``[B, T, E]``, for losses that apply
        the head chunk-wise to the rows that need it (``gist_jax/model/loss.py``)."""
        cfg = self.cfg
        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")),
            name="embed",
        )
        x_BxTxE = embed(tokens_BxT)
        if cfg.num_gist_embeddings:
            assert spec.is_gist is not None and spec.gist_slot is not None, (
                "a model with gist embeddings needs spec.is_gist and spec.gist_slot")
            # flax types param() without unbox= as the initializer's box, but it unboxes by default.
            gist_GxE: jax.Array = self.param(  # type: ignore[assignment]
                "gist_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                (cfg.num_gist_embeddings, cfg.hidden_size), cfg.storage_dtype)
            gist_BxTxE = jnp.take(gist_GxE, spec.gist_slot, axis=0).astype(x_BxTxE.dtype)
            x_BxTxE = jnp.where(spec.is_gist[..., None], gist_BxTxE, x_BxTxE)
        if input_embeds_BxTxE is not None:
            chosen = True if input_embeds_mask_BxT is None else input_embeds_mask_BxT[..., None]
            x_BxTxE = jnp.where(chosen, input_embeds_BxTxE.astype(x_BxTxE.dtype), x_BxTxE)
        x_BxTxE = constrain(x_BxTxE.astype(cfg.compute_dtype), BATCH_LENGTH_EMBED)

        block = _block_class(cfg)
        if cfg.scan_layers:
            stack = nn.scan(
                block, variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True}, in_axes=(nn.broadcast, 0), length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxTxE, _ = stack(cfg, name="layers")(x_BxTxE, spec, memory)
        else:
            for i in range(cfg.num_layers):
                layer_memory = None if memory is None else jax.tree.map(lambda m, i=i: m[i], memory)
                x_BxTxE, _ = block(cfg, name=f"layers_{i}")(x_BxTxE, spec, layer_memory)

        hidden_BxTxE = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.storage_dtype,
                               name="final_norm")(x_BxTxE)
        if not head:
            return hidden_BxTxE
        if cfg.tie_embeddings:
            logits_BxTxV = embed.attend(hidden_BxTxE)
        else:
            logits_BxTxV = nn.DenseGeneral(
                cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                param_dtype=cfg.storage_dtype, kernel_init=kernel_init(("embed", "vocab")),
                dot_general=projection_dot_general, name="lm_head",
            )(hidden_BxTxE)
        logits_BxTxV = constrain(logits_BxTxV, BATCH_LENGTH_VOCAB).astype(jnp.float32)
        return (logits_BxTxV, hidden_BxTxE) if return_hidden else logits_BxTxV


def _dummy_inputs(batch: int = 1, length: int = 8) -> tuple[jax.Array, AttentionSpec]:
    spec = AttentionSpec.causal(batch, length)
    spec = spec.replace(is_gist=jnp.zeros((batch, length), bool),
                        gist_slot=jnp.zeros((batch, length), jnp.int32))
    return jnp.zeros((batch, length), jnp.int32), spec


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters as plain arrays (partitioning boxes removed)."""
    return nn.unbox(Decoder(cfg).init(rng, *_dummy_inputs())["params"])


def param_logical_specs(cfg: ModelConfig) -> Params:
    """Tree of logical ``PartitionSpec``s matching ``init_params``, computed without FLOPs."""
    boxed = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), *_dummy_inputs()))
    return nn.get_partition_spec(boxed)["params"]


def forward(cfg: ModelConfig, params: Params, tokens_BxT: jax.Array,
            spec: AttentionSpec | None = None) -> jax.Array:
    """Float32 logits [B, T, V]; causal positions 0..T-1 unless a spec is given."""
    if spec is None:
        spec = AttentionSpec.causal(tokens_BxT.shape[0], tokens_BxT.shape[1])
    return cast(jax.Array, Decoder(cfg).apply({"params": params}, tokens_BxT, spec))


def collect_kv(intermediates: dict, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Un-rotated keys and values sown by every layer -> ([L, B, T, K, H], [L, B, T, K, H])."""
    if cfg.scan_layers:
        return intermediates["layers"]["attn"]["kv"][0]
    per_layer = [intermediates[f"layers_{i}"]["attn"]["kv"][0] for i in range(cfg.num_layers)]
    return jnp.stack([k for k, _ in per_layer]), jnp.stack([v for _, v in per_layer])


def stack_layers(params: Params, num_layers: int) -> Params:
    """Unscanned tree (``layers_{i}``) -> scanned tree (``layers`` with a leading axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return out


def unstack_layers(params: Params) -> Params:
    """Scanned tree -> unscanned tree."""
    out = {k: v for k, v in params.items() if k != "layers"}
    num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def to_layout(params: Params, cfg: ModelConfig) -> Params:
    """Return params in the layer layout ``cfg.scan_layers`` asks for, whichever they are in."""
    is_scanned = "layers" in params
    if cfg.scan_layers and not is_scanned:
        return stack_layers(params, cfg.num_layers)
    if not cfg.scan_layers and is_scanned:
        return unstack_layers(params)
    return params
