"""The model's projection matmuls, arranged for XLA:CPU's fast GEMM kernels.

Why this exists (measured on this project's 2-core AMD EPYC, jax 0.10.2; docs/performance.md):
XLA:CPU hands a dot to YNNPACK only in a few forms, and every other form falls back to a much
slower path. Three gaps showed up in the training step of a SmolLM2-sized model:

- **bfloat16 with a bfloat16 result** is up-cast: both operands are converted to float32 and
  multiplied in float32 (about 170 GFLOP/s), and the step's saved activations are converted
  back and forth around every such dot. The same operands asking for a float32 result
  (``preferred_element_type=float32``) run YNNPACK's native bfloat16 kernel (about 350
  GFLOP/s), with float32 accumulation, which is what the up-cast computed anyway.
- **The weight gradient** ``dW = X^T dY`` contracts the token axis, the leading axis of both
  operands. That form goes to Eigen in float32 (again about 170 GFLOP/s for bfloat16 inputs);
  splitting the token axis into (chunks, rows) and contracting both makes XLA transpose X once
  (a cheap copy) and use the native kernel (about 350 GFLOP/s).
- Autodiff's own transposes were fused with the SwiGLU backward into strided copies that ran
  at a few hundred MB/s; a ``custom_vjp`` keeps the residuals as the forward made them.

So ``projection_dot_general`` (given to every ``nn.DenseGeneral`` of the model, and used by the
LM head in ``loss.py``) computes exactly ``lax.dot_general`` of a projection: lhs contracting its
trailing axes with the kernel's leading axes, accumulated in float32 and rounded to the inputs'
dtype, with a hand-written backward of the same three GEMMs in the fast forms. Values equal
``lax.dot_general`` up to float32 summation order (tested, with gradients). It applies on the
CPU backend only: GPU and TPU compilers take every form natively, so there it is
``lax.dot_general`` itself; any other dimension numbers fall back to it too. So does a step with
context parallelism (``mesh.context`` > 1): flattening ``[B, T, E]`` to ``[B * T, E]`` merges the
batch axis with the sharded sequence axis, a layout XLA can only reach by all-gathering the
activations, which is the traffic context parallelism exists to avoid.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gist_jax.model.sharding import context_size

# Largest token-chunk count tried for the weight gradient's (chunks, rows) split.
_MAX_CHUNKS = 16
_PLAIN: contextvars.ContextVar[bool] = contextvars.ContextVar("plain_projections", default=False)


@contextlib.contextmanager
def plain_projections() -> Iterator[None]:
    """While tracing under this context, every projection traces plain ``lax.dot_general``
    (tests, A/B benchmarks): the rewrite is read at trace time, so trace a fresh function."""
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


def _accumulate_dtype(dtype: Any) -> Any:
    """float32 for 16-bit floats (what makes YNNPACK take bfloat16), else None (the dtype's own)."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 and jnp.issubdtype(dtype, jnp.floating) else None


def _chunks(m: int) -> int:
    """A divisor c > 1 of the token count m, as large as possible up to ``_MAX_CHUNKS`` (1 when
    m is prime or small): the weight gradient contracts m as (c, m / c)."""
    return next((c for c in range(min(_MAX_CHUNKS, m // 2), 1, -1) if m % c == 0), 1)


def _weight_grad(x_MxK: jax.Array, ct_MxN: jax.Array) -> jax.Array:
    """``x^T ct`` ([K, N], float32 accumulated) in the form XLA:CPU runs natively."""
    m, k = x_MxK.shape
    acc = _accumulate_dtype(x_MxK.dtype) or x_MxK.dtype
    c = _chunks(m)
    if c == 1:
        return jnp.einsum("MK,MN->KN", x_MxK, ct_MxN, preferred_element_type=acc)
    return jnp.einsum("cmK,cmN->KN", x_MxK.reshape(c, m // c, k), ct_MxN.reshape(c, m // c, -1),
                      preferred_element_type=acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_MxK: jax.Array, w_KxN: jax.Array, out_dtype: Any) -> jax.Array:
    acc = _accumulate_dtype(out_dtype)
    return jnp.dot(x_MxK, w_KxN, preferred_element_type=acc).astype(out_dtype)


def _matmul_fwd(x_MxK: jax.Array, w_KxN: jax.Array, out_dtype: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _matmul(x_MxK, w_KxN, out_dtype), (x_MxK, w_KxN)


def _matmul_bwd(out_dtype: Any, res: tuple[jax.Array, jax.Array],
                ct_MxN: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_MxK, w_KxN = res
    ct_MxN = ct_MxN.astype(out_dtype)
    dx_MxK = lax.dot_general(ct_MxN, w_KxN, (((1,), (1,)), ((), ())),
                             preferred_element_type=_accumulate_dtype(out_dtype))
    dw_KxN = _weight_grad(x_MxK, ct_MxN)
    return dx_MxK.astype(x_MxK.dtype), dw_KxN.astype(w_KxN.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _is_projection(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    return (not lhs_batch and not rhs_batch and n > 0
            and tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
            and tuple(rhs_contract) == tuple(range(n))
            and lhs.shape[lhs.ndim - n:] == rhs.shape[:n])


def projection_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                           precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """``lax.dot_general`` with the signature ``nn.DenseGeneral(dot_general=...)`` expects."""
    if (_PLAIN.get() or jax.default_backend() != "cpu" or context_size() > 1 or precision is not None
            or preferred_element_type is not None or lhs.dtype != rhs.dtype
            or not jnp.issubdtype(lhs.dtype, jnp.floating)
            or not _is_projection(lhs, rhs, dimension_numbers)):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    n = len(dimension_numbers[0][0])
    batch_shape, out_shape = lhs.shape[:lhs.ndim - n], rhs.shape[n:]
    k = math.prod(rhs.shape[:n])
    y_MxN = _matmul(lhs.reshape(-1, k), rhs.reshape(k, -1), lhs.dtype)
    return y_MxN.reshape(batch_shape + out_shape)


def project(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w``, x's last axis against w's first (the LM head's form), as a projection."""
    return projection_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
