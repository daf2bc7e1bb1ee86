"""UniGist under context parallelism: the layout in contiguous blocks of whole segments, the
gist memory all-gathered as for the KV variants, and each block's window reaching back into the
previous block through a halo.

UniGist (``window.py``) lets a token see the sinks, every earlier gist and the raw tokens from
its window start on. Split over the ``context`` axis, a block's tokens need (a) the sinks and
gists of every earlier block: the memory buffer, gathered once per layer exactly as
``context_parallel.gather_buffer`` does for Fine-KV (1 / r of the tokens), and (b) the raw
tokens within their window that lie in the previous block: its last ``halo`` keys and values,
sent forward by one ``ppermute`` per layer (``halo`` = the band length less one query block,
about ``W (1 + 1 / r)``; refused in one line when it exceeds a block). Each block then runs
``window.block_out`` over its own query blocks with global indices, against ``[halo | own
keys]`` and the gathered buffer. The blocks stay contiguous (the window ties a segment to the
one before it), so the memory part is not balanced the way ``balanced_order`` balances Fine-KV;
it is computed against the whole buffer (one memory group, static shapes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gist_jax.gist.context_parallel import gather_buffer
from gist_jax.gist.layout import LayoutShape
from gist_jax.gist.structured import rotate_memory
from gist_jax.gist.window import ContextWindowPlan, WindowedKV, block_out, context_window_plan
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.layers import apply_rope
from gist_jax.model.sharding import (
    CONTEXT_AXIS,
    active_mesh,
    context_head_specs,
    context_size,
)


@flax.struct.dataclass
class ContextParallelWindowedKV:
    """``WindowedKV`` with the layout split over the mesh's ``context`` axis (an
    ``AttentionSpec.structure``); ``attend`` runs under ``shard_map`` over the whole mesh."""

    inner: WindowedKV

    def attend(self, q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
               spec: AttentionSpec, inv_freq: jax.Array) -> jax.Array:
        mesh, context = active_mesh(), context_size()
        assert mesh is not None and context > 1, "ContextParallelWindowedKV runs inside an activation_mesh"
        w, mem = self.inner, self.inner.memory
        shape = LayoutShape(mem.num_segments, mem.segment_tokens - mem.slots, mem.slots, mem.num_sinks, True)
        plan = context_window_plan(shape, w.window, context)
        q_spec, kv_spec = context_head_specs(q_BxTxNxH.shape, k_BxTxKxH.shape)
        assert q_spec[1] == CONTEXT_AXIS and kv_spec[1] == CONTEXT_AXIS, (q_spec, kv_spec)
        assert spec.valid is not None and spec.is_gist is not None, "structured_spec sets valid and is_gist"
        token_spec = PartitionSpec(q_spec[0], CONTEXT_AXIS)
        local = _local_attention(plan, mem.num_sinks, mem.slots, spec.stop_gist_memory_gradient)
        return jax.shard_map(
            local, mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec) + (token_spec,) * 3 + (PartitionSpec(),) * 8,
            out_specs=q_spec, check_vma=False,
        )(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, spec.positions, spec.valid, spec.is_gist, w.always_T,
          w.raw_index_T, w.window_start_T, mem.memory_token_M, mem.memory_position_M, mem.memory_live_M,
          jnp.asarray(plan.band_start, jnp.int32), inv_freq)


def _local_attention(plan: ContextWindowPlan, sinks: int, slots: int, hold_gists: bool) -> Callable[..., jax.Array]:
    """The per-device body: this block's query blocks over [halo | own keys] and the buffer."""
    bq, blocks, band, halo = plan.query_block, plan.blocks, plan.band, plan.halo

    def local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, positions_BxT, valid_BxT, is_gist_BxT, always_T, raw_T,
              window_start_T, memory_token_M, memory_position_M, memory_live_M, band_start_CxJ, inv_freq):
        block, context = jax.lax.axis_index(CONTEXT_AXIS), jax.lax.axis_size(CONTEXT_AXIS)
        b, t_local, n, h = q_BxTxNxH.shape
        kv_heads = k_BxTxKxH.shape[2]
        tail = blocks * bq - t_local  # this block's layout padded to whole query blocks
        k_rot_BxTxKxH, v_band_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, inv_freq), v_BxTxKxH
        if hold_gists:  # every view of a gist is held (no-leak tests)
            hold = is_gist_BxT[:, :, None, None]
            k_rot_BxTxKxH = jnp.where(hold, jax.lax.stop_gradient(k_rot_BxTxKxH), k_rot_BxTxKxH)
            v_band_BxTxKxH = jnp.where(hold, jax.lax.stop_gradient(v_BxTxKxH), v_BxTxKxH)
        order_S = jnp.arange((memory_live_M.shape[0] - sinks) // slots, dtype=jnp.int32)  # contiguous blocks
        buffer_2xBxMxKxH = gather_buffer(k_BxTxKxH, v_BxTxKxH, memory_token_M, order_S, sinks, slots)
        k_mem_BxMxKxH, v_mem_BxMxKxH = rotate_memory(buffer_2xBxMxKxH[0], buffer_2xBxMxKxH[1],
                                                     memory_position_M, sinks, hold_gists, inv_freq)
        # The previous block's last `halo` keys, values and liveness (block 0 gets zeros: dead).
        to_next = [(i, i + 1) for i in range(context - 1)]
        halo_k, halo_v, halo_live = jax.lax.ppermute(
            (k_rot_BxTxKxH[:, t_local - halo:], v_band_BxTxKxH[:, t_local - halo:], valid_BxT[:, t_local - halo:]),
            CONTEXT_AXIS, to_next)

        def keys(x_halo: jax.Array, x_own: jax.Array) -> jax.Array:  # -> [B, K, halo + blocks * bq, H]
            return jnp.pad(jnp.concatenate([x_halo, x_own], axis=1), ((0, 0), (0, tail), (0, 0), (0, 0))).swapaxes(1, 2)

        def per_key(x_T: jax.Array, fill: int | bool) -> jax.Array:  # global [block start - halo, ...)
            padded = jnp.pad(x_T, (halo, tail), constant_values=fill)
            return jax.lax.dynamic_slice_in_dim(padded, block * t_local, halo + blocks * bq)

        consts = {
            "k": keys(halo_k, k_rot_BxTxKxH), "v": keys(halo_v, v_band_BxTxKxH),
            "live": jnp.pad(jnp.concatenate([halo_live, valid_BxT], axis=1), ((0, 0), (0, tail))),
            "always": per_key(always_T, False), "raw": per_key(raw_T, -1),
            "km": k_mem_BxMxKxH.swapaxes(1, 2), "vm": v_mem_BxMxKxH.swapaxes(1, 2),
            "token_M": memory_token_M, "live_M": memory_live_M,
        }
        g = n // kv_heads
        q_pad = jnp.pad(q_BxTxNxH, ((0, 0), (0, tail), (0, 0), (0, 0)))
        local_rows_J = jnp.arange(blocks, dtype=jnp.int32) * bq
        xs = {
            "q": q_pad.reshape(b, blocks, bq, kv_heads, g, h).transpose(1, 0, 3, 4, 2, 5),
            "q_start": jax.lax.dynamic_slice_in_dim(jnp.pad(window_start_T, (0, tail)), block * t_local,
                                                    blocks * bq).reshape(blocks, bq),
            "row0": block * t_local + local_rows_J, "slice": local_rows_J,
            "a": jax.lax.dynamic_index_in_dim(band_start_CxJ, block, keepdims=False),
        }
        step = jax.checkpoint(functools.partial(block_out, bound=memory_live_M.shape[0], bq=bq, band=band))
        _, out_JxBxKxGxQxH = jax.lax.scan(lambda carry, x: (carry, step(consts, x)), None, xs)
        out_BxTxNxH = out_JxBxKxGxQxH.transpose(1, 0, 4, 2, 3, 5).reshape(b, blocks * bq, n, h)[:, :t_local]
        return out_BxTxNxH.astype(v_BxTxKxH.dtype)

    return local
