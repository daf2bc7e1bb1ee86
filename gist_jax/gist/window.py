"""UniGist's attention without a T x T matrix: a sliding band plus the gist memory.

UniGist (``compression.window`` W > 0, ``specs.windowed_mask``) lets every token see the sinks,
every earlier gist, and the raw tokens from its ``window_start`` (its gist unit's first raw
token minus W). Over the fine layout cut into segments of ``Ts = L + slots`` tokens, a query
of segment i can only reach raw tokens of segments ``i - nb .. i`` with ``nb = ceil(W / L)``.
So the mask splits into two disjoint parts, each computed at its own size and merged by
log-sum-exp (``structured.merge``'s identity):

  (a) band: segment i against segments ``i - nb .. i`` (``(nb + 1) * Ts`` keys), with the
      windowed mask evaluated on per-token arrays: causal, live, and (sink or gist or inside
      the window);
  (b) memory: the sinks and gists of segments ``< i - nb``, which is exactly the memory
      buffer's prefix ``[0, s + (i - nb) * slots)`` (sinks, then segment-major gist slots).
      Segments share a static bound in at most ``MAX_MEMORY_GROUPS`` groups, as in
      ``structured.py``.

Every key has one position (aligned positions), so keys are rotated once. One ``lax.scan``
per group walks the segments; its step is rematerialised (``jax.checkpoint``), so the backward
holds one segment's scores at a time and the step's memory stays linear in the sequence length.
The gradient is autodiff's; the dense mask (``specs.parallel_spec``) is the reference
(``tests/test_unigist.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from gist_jax.gist.layout import LayoutShape
from gist_jax.gist.structured import MAX_MEMORY_GROUPS, NEG, DecomposedKV, _bias, _partial
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.layers import apply_rope


def band_segments(window: int, segment_length: int) -> int:
    """``nb``: how many earlier segments a window of ``window`` raw tokens can reach."""
    return -(-window // segment_length)


def window_groups(num_segments: int, nb: int, num_sinks: int, slots: int,
                  max_groups: int | None = None) -> tuple[tuple[int, int, int], ...]:
    """(first segment, end segment, memory bound) per scan. Segments ``0 .. nb`` see no memory
    (bound 0: the sinks are inside their band); the rest in at most ``max_groups`` groups, each
    bounded by its last segment's prefix ``s + (i - nb) * slots``."""
    first_with_memory = min(nb + 1, num_segments)
    groups = [(0, first_with_memory, 0)] if first_with_memory else []
    rest = num_segments - first_with_memory
    if rest > 0:
        size = -(-rest // (max_groups or MAX_MEMORY_GROUPS))
        for first in range(first_with_memory, num_segments, size):
            end = min(first + size, num_segments)
            groups.append((first, end, num_sinks + (end - 1 - nb) * slots))
    return tuple(groups)


@flax.struct.dataclass
class WindowedKV:
    """What the windowed path needs beyond ``AttentionSpec``: the memory buffer (as
    ``DecomposedKV`` builds it), the per-token window arrays, and the static geometry."""

    memory: DecomposedKV
    raw_index_T: jax.Array
    window_start_T: jax.Array
    always_T: jax.Array  # sinks and live gists: seen by every later token
    window: int = flax.struct.field(pytree_node=False)

    @classmethod
    def from_arrays(cls, arrays: dict[str, jax.Array], shape: LayoutShape, window: int) -> WindowedKV:
        always_T = (arrays["is_gist"] & arrays["alive"]) | arrays["is_sink"]
        return cls(DecomposedKV.from_arrays(arrays, shape), arrays["raw_index"],
                   arrays["window_start"], always_T, window)

    def attend(self, q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
               spec: AttentionSpec, inv_freq: jax.Array) -> jax.Array:
        """Queries rotated at ``spec.positions``, keys un-rotated; [B, T, N, H] in the value dtype."""
        mem = self.memory
        b, t, n, h = q_BxTxNxH.shape
        s, ts = mem.num_segments, mem.segment_tokens
        kv_heads = k_BxTxKxH.shape[2]
        g = n // kv_heads
        nb = band_segments(self.window, ts - mem.slots)
        assert spec.valid is not None, "structured_spec sets valid (the live tokens)"
        k_rot_BxTxKxH, v_band_BxTxKxH = apply_rope(k_BxTxKxH, spec.positions, inv_freq), v_BxTxKxH
        if spec.stop_gist_memory_gradient:  # every view of a gist is held (no-leak tests)
            assert spec.is_gist is not None, "structured_spec sets is_gist"
            hold = spec.is_gist[:, :, None, None]
            k_rot_BxTxKxH = jnp.where(hold, jax.lax.stop_gradient(k_rot_BxTxKxH), k_rot_BxTxKxH)
            v_band_BxTxKxH = jnp.where(hold, jax.lax.stop_gradient(v_BxTxKxH), v_BxTxKxH)
        # Aligned positions: a sink's or gist's memory position is its own position.
        k_mem_BxMxKxH, v_mem_BxMxKxH = mem.memory_kv(k_BxTxKxH, v_BxTxKxH, spec, inv_freq)
        km_BxKxMxH, vm_BxKxMxH = k_mem_BxMxKxH.swapaxes(1, 2), v_mem_BxMxKxH.swapaxes(1, 2)

        def band(x_BxTx: jax.Array, fill: int | bool) -> jax.Array:
            """[B, T, ...] -> [S, B, (nb + 1) * Ts, ...]: segments i - nb .. i per segment i."""
            x_BxSxTsx = x_BxTx.reshape((b, s, ts) + x_BxTx.shape[2:])
            pad = [(0, 0), (nb, 0)] + [(0, 0)] * (x_BxSxTsx.ndim - 2)
            padded = jnp.pad(x_BxSxTsx, pad, constant_values=fill)
            stacked = jnp.concatenate([padded[:, d:d + s] for d in range(nb + 1)], axis=2)
            return stacked.swapaxes(0, 1)

        def per_token(x_T: jax.Array) -> jax.Array:
            return jnp.broadcast_to(x_T, (b,) + x_T.shape)

        idx_T = jnp.arange(t, dtype=jnp.int32)
        xs = {
            "q": q_BxTxNxH.reshape(b, s, ts, kv_heads, g, h).transpose(1, 0, 3, 4, 2, 5),
            "k": band(k_rot_BxTxKxH, 0).transpose(0, 1, 3, 2, 4),  # [S, B, K, C, H]
            "v": band(v_band_BxTxKxH, 0).transpose(0, 1, 3, 2, 4),
            "key_idx": band(per_token(idx_T), t),  # padding: after every query, never causal
            "key_live": band(spec.valid, False),
            "key_always": band(per_token(self.always_T), False),
            "key_raw": band(per_token(self.raw_index_T), -1),
            "q_idx": per_token(idx_T).reshape(b, s, ts).swapaxes(0, 1),
            "q_start": per_token(self.window_start_T).reshape(b, s, ts).swapaxes(0, 1),
            "i": jnp.arange(s, dtype=jnp.int32),
        }

        def segment_out(x: dict[str, jax.Array], bound: int) -> jax.Array:
            visible_BxTsxC = ((x["key_idx"][:, None, :] <= x["q_idx"][:, :, None])
                              & x["key_live"][:, None, :]
                              & (x["key_always"][:, None, :]
                                 | (x["key_raw"][:, None, :] >= x["q_start"][:, :, None])))
            o, lse = _partial(x["q"], x["k"], x["v"], _bias(visible_BxTsxC)[:, None, None])
            if bound:
                live_M = mem.memory_live_M[:bound] & (
                    jnp.arange(bound) < mem.num_sinks + (x["i"] - nb) * mem.slots)
                o_m, lse_m = _partial(x["q"], km_BxKxMxH[:, :, :bound], vm_BxKxMxH[:, :, :bound],
                                      _bias(live_M))
                top = jax.lax.stop_gradient(jnp.maximum(lse, lse_m))
                w, w_m = jnp.exp(lse - top), jnp.exp(lse_m - top)
                o = (w[..., None] * o + w_m[..., None] * o_m) / jnp.maximum(w + w_m, 1e-30)[..., None]
            return o

        outs = []
        for first, end, bound in window_groups(s, nb, mem.num_sinks, mem.slots):
            step = jax.checkpoint(functools.partial(segment_out, bound=bound))

            def body(carry: None, x: dict[str, jax.Array], step: Any = step) -> tuple[None, jax.Array]:
                return carry, step(x)

            group = {key: a[first:end] for key, a in xs.items()}
            outs.append(jax.lax.scan(body, None, group)[1])
        out_SxBxKxGxTsxH = jnp.concatenate(outs, axis=0)
        out_BxTxNxH = out_SxBxKxGxTsxH.transpose(1, 0, 4, 2, 3, 5).reshape(b, t, n, h)
        return out_BxTxNxH.astype(v_BxTxKxH.dtype)


__all__ = ["NEG", "WindowedKV", "band_segments", "window_groups"]
