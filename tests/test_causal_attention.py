"""Plain causal attention fast paths (gist_jax/model/causal.py) against the dense reference:
values and gradients with padding, GQA, offsets, block sizes that do and do not divide the
length, RoPE variants at model level; ``auto`` resolution per backend; O(N) backward memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax.errors import ConfigError
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.forward import compressed_logits
from gist_jax.gist.layout import build_layout
from gist_jax.model import causal
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.causal import dot_product_attention
from gist_jax.model.config import RopeScaling, preset
from gist_jax.model.transformer import forward, init_params


def _qkv(b: int, t: int, s: int, n: int, kv_heads: int, h: int = 8, seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, t, n, h)), jax.random.normal(kk, (b, s, kv_heads, h)),
            jax.random.normal(kv, (b, s, kv_heads, h)))


def _dense(q, k, v, valid, q_offset):
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    mask = jnp.broadcast_to(causal.causal_mask(t, s, valid, q_offset), (b, t, s))
    return dot_product_attention(q, k, v, mask)


def _values_and_grads(fn, q, k, v, live_BxTx1x1):
    """Output on live rows and d(sum(w * out))/d(q, k, v) with a random w on live rows (rows
    that see no key are padding: the two implementations differ there by design)."""
    w = jax.random.normal(jax.random.key(7), q.shape) * live_BxTx1x1

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out * live_BxTx1x1, vjp(w)

    return run(q, k, v)


@pytest.mark.parametrize("t,s,kv_heads,block,q_offset,pad", [
    (16, 16, 4, 4, 0, False),     # MHA, block divides N
    (19, 19, 2, 8, 0, True),      # GQA, block does not divide N, left and right padding
    (13, 13, 1, 512, 0, True),    # MQA, block clamped to N
    (10, 17, 2, 4, 7, True),      # queries after a 7-key prefix (bottom-right causal)
    (12, 12, 2, 5, -2, False),    # negative offset: first queries see nothing
])
def test_blockwise_matches_dense(t, s, kv_heads, block, q_offset, pad):
    b, n = 2, 4
    q, k, v = _qkv(b, t, s, n, kv_heads)
    valid = None
    if pad:
        valid = jnp.ones((b, s), bool).at[0, s - 3:].set(False).at[1, :2].set(False)
    live = causal.causal_mask(t, s, valid, q_offset).any(-1)[..., None, None]
    fast = _values_and_grads(lambda *a: causal.blockwise_causal_attention(
        *a, valid, q_offset=q_offset, block=block), q, k, v, live)
    ref = _values_and_grads(lambda *a: _dense(*a, valid, q_offset), q, k, v, live)
    for got, want in zip(jax.tree.leaves(fast), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    assert float(jnp.abs(fast[0]).max()) > 0.1  # not a vacuous comparison


def test_off_by_one_mask_is_detected():
    """The comparison above can fail: a dense reference whose causal mask is shifted by one
    (each query also sees the next key) is far from blockwise, in values and gradients."""
    q, k, v = _qkv(1, 16, 16, 4, 2)
    live = jnp.ones((1, 16, 1, 1))
    fast = _values_and_grads(lambda *a: causal.blockwise_causal_attention(*a, block=4), q, k, v, live)
    shifted = _values_and_grads(lambda *a: _dense(*a, None, 1), q, k, v, live)
    for got, bad in zip(jax.tree.leaves(fast), jax.tree.leaves(shifted)):
        assert float(jnp.abs(got - bad).max()) > 1e-2


def test_blockwise_bfloat16_close_to_dense():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(1, 24, 24, 4, 2, h=16))
    got = causal.blockwise_causal_attention(q, k, v, block=8)
    want = _dense(q, k, v, None, 0)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2)


def test_auto_resolution_per_backend():
    r = causal.resolve_impl
    assert r("auto", "gpu", jnp.bfloat16, 128) == "cudnn"
    assert r("auto", "gpu", jnp.float16, 64) == "cudnn"
    assert r("auto", "gpu", jnp.float32, 128) == "blockwise"   # cuDNN: half precision only
    assert r("auto", "gpu", jnp.bfloat16, 256) == "blockwise"  # head size cuDNN does not take
    assert r("auto", "gpu", jnp.bfloat16, 128, has_padding=True) == "blockwise"
    assert r("auto", "gpu", jnp.bfloat16, 128, q_offset=3) == "blockwise"
    assert r("auto", "tpu", jnp.bfloat16, 128) == "splash"
    assert r("auto", "tpu", jnp.float32, 128, has_padding=True) == "blockwise"
    assert r("auto", "cpu", jnp.bfloat16, 128) == "blockwise"
    assert r("dense", "gpu", jnp.bfloat16, 128) == "dense"
    with pytest.raises(ValueError, match="causal attention kernel 'flash' is unknown"):
        r("flash", "cpu", jnp.float32, 8)  # a gist kernel, not a causal one
    with pytest.raises(ConfigError, match="model.attention='flash,blockwise' is not an attention choice"):
        preset("tiny", attention="flash,blockwise")
    assert preset("tiny", attention="flash").kernels.causal == "auto"  # a gist kernel leaves causal auto


def test_splash_interpret_matches_dense(monkeypatch):
    """Pallas Splash (the TPU kernel) in interpret mode, two 128-blocks, GQA."""
    monkeypatch.setattr(causal, "DEFAULT_BLOCK", 128)
    q, k, v = _qkv(1, 256, 256, 4, 2, h=64)
    got = causal.splash_causal_attention(q, k, v, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_dense(q, k, v, None, 0)), atol=1e-5)


def _backward_temp_bytes(attend, n: int) -> int:
    q, k, v = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _qkv(1, n, n, 2, 1, h=16))
    loss = lambda q, k, v: jnp.sum(attend(q, k, v) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_backward_memory_is_linear():
    """Compiled forward + backward: temp memory grows ~2x per doubling of N with blockwise (no
    N x N residual) and ~4x with dense (the check would catch a quadratic buffer)."""
    blockwise = lambda q, k, v: causal.blockwise_causal_attention(q, k, v, block=128)
    dense = lambda q, k, v: _dense(q, k, v, None, 0)
    small, large = (_backward_temp_bytes(blockwise, n) for n in (1024, 2048))
    assert large / small < 2.3, (small, large)
    dense_small, dense_large = (_backward_temp_bytes(dense, n) for n in (1024, 2048))
    assert dense_large / dense_small > 3.0, (dense_small, dense_large)
    assert large < dense_large / 8


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(preset("tiny"), jax.random.key(0))  # RoPE has no parameters


@pytest.mark.parametrize("rope,with_grads", [(RopeScaling(), True), (RopeScaling("linear", 2.0), False),
                                             (RopeScaling("llama3", 8.0, 1.0, 4.0, 16), True)])
def test_model_blockwise_matches_dense(monkeypatch, tiny_params, rope, with_grads):
    """The decoder on a plain causal spec (left padding, non-zero start positions) gives the
    same logits on live rows and the same parameter gradients with blockwise as with dense."""
    monkeypatch.setattr(causal, "DEFAULT_BLOCK", 8)  # 20 tokens: blocks of 8, 8, 4
    cfg = preset("tiny", rope_scaling=rope, max_position_embeddings=64)
    params = tiny_params
    b, t = 2, 20
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
    valid = jnp.ones((b, t), bool).at[1, :3].set(False)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32) + 5
    spec = AttentionSpec(positions=positions, valid=valid)
    targets = jnp.roll(tokens, -1, axis=1)

    def loss(p, impl):
        logits = forward(cfg.replace(attention=impl), p, tokens, spec)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(valid, nll, 0.0)), logits

    if with_grads:
        run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    else:
        run = jax.jit(lambda p, impl: (loss(p, impl), {}), static_argnums=1)
    (l_fast, logits_fast), g_fast = run(params, "blockwise")
    (l_ref, logits_ref), g_ref = run(params, "dense")
    np.testing.assert_allclose(float(l_fast), float(l_ref), rtol=1e-5)
    live = np.asarray(valid)[..., None]
    np.testing.assert_allclose(np.asarray(logits_fast) * live, np.asarray(logits_ref) * live,
                               atol=2e-5)
    for got, want in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)


def test_full_attention_baseline_uses_fast_path(monkeypatch, tiny_params):
    """``memory='none'`` (the full-attention baseline) runs the causal kernel: its loss and
    gradients equal dense, and its jaxpr holds no [N, N] array."""
    monkeypatch.setattr(causal, "DEFAULT_BLOCK", 8)
    comp = CompressionConfig(memory="none", segment_length=8, ratios=(4,), ratio_sampling="fixed")
    cfg, params = preset("tiny"), tiny_params
    n = 24
    tokens = jax.random.randint(jax.random.key(2), (1, n), 0, cfg.vocab_size)
    shape = build_layout(n, comp).shape

    def loss(p, impl):
        logits = compressed_logits(cfg.replace(attention=impl), comp, shape, p, tokens, None)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    grad = jax.value_and_grad(loss)
    run = jax.jit(grad, static_argnums=1)
    l_fast, g_fast = run(params, "blockwise")
    l_ref, g_ref = run(params, "dense")
    np.testing.assert_allclose(float(l_fast), float(l_ref), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)
    square = f"{n},{n}]"
    jaxpr = {impl: str(jax.make_jaxpr(grad, static_argnums=1)(params, impl)).replace(" ", "")
             for impl in ("blockwise", "dense")}
    assert square not in jaxpr["blockwise"] and square in jaxpr["dense"]
