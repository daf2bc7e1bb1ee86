"""The kvpress suite (gist_jax/evaluate/kvpress_peer.py) on a tiny random checkpoint: the torch
base model reproduces our JAX ``full`` and ``local`` (same windows, same targets), a press sees
its context with the scored tokens at their original positions (checked against an independent
masked forward, and shown to fail with compressed positions), every press keeps exactly its
budget, the one-prefill path equals kvpress's own hooks, and the suite writes its rows."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

pytestmark = pytest.mark.requires("torch", "kvpress")

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(num_windows=3, batch=2)
L = 16  # experiments/demo.py:tiny: segments of 16, windows of 64, ratios 4 and 8


@pytest.fixture(scope="module")
def tokens(ck) -> np.ndarray:
    from gist_jax.evaluate import common

    return common.windows(ck, common.documents("stdlib", "validation", ck.tokenizer_spec), ck.seq_len, 3)


@pytest.fixture(scope="module")
def suites(checkpoint, tmp_path_factory):
    from gist_jax.evaluate import run_suites

    out = tmp_path_factory.mktemp("kvpress_eval")
    return out, run_suites(checkpoint, "perplexity,kvpress", out, verbose=False, **SMALL)


def test_full_and_local_equal_our_jax_suite(suites):
    """Same windows and targets: torch full/local equal the perplexity suite's, per window."""
    _, p = suites
    ours = {(w["setting"]): w for w in p["perplexity"]["per_window"]}
    theirs = {(w["setting"]): w for w in p["kvpress"]["per_window"]}
    for setting in ("full", "local"):
        np.testing.assert_array_equal(ours[setting]["tokens"], theirs[setting]["tokens"])
        np.testing.assert_allclose(theirs[setting]["nll_sum"], ours[setting]["nll_sum"], rtol=1e-4)
    rows = {r["setting"]: r for r in p["kvpress"]["rows"]}
    jax_rows = {r["setting"]: r for r in p["perplexity"]["rows"]}
    assert rows["full"]["ppl"] == pytest.approx(jax_rows["full"]["ppl"], rel=1e-4)
    assert rows["local"]["ppl"] == pytest.approx(jax_rows["local"]["ppl"], rel=1e-4)
    assert rows["full"]["tokens"] == jax_rows["full"]["tokens"] == 3 * (64 - L - 1)


def test_suite_rows_budgets_and_efficacy(suites):
    from gist_jax.evaluate import stats

    out, _ = suites
    payload = json.loads((out / "kvpress.json").read_text())
    assert (out / "kvpress.csv").exists()
    rows = {r["setting"]: r for r in payload["rows"]}
    presses = ("streaming_llm", "snapkv", "knorm", "expected_attention")
    assert set(rows) == {"full", "local"} | {f"{n}_r{r}" for n in presses for r in (4, 8)}
    sums = {w["setting"]: np.asarray(w["nll_sum"]) for w in payload["per_window"]}
    for n in presses:
        for r, cr in ((4, 0.75), (8, 0.875)):
            row = rows[f"{n}_r{r}"]
            assert row["press"] == n and row["ratio"] == r and row["compression_ratio"] == cr
            assert 1.0 < row["ppl"] < 2 * 264
            e = stats.efficacy(sums["local"], sums[f"{n}_r{r}"], sums["full"])
            assert row["efficacy"] == (None if np.isnan(e.value) else pytest.approx(e.value))
            assert {"efficacy", "efficacy_lo", "efficacy_hi"} <= set(row)
    # context 16, 32, 48 (segments 1..3) keeps a quarter / an eighth of itself, in every layer
    budgets = {b["setting"]: b["kept_by_context"] for b in payload["budgets"]}
    for n in presses:
        assert budgets[f"{n}_r4"] == {"16": 4, "32": 8, "48": 12}
        assert budgets[f"{n}_r8"] == {"16": 2, "32": 4, "48": 6}


def test_press_with_nothing_to_drop_is_full_attention(model, tokens):
    """Ratio 0: the press path (prefill, then the segment on the cache at positions kL + i)
    is the whole-window forward on every scored target."""
    from kvpress import KnormPress

    from gist_jax.evaluate import kvpress_peer, torch_base

    full = torch_base.full_nll(model, tokens)
    hooked = torch_base.pressed_nll(model, tokens, L, lambda m, c: kvpress_peer.applied(KnormPress(0.0), m))
    np.testing.assert_allclose(hooked[:, L:], full[:, L:], atol=2e-5)


def _masked_reference(model, tokens, start: int, kept_context: np.ndarray) -> np.ndarray:
    """NLL of segment [start, start + L) from ONE forward over the window's first start + L
    tokens at their own positions, the segment's queries barred from the context keys a press
    dropped (an additive 4D mask): what the segment must see through the press."""
    import torch

    n = start + L
    allowed = np.tril(np.ones((n, n), bool))
    drop = np.setdiff1d(np.arange(start), kept_context)
    allowed[start:, drop] = False
    mask = torch.where(torch.as_tensor(allowed), 0.0, torch.finfo(torch.float32).min)[None, None]
    ids = torch.as_tensor(tokens[:, :n + 1], dtype=torch.long)
    with torch.no_grad():
        hidden = model.model(input_ids=ids[:, :n], attention_mask=mask.expand(len(tokens), 1, n, n)).last_hidden_state
        logits = model.lm_head(hidden[:, start:])
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, start + 1:n + 1],
                                                 reduction="none").double().numpy()


@pytest.mark.parametrize("start", [L, 2 * L])
def test_scored_tokens_keep_their_original_positions(model, tokens, start):
    """StreamingLLM keeps the 4 sinks and the most recent tokens: scoring the segment on its
    cache must equal the masked whole-window forward. Fed at compressed positions (cache length
    + i, what a plain forward on the short cache would do) it must not: the test can fail."""
    import torch
    from kvpress import StreamingLLMPress

    from gist_jax.evaluate import kvpress_peer, torch_base

    kept = kvpress_peer.kept_entries(start, 4)
    kept_idx = np.r_[np.arange(4), np.arange(start - (kept - 4), start)]
    ref = _masked_reference(model, tokens, start, kept_idx)
    got = torch_base.pressed_nll(model, tokens, L, lambda m, c: kvpress_peer.applied(
        kvpress_peer.make_press("streaming_llm", c, kvpress_peer.kept_entries(c, 4)), m))
    np.testing.assert_allclose(got[:, start:start + L], ref, atol=2e-5)
    assert isinstance(kvpress_peer.make_press("streaming_llm", start, kept), StreamingLLMPress)

    ids = torch.as_tensor(tokens, dtype=torch.long)
    pre = torch_base.prefill(model, ids[:, :-1])
    cache = torch_base.compressed_cache(model, pre, start, kvpress_peer.make_press("streaming_llm", start, kept))
    assert torch_base.cache_lengths(cache) == [kept] * len(model.model.layers)
    with torch.no_grad():  # the wrong positions: the cache's own length
        hidden = model.model(input_ids=ids[:, start:start + L], past_key_values=cache).last_hidden_state
        wrong = torch.nn.functional.cross_entropy(model.lm_head(hidden).transpose(1, 2),
                                                  ids[:, start + 1:start + L + 1], reduction="none").numpy()
    assert np.abs(wrong - ref).max() > 1e-3


@pytest.mark.parametrize("budget", ["ratio", "with_sinks"])
def test_prefill_once_equals_kvpress_hooks(model, tokens, ck, budget):
    """One forward per window serving every press (``torch_base.Prefill``) gives kvpress's
    own hook path, press by press, ratio by ratio."""
    from gist_jax.evaluate import kvpress_peer

    configs = [(f"{n}_r{r}", n, r) for n in kvpress_peer.DEFAULT_PRESSES for r in (4, 8)]
    seen_a = {c[0]: set() for c in configs}
    seen_b = {c[0]: set() for c in configs}
    a = kvpress_peer._window_nlls(model, tokens[:2], ck, configs, budget, "prefill_once", seen_a)
    b = kvpress_peer._window_nlls(model, tokens[:2], ck, configs, budget, "hooks", seen_b)
    assert seen_a == seen_b
    for setting in a:
        np.testing.assert_allclose(a[setting][:, L:], b[setting][:, L:], atol=1e-4, err_msg=setting)
    if budget == "with_sinks":  # the tiny run keeps 4 sinks beside its gists
        assert seen_a["knorm_r4"] == {(16, 8), (32, 12), (48, 16)}


def test_a_press_that_keeps_everything_is_refused(model, tokens):
    from kvpress import KnormPress

    from gist_jax.evaluate import kvpress_peer, torch_base

    check = kvpress_peer.budget_check("knorm", lambda c: kvpress_peer.kept_entries(c, 4), set())
    with pytest.raises(RuntimeError, match="not the budget"):
        torch_base.pressed_nll(model, tokens[:1], L, lambda m, c: kvpress_peer.applied(KnormPress(0.0), m), check)


def test_budget_arithmetic():
    from gist_jax.evaluate.kvpress_peer import kept_entries, make_press

    assert kept_entries(128, 4) == 32 and kept_entries(384, 8) == 48
    assert kept_entries(128, 4, "with_sinks", 16) == 48 and kept_entries(16, 1) == 16
    for name in ("streaming_llm", "snapkv", "snapkv_fit", "knorm", "expected_attention"):
        for context in (16, 128, 384):
            for r in (4, 8):
                press = make_press(name, context, kept_entries(context, r))
                assert int(context * (1 - press.compression_ratio)) == kept_entries(context, r)
    # SnapKV's always-kept observation window: kvpress's 64 (capped at half a short context), or
    # at most half the budget (snapkv_fit), so the budget is not filled by the window's ties
    assert make_press("snapkv", 128, 32).window_size == 64 and make_press("snapkv", 16, 4).window_size == 8
    assert make_press("snapkv_fit", 128, 32).window_size == 16 and make_press("snapkv_fit", 384, 96).window_size == 48


def test_comparison_rows_merge_and_guard(suites):
    from gist_jax.evaluate.kvpress_peer import comparison_rows, format_comparison

    _, p = suites
    rows = comparison_rows(p["perplexity"], p["kvpress"])
    methods = [r["method"] for r in rows]
    assert methods[:3] == ["full", "local", f"gist ({rows[0]['checkpoint']})"]
    assert set(methods[3:]) == {"streaming_llm", "snapkv", "knorm", "expected_attention"}
    gist = rows[2]
    ours = {r["setting"]: r for r in p["perplexity"]["rows"]}
    assert gist["ppl_r4"] == ours["r4"]["ppl"] and gist["efficacy_r8"] == ours["r8"].get("efficacy")
    assert "| stdlib | knorm |" in format_comparison(rows)
    other = {**p["kvpress"], "rows": [{**r, "ppl": r["ppl"] * 1.01} for r in p["kvpress"]["rows"]]}
    with pytest.raises(Exception, match="not the same windows"):
        comparison_rows(p["perplexity"], other)
