"""The kernel of split attention (``split.py``): two exact attention calls, local and memory,
merged by log-sum-exp, with a hand-written backward, and the interface of their backends.

Why a custom VJP: the merged output depends on each part's log-sum-exp, and cuDNN's public
backward drops the lse cotangent (``flash.py``). But the gradient of one softmax split over
disjoint key sets needs no lse cotangent at all: with the *merged* output O and the *merged*
log-sum-exp l, part p's probabilities are ``P_p = exp(s_p - l)`` and

    D = rowsum(dO * O),  dS_p = P_p * (dO V_p^T - D),  dQ = sum_p dS_p K_p,  dK_p = dS_p^T Q,
    dV_p = P_p^T dO

which is exactly a flash-attention backward of part p alone, called with (O, l) in place of
its own output and statistics (the identity ring attention relies on). So each part's backward
kernel runs unchanged and ``split_attention``'s ``custom_vjp`` sums the query gradients.

Two backends share one interface, ``forward(q, k, v, q_len, kv_len, causal) -> (out, lse)``
and ``backward(q, k, v, out, lse, dout, q_len, kv_len, causal) -> (dq, dk, dv)`` with
``lse`` ``[B, N, T]`` float32 (cuDNN's statistics layout): ``XLA`` here (pure JAX; scores are
materialised, for CPU and tests) and cuDNN (``cudnn_stats.py``, the one module that touches
jax's private fused-attention primitives; self-tested at first use). Rows past ``q_len`` give
output 0 and lse ``NEG`` in both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from gist_jax.gist.partials import partial_attention


class AttentionBackend(Protocol):
    """One exact attention call with explicit softmax statistics. Shapes: q ``[B, T, N, H]``,
    k/v ``[B, S, K, H]`` (GQA: N % K == 0), lengths ``[B]`` int32, lse ``[B, N, T]`` f32.
    ``causal`` is top-left aligned (query j sees keys <= j; used with q_len == kv_len)."""

    @property
    def name(self) -> str: ...

    def forward(self, q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                q_len_B: jax.Array, kv_len_B: jax.Array, causal: bool) -> tuple[jax.Array, jax.Array]: ...

    def backward(self, q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                 out_BxTxNxH: jax.Array, lse_BxNxT: jax.Array, dout_BxTxNxH: jax.Array,
                 q_len_B: jax.Array, kv_len_B: jax.Array,
                 causal: bool) -> tuple[jax.Array, jax.Array, jax.Array]: ...


def length_mask(t: int, s: int, q_len_B: jax.Array, kv_len_B: jax.Array, causal: bool) -> jax.Array:
    """[B, T, S] visibility from lengths (and top-left causality): what cuDNN's PADDING /
    PADDING_CAUSAL masks mean."""
    q_T, k_S = jnp.arange(t), jnp.arange(s)
    mask = (q_T[None, :, None] < q_len_B[:, None, None]) & (k_S[None, None, :] < kv_len_B[:, None, None])
    if causal:
        mask = mask & (k_S[None, None, :] <= q_T[None, :, None])
    return mask


@dataclasses.dataclass(frozen=True)
class XlaBackend:
    """Pure-JAX attention with explicit statistics: ``[B, N, T, S]`` scores per call, so only
    for CPU, tests and the cuDNN self-test's reference."""

    name: str = "xla"

    def forward(self, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_len_B, kv_len_B, causal):
        mask = length_mask(q_BxTxNxH.shape[1], k_BxSxKxH.shape[1], q_len_B, kv_len_B, causal)
        out_BxTxNxH, lse_BxTxN = partial_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
        return out_BxTxNxH, lse_BxTxN.transpose(0, 2, 1)

    def backward(self, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, out_BxTxNxH, lse_BxNxT, dout_BxTxNxH,
                 q_len_B, kv_len_B, causal):
        b, t, n, h = q_BxTxNxH.shape
        kv_heads = k_BxSxKxH.shape[2]
        g = n // kv_heads

        def grouped(x_BxTxNxH):
            return x_BxTxNxH.astype(jnp.float32).reshape(b, t, kv_heads, g, h)

        q, out, dout = grouped(q_BxTxNxH), grouped(out_BxTxNxH), grouped(dout_BxTxNxH)
        k, v = k_BxSxKxH.astype(jnp.float32), v_BxSxKxH.astype(jnp.float32)
        scale = h ** -0.5
        mask_Bx1x1xTxS = length_mask(t, k.shape[1], q_len_B, kv_len_B, causal)[:, None, None]
        lse_BxKxGxT = lse_BxNxT.reshape(b, kv_heads, g, t)
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k) * scale
        probs = jnp.where(mask_Bx1x1xTxS, jnp.exp(scores - lse_BxKxGxT[..., None]), 0.0)
        delta_BxKxGxT = jnp.einsum("BTKGH,BTKGH->BKGT", dout, out)
        dv = jnp.einsum("BKGTS,BTKGH->BSKH", probs, dout)
        dscores = probs * (jnp.einsum("BTKGH,BSKH->BKGTS", dout, v) - delta_BxKxGxT[..., None])
        dq = jnp.einsum("BKGTS,BSKH->BTKGH", dscores, k) * scale
        dk = jnp.einsum("BKGTS,BTKGH->BSKH", dscores, q) * scale
        return (dq.reshape(b, t, n, h).astype(q_BxTxNxH.dtype), dk.astype(k_BxSxKxH.dtype),
                dv.astype(v_BxSxKxH.dtype))


XLA = XlaBackend()


def merge_lse(out1_BxSxTxNxH: jax.Array, lse1_BxSxNxT: jax.Array, out2_BxSxTxNxH: jax.Array,
              lse2_BxSxNxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact softmax over the union of two disjoint key sets, float32: (output, lse). Rows that
    see nothing in both parts (lse ``NEG`` twice) stay finite: output 0, lse ~``NEG``."""
    top = jnp.maximum(lse1_BxSxNxT, lse2_BxSxNxT)
    w1, w2 = jnp.exp(lse1_BxSxNxT - top), jnp.exp(lse2_BxSxNxT - top)
    total = w1 + w2

    def rows(w_BxSxNxT):  # -> [B, S, T, N, 1], the output's row layout
        return jnp.swapaxes(w_BxSxNxT / total, -1, -2)[..., None]

    out = rows(w1) * out1_BxSxTxNxH.astype(jnp.float32) + rows(w2) * out2_BxSxTxNxH.astype(jnp.float32)
    return out, top + jnp.log(total)


def _fold(x_BxSx: jax.Array) -> jax.Array:  # [B, S, ...] -> [B * S, ...]
    return x_BxSx.reshape((-1,) + x_BxSx.shape[2:])


def _memory_keys(k_mem_BxCxKxH: jax.Array, segments: int) -> jax.Array:
    """The compacted memory once per querying segment: [B * (S - 1), C, K, H] (a batch of
    independent calls, each with its own key length c_i)."""
    b = k_mem_BxCxKxH.shape[0]
    x = jnp.broadcast_to(k_mem_BxCxKxH[:, None], (b, segments - 1) + k_mem_BxCxKxH.shape[1:])
    return _fold(x)


def _parts_forward(backend: AttentionBackend, q_BxSxTsxNxH: jax.Array, k_BxSxTsxKxH: jax.Array,
                   v_BxSxTsxKxH: jax.Array, local_len_BxS: jax.Array, k_mem_BxCxKxH: jax.Array,
                   v_mem_BxCxKxH: jax.Array, memory_len_BxS1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both parts and their merge: (output f32 [B, S, Ts, N, H], lse f32 [B, S, N, Ts])."""
    b, s, ts, n, h = q_BxSxTsxNxH.shape
    out_l, lse_l = backend.forward(_fold(q_BxSxTsxNxH), _fold(k_BxSxTsxKxH), _fold(v_BxSxTsxKxH),
                                   _fold(local_len_BxS), _fold(local_len_BxS), True)
    out_l = out_l.astype(jnp.float32).reshape(b, s, ts, n, h)
    lse_l = lse_l.reshape(b, s, n, ts)
    if s == 1:
        return out_l, lse_l
    out_m, lse_m = backend.forward(_fold(q_BxSxTsxNxH[:, 1:]), _memory_keys(k_mem_BxCxKxH, s),
                                   _memory_keys(v_mem_BxCxKxH, s), _fold(local_len_BxS[:, 1:]),
                                   _fold(memory_len_BxS1), False)
    out_r, lse_r = merge_lse(out_l[:, 1:], lse_l[:, 1:], out_m.reshape(b, s - 1, ts, n, h),
                             lse_m.reshape(b, s - 1, n, ts))
    return (jnp.concatenate([out_l[:, :1], out_r], axis=1),
            jnp.concatenate([lse_l[:, :1], lse_r], axis=1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def split_attention(backend: AttentionBackend, q_BxSxTsxNxH: jax.Array, k_BxSxTsxKxH: jax.Array,
                    v_BxSxTsxKxH: jax.Array, local_len_BxS: jax.Array, k_mem_BxCxKxH: jax.Array,
                    v_mem_BxCxKxH: jax.Array, memory_len_BxS1: jax.Array) -> jax.Array:
    """Segment-local causal attention (key lengths ``local_len``) merged with the memory
    attention of segments 1..S-1 (key lengths ``memory_len`` into the shared compacted
    memory). Keys already rotated. Returns [B, S, Ts, N, H] in the value dtype."""
    out, _ = _parts_forward(backend, q_BxSxTsxNxH, k_BxSxTsxKxH, v_BxSxTsxKxH, local_len_BxS,
                            k_mem_BxCxKxH, v_mem_BxCxKxH, memory_len_BxS1)
    return out.astype(v_BxSxTsxKxH.dtype)


def _split_fwd(backend, q, k, v, local_len, k_mem, v_mem, memory_len):
    out, lse = _parts_forward(backend, q, k, v, local_len, k_mem, v_mem, memory_len)
    out = out.astype(v.dtype)  # what the kernels' backward takes (and D = rowsum(dO * O) uses)
    return out, (q, k, v, local_len, k_mem, v_mem, memory_len, out, lse)


def _split_bwd(backend, residuals, dout_BxSxTsxNxH):
    """Each part's backward with the merged output and lse (module docstring); no lse
    cotangent exists or is needed. Lengths are integers: no cotangent (None)."""
    q, k, v, local_len, k_mem, v_mem, memory_len, out, lse = residuals
    b, s = q.shape[:2]
    dout = dout_BxSxTsxNxH.astype(v.dtype)
    dq_l, dk_l, dv_l = backend.backward(_fold(q), _fold(k), _fold(v), _fold(out), _fold(lse),
                                        _fold(dout), _fold(local_len), _fold(local_len), True)
    dq = dq_l.reshape(q.shape)
    dk, dv = dk_l.reshape(k.shape), dv_l.reshape(v.shape)
    if s == 1:
        return dq, dk, dv, None, jnp.zeros_like(k_mem), jnp.zeros_like(v_mem), None
    dq_m, dk_m, dv_m = backend.backward(
        _fold(q[:, 1:]), _memory_keys(k_mem, s), _memory_keys(v_mem, s), _fold(out[:, 1:]),
        _fold(lse[:, 1:]), _fold(dout[:, 1:]), _fold(local_len[:, 1:]), _fold(memory_len), False)
    dq_m = dq_m.reshape((b, s - 1) + q.shape[2:])
    dq = jnp.concatenate([dq[:, :1], (dq[:, 1:].astype(jnp.float32) + dq_m).astype(q.dtype)], axis=1)

    def per_memory(d_BS1xCxKxH, like):  # the broadcast's transpose: sum over querying segments
        d = d_BS1xCxKxH.reshape((b, s - 1) + like.shape[1:])
        return jnp.sum(d, axis=1, dtype=jnp.float32).astype(like.dtype)

    return dq, dk, dv, None, per_memory(dk_m, k_mem), per_memory(dv_m, v_mem), None


split_attention.defvjp(_split_fwd, _split_bwd)
