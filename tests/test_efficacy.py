"""Memory efficacy: the ``local`` (no memory) setting against an independent computation, the
formula, its bootstrap interval, and where it is reported (in-training eval, demo table, study).

The independent computation is the base model run by hand on each segment alone (a plain
``Decoder`` call on the segment's tokens, positions 0..L-1), not the evaluator's folded batch;
the leak test shows that the comparison notices a ``local`` that lets one earlier segment in.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gist_helpers import BASE, comp_config, model, tokens

from gist_jax.evaluate import stats
from gist_jax.gist.forward import compressed_hidden
from gist_jax.model.attention import AttentionSpec
from gist_jax.model.transformer import Decoder
from gist_jax.train import evaluation
from gist_jax.train.evaluation import (
    PerplexityEvaluator,
    eval_settings,
    memory_efficacy,
    setting_params,
    token_nll_fn,
)

SEGMENT = 8
NUM_SEGMENTS = 4


def _local_setting(comp):
    cfg, _ = model(comp)
    (local,) = [s for s in eval_settings(cfg, comp, local=True) if s.local]
    return local


def _segments_alone_nll(cfg, params, tokens_BxN, segment_length):
    """NLL ``[B, N-1]`` of token j+1 from position j, each segment run alone by hand: the last
    position of a segment sees that segment only and predicts the next segment's first token."""
    b, n = tokens_BxN.shape
    nll = np.zeros((b, n - 1))
    for start in range(0, n, segment_length):
        seg_BxL = tokens_BxN[:, start:start + segment_length]
        spec = AttentionSpec.causal(b, seg_BxL.shape[1])  # positions 0..L-1, no memory
        logits = Decoder(cfg).apply({"params": params}, seg_BxL, spec)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        for j in range(start, min(start + segment_length, n - 1)):
            nll[:, j] = -np.asarray(logp[jnp.arange(b), j - start, tokens_BxN[:, j + 1]])
    return nll


def _segments_behind_sinks_nll(cfg, params, tokens_BxN, segment_length, sinks):
    """As ``_segments_alone_nll``, each segment run by hand behind the window's first ``sinks``
    tokens (positions 0..s-1, the segment at s..s+L-1)."""
    b, n = tokens_BxN.shape
    nll = np.zeros((b, n - 1))
    for start in range(0, n, segment_length):
        seg_BxL = jnp.concatenate([tokens_BxN[:, :sinks], tokens_BxN[:, start:start + segment_length]], axis=1)
        logits = Decoder(cfg).apply({"params": params}, seg_BxL, AttentionSpec.causal(b, seg_BxL.shape[1]))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        for j in range(start, min(start + segment_length, n - 1)):
            nll[:, j] = -np.asarray(logp[jnp.arange(b), sinks + j - start, tokens_BxN[:, j + 1]])
    return nll


def _local_nll(comp, params, tokens_BxN):
    setting = _local_setting(comp)
    nll, _ = token_nll_fn(setting, tokens_BxN.shape[1])(setting_params(params, setting), tokens_BxN)
    return np.asarray(nll)


@pytest.fixture(scope="module")
def case():
    comp = comp_config("kv", "fine", sinks=2, segment_length=SEGMENT, gist_projections=True)
    _, params = model(comp)
    toks = tokens(2, SEGMENT * NUM_SEGMENTS - 3)  # a short last segment: folding pads it
    base_cfg = _local_setting(comp).cfg
    reference = _segments_alone_nll(base_cfg, evaluation.strip_gist_params(params), toks, SEGMENT)
    return comp, params, toks, reference


def test_local_is_the_base_model_on_each_segment_alone(case):
    comp, params, toks, reference = case
    np.testing.assert_allclose(_local_nll(comp, params, toks), reference, atol=2e-5, rtol=1e-5)


def test_the_comparison_fails_when_local_leaks_one_earlier_segment(case, monkeypatch):
    """A ``local`` whose segments also see the previous segment (the mutation) must not pass
    the comparison above: the test can fail, and fails for exactly the leak it guards."""
    comp, params, toks, reference = case

    def leaking(cfg, comp_none, params, tokens_BxN, segment_length, sinks=0):
        n = tokens_BxN.shape[1]
        rows = []
        for start in range(0, n, segment_length):
            lo = max(0, start - segment_length)  # one earlier segment visible
            hidden = compressed_hidden(cfg, comp_none, None, params, tokens_BxN[:, lo:start + segment_length], {})
            rows.append(hidden[:, start - lo:])
        return jnp.concatenate(rows, axis=1)

    monkeypatch.setattr(evaluation, "segments_alone_hidden", leaking)
    token_nll_fn.cache_clear()
    try:
        leaked = _local_nll(comp, params, toks)
    finally:
        token_nll_fn.cache_clear()
    first = np.arange(toks.shape[1] - 1) < SEGMENT
    np.testing.assert_allclose(leaked[:, first], reference[:, first], atol=2e-5)  # segment 0 has nothing to leak
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(leaked, reference, atol=2e-5, rtol=1e-5)


def test_the_sinks_control_is_the_base_model_behind_the_sinks_on_each_segment(case):
    """The ``sinks`` setting (the memory a compressed setting keeps besides its gists) equals the
    base model run by hand on [sinks, segment]; it differs from ``local`` (it sees something)."""
    comp, params, toks, reference = case
    cfg, _ = model(comp)
    (sinks,) = [s for s in eval_settings(cfg, comp, local=True, sinks_only=True) if s.name == "sinks"]
    assert sinks.sinks == comp.num_sinks == 2 and sinks.local
    got, _ = token_nll_fn(sinks, toks.shape[1])(setting_params(params, sinks), toks)
    want = _segments_behind_sinks_nll(sinks.cfg, evaluation.strip_gist_params(params), toks, SEGMENT, 2)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)
    scored = np.arange(toks.shape[1] - 1) >= SEGMENT
    assert np.abs(np.asarray(got)[:, scored] - reference[:, scored]).max() > 1e-3
    assert "sinks" not in [s.name for s in eval_settings(cfg, comp.replace(num_sinks=0), local=True, sinks_only=True)]
    assert "sinks" not in [s.name for s in eval_settings(cfg, comp, local=True)]  # only when asked for


def test_efficacy_formula_and_edges():
    assert memory_efficacy(3.0, 2.0, 1.0) == pytest.approx(0.5)
    assert memory_efficacy(3.0, 1.0, 1.0) == pytest.approx(1.0)  # as good as full attention
    assert memory_efficacy(3.0, 3.0, 1.0) == pytest.approx(0.0)  # as good as no memory
    assert memory_efficacy(3.0, 4.0, 1.0) == pytest.approx(-0.5)  # the gists hurt
    assert math.isnan(memory_efficacy(1.0, 1.0, 1.0))  # full attention gains nothing over no memory
    assert evaluation.efficacy_metrics({"full": 1.0, "r4": 2.0}) == {}
    assert evaluation.efficacy_metrics({"full": 1.0, "local": 3.0, "r4": 2.0, "r8": 2.5}) == {
        "eval/efficacy_r4": pytest.approx(0.5), "eval/efficacy_r8": pytest.approx(0.25)}


def test_efficacy_interval_resamples_the_three_settings_together():
    rng = np.random.default_rng(0)
    full = rng.uniform(90, 110, 64)
    local = full + rng.uniform(20, 40, 64)  # per window: context gain 20..40 nats
    comp = local - 0.5 * (local - full)  # exactly half the gain recovered in every window
    e = stats.efficacy(local, comp, full)
    assert e.value == pytest.approx(0.5) and e.lo == pytest.approx(0.5) and e.hi == pytest.approx(0.5)
    noisy = comp + rng.normal(0, 5, 64)
    e = stats.efficacy(local, noisy, full)
    assert e.lo < e.value < e.hi and e.hi - e.lo < 0.2 and e.n == 64
    assert math.isnan(stats.efficacy([], [], []).value)


def test_in_training_eval_reports_local_and_efficacy_from_the_same_nll(case):
    comp, params, toks, reference = case
    batch = {"tokens": toks, "loss_mask": jnp.ones(toks.shape, bool).at[:, -1].set(False)}
    out = PerplexityEvaluator(BASE, comp, toks.shape[1], [batch])(params)
    scored = np.arange(toks.shape[1] - 1) >= SEGMENT
    local_nll = reference[:, scored].mean()
    assert out["eval/ppl_local"] == pytest.approx(math.exp(local_nll), rel=1e-5)
    full_nll, r4_nll = math.log(out["eval/ppl_full"]), math.log(out["eval/ppl_r4"])
    # A random model gains nothing from context (full >= local): NaN, as memory_efficacy defines.
    expected = memory_efficacy(local_nll, r4_nll, full_nll)
    assert out["eval/efficacy_r4"] == pytest.approx(expected, rel=1e-4, abs=1e-6, nan_ok=True)


def test_a_full_attention_run_has_no_local_setting():
    comp = comp_config("kv", "fine").full_attention()
    assert [s.name for s in eval_settings(BASE, comp, local=True)] == ["full"]


def test_the_eval_line_and_the_demo_table_show_efficacy(tmp_path):
    import json

    from gist_jax.train.report import perplexity_table
    from gist_jax.train.state_hooks import eval_line

    before = {"eval/ppl_full": 4.0, "eval/ppl_local": 9.0, "eval/ppl_r4": 30.0, "eval/efficacy_r4": -1.39}
    after = {"eval/ppl_full": 4.0, "eval/ppl_local": 9.0, "eval/ppl_r4": 6.0, "eval/efficacy_r4": 0.5}
    assert eval_line(after) == "ppl_full 4.000 | ppl_local 9.000 | ppl_r4 6.000 | efficacy_r4 0.500"
    lines = [json.dumps({"step": s, **m}) for s, m in ((0, before), (20, after))]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    table = perplexity_table(tmp_path).splitlines()
    assert table[0] == ("| setting | ppl at step 0 | ppl at step 20 | change | efficacy at step 0 | "
                        "efficacy at step 20 |")
    assert table[3].startswith("| no memory (each segment alone) | 9.000 | 9.000 |")
    assert table[4] == "| compressed, ratio 4 | 30.000 | 6.000 | -80.0% | -1.390 | +0.500 |"
