"""The chunked LM head + cross-entropy (gist_jax/model/loss.py) against dense [B, T, V] logits.

References are written here from ``jax.nn.log_softmax`` on whole logits (not with the module's
own helpers), values and gradients are compared for chunk sizes that do and do not divide T,
and each comparison is shown to catch a dropped chunk. The memory test compiles (never runs)
a T = 4096, V = 32768 gradient and reads XLA's temp-buffer size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax.model.attention import AttentionSpec
from gist_jax.model.config import ModelConfig
from gist_jax.model.loss import dense_token_scores, lm_head, lm_token_scores, next_token_labels, token_scores
from gist_jax.model.transformer import Decoder, forward, init_params

B, T, E, V = 2, 24, 16, 40


def _inputs(seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 5)
    hidden_BxTxE = jax.random.normal(k[0], (B, T, E))
    head_ExV = jax.random.normal(k[1], (E, V)) * 0.5
    labels_BxT = jax.random.randint(k[2], (B, T), 0, V)
    mask_BxT = jax.random.bernoulli(k[3], 0.7, (B, T))
    labels_BxT = jnp.where(mask_BxT | (jnp.arange(T) % 3 != 0), labels_BxT, -1)  # some -1, all masked
    weights_BxT = jax.random.uniform(k[4], (B, T), minval=0.5, maxval=2.0)
    return hidden_BxTxE, head_ExV, labels_BxT, mask_BxT, weights_BxT


def _dense_nll(hidden_BxTxE, head_ExV, labels_BxT, mask_BxT):
    logp_BxTxV = jax.nn.log_softmax(hidden_BxTxE @ head_ExV, axis=-1)
    picked = jnp.take_along_axis(logp_BxTxV, jnp.maximum(labels_BxT, 0)[..., None], -1)[..., 0]
    return jnp.where(mask_BxT, -picked, 0.0), (jnp.argmax(logp_BxTxV, -1) == labels_BxT) & mask_BxT


def _value_and_grads(nll_fn, hidden, head, labels, mask, weights):
    def loss(h, w):
        return jnp.sum(weights * nll_fn(h, w, labels, mask))
    return jax.value_and_grad(loss, argnums=(0, 1))(hidden, head)


def _assert_close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("chunk", [1, 5, 7, 8, 24, 100])  # 5, 7: padded tail; 100 > T
def test_chunked_matches_dense_values_and_gradients(chunk):
    hidden, head, labels, mask, weights = _inputs()
    ours = token_scores(hidden, head, labels, mask, chunk=chunk)
    ref_nll, ref_correct = _dense_nll(hidden, head, labels, mask)
    _assert_close(ours.nll, ref_nll)
    np.testing.assert_array_equal(np.asarray(ours.correct), np.asarray(ref_correct))
    assert np.asarray(ref_correct).any() and not np.asarray(ref_correct).all()
    assert np.all(np.asarray(ours.nll)[~np.asarray(mask)] == 0)

    chunked = lambda h, w, y, m: token_scores(h, w, y, m, chunk=chunk).nll
    dense = lambda h, w, y, m: _dense_nll(h, w, y, m)[0]
    (v1, (dh1, dw1)) = _value_and_grads(chunked, hidden, head, labels, mask, weights)
    (v0, (dh0, dw0)) = _value_and_grads(dense, hidden, head, labels, mask, weights)
    _assert_close(v1, v0)
    _assert_close(dh1, dh0)
    _assert_close(dw1, dw0)
    assert np.all(np.asarray(dh1)[~np.asarray(mask)] == 0)  # masked rows get no gradient
    # The module's dense reference (used by AE's host-side reference) is the same computation.
    _assert_close(dense_token_scores(hidden, head, labels, mask).nll, ref_nll)


def test_comparison_catches_a_dropped_chunk():
    """Zeroing one chunk's contribution (values, or its share of the head gradient) must make
    the comparisons above fail: they are not vacuous."""
    hidden, head, labels, mask, weights = _inputs()
    chunk = 5
    dropped = mask & ~((jnp.arange(T) >= 10) & (jnp.arange(T) < 15))[None]  # third chunk gone
    assert int(jnp.sum(mask)) > int(jnp.sum(dropped))
    ref_nll, _ = _dense_nll(hidden, head, labels, mask)
    with pytest.raises(AssertionError):
        _assert_close(token_scores(hidden, head, labels, dropped, chunk=chunk).nll, ref_nll)
    chunked = lambda h, w, y, m: token_scores(h, w, y, m & dropped, chunk=chunk).nll
    dense = lambda h, w, y, m: _dense_nll(h, w, y, m)[0]
    v1, (_, dw1) = _value_and_grads(chunked, hidden, head, labels, mask, weights)
    v0, (_, dw0) = _value_and_grads(dense, hidden, head, labels, mask, weights)
    for ours, ref in ((v1, v0), (dw1, dw0)):
        with pytest.raises(AssertionError):
            _assert_close(ours, ref)


def _tiny(tied: bool) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=V, hidden_size=E, intermediate_size=32,
                       num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                       max_position_embeddings=64, dtype="float32", tie_embeddings=tied)


@pytest.mark.parametrize("tied", [True, False])
def test_model_head_matches_decoder_logits(tied):
    """Decoder(head=False) + lm_token_scores == log_softmax of the Decoder's own logits, values
    and gradients w.r.t. every parameter (the embedding receives the head's gradient when
    tied; the final norm sits before the head)."""
    cfg = _tiny(tied)
    params = init_params(cfg, jax.random.key(1))
    assert ("lm_head" in params) != tied
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, V)
    labels, mask = next_token_labels(tokens), jnp.broadcast_to(jnp.arange(T) < T - 1, (B, T))
    _, _, _, _, weights = _inputs()
    spec = AttentionSpec.causal(B, T)

    def chunked(p):
        hidden = Decoder(cfg).apply({"params": p}, tokens, spec, head=False)
        return jnp.sum(weights * lm_token_scores(cfg, p, hidden, labels, mask, chunk=7).nll)

    def dense(p):
        logp = jax.nn.log_softmax(forward(cfg, p, tokens), axis=-1)
        nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
        return jnp.sum(weights * nll * mask)

    (v1, g1), (v0, g0) = jax.value_and_grad(chunked)(params), jax.value_and_grad(dense)(params)
    _assert_close(v1, v0)
    jax.tree.map(_assert_close, g1, g0)
    head_grad = g1["embed"]["embedding"] if tied else g1["lm_head"]["kernel"]
    assert float(jnp.abs(head_grad).max()) > 0
    np.testing.assert_array_equal(np.asarray(lm_head(cfg, params)).shape, (E, V))


def test_compiled_memory_is_chunk_sized_not_sequence_sized():
    """XLA's temp buffers for the value-and-gradient at V = 32768, chunk 512, stay under three
    chunk-sized logit buffers (the backward holds the recomputed logits and their gradient),
    i.e. well under the 512 MiB of dense float32 logits at T = 4096, and do not grow with T.
    Compiled only, never run."""
    v, e, chunk = 32768, 64, 512

    def temp_bytes(nll_fn, t: int) -> int:
        shapes = (jax.ShapeDtypeStruct((1, t, e), jnp.float32), jax.ShapeDtypeStruct((e, v), jnp.float32),
                  jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, t), bool))
        grad_fn = jax.grad(lambda h, w, y, m: jnp.sum(nll_fn(h, w, y, m)), argnums=(0, 1))
        return jax.jit(grad_fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    chunk_logits, dense_logits = chunk * v * 4, 4096 * v * 4
    chunked = lambda h, w, y, m: token_scores(h, w, y, m, chunk=chunk).nll
    at_4k, at_8k = temp_bytes(chunked, 4096), temp_bytes(chunked, 8192)
    assert at_4k < 3 * chunk_logits and at_4k < 0.4 * dense_logits, (at_4k, dense_logits)
    assert at_8k < 1.1 * at_4k, (at_8k, at_4k)  # O(chunk x V), not O(T x V)
    # The measurement sees logits at all: the dense path needs at least their full size.
    assert temp_bytes(lambda h, w, y, m: _dense_nll(h, w, y, m)[0], 4096) >= dense_logits
