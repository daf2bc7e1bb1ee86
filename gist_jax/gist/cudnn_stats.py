"""cuDNN fused attention with explicit softmax statistics: the only module that touches jax's
private ``jax._src.cudnn.fused_attention_stablehlo``.

``split.py`` needs a forward that returns the log-sum-exp in float32 and a backward that takes
(output, log-sum-exp, output cotangent) as *inputs*, so it can pass the merged ones. jax's
public ``dot_product_attention(implementation="cudnn")`` has neither (its residual is cast to
the output dtype, its backward drops the lse cotangent). The private primitives behind it do,
with the same signature from jax 0.8 to 0.11.x (checked in 0.10.2 and 0.11):

  _dot_product_attention_fwd_p_wrapper.bind(q, k, v, bias, q_seqlen, kv_seqlen, q_offsets,
      kv_offsets, page_table_k, page_table_v, *, scale, seed, dropout_rate, variadic_args,
      mask_type, layout, sliding_window_length, is_training) -> (out, stats [B, N, T] f32)
  _dot_product_attention_bwd_p_wrapper.bind(..., activation=stats, fwd_output, grad_output,
      *, <the same parameters but is_training>) -> (dq, dk, dv)

The ``*_p_wrapper`` primitives are what the public function binds (their lowering carries the
custom partitioning, so sharded batches and heads stay sharded); where a version lacks them,
``_dot_product_attention_fwd_impl``/``_bwd_impl`` (same arguments, unpartitioned) serve.

Because this is private API, nothing trusts it blindly: ``available()`` runs once per process
(on the first GPU trace that asks): the names must exist and a tiny split attention (local +
memory parts, merged, bf16, GQA, padding) must agree with the XLA backend in values and
gradients. Otherwise it reports why, the gist kernel ``split`` falls back to ``flash`` with
one warning (``forward.resolve_gist_kernel``), and ``auto`` keeps ``flash``. Off GPU it
reports "unavailable" without importing anything CUDA-specific.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.gist import split_kernel
from gist_jax.model.kernels import NEG, cudnn_accepts, cudnn_runs

SELF_TEST_TOLERANCE = 3e-2  # bf16 inputs, relative to max(1, |reference|)

_STATE: dict[str, Any] = {}  # "ok": bool, "reason": str | None, "calls": (fwd, bwd, module)


def _calls() -> tuple[Callable, Callable, Any]:
    """(forward, backward, private module); raises ImportError/AttributeError when missing."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    for name in ("MaskType", "AttentionLayout"):
        if not hasattr(fa, name):
            raise AttributeError(f"jax._src.cudnn.fused_attention_stablehlo.{name} is missing")
    if hasattr(fa, "_dot_product_attention_fwd_p_wrapper") and hasattr(fa, "_dot_product_attention_bwd_p_wrapper"):
        return fa._dot_product_attention_fwd_p_wrapper.bind, fa._dot_product_attention_bwd_p_wrapper.bind, fa
    if hasattr(fa, "_dot_product_attention_fwd_impl") and hasattr(fa, "_dot_product_attention_bwd_impl"):
        return fa._dot_product_attention_fwd_impl, fa._dot_product_attention_bwd_impl, fa
    raise AttributeError("neither the *_p_wrapper primitives nor _dot_product_attention_fwd_impl/"
                         "_bwd_impl exist in jax._src.cudnn.fused_attention_stablehlo")


def _params(fa: Any, head_dim: int, causal: bool) -> dict[str, Any]:
    mask = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    return {"scale": float(head_dim ** -0.5), "seed": 42, "dropout_rate": 0.0,
            "variadic_args": (False, False), "mask_type": mask,
            "layout": fa.AttentionLayout.BTNH.value, "sliding_window_length": None}


def _rows_valid(t: int, q_len_B: jax.Array) -> jax.Array:
    return jnp.arange(t)[None, :] < q_len_B[:, None]  # [B, T]


@dataclasses.dataclass(frozen=True)
class CudnnBackend:
    """``split_kernel.AttentionBackend`` on cuDNN's fused flash attention (BTNH, bf16/fp16, GQA
    native). Padded query rows (past ``q_len``) are set to output 0 and lse ``NEG``, as in the
    XLA backend, whatever the kernel leaves there."""

    name: str = "cudnn"

    def forward(self, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_len_B, kv_len_B, causal):
        fwd, _, fa = _STATE.get("calls") or _calls()
        unused = jnp.zeros(0, q_BxTxNxH.dtype)
        out, stats_BxNxT = fwd(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, unused, q_len_B.astype(jnp.int32),
                               kv_len_B.astype(jnp.int32), unused, unused, unused, unused,
                               **_params(fa, q_BxTxNxH.shape[-1], causal), is_training=True)
        valid_BxT = _rows_valid(q_BxTxNxH.shape[1], q_len_B)
        out = jnp.where(valid_BxT[:, :, None, None], out, jnp.zeros((), out.dtype))
        lse = jnp.where(valid_BxT[:, None, :], stats_BxNxT.astype(jnp.float32), NEG)
        return out, lse

    def backward(self, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, out_BxTxNxH, lse_BxNxT, dout_BxTxNxH,
                 q_len_B, kv_len_B, causal):
        _, bwd, fa = _STATE.get("calls") or _calls()
        unused = jnp.zeros(0, q_BxTxNxH.dtype)
        dtype = q_BxTxNxH.dtype
        grads = bwd(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, unused, q_len_B.astype(jnp.int32),
                    kv_len_B.astype(jnp.int32), unused, unused, unused, unused,
                    lse_BxNxT.astype(jnp.float32), out_BxTxNxH.astype(dtype),
                    dout_BxTxNxH.astype(dtype), **_params(fa, q_BxTxNxH.shape[-1], causal))
        return grads[0], grads[1], grads[2]


CUDNN = CudnnBackend()


def backend() -> CudnnBackend:
    return CUDNN


def takes(q_BxTxNxH: jax.Array) -> bool:
    """Shapes and dtypes cuDNN's flash attention takes (checked before any self-test)."""
    return cudnn_accepts(q_BxTxNxH.dtype, q_BxTxNxH.shape[-1])


def available() -> bool:
    """Whether the private cuDNN calls exist here and passed the self-test (run once per
    process, on the first call; safe inside a jit trace). False off GPU, without crashing."""
    if "ok" not in _STATE:
        ok, reason = _check()
        _STATE.update(ok=ok, reason=reason)
    return bool(_STATE["ok"])


def unavailable_reason() -> str | None:
    available()
    return _STATE["reason"]


def usable_for(q_BxTxNxH: jax.Array) -> bool:
    return cudnn_runs(jax.default_backend(), q_BxTxNxH.dtype, q_BxTxNxH.shape[-1]) and available()


def ready(target_backend: str | None = None) -> bool | None:
    """For ``resolve_gist_kernel``: True/False when ``target_backend`` (default: this
    process's) is this process's GPU; None when it cannot be checked from here (planning for
    another machine, or not a GPU)."""
    here = jax.default_backend()
    if (target_backend or here) != "gpu" or here != "gpu":
        return None
    return available()


def _check() -> tuple[bool, str | None]:
    if jax.default_backend() != "gpu":
        return False, f"unavailable: backend is {jax.default_backend()!r}, not 'gpu'"
    try:
        _STATE["calls"] = _calls()
    except (ImportError, AttributeError) as e:
        return False, f"unavailable: {e}"
    try:
        with jax.ensure_compile_time_eval():  # the first use is usually inside a trace
            error = self_test(CUDNN)
    except Exception as e:  # noqa: BLE001 - any failure of private API means "do not use"
        return False, f"self-test raised {type(e).__name__}: {e}"
    if error > SELF_TEST_TOLERANCE:
        return False, f"self-test disagrees with XLA: relative error {error:.3g} > {SELF_TEST_TOLERANCE}"
    return True, None


@functools.partial(jax.jit, static_argnums=0)
def _values_and_grads(backend, q, k, v, k_mem, v_mem, dout, local_len, memory_len):
    """split attention's output and its vjp of ``dout`` for (q, k, v, k_mem, v_mem)."""
    def core(q_, k_, v_, km, vm):
        return split_kernel.split_attention(backend, q_, k_, v_, local_len, km, vm, memory_len)

    out, vjp = jax.vjp(core, q, k, v, k_mem, v_mem)
    return [out] + list(vjp(dout))


def self_test(candidate: Any, reference: Any = None, dtype: Any = jnp.bfloat16) -> float:
    """Largest relative error of ``candidate``'s split attention (values, dq, dk, dv of both
    parts) against ``reference`` (default: the XLA backend in float32 on the same rounded
    inputs), on 2 sequences x 3 segments of 16 tokens (padding: 13 and 16 live), a 12-entry
    memory, GQA 4 heads on 2, head size 64."""
    reference = reference or split_kernel.XLA
    b, s, ts, n, kh, h, c = 2, 3, 16, 4, 2, 64, 12
    keys = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(keys[0], (b, s, ts, n, h)).astype(dtype)
    k = jax.random.normal(keys[1], (b, s, ts, kh, h)).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, ts, kh, h)).astype(dtype)
    k_mem = jax.random.normal(keys[3], (b, c, kh, h)).astype(dtype)
    v_mem = jax.random.normal(keys[4], (b, c, kh, h)).astype(dtype)
    dout = jax.random.normal(keys[5], (b, s, ts, n, h)).astype(dtype)
    local_len = jnp.array([[16, 16, 13], [16, 13, 16]], jnp.int32)
    memory_len = jnp.array([[5, 12], [3, 9]], jnp.int32)
    live = (jnp.arange(ts)[None, None, :] < local_len[:, :, None])[..., None, None]
    dout = jnp.where(live, dout, 0)  # nothing reads dead rows

    def run(backend, cast):
        args = [x.astype(cast) for x in (q, k, v, k_mem, v_mem, dout)]
        return _values_and_grads(backend, *args, local_len, memory_len)

    got = run(candidate, dtype)
    want = run(reference, jnp.float32)
    errors = []
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if i == 0:  # outputs: live rows only
            mask = np.asarray(jnp.broadcast_to(live, g.shape))
            g, w = g[mask], w[mask]
        errors.append(float(np.max(np.abs(g - w))) / max(1.0, float(np.max(np.abs(w)))))
    return max(errors)
