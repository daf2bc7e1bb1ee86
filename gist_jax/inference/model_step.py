"""The two model calls every cached feed makes, shared by chunked (``decode.py``) and windowed
(``window.py``) inference: rotate stored keys, and run the decoder collecting its un-rotated KV."""

from __future__ import annotations

from typing import Any

import jax

from gist_jax.model.attention import AttentionSpec, LayerMemory
from gist_jax.model.config import ModelConfig
from gist_jax.model.layers import apply_rope, rope_inverse_frequencies
from gist_jax.model.transformer import Decoder, Params, collect_kv


def rotate_keys(cfg: ModelConfig, k_LxBxTxKxH: jax.Array, pos_BxT: jax.Array) -> jax.Array:
    """Keys of every layer rotated at ``pos`` (the model rotates queries and its own keys the
    same way, so a key rotated once here is what the attention would have computed)."""
    inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return jax.vmap(lambda k: apply_rope(k, pos_BxT, inv_freq))(k_LxBxTxKxH)


def run_decoder(cfg: ModelConfig, params: Params, tokens_BxC: jax.Array, spec: AttentionSpec,
                memory: LayerMemory | None, embeds: tuple[jax.Array, jax.Array] | None = None
                ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """(logits [B, C, V], post-norm hidden [B, C, E], un-rotated (k, v) [layers, B, C, K, H])."""
    kwargs: dict[str, Any] = {} if embeds is None else {"input_embeds_BxTxE": embeds[0],
                                                        "input_embeds_mask_BxT": embeds[1]}
    (logits, hidden), state = Decoder(cfg).apply({"params": params}, tokens_BxC, spec, memory=memory,
                                                 return_hidden=True, mutable=["intermediates"], **kwargs)
    return logits, hidden, collect_kv(state["intermediates"], cfg)
