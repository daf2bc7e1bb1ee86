"""The CPU-arranged projection matmul and the SwiGLU custom VJP against their plain forms.

``model/matmul.py`` and ``model/layers.swiglu`` replace autodiff's backward with hand-written
ones (for XLA:CPU's fast GEMM forms and fewer residuals); these tests hold them to the plain
``lax.dot_general`` / ``nn.silu(g) * u`` in values and in both operands' gradients.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gist_jax.model import matmul
from gist_jax.model.layers import swiglu

# (lhs shape, rhs shape, contracted axes): the model's forms (q/k/v, o_proj) and a prime token
# count (no chunk split for the weight gradient).
CASES = [
    ((2, 6, 8), (8, 3, 4), 1),
    ((2, 6, 3, 4), (3, 4, 8), 2),
    ((1, 7, 8), (8, 5), 1),
    ((1, 24, 16), (16, 12), 1),
]


def _dims(lhs_ndim: int, n: int):
    return ((tuple(range(lhs_ndim - n, lhs_ndim)), tuple(range(n))), ((), ()))


def _loss(dot, dims, cotangent):
    return lambda x, w: jnp.sum(dot(x, w, dims).astype(jnp.float32) * cotangent)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("lhs_shape,rhs_shape,n", CASES)
def test_projection_matches_dot_general_in_values_and_gradients(lhs_shape, rhs_shape, n, dtype, tol):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, lhs_shape, jnp.float32).astype(dtype)
    w = jax.random.normal(kw, rhs_shape, jnp.float32).astype(dtype)
    dims = _dims(len(lhs_shape), n)
    ref = lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
    got = jax.jit(lambda a, b: matmul.projection_dot_general(a, b, dims))(x, w)
    assert got.shape == ref.shape and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), rtol=tol, atol=tol)
    cotangent = jax.random.normal(kc, ref.shape, jnp.float32)
    # The reference gradient in float32 from the same (rounded) inputs: what both compute.
    ref_grads = jax.grad(_loss(lax.dot_general, dims, cotangent), argnums=(0, 1))(
        x.astype(jnp.float32), w.astype(jnp.float32))
    got_grads = jax.jit(jax.grad(_loss(matmul.projection_dot_general, dims, cotangent), argnums=(0, 1)))(x, w)
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == dtype
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), rtol=tol, atol=tol * scale)


def test_projection_takes_the_custom_path_on_cpu_and_only_for_projections():
    x, w = jnp.ones((2, 6, 8)), jnp.ones((8, 4))

    def has_custom_vjp(f, *args) -> bool:
        return "custom_vjp_call" in str(jax.make_jaxpr(f)(*args))

    proj = lambda a, b: matmul.projection_dot_general(a, b, _dims(3, 1))
    assert has_custom_vjp(proj, x, w) == (jax.default_backend() == "cpu")
    # A batched contraction is not a projection: plain dot_general.
    batched = lambda a, b: matmul.projection_dot_general(a, b, (((2,), (1,)), ((0,), (0,))))
    assert not has_custom_vjp(batched, x, jnp.ones((2, 8, 4)))
    with matmul.plain_projections():  # read at trace time: a fresh function, not a cached trace
        assert not has_custom_vjp(lambda a, b: matmul.projection_dot_general(a, b, _dims(3, 1)), x, w)
    assert has_custom_vjp(lambda a, b: matmul.projection_dot_general(a, b, _dims(3, 1)), x, w) == (
        jax.default_backend() == "cpu")  # and back after it


@pytest.mark.parametrize("m,expected", [(2304, 16), (7, 1), (24, 12), (2, 1), (4, 2)])
def test_weight_gradient_chunk_count_divides_the_tokens(m, expected):
    c = matmul._chunks(m)
    assert c == expected and m % c == 0


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_swiglu_matches_autodiff_form(dtype, tol):
    kg, ku, kc = jax.random.split(jax.random.key(1), 3)
    g = (3 * jax.random.normal(kg, (2, 5, 16), jnp.float32)).astype(dtype)
    u = jax.random.normal(ku, (2, 5, 16), jnp.float32).astype(dtype)
    ct = jax.random.normal(kc, (2, 5, 16), jnp.float32)

    def plain(a, b):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return nn.silu(a) * b

    np.testing.assert_allclose(np.asarray(swiglu(g, u), np.float32), np.asarray(plain(g, u)), rtol=tol, atol=tol)
    loss = lambda f: lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * ct)
    got = jax.grad(loss(swiglu), argnums=(0, 1))(g, u)
    ref = jax.grad(loss(plain), argnums=(0, 1))(g.astype(jnp.float32), u.astype(jnp.float32))
    for a, b in zip(got, ref):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), rtol=tol, atol=tol)
