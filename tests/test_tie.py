"""TIE (method.md 4.2): reference log-probs against transformers, weight properties, no gradient
into the reference model, offline precomputation round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
import torch

from gist_jax.hf.importer import load_hf_dir
from gist_jax.model.transformer import forward
from gist_jax.train import tie

N, L = 24, 8
ref_log_probs = jax.jit(tie.reference_log_probs, static_argnums=(0, 3))
compute = jax.jit(tie.compute_tie_weights, static_argnums=(0, 4, 5, 6))
weights_fn = jax.jit(tie.tie_weights, static_argnums=(3, 4))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    path = tmp_path_factory.mktemp("tie_llama")
    model = tiny_hf.build("llama_gqa_untied", path)
    cfg, params = load_hf_dir(path, dtype="float32")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tiny_hf.TINY["vocab_size"], size=(2, N)).astype(np.int64)
    mask = rng.random((2, N)) < 0.8
    mask[:, -1] = False
    return model, cfg, params, tokens, mask


def _torch_log_probs(model, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: full sequence in one forward; each segment as its own sequence
    (positions from 0), its logit at chunk offset j - kL predicting token j+1."""
    b, n = tokens.shape
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=torch.from_numpy(tokens)).logits.float(), -1)
        segs = [torch.log_softmax(model(input_ids=torch.from_numpy(tokens[:, k:k + L])).logits
                                  .float(), -1) for k in range(0, n, L)]
    seg = torch.cat(segs, dim=1).numpy()
    full = full.numpy()
    lp_full, lp_seg = np.zeros((b, n), np.float32), np.zeros((b, n), np.float32)
    for i in range(b):
        for j in range(n - 1):
            lp_full[i, j] = full[i, j, tokens[i, j + 1]]
            lp_seg[i, j] = seg[i, j, tokens[i, j + 1]]
    return lp_full, lp_seg


def _np_weights(lp_full, lp_seg, mask, gamma, rescale=True):
    d = np.minimum(lp_full - lp_seg, gamma)
    w = np.zeros_like(d, dtype=np.float64)
    for i in range(d.shape[0]):
        if mask[i].any():
            e = np.exp(d[i][mask[i]] - d[i][mask[i]].max())
            w[i][mask[i]] = e / e.sum() * (mask[i].sum() if rescale else 1)
    return w


def test_matches_transformers(ref):
    model, cfg, params, tokens, mask = ref
    t_full, t_seg = _torch_log_probs(model, tokens)
    lp_full, lp_seg = ref_log_probs(cfg, params, jnp.asarray(tokens, jnp.int32), L)
    np.testing.assert_allclose(np.asarray(lp_full), t_full, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(lp_seg), t_seg, atol=1e-4, rtol=0)
    d = t_full - t_seg
    assert np.abs(d[:, L:N - 1]).max() > 1e-2  # later segments really differ: not a vacuous test
    for gamma in (2.0, 0.05):
        ours = compute(cfg, params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), L, gamma,
                       True)
        np.testing.assert_allclose(np.asarray(ours), _np_weights(t_full, t_seg, mask, gamma),
                                   atol=1e-4, rtol=0)


def test_chunked_head_matches_unchunked(ref, monkeypatch):
    """The chunked LM head (long sequences) gives the same log-probs as plain logits."""
    _, cfg, params, tokens, _ = ref
    toks = jnp.asarray(tokens, jnp.int32)
    logp = jax.jit(lambda p, t: jax.nn.log_softmax(forward(cfg, p, t), -1))(params, toks)
    expected = np.take_along_axis(np.asarray(logp)[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    monkeypatch.setattr(tie, "LOGIT_CHUNK", 10)  # 24 = 10 + 10 + 4 (padding path)
    lp_full, _ = jax.jit(lambda p, t: tie.reference_log_probs(cfg, p, t, L))(params, toks)
    np.testing.assert_allclose(np.asarray(lp_full)[:, :-1], expected, atol=1e-5, rtol=0)
    assert np.all(np.asarray(lp_full)[:, -1] == 0)


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_segment_zero_predictions_have_zero_d(ref, impl):
    """Predictions made from segment 0 see the same context in both passes. Dense: the same
    rows of the same mask values go through the same computation, so the match is bitwise;
    blockwise folds segments into the batch (other block shapes), so it is float-close."""
    _, cfg, params, tokens, _ = ref
    cfg = cfg.replace(attention=impl)
    lp_full, lp_seg = (np.asarray(x) for x in
                       ref_log_probs(cfg, params, jnp.asarray(tokens, jnp.int32), L))
    if impl == "dense":
        np.testing.assert_array_equal(lp_full[:, :L], lp_seg[:, :L])
    else:
        np.testing.assert_allclose(lp_full[:, :L], lp_seg[:, :L], atol=1e-6, rtol=0)
    assert np.all(lp_full[:, L:N - 1] != lp_seg[:, L:N - 1])


def test_weight_sums_and_masking():
    rng = np.random.default_rng(1)
    lp_full, lp_seg = rng.normal(size=(3, 10)) * 2, rng.normal(size=(3, 10)) * 2
    mask = rng.random((3, 10)) < 0.6
    mask[0, 0] = True
    mask[2] = False  # no loss position at all
    for rescale, target in ((False, 1.0), (True, mask.sum(-1))):
        w = np.asarray(weights_fn(jnp.asarray(lp_full), jnp.asarray(lp_seg), jnp.asarray(mask),
                                  2.0, rescale))
        assert w.dtype == np.float32 and not np.isnan(w).any()
        assert np.all(w[~mask] == 0) and np.all(w[mask] > 0)
        np.testing.assert_allclose(w[:2].sum(-1), np.broadcast_to(target, (3,))[:2], rtol=1e-5)
        assert np.all(w[2] == 0)
    grad = jax.jit(jax.grad(lambda a: tie.tie_weights(a, jnp.asarray(lp_seg), jnp.asarray(mask)).sum()))(
        jnp.asarray(lp_full, jnp.float32))
    assert not np.isnan(np.asarray(grad)).any()
    ent = float(tie.weight_entropy(jnp.ones((3, 10)), jnp.asarray(mask)))
    np.testing.assert_allclose(ent, np.log(mask[:2].sum(-1)).mean(), rtol=1e-5)


def test_gamma_clips():
    d = np.array([[0.5, 3.0, -1.0, 2.5, 0.1, 7.0, 0.0]], np.float32)
    lp_seg = np.full_like(d, -3.0)
    mask = np.array([[1, 1, 1, 1, 1, 1, 0]], bool)
    w = np.asarray(tie.tie_weights(jnp.asarray(lp_seg + d), jnp.asarray(lp_seg),
                                   jnp.asarray(mask), gamma=2.0, rescale=False))
    e = np.exp(np.minimum(d[0, :6], 2.0))
    np.testing.assert_allclose(w[0, :6], e / e.sum(), rtol=1e-6)
    assert w[0, 1] == w[0, 3] == w[0, 5]  # 3.0, 2.5 and 7.0 are all clipped to gamma
    w_tiny = np.asarray(tie.tie_weights(jnp.asarray(lp_seg + d), jnp.asarray(lp_seg),
                                        jnp.asarray(mask), gamma=1e-3, rescale=True))
    clipped = mask[0] & (d[0] >= 1e-3)  # all loss positions but the one with d = -1
    assert np.all(w_tiny[0, clipped] == w_tiny[0, clipped][0])
    e = np.exp(np.minimum(d[0, :6], 1e-3))
    np.testing.assert_allclose(w_tiny[0, :6], 6 * e / e.sum(), rtol=1e-6)


def test_no_gradient_into_reference(ref):
    _, cfg, params, tokens, mask = ref
    toks, m = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)
    probe = jnp.asarray(np.random.default_rng(2).normal(size=tokens.shape), jnp.float32)

    def through_tie(p):
        lp_full, lp_seg = tie.reference_log_probs(cfg, p, toks, L)
        w = tie.compute_tie_weights(cfg, p, toks, m, L, rescale=True)
        return jnp.sum(w * probe) + jnp.sum(lp_full * probe) + jnp.sum(lp_seg)

    grads = jax.jit(jax.grad(through_tie))(params)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
    # Control: the same params do receive gradient through an ordinary forward.
    control = jax.jit(jax.grad(lambda p: jnp.sum(forward(cfg, p, toks)[..., 0] * probe)))(params)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(control))


def test_precompute_round_trip(ref, tmp_path):
    _, cfg, params, tokens, _ = ref
    rng = np.random.default_rng(3)
    extra = rng.integers(0, tiny_hf.TINY["vocab_size"], size=(1, N))
    out = tie.precompute_tie_weights(cfg, params, [tokens, extra], L, 1.5, tmp_path / "w")
    weights, meta = tie.load_precomputed_tie_weights(out)
    assert weights.shape == (3, N) and weights.dtype == np.float32
    assert meta["gamma"] == 1.5 and meta["segment_length"] == L and meta["rescale"] is True
    assert meta["model_family"] == "llama" and meta["num_sequences"] == 3
    everything = np.concatenate([tokens, extra])
    expected = compute(cfg, params, jnp.asarray(everything, jnp.int32),
                       jnp.asarray(tie.default_loss_mask(everything)), L, 1.5, True)
    np.testing.assert_allclose(weights, np.asarray(expected), atol=1e-5)  # batch 2+1 vs 3
    np.testing.assert_allclose(weights.sum(-1), N - 1, rtol=1e-5)


@pytest.mark.parametrize("n,seg,block", [(24, 8, 512), (23, 7, 5)])
def test_fast_reference_passes_match_dense(ref, monkeypatch, n, seg, block):
    """The fast passes (causal kernel; segments folded into the batch, last one padded when
    L does not divide N) equal the dense-mask reference passes, with several kernel blocks."""
    from gist_jax.model import causal

    _, cfg, params, tokens, _ = ref
    monkeypatch.setattr(causal, "DEFAULT_BLOCK", block)
    toks = jnp.asarray(tokens[:, :n], jnp.int32)
    fast = jax.jit(tie.reference_log_probs, static_argnums=(0, 3))(
        cfg.replace(attention="blockwise"), params, toks, seg)
    dense = ref_log_probs(cfg.replace(attention="dense"), params, toks, seg)
    for f, d in zip(fast, dense):
        np.testing.assert_allclose(np.asarray(f), np.asarray(d), atol=2e-5, rtol=0)
    assert np.abs(np.asarray(dense[0] - dense[1])[:, seg:n - 1]).max() > 1e-2  # passes differ
