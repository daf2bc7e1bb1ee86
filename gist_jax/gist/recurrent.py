"""Coarse-Rec's training forward: a scan over segments whose backward holds the memory once.

Step i runs ``[sinks | memory buffer | segment i raw + gists]`` causally; memory slots of
segments >= i are masked out, so one compiled step serves every segment, and step i writes its
gists' post-norm last-layer states into the buffer's block i.

Why a custom backward: differentiating a ``lax.scan`` keeps every step's inputs (here the whole
``[B, S * slots, E]`` buffer) and, without remat, every step's activations over its
``s + S * slots + Ts`` rows, so the step's memory grew as O(S^2) in the segment count (0.080 /
0.188 / 0.535 GiB at 2K / 4K / 8K tokens, docs/performance.md). The buffer is append-only:
block j is written once, by step j, and never changed. So the memory step i saw is the final
buffer with blocks >= i zeroed, and the backward needs nothing per step. ``_segments``' backward
is a reverse scan that rebuilds that memory, recomputes step i under ``jax.vjp`` and carries one
buffer-sized cotangent: what it holds is O(S), and the cost is one more forward of each step
(what ``jax.checkpoint`` at segment boundaries cost before, now whatever the remat policy; the
model's own ``remat_policy`` still applies inside a step). Values are the scan's own;
gradients equal plain autodiff's (tests/test_gist_parity.py, against the sequential reference).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, cast

import jax
import jax.numpy as jnp

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import LayoutShape
from gist_jax.gist.specs import LayoutArrays, embedding_rows, gather_raw, pad_raw, raw_embed_inputs
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.config import ModelConfig
from gist_jax.model.transformer import Decoder, Params, collect_kv

LayerKV = tuple[jax.Array, jax.Array]  # one layer's un-rotated (k, v), [B, T, K, H] each


@dataclasses.dataclass(frozen=True)
class _Static:
    """What shapes the step and is not an array (hashable: ``custom_vjp``'s static argument)."""

    cfg: ModelConfig
    comp: CompressionConfig
    shape: LayoutShape
    batch: int
    head: bool
    kv_layer: int | None
    stop_memory_gradient: bool
    raw_embeds: bool  # probing with raw-token embeddings (sinks and segment tokens)

    @property
    def memory_slots(self) -> int:
        return self.shape.num_segments * self.shape.slots

    @property
    def prefix(self) -> int:
        return self.shape.num_sinks + self.memory_slots


def _segment(st: _Static, consts: dict[str, jax.Array], params: Params, sink_embeds: jax.Array | None,
             memory_BxMxE: jax.Array, x: dict[str, jax.Array], seg_embeds: jax.Array | None
             ) -> tuple[jax.Array, tuple[jax.Array, tuple[jax.Array, ...]]]:
    """One segment step: (its gists' states ``[B, slots, E]``, (per-token output, layer KV))."""
    cfg, comp, shape, b = st.cfg, st.comp, st.shape, st.batch
    s, mem, prefix = shape.num_sinks, st.memory_slots, st.prefix
    i = x["i"]
    if comp.bptt_segments:
        hold = (consts["mem_seg"] < i - comp.bptt_segments)[None, :, None]
        memory_BxMxE = jnp.where(hold, jax.lax.stop_gradient(memory_BxMxE), memory_BxMxE)
    if st.stop_memory_gradient:
        memory_BxMxE = jax.lax.stop_gradient(memory_BxMxE)
    tokens = jnp.concatenate([consts["sink_tokens"], jnp.zeros((b, mem), consts["sink_tokens"].dtype),
                              x["tokens"]], axis=1)
    valid = jnp.concatenate([consts["sink_live"] & (i > 0), consts["mem_live"] & (consts["mem_seg"] < i),
                             x["alive"]])
    spec = AttentionSpec(
        positions=jnp.broadcast_to(jnp.concatenate([consts["sink_pos"], consts["mem_pos"], x["position"]]),
                                   tokens.shape),
        valid=jnp.broadcast_to(valid, tokens.shape),
        is_gist=jnp.broadcast_to(jnp.concatenate([jnp.zeros(prefix, bool), x["is_gist"]]), tokens.shape),
        gist_slot=jnp.broadcast_to(jnp.concatenate([jnp.zeros(prefix, jnp.int32), x["row"]]), tokens.shape))
    dtype = memory_BxMxE.dtype
    if seg_embeds is None:
        seg_embeds = jnp.zeros((b, shape.segment_tokens, cfg.hidden_size), dtype)
    first = jnp.zeros((b, s, cfg.hidden_size), dtype) if sink_embeds is None else sink_embeds
    input_embeds = jnp.concatenate([first.astype(dtype), memory_BxMxE, seg_embeds.astype(dtype)], axis=1)
    embeds_mask = jnp.concatenate([jnp.full((s,), st.raw_embeds), jnp.ones(mem, bool),
                                   (~x["is_gist"]) & st.raw_embeds])
    outputs = Decoder(cfg).apply(
        {"params": params}, tokens, spec, input_embeds_BxTxE=input_embeds,
        input_embeds_mask_BxT=jnp.broadcast_to(embeds_mask, tokens.shape), return_hidden=True,
        head=st.head, mutable=["intermediates"] if st.kv_layer is not None else False)
    layer_kv: tuple[jax.Array, ...] = ()
    if st.kv_layer is not None:
        outputs, state = outputs
        k_all, v_all = collect_kv(state["intermediates"], cfg)
        layer_kv = (k_all[st.kv_layer][:, prefix:], v_all[st.kv_layer][:, prefix:])
    # Per-token output: logits, or (head=False) the hidden states themselves.
    if st.head:
        out_BxTxV, hidden_BxTxE = cast(tuple[jax.Array, jax.Array], outputs)
    else:
        out_BxTxV = hidden_BxTxE = cast(jax.Array, outputs)
    seg_len = shape.segment_length
    gist_states = hidden_BxTxE[:, prefix + seg_len:prefix + seg_len + shape.slots]
    return gist_states, (out_BxTxV[:, prefix:], layer_kv)


def _forward(st: _Static, consts: dict[str, jax.Array], params: Params, sink_embeds: jax.Array | None,
             xs: dict[str, jax.Array], xs_embeds: jax.Array | None) -> tuple[jax.Array, Any]:
    """The scan: (final memory buffer, per-step outputs stacked ``[S, ...]``)."""
    slots = st.shape.slots

    def step(memory_BxMxE, inputs):
        x, seg_embeds = inputs
        states, out = _segment(st, consts, params, sink_embeds, memory_BxMxE, x, seg_embeds)
        memory_BxMxE = jax.lax.dynamic_update_slice(
            memory_BxMxE, states.astype(memory_BxMxE.dtype), (0, x["i"] * slots, 0))
        return memory_BxMxE, out

    memory0 = jnp.zeros((st.batch, st.memory_slots, st.cfg.hidden_size), st.cfg.compute_dtype)
    return jax.lax.scan(step, memory0, (xs, xs_embeds))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _segments(st: _Static, consts: dict[str, jax.Array], params: Params, sink_embeds: jax.Array | None,
              xs: dict[str, jax.Array], xs_embeds: jax.Array | None) -> Any:
    return _forward(st, consts, params, sink_embeds, xs, xs_embeds)[1]


def _segments_fwd(st, consts, params, sink_embeds, xs, xs_embeds):
    memory_final, outs = _forward(st, consts, params, sink_embeds, xs, xs_embeds)
    return outs, (consts, params, sink_embeds, xs, xs_embeds, memory_final)


def _segments_bwd(st, residuals, g_outs):
    consts, params, sink_embeds, xs, xs_embeds, memory_final = residuals
    slots = st.shape.slots
    block_M = jnp.arange(st.memory_slots) // max(slots, 1)

    def back(carry, inputs):
        g_memory, g_params, g_sinks = carry
        x, seg_embeds, g_out = inputs
        i = x["i"]
        seen = (block_M < i)[None, :, None]  # what step i's memory held: blocks written before it
        memory_i = jnp.where(seen, memory_final, jnp.zeros_like(memory_final))
        _, vjp = jax.vjp(lambda p, se, m, xe: _segment(st, consts, p, se, m, x, xe),
                         params, sink_embeds, memory_i, seg_embeds)
        g_states = jax.lax.dynamic_slice_in_dim(g_memory, i * slots, slots, axis=1)
        gp, gs, gm, g_seg = vjp((g_states.astype(memory_final.dtype), g_out))
        g_memory = g_memory + jnp.where(seen, gm, jnp.zeros_like(gm)).astype(g_memory.dtype)
        g_params = jax.tree.map(jnp.add, g_params, gp)
        g_sinks = None if g_sinks is None else g_sinks + gs
        return (g_memory, g_params, g_sinks), g_seg

    init = (jnp.zeros_like(memory_final), jax.tree.map(jnp.zeros_like, params),
            None if sink_embeds is None else jnp.zeros_like(sink_embeds))
    (_, g_params, g_sinks), g_xs_embeds = jax.lax.scan(back, init, (xs, xs_embeds, g_outs), reverse=True)
    return None, g_params, g_sinks, None, g_xs_embeds


_segments.defvjp(_segments_fwd, _segments_bwd)


def recurrent_scan(cfg: ModelConfig, comp: CompressionConfig, shape: LayoutShape, params: Params,
                   tokens_BxN: jax.Array, arrays: LayoutArrays, *,
                   raw_embeds_BxNxE: jax.Array | None = None,
                   stop_gist_memory_gradient: bool = False, kv_layer: int | None = None,
                   head: bool = True) -> jax.Array | tuple[jax.Array, LayerKV]:
    """Coarse-Rec in layout order: logits ``[B, T, V]`` (``head=False``: hidden states), and
    ``(k, v)`` of layer ``kv_layer`` when given. Gradients reach at most ``comp.bptt_segments``
    segments back through the memory (0: all); ``stop_gist_memory_gradient`` stops them all."""
    b = tokens_BxN.shape[0]
    s, nseg = shape.num_sinks, shape.num_segments
    tokens_BxN = pad_raw(tokens_BxN, shape)

    def per_segment(x_BxT):  # [B, T, ...] -> [S, B, Ts, ...]
        return x_BxT.reshape((x_BxT.shape[0], nseg, shape.segment_tokens) + x_BxT.shape[2:]).swapaxes(0, 1)

    def per_segment_1d(x_T):  # [T] -> [S, Ts]
        return x_T.reshape(nseg, shape.segment_tokens)

    embeds = raw_embed_inputs(raw_embeds_BxNxE, shape, arrays["raw_index"])
    xs = {"i": jnp.arange(nseg), "tokens": per_segment(gather_raw(tokens_BxN, arrays["raw_index"])),
          "position": per_segment_1d(arrays["position"]), "alive": per_segment_1d(arrays["alive"]),
          "is_gist": per_segment_1d(arrays["is_gist"]),
          "row": per_segment_1d(embedding_rows(arrays["gist_slot"], comp))}
    xs_embeds = per_segment(embeds["input_embeds_BxTxE"]) if embeds else None
    sink_embeds = None if raw_embeds_BxNxE is None else pad_raw(raw_embeds_BxNxE, shape)[:, :s]
    consts = {"sink_tokens": tokens_BxN[:, :s], "sink_pos": arrays["buffer_position"][:s],
              "sink_live": arrays["buffer_live"][:s], "mem_pos": arrays["buffer_position"][s:],
              "mem_live": arrays["buffer_live"][s:], "mem_seg": arrays["buffer_segment"][s:]}
    st = _Static(cfg, comp, shape, b, head, kv_layer, stop_gist_memory_gradient, bool(embeds))
    out_SxBxTs, layer_kv = _segments(st, consts, params, sink_embeds, xs, xs_embeds)

    def layout_order(x_SxBxTs):  # [S, B, Ts, ...] -> [B, T, ...]
        return x_SxBxTs.swapaxes(0, 1).reshape((b, shape.length) + x_SxBxTs.shape[3:])

    if kv_layer is None:
        return layout_order(out_SxBxTs)
    k_SxBxTsxKxH, v_SxBxTsxKxH = layer_kv
    return layout_order(out_SxBxTs), (layout_order(k_SxBxTsxKxH), layout_order(v_SxBxTsxKxH))
