"""The ``ruler_press`` suite (gist_jax/evaluate/ruler_press.py) on a tiny random checkpoint:
decoding on a cache equals transformers' own greedy generation when nothing is pressed, a
press's cache holds exactly the ratio's budget of the prompt's whole segments, and the suite
writes the ``ruler`` suite's rows for every press and ratio, each score the RULER metric of its
recorded prediction."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.requires("torch", "kvpress", "long_context_eval", "wonderwords")


@pytest.mark.parametrize("length", [53, 48])
def test_unpressed_cache_decodes_as_transformers_generate(ck, model, length):
    """The prompt's whole segments prefilled into a plain cache, the rest fed at its positions
    (none when the prompt ends on a segment boundary: the first token then comes from the
    prefill's last state), then greedy: token for token what ``model.generate`` gives."""
    import torch

    from gist_jax.evaluate import torch_base
    from gist_jax.evaluate.ruler_press import greedy_on_cache

    ids = torch.tensor([list(range(40, 40 + length))]) % ck.tokenizer.vocab_size
    context = (ids.shape[1] // 16) * 16
    pre = torch_base.prefill(model, ids[:, :context])
    cache = torch_base.compressed_cache(model, pre, context, None)
    last = pre.last_hidden[:, -1] if context == length else None
    got = greedy_on_cache(model, ids, context, cache, 12, None, ck.tokenizer.vocab_size, last)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, ids.shape[1]:].tolist()
    assert got == want


@pytest.mark.parametrize("press", ["streaming_llm", "expected_attention", "knorm"])
def test_a_press_keeps_the_budget_of_the_whole_segments(ck, model, press):
    import torch

    from gist_jax.evaluate import torch_base
    from gist_jax.evaluate.kvpress_peer import kept_entries
    from gist_jax.evaluate.ruler_press import _pressed_cache

    ids = torch.tensor([list(range(7, 7 + 100))])
    context = 96  # six segments of 16; the last 4 tokens stay raw
    pre = torch_base.prefill(model, ids[:, :context])
    for r in (4, 8):
        cache = _pressed_cache(model, ids, pre, context, press, r, "ratio", ck.comp.num_sinks)
        assert set(torch_base.cache_lengths(cache)) == {kept_entries(context, r)} == {context // r}


def test_the_suite_end_to_end(checkpoint, tmp_path):
    from gist_jax.evaluate import SUMMARY_COLUMNS, run_suites
    from gist_jax.evaluate.ruler import score

    tasks = ("niah_single_1", "vt")
    out = run_suites(checkpoint, "ruler_press", tmp_path, verbose=False, ruler_lengths=(2048,), ruler_tasks=tasks,
                     num_examples=2, seed=3, ruler_presses=("streaming_llm", "knorm"),
                     ruler_max_new_tokens=8)["ruler_press"]
    rows = out["rows"]
    settings = {f"{p}_r{r}" for p in ("streaming_llm", "knorm") for r in (4, 8)}
    assert {(r["setting"], r["task"]) for r in rows} == {(s, t) for s in settings for t in (*tasks, "mean")}
    for r in rows:
        assert set(SUMMARY_COLUMNS["ruler_press"]) <= set(r)
        assert r["ratio"] == int(r["setting"][-1])
        assert r["examples"] == (4 if r["task"] == "mean" else 2)
        assert 0.0 <= r["score_lo"] <= r["score"] <= r["score_hi"] <= 1.0
    saved = json.loads((tmp_path / "ruler_press.json").read_text())
    assert len(saved["examples"]) == 4 * 2 * 2
    for p in saved["examples"]:
        assert p["score"] == score(p["task"], p["prediction"], p["answers"])
