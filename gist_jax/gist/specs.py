"""From a host-side ``GistLayout`` to what the compiled model consumes: token ids in layout
order and ``AttentionSpec``s for the parallel pass, one segment, or one recurrent step.

Masks are built from per-token arrays inside the compiled function (broadcast comparisons),
so nothing of size T x T ever crosses from the host.
"""

from __future__ import annotations

from typing import TypedDict, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import GistLayout, LayoutShape
from gist_jax.model.attention import AttentionSpec, AttentionStructure
from gist_jax.model.sharding import constrain, context_size

LayoutArrays = dict[str, jax.Array]
_Rows = TypeVar("_Rows", np.ndarray, jax.Array)


class RawEmbedInputs(TypedDict, total=False):
    """``Decoder`` keyword arguments that feed raw-token embeddings (``raw_embed_inputs``)."""

    input_embeds_BxTxE: jax.Array
    input_embeds_mask_BxT: jax.Array
# The per-token [T] fields of ``layout_arrays`` (the rest index the raw sequence or the buffer).
TOKEN_FIELDS = ("raw_index", "segment", "is_gist", "is_sink", "alive", "gist_slot", "position",
           "memory_position", "memory_slot", "window_start")


def layout_host_arrays(layout: GistLayout) -> dict[str, np.ndarray]:
    """Per-token and memory-buffer layout arrays on the host: the data half of a layout, passed
    through jit next to the static ``layout.shape``. The training loop places them on its mesh in
    one ``device_put`` (``train/step_layouts.py``); ``layout_arrays`` puts them on the default
    device."""
    arrays = {k: np.asarray(getattr(layout, k)) for k in TOKEN_FIELDS}
    # raw_position[j]: where raw token j of the *padded* raw sequence sits in the layout (raw
    # tokens keep their order), [padded_raw]: its shape depends on layout.shape alone, so one
    # compilation serves every real length; callers cut it to their token width. On the host,
    # layout.live_raw_positions() selects the real raw tokens.
    arrays["raw_position"] = np.nonzero(layout.raw_index >= 0)[0].astype(np.int32)
    arrays.update({f"buffer_{k}": np.asarray(v) for k, v in memory_buffer_arrays(layout).items()})
    return arrays


def layout_arrays(layout: GistLayout) -> LayoutArrays:
    """``layout_host_arrays`` on the default device (evaluation, inference, tests)."""
    return {k: jnp.asarray(v) for k, v in layout_host_arrays(layout).items()}


def embedding_rows(gist_slot: _Rows, comp: CompressionConfig) -> _Rows:
    """Gist embedding row per token (numpy or jax in, same kind out)."""
    return gist_slot if comp.gist_embedding == "per_slot" else gist_slot * 0


def gather_raw(raw_BxN: jax.Array, raw_index_T: jax.Array) -> jax.Array:
    """Raw tokens (or embeddings) in layout order; gist slots get index 0 (overwritten later)."""
    return jnp.take(raw_BxN, jnp.maximum(raw_index_T, 0), axis=1)


def raw_rows(x_BxTx: jax.Array, arrays: LayoutArrays, num_raw: int,
             shape: LayoutShape | None = None) -> jax.Array:
    """Rows of layout-order activations (hidden states, logits) that belong to raw tokens
    0..num_raw-1, in raw order: the only rows with an LM label, gathered before the head so
    gists never reach it.

    With the sequence split over the mesh's ``context`` axis (and ``shape`` given), the rows
    are gathered segment by segment, ``[B, S, Ts] -> [B, S, L]``: a gather batched over
    segments stays on the device that holds them, where one gather over the whole layout
    axis would make XLA move every hidden row. The rows then come in the layout's segment order
    (``raw_row_order``)."""
    if shape is None or context_size() == 1:
        return jnp.take(x_BxTx, arrays["raw_position"][:num_raw], axis=1)
    s, ts, seg_len = shape.num_segments, shape.segment_tokens, shape.segment_length
    assert num_raw == s * seg_len, "context parallelism splits whole segments"
    in_segment_SxL = (arrays["raw_position"].reshape(s, seg_len)[physical_segments(arrays, shape)]
                      - (jnp.arange(s, dtype=jnp.int32) * ts)[:, None])
    rows = segment_take(x_BxTx, in_segment_SxL, shape)
    return rows.reshape((x_BxTx.shape[0], s * seg_len) + x_BxTx.shape[2:])


def raw_row_order(arrays: LayoutArrays, num_raw: int, shape: LayoutShape | None = None) -> jax.Array | None:
    """[num_raw]: the raw index of each row ``raw_rows`` returns, where that is not raw order
    (a layout whose segments are permuted, ``context_parallel.balanced_arrays``); else None.
    Callers take labels, masks and weights in this order (a local take of replicated rows)."""
    if shape is None or context_size() == 1:
        return None
    order_S = physical_segments(arrays, shape)
    return (order_S[:, None] * shape.segment_length + jnp.arange(shape.segment_length)).reshape(num_raw)


def physical_segments(arrays: LayoutArrays, shape: LayoutShape) -> jax.Array:
    """[S]: the segment each run of ``segment_tokens`` layout tokens holds (``arange(S)`` unless
    the segments were permuted; whole-segment layouts only)."""
    return arrays["segment"].reshape(shape.num_segments, shape.segment_tokens)[:, 0]


def segment_take(x_BxTx: jax.Array, in_segment_SxJ: jax.Array, shape: LayoutShape) -> jax.Array:
    """``[B, S, J, ...]``: from each segment of layout-order ``x`` (``[B, T, ...]``, whole
    segments), the rows at its in-segment indices. A gather batched over segments, with the
    segment axis on the ``context`` mesh axis before and after, stays on the device that holds
    the segment (context parallelism)."""
    s, ts = shape.num_segments, shape.segment_tokens
    b, rest = x_BxTx.shape[0], x_BxTx.shape[2:]
    index = in_segment_SxJ.reshape((1,) + in_segment_SxJ.shape + (1,) * len(rest))
    per_segment = ("activation_batch", "activation_length", None) + (None,) * len(rest)
    rows = jnp.take_along_axis(constrain(x_BxTx.reshape((b, s, ts) + rest), per_segment), index, axis=2)
    return constrain(rows, per_segment)


def pad_raw(tokens_BxN: jax.Array, shape: LayoutShape) -> jax.Array:
    extra = shape.padded_raw - tokens_BxN.shape[1]
    return tokens_BxN if extra == 0 else jnp.pad(tokens_BxN, ((0, 0), (0, extra)))


def raw_embed_inputs(raw_embeds_BxNxE: jax.Array | None, shape: LayoutShape,
                     raw_index_T: np.ndarray | jax.Array) -> RawEmbedInputs:
    """Decoder kwargs that feed raw-token embeddings (gradient probes) in layout order;
    gist slots keep their gist embedding. Empty when no embeddings are given."""
    if raw_embeds_BxNxE is None:
        return {}
    raw_index_T = jnp.asarray(raw_index_T)
    embeds = gather_raw(pad_raw(raw_embeds_BxNxE, shape), raw_index_T)
    mask = jnp.broadcast_to(raw_index_T >= 0, embeds.shape[:2])
    return {"input_embeds_BxTxE": embeds, "input_embeds_mask_BxT": mask}


def _per_batch(batch: int, x_T: jax.Array) -> jax.Array:
    return jnp.broadcast_to(x_T, (batch,) + x_T.shape)


def parallel_spec(arrays: LayoutArrays, comp: CompressionConfig, batch: int,
                  stop_gist_memory_gradient: bool = False) -> AttentionSpec:
    """The whole sequence in one pass (KV variants). Own segment: causal, keys at their
    in-segment positions. Earlier segments: sinks and live gists only, keys at memory positions.
    UniGist (``comp.windowed``): ``windowed_mask``, every key at its one (aligned) position.
    """
    if comp.windowed:
        # One position per key (aligned), so the two views split the windowed mask in two:
        # raw tokens inside the window, and the sinks and gists (which may be held fixed).
        visible_TxS = windowed_mask(arrays)
        always_S = arrays["is_gist"] | arrays["is_sink"]
        return AttentionSpec(positions=_per_batch(batch, arrays["position"]),
                             mask=_per_batch(batch, visible_TxS & ~always_S[None, :]),
                             memory_positions=_per_batch(batch, arrays["position"]),
                             memory_mask=_per_batch(batch, visible_TxS & always_S[None, :]),
                             is_gist=_per_batch(batch, arrays["is_gist"]),
                             gist_slot=_per_batch(batch, embedding_rows(arrays["gist_slot"], comp)),
                             stop_gist_memory_gradient=stop_gist_memory_gradient)
    seg_T, alive_T = arrays["segment"], arrays["alive"]
    idx_T = jnp.arange(seg_T.shape[0])
    local_TxS = (seg_T[:, None] == seg_T[None, :]) & (idx_T[None, :] <= idx_T[:, None]) & alive_T[None, :]
    memory_key_S = (arrays["is_gist"] & alive_T) | arrays["is_sink"]
    memory_TxS = (seg_T[None, :] < seg_T[:, None]) & memory_key_S[None, :]
    return AttentionSpec(positions=_per_batch(batch, arrays["position"]), mask=_per_batch(batch, local_TxS),
                         memory_positions=_per_batch(batch, arrays["memory_position"]),
                         memory_mask=_per_batch(batch, memory_TxS), is_gist=_per_batch(batch, arrays["is_gist"]),
                         gist_slot=_per_batch(batch, embedding_rows(arrays["gist_slot"], comp)),
                         stop_gist_memory_gradient=stop_gist_memory_gradient)


def windowed_mask(arrays: LayoutArrays) -> jax.Array:
    """UniGist's one mask, [T, T] bool (the dense reference): query t sees live key s <= t
    when s is a sink, a gist, or a raw token at or after t's ``window_start``."""
    alive_T, raw_T = arrays["alive"], arrays["raw_index"]
    idx_T = jnp.arange(alive_T.shape[0])
    always_S = arrays["is_gist"] | arrays["is_sink"]
    in_window_TxS = raw_T[None, :] >= arrays["window_start"][:, None]
    return ((idx_T[None, :] <= idx_T[:, None]) & alive_T[None, :]
            & (always_S[None, :] | in_window_TxS))


def segment_spec(arrays: LayoutArrays, shape: LayoutShape, comp: CompressionConfig, i: int,
                 batch: int, prefix_valid_BxM: jax.Array) -> AttentionSpec:
    """Segment i alone against an external KV memory (sequential path and inference)."""
    sl = shape.segment_slice(i)
    alive_T = arrays["alive"][sl]
    t = alive_T.shape[0]
    local_TxS = jnp.tril(jnp.ones((t, t), bool)) & alive_T[None, :]
    return AttentionSpec(positions=_per_batch(batch, arrays["position"][sl]), mask=_per_batch(batch, local_TxS),
                         is_gist=_per_batch(batch, arrays["is_gist"][sl]),
                         gist_slot=_per_batch(batch, embedding_rows(arrays["gist_slot"], comp)[sl]),
                         prefix_valid=prefix_valid_BxM)


def memory_buffer_arrays(layout: GistLayout) -> dict[str, np.ndarray]:
    """Host arrays over the memory buffer (sinks first, then S * slots gist slots)."""
    size = layout.memory_size
    position = np.zeros(size, np.int32)
    live = np.zeros(size, bool)
    segment = np.full(size, -1, np.int32)
    kept = layout.memory_slot >= 0
    slots = layout.memory_slot[kept]
    position[slots] = layout.memory_position[kept]
    live[slots] = True
    segment[slots] = np.where(layout.is_gist[kept], layout.segment[kept], -1)
    return {"position": position, "live": live, "segment": segment}


def structured_spec(arrays: dict[str, jax.Array], comp: CompressionConfig, batch: int,
                    structure: AttentionStructure, stop_gist_memory_gradient: bool = False) -> AttentionSpec:
    """The ``parallel_spec`` of a structured path: per-token arrays and ``structure`` (an
    object with ``attend``: ``DecomposedKV``, ``flash.PrefixCausalKV``, ``bank.GistBankKV``),
    no masks (``valid`` carries the live tokens; ``mask``/``memory_mask`` stay None)."""
    def per_batch(x):
        return jnp.broadcast_to(x, (batch,) + x.shape)

    return AttentionSpec(
        positions=per_batch(arrays["position"]), valid=per_batch(arrays["alive"]),
        memory_positions=per_batch(arrays["memory_position"]),
        is_gist=per_batch(arrays["is_gist"]),
        gist_slot=per_batch(embedding_rows(arrays["gist_slot"], comp)),
        structure=structure,
        stop_gist_memory_gradient=stop_gist_memory_gradient)
