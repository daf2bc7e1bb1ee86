"""The sequential reference: one segment at a time against an explicit carried memory.

KV variants carry ``KVMemory`` (per layer: keys rotated at their memory positions, values,
and which slots are filled); Coarse-Rec carries the post-norm last-layer gist states. Nothing
is padded or masked ahead: each segment sees exactly what the method says, which makes this
the reference the parallel paths are tested against, and the shape compressed inference uses.
"""

from __future__ import annotations

from typing import Any, cast

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import GistLayout
from gist_jax.gist.specs import embedding_rows, gather_raw, layout_arrays, pad_raw, raw_embed_inputs, segment_spec
from gist_jax.model.attention import AttentionSpec, LayerMemory
from gist_jax.model.config import ModelConfig
from gist_jax.model.layers import apply_rope, rope_inverse_frequencies
from gist_jax.model.transformer import Decoder, Params, collect_kv


@flax.struct.dataclass
class KVMemory:
    """Sinks + gist KV for every layer: k, v [layers, B, M, K, H]; valid [B, M]."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, size: int) -> KVMemory:
        shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype),
                   jnp.zeros((batch, size), bool))

    def append(self, cfg: ModelConfig, k_LxBxTxKxH: jax.Array, v_LxBxTxKxH: jax.Array,
               token_index: np.ndarray, slot: np.ndarray, position: np.ndarray) -> KVMemory:
        """Keep tokens ``token_index`` of a processed segment at memory ``slot``, keys rotated
        at their memory ``position``."""
        if len(token_index) == 0:
            return self
        inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        k_sel = k_LxBxTxKxH[:, :, token_index]
        pos_BxT = jnp.broadcast_to(jnp.asarray(position), k_sel.shape[1:3])
        k_rot = jax.vmap(lambda k: apply_rope(k, pos_BxT, inv_freq))(k_sel)
        return KVMemory(self.k.at[:, :, slot].set(k_rot.astype(self.k.dtype)),
                        self.v.at[:, :, slot].set(v_LxBxTxKxH[:, :, token_index].astype(self.v.dtype)),
                        self.valid.at[:, slot].set(True))


def sequential_kv(cfg: ModelConfig, comp: CompressionConfig, layout: GistLayout, params: Params,
                  tokens_BxN: jax.Array, *, raw_embeds_BxNxE: jax.Array | None = None
                  ) -> tuple[jax.Array, KVMemory]:
    """Fine-KV / Coarse-KV segment by segment; returns layout-order logits and final memory."""
    b = tokens_BxN.shape[0]
    arrays = layout_arrays(layout)
    tokens_BxT = gather_raw(pad_raw(tokens_BxN, layout.shape), arrays["raw_index"])
    memory = KVMemory.empty(cfg, b, layout.memory_size)
    outputs = []
    for i in range(layout.num_segments):
        sl = layout.segment_slice(i)
        spec = segment_spec(arrays, layout.shape, comp, i, b, memory.valid)
        logits, state = Decoder(cfg).apply(
            {"params": params}, tokens_BxT[:, sl], spec, memory=LayerMemory(memory.k, memory.v),
            mutable=["intermediates"], **raw_embed_inputs(raw_embeds_BxNxE, layout.shape, layout.raw_index[sl]))
        k_un, v = collect_kv(state["intermediates"], cfg)
        keep = np.nonzero(layout.memory_slot[sl] >= 0)[0]
        memory = memory.append(cfg, k_un, v, keep, layout.memory_slot[sl][keep],
                               layout.memory_position[sl][keep])
        outputs.append(logits)
    return jnp.concatenate(outputs, axis=1), memory


def sequential_recurrent(cfg: ModelConfig, comp: CompressionConfig, layout: GistLayout,
                         params: Params, tokens_BxN: jax.Array, *,
                         raw_embeds_BxNxE: jax.Array | None = None) -> jax.Array:
    """Coarse-Rec segment by segment with exact-length inputs ``[sinks ; memory ; segment]``."""
    b = tokens_BxN.shape[0]
    tokens_BxN = pad_raw(tokens_BxN, layout.shape)
    raw_embeds = None if raw_embeds_BxNxE is None else pad_raw(raw_embeds_BxNxE, layout.shape)
    rows = embedding_rows(layout.gist_slot, comp)
    sink_index = np.nonzero(layout.is_sink)[0]
    memory_states: list[jax.Array] = []
    memory_positions: list[np.ndarray] = []
    outputs: list[jax.Array] = []
    for i in range(layout.num_segments):
        sl = layout.segment_slice(i)
        raw_index = layout.raw_index[sl]
        seg_tokens = gather_raw(tokens_BxN, jnp.asarray(raw_index))
        sinks = sink_index if i > 0 else sink_index[:0]
        n_mem = sum(m.shape[1] for m in memory_states)
        prefix = len(sinks) + n_mem
        tokens = jnp.concatenate([tokens_BxN[:, :len(sinks)], jnp.zeros((b, n_mem), tokens_BxN.dtype),
                                  seg_tokens], axis=1)
        positions = np.concatenate([layout.memory_position[sinks], *memory_positions,
                                    layout.position[sl]]).astype(np.int32)

        def per_token(x, shape=tokens.shape):
            return jnp.broadcast_to(jnp.asarray(x), shape)

        spec = AttentionSpec(
            positions=per_token(positions),
            valid=per_token(np.concatenate([np.ones(prefix, bool), layout.alive[sl]])),
            is_gist=per_token(np.concatenate([np.zeros(prefix, bool), layout.is_gist[sl]])),
            gist_slot=per_token(np.concatenate([np.zeros(prefix, np.int32), rows[sl]])))
        k = comp.bptt_segments  # same truncation as the scan: older memory is a constant
        mem_E = [jax.lax.stop_gradient(m) if k and j < i - k else m for j, m in enumerate(memory_states)]
        # Input embeddings: memory states after the sinks; raw-token embeddings for the sinks and
        # the segment only when probing with raw_embeds; gists keep their gist embedding.
        probe = raw_embeds is not None

        def zeros(t):
            return jnp.zeros((b, t, cfg.hidden_size), cfg.compute_dtype)

        sink_E = zeros(len(sinks)) if raw_embeds is None else raw_embeds[:, :len(sinks)]
        seg_E = zeros(len(raw_index)) if raw_embeds is None else gather_raw(raw_embeds, jnp.asarray(raw_index))
        embeds = jnp.concatenate([x.astype(cfg.compute_dtype) for x in (sink_E, *mem_E, seg_E)], axis=1)
        embeds_mask = np.concatenate([np.full(len(sinks), probe), np.ones(n_mem, bool),
                                      (raw_index >= 0) & probe])
        logits, hidden = cast(tuple[jax.Array, jax.Array], Decoder(cfg).apply(
            {"params": params}, tokens, spec, input_embeds_BxTxE=embeds,
            input_embeds_mask_BxT=per_token(embeds_mask), return_hidden=True))
        live = np.nonzero(layout.is_gist[sl] & layout.alive[sl])[0]
        memory_states.append(hidden[:, prefix + live])
        memory_positions.append(layout.memory_position[sl][live])
        outputs.append(logits[:, prefix:])
    return jnp.concatenate(outputs, axis=1)


def sequential_logits(cfg: ModelConfig, comp: CompressionConfig, layout: GistLayout,
                      params: Params, tokens_BxN: jax.Array, **kwargs: Any) -> jax.Array:
    if comp.memory == "kv":
        return sequential_kv(cfg, comp, layout, params, tokens_BxN, **kwargs)[0]
    return sequential_recurrent(cfg, comp, layout, params, tokens_BxN, **kwargs)
