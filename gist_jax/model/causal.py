"""Plain causal attention without an N x N score matrix: the fast path of every no-gist pass.

The full-attention baseline, TIE's two frozen reference passes and full-attention prefill all
run ordinary causal attention. Through the dense reference (``dot_product_attention``, here
with a ``[B, T, T]`` mask) their memory grows 4x per doubling of the context, which would make
"compression vs full attention" a comparison against a strawman (engineering.md section 3).
``causal_attention`` picks a kernel per backend (``resolve_impl``):

  cudnn      ``jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")`` on NVIDIA
             GPUs in bf16/fp16 (the kernel skips the upper triangle, forward and backward).
  splash     Pallas Splash attention with a causal mask on TPU.
  blockwise  pure-JAX online-softmax ("flash") attention: query blocks against only the key
             blocks at or below the diagonal, with a ``custom_vjp`` whose residuals are
             (q, k, v, out, logsumexp) -- O(N) memory forward and backward, on any backend.
  dense      the reference (materialises the scores).

Causality is by index with an optional ``q_offset``: query i sits at key index ``i + q_offset``
(bottom-right alignment when queries follow a prefix of ``q_offset`` keys). ``valid_BxS`` masks
padded keys anywhere (left padding included). A query that sees no key at all gets 0 (the dense
reference gives a uniform average there); such rows are padding and nothing live reads them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from gist_jax.model.kernels import BOTH, CAUSAL_KERNELS, NEG, cudnn_runs, splash_runs

IMPLS = BOTH + CAUSAL_KERNELS  # what the causal part of ``model.attention`` may name
DEFAULT_BLOCK = 512


def resolve_impl(impl: str, backend: str, dtype: DTypeLike, head_dim: int,
                 has_padding: bool = False, q_offset: int = 0) -> str:
    """The kernel ``impl`` stands for on ``backend`` (a pure function, so tests can check every
    backend on CPU). ``auto``: cuDNN on GPU for bf16/fp16 with a head size it takes, Splash on
    TPU, blockwise elsewhere (CPU, float32). cuDNN's and Splash's causal masks are top-left
    aligned and take padding only as lengths/segments, so padded or offset inputs go blockwise.
    """
    if impl not in IMPLS:
        raise ValueError(f"causal attention kernel {impl!r} is unknown; use one of {IMPLS}")
    if impl != "auto":
        return impl
    plain = not has_padding and q_offset == 0
    if cudnn_runs(backend, dtype, head_dim) and plain:
        return "cudnn"
    if splash_runs(backend) and plain:
        return "splash"
    return "blockwise"


def causal_pairs(n: int) -> int:
    """Query-key pairs causal attention admits over n tokens (the lower triangle)."""
    return n * (n + 1) // 2


def blockwise_causal_pairs(t: int, s: int | None = None, block: int | None = None) -> int:
    """Score entries the blockwise kernel computes for t queries and s keys (offset 0): query
    block i (``bq = min(block, t)``, T padded to whole blocks) runs key
    blocks ``0 .. (i bq + bq - 1) // bk`` (``_last_key_block``), each a full ``bq x bk`` tile,
    so the skipped upper triangle is counted out and the diagonal tiles are counted whole.
    ``block`` None: ``causal.DEFAULT_BLOCK`` read now, as the kernel reads it at trace time."""
    s = t if s is None else s
    block = block or DEFAULT_BLOCK
    bq, bk = min(block, t), min(block, s)
    nq, nk = -(-t // bq), -(-s // bk)
    i = np.arange(nq)
    return int(np.minimum(nk, (i * bq + bq - 1) // bk + 1).sum()) * bq * bk


def computed_pairs(impl: str, t: int) -> int:
    """The kernels' cost model (``train/flops.py`` asks it): score entries of one plain causal
    pass over t tokens. Dense builds the whole [t, t] matrix; blockwise and Splash (same block
    size) the non-skipped tiles; cuDNN the causal triangle (its tile granularity is not
    modelled, so this is a lower bound)."""
    if impl == "dense":
        return t * t
    if impl == "cudnn":
        return causal_pairs(t)
    return blockwise_causal_pairs(t)


def causal_mask(t: int, s: int, valid_BxS: jax.Array | None, q_offset: int = 0) -> jax.Array:
    """[B or 1, T, S] bool: query i sees key j iff ``j <= i + q_offset`` and key j is valid."""
    mask_1xTxS = (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + q_offset)[None]
    return mask_1xTxS if valid_BxS is None else mask_1xTxS & valid_BxS[:, None, :]


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


def causal_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                     valid_BxS: jax.Array | None = None, *, impl: str = "auto",
                     q_offset: int = 0, block: int | None = None) -> jax.Array:
    """Causal GQA attention (N query heads, K | N kv heads; q and k already rotated).
    ``block`` None: ``DEFAULT_BLOCK``, read at trace time (tests shrink it). Returns
    [B, T, N, H] in the value dtype."""
    impl = resolve_impl(impl, jax.default_backend(), q_BxTxNxH.dtype, q_BxTxNxH.shape[-1],
                        valid_BxS is not None, q_offset)
    if impl == "dense":
        t, s = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
        mask = causal_mask(t, s, valid_BxS, q_offset)
        return dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH,
                                     jnp.broadcast_to(mask, (q_BxTxNxH.shape[0], t, s)))
    if impl == "cudnn":
        if valid_BxS is not None or q_offset:
            raise ValueError("the causal kernel 'cudnn' takes no padding mask or offset; use auto")
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH.astype(q_BxTxNxH.dtype),
                                            v_BxSxKxH.astype(q_BxTxNxH.dtype), is_causal=True,
                                            implementation="cudnn").astype(v_BxSxKxH.dtype)
    if impl == "splash":
        if valid_BxS is not None or q_offset:
            raise ValueError("the causal kernel 'splash' takes no padding mask or offset; use auto")
        return splash_causal_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)
    return blockwise_causal_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS,
                                      q_offset=q_offset, block=block or DEFAULT_BLOCK)


def splash_causal_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                            interpret: bool = False) -> jax.Array:
    """Pallas Splash attention (TPU; ``interpret`` runs it anywhere, slowly) with a causal mask.
    GQA: one MQA kernel per kv head (its query group shares that head's keys), vmapped over
    kv heads and batch. Splash takes unscaled scores, so q is scaled here."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q_BxTxNxH.shape
    kv_heads = k_BxSxKxH.shape[2]
    g = n // kv_heads
    mask = sm.MultiHeadMask([sm.CausalMask((t, k_BxSxKxH.shape[1])) for _ in range(g)])
    block = min(DEFAULT_BLOCK, t)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    q_BxKxGxTxH = (q_BxTxNxH * (h ** -0.5)).reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4)
    k_BxKxSxH = k_BxSxKxH.astype(q_BxTxNxH.dtype).transpose(0, 2, 1, 3)
    v_BxKxSxH = v_BxSxKxH.astype(q_BxTxNxH.dtype).transpose(0, 2, 1, 3)
    out_BxKxGxTxH = jax.vmap(jax.vmap(kernel))(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH)
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(v_BxSxKxH.dtype)


# -- blockwise online-softmax kernel --------------------------------------------------------------

def _blocks(x_BxTxCxH: jax.Array, size: int) -> jax.Array:
    """[B, T, C, H] (T a multiple of size) -> [T / size, B, C, size, H]."""
    b, t, c, h = x_BxTxCxH.shape
    return x_BxTxCxH.reshape(b, t // size, size, c, h).transpose(1, 0, 3, 2, 4)


def _block_mask(i: jax.Array, j: jax.Array, bq: int, bk: int, q_offset: jax.Array,
                valid_nkxBxC: jax.Array) -> jax.Array:
    """[B, 1, 1, bq, bk] visibility of key block j to query block i."""
    qi = i * bq + jnp.arange(bq)[:, None] + q_offset
    kj = j * bk + jnp.arange(bk)[None, :]
    keep_BxC = jax.lax.dynamic_index_in_dim(valid_nkxBxC, j, keepdims=False)
    return (kj <= qi)[None, None, None] & keep_BxC[:, None, None, None, :]


def _last_key_block(i: jax.Array, bq: int, bk: int, q_offset: jax.Array, nk: int) -> jax.Array:
    """Number of key blocks query block i needs (0 .. nk): blocks up to its last query's key."""
    return jnp.clip((i * bq + bq - 1 + q_offset) // bk + 1, 0, nk)


def _first_query_block(j: jax.Array, bq: int, bk: int, q_offset: jax.Array, nq: int) -> jax.Array:
    """First query block that sees any key of block j (its query j * bk - q_offset does)."""
    return jnp.clip((j * bk - q_offset) // bq, 0, nq)


def _forward(q_nqxBxKxGxQxH, k_nkxBxKxCxH, v_nkxBxKxCxH, valid_nkxBxC, bq, bk, q_offset, scale):
    """Online softmax per query block over the key blocks it needs (a while loop: the upper
    triangle is never computed). Returns (out float32 [nq, B, K, G, Q, H], lse [nq, B, K, G, Q])."""
    nk = k_nkxBxKxCxH.shape[0]

    def one_query_block(args):
        i, q_BxKxGxQxH = args
        shape = q_BxKxGxQxH.shape[:-1]

        def body(j, carry):
            m, l, acc = carry
            k_j = jax.lax.dynamic_index_in_dim(k_nkxBxKxCxH, j, keepdims=False)
            v_j = jax.lax.dynamic_index_in_dim(v_nkxBxKxCxH, j, keepdims=False)
            s = jnp.einsum("BKGQH,BKCH->BKGQC", q_BxKxGxQxH, k_j,
                           preferred_element_type=jnp.float32) * scale
            mask = _block_mask(i, j, bq, bk, q_offset, valid_nkxBxC)
            s = jnp.where(mask, s, NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            l = alpha * l + jnp.sum(p, axis=-1)
            acc = alpha[..., None] * acc + jnp.einsum(
                "BKGQC,BKCH->BKGQH", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full(shape, NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(q_BxKxGxQxH.shape, jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, _last_key_block(i, bq, bk, q_offset, nk), body, init)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        return out, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)

    nq = q_nqxBxKxGxQxH.shape[0]
    return jax.lax.map(one_query_block, (jnp.arange(nq), q_nqxBxKxGxQxH))


def _backward(q_nqxBxKxGxQxH, k_nkxBxKxCxH, v_nkxBxKxCxH, valid_nkxBxC, out, lse, dout,
              bq, bk, q_offset, scale):
    """Flash-attention backward: per key block, the query blocks that see it, with scores and
    probabilities recomputed from the saved lse; dQ accumulates in a carry (O(N))."""
    nq, nk = q_nqxBxKxGxQxH.shape[0], k_nkxBxKxCxH.shape[0]
    dout = dout.astype(jnp.float32)
    delta_nqxBxKxGxQ = jnp.sum(dout * out, axis=-1)  # rowsum(dO * O)

    def one_key_block(dq, args):
        j, k_j, v_j = args

        def body(i, carry):
            dq, dk, dv = carry
            q_i = jax.lax.dynamic_index_in_dim(q_nqxBxKxGxQxH, i, keepdims=False)
            do_i = jax.lax.dynamic_index_in_dim(dout, i, keepdims=False)
            lse_i = jax.lax.dynamic_index_in_dim(lse, i, keepdims=False)
            delta_i = jax.lax.dynamic_index_in_dim(delta_nqxBxKxGxQ, i, keepdims=False)
            s = jnp.einsum("BKGQH,BKCH->BKGQC", q_i, k_j,
                           preferred_element_type=jnp.float32) * scale
            mask = _block_mask(i, j, bq, bk, q_offset, valid_nkxBxC)
            p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
            dv = dv + jnp.einsum("BKGQC,BKGQH->BKCH", p.astype(v_j.dtype), do_i.astype(v_j.dtype),
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("BKGQH,BKCH->BKGQC", do_i.astype(v_j.dtype), v_j,
                            preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(q_i.dtype)
            dk = dk + jnp.einsum("BKGQC,BKGQH->BKCH", ds, q_i, preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("BKGQC,BKCH->BKGQH", ds, k_j, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_index_in_dim(
                dq, jax.lax.dynamic_index_in_dim(dq, i, keepdims=False) + dq_i, i, 0)
            return dq, dk, dv

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(_first_query_block(j, bq, bk, q_offset, nq), nq, body,
                                       (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(one_key_block, jnp.zeros(q_nqxBxKxGxQxH.shape, jnp.float32),
                                (jnp.arange(nk), k_nkxBxKxCxH, v_nkxBxKxCxH))
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, valid, bq, bk, q_offset):
    out, _ = _forward(q, k, v, valid, bq, bk, q_offset, q.shape[-1] ** -0.5)
    return out


def _blockwise_fwd(q, k, v, valid, bq, bk, q_offset):
    out, lse = _forward(q, k, v, valid, bq, bk, q_offset, q.shape[-1] ** -0.5)
    return out, (q, k, v, valid, q_offset, out, lse)


def _blockwise_bwd(bq, bk, residuals, dout):
    q, k, v, valid, q_offset, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, valid, out, lse, dout, bq, bk, q_offset, q.shape[-1] ** -0.5)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_causal_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                               valid_BxS: jax.Array | None = None, *, q_offset: int | jax.Array = 0,
                               block: int = DEFAULT_BLOCK) -> jax.Array:
    """Blockwise causal attention; query and key block sizes are ``block`` clamped to T and S
    (T and S are padded up to whole blocks; padded keys are invalid, padded queries dropped).
    ``q_offset`` may be traced (a context-parallel block's first index): the loops' bounds are
    dynamic anyway. Returns [B, T, N, H] in the value dtype."""
    b, t, n, h = q_BxTxNxH.shape
    s, kv_heads = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    g = n // kv_heads
    bq, bk = min(block, t), min(block, s)
    pad_t, pad_s = -t % bq, -s % bk
    valid_BxS = jnp.ones((b, s), bool) if valid_BxS is None else jnp.asarray(valid_BxS, bool)
    valid_BxS = jnp.pad(valid_BxS, ((0, 0), (0, pad_s)))

    def pad(x: jax.Array, p: int) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, p), (0, 0), (0, 0)))

    q_nqxBxNxQxH = _blocks(pad(q_BxTxNxH, pad_t), bq)
    nq = q_nqxBxNxQxH.shape[0]
    q_nqxBxKxGxQxH = q_nqxBxNxQxH.reshape(nq, b, kv_heads, g, bq, h)
    k_nkxBxKxCxH = _blocks(pad(k_BxSxKxH, pad_s), bk)
    v_nkxBxKxCxH = _blocks(pad(v_BxSxKxH, pad_s), bk)
    valid_nkxBxC = valid_BxS.reshape(b, -1, bk).swapaxes(0, 1)
    out = _blockwise(q_nqxBxKxGxQxH, k_nkxBxKxCxH, v_nkxBxKxCxH, valid_nkxBxC, bq, bk,
                     jnp.asarray(q_offset, jnp.int32))
    out_BxTxNxH = out.reshape(nq, b, n, bq, h).transpose(1, 0, 3, 2, 4).reshape(b, nq * bq, n, h)
    return out_BxTxNxH[:, :t].astype(v_BxSxKxH.dtype)
