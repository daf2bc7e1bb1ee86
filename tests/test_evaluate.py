"""Evaluation suites (gist_jax/evaluate): metrics against hand-computed values, and every suite
on a tiny checkpoint producing its JSON, CSV and PNG files."""

from __future__ import annotations

import csv
import json
import math
import pathlib

import numpy as np
import pytest

from gist_jax.evaluate import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- metrics
def test_perplexity_of_a_known_distribution():
    # a model that is uniform over 4 choices has perplexity 4 whatever the targets
    assert metrics.perplexity(np.full((3, 5), math.log(4))) == pytest.approx(4.0)
    nll = np.asarray([[math.log(2), 99.0], [math.log(8), 99.0]])
    mask = np.asarray([[True, False], [True, False]])
    assert metrics.perplexity(nll, mask) == pytest.approx(4.0)  # exp(mean(log 2, log 8)) = 4
    assert math.isnan(metrics.perplexity(nll, np.zeros_like(mask)))


def test_uuid_prefix_scoring():
    uuid = "0123456789abcdef0123456789abcdef"
    preds = [" " + uuid + ".", "0123456789abcdeX" + "0" * 16, "01234567" + "z" * 24, "nothing"]
    got = metrics.mean_prefix_scores(preds, [uuid] * 4)
    assert got == {8: 3 / 4, 16: 1 / 4, 32: 1 / 4}  # hand count: 8 chars right in 3, 16 in 1 (the full one)


def test_position_in_segment_bucketing():
    seg, pos = metrics.target_positions_in_segment(7, 4)  # targets are raw tokens 1..7, L = 4
    assert seg.tolist() == [0, 0, 0, 1, 1, 1, 1] and pos.tolist() == [2, 3, 4, 1, 2, 3, 4]
    nll = np.asarray([[9, 9, 9, 1, 2, 3, 4], [9, 9, 9, 3, 4, 5, 6]], float)  # first segment skipped
    np.testing.assert_allclose(metrics.loss_by_position(nll, 4), [2, 3, 4, 5])
    both = metrics.loss_by_position(nll, 4, skip_first_segment=False)
    np.testing.assert_allclose(both, [2, (2 * 9 + 2 + 4) / 4, (2 * 9 + 3 + 5) / 4, (2 * 9 + 4 + 6) / 4])
    assert metrics.log_buckets(16) == [(1, 1), (2, 3), (4, 7), (8, 15), (16, 16)]
    assert metrics.bucket_means(np.arange(1.0, 17.0), metrics.log_buckets(16)) == [1, 2.5, 5.5, 11.5, 16]
    first, last, gap = metrics.edge_gap(np.arange(1.0, 33.0), 16)
    assert (first, last, gap) == (8.5, 24.5, -16.0)


# ----------------------------------------------------------------------------- suites
SMALL = dict(num_windows=2, num_examples=2, context_tokens=128, recall_lengths=(96, 128), depths=(0.2, 0.8),
             kinds=("passkey",), probe_steps=3, batch=2)
FILES = {
    "perplexity": ["perplexity.json", "perplexity.csv", "perplexity_vs_ratio.png"],
    "boundary": ["boundary.json", "boundary.csv", "boundary_continuation.csv", "boundary_loss_by_position.png"],
    "uuid": ["uuid.json", "uuid.csv", "uuid_prefix_accuracy.png"],
    "surprise": ["surprise.json", "surprise.csv", "surprise_accuracy_vs_ratio.png"],
    "recall": ["recall.json", "recall.csv", "recall_depth_heatmap.png"],
    "reconstruction": ["reconstruction.json", "reconstruction.csv", "reconstruction_accuracy_vs_ratio.png"],
}


@pytest.fixture(scope="module")
def results(checkpoint, tmp_path_factory):
    from gist_jax.evaluate import run_suites

    out = tmp_path_factory.mktemp("eval")
    return out, run_suites(checkpoint, "all", out, **SMALL)


@pytest.mark.parametrize("suite", list(FILES))
def test_suite_writes_its_files(results, suite):
    out, payloads = results
    for name in FILES[suite]:
        path = out / name
        assert path.exists() and path.stat().st_size > 0, name
    rows = json.loads((out / f"{suite}.json").read_text())["rows"]
    with open(out / f"{suite}.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows) > 0
    settings = {r["setting"] for r in rows}
    expected = {"r4", "r8"} if suite == "reconstruction" else {"full", "r4", "r8"}
    assert settings == (expected | {"local"} if suite == "perplexity" else expected)
    assert (out / f"{suite}.png").exists() is False  # plots carry descriptive names
    assert payloads[suite]["rows"] == rows


def test_suite_values_are_sane(results):
    _, p = results
    for row in p["perplexity"]["rows"]:
        # random model, bytes; the predictions of positions 16..62 (j >= L, j < N - 1) in 2 windows
        assert 1.0 < row["ppl"] < 2 * 264 and row["tokens"] == 2 * (64 - 16 - 1)
    boundary = p["boundary"]
    assert len(boundary["loss_by_position"]["full"]) == 16
    assert {r["start"] for r in boundary["continuation"]} == {"boundary", "mid_segment"}
    for row in p["uuid"]["rows"]:
        assert row["prefix8"] >= row["prefix16"] >= row["prefix32"]
    for row in p["surprise"]["rows"]:
        assert row["gap"] == pytest.approx(row["acc_relevant"] - row["acc_unrelated"])
    assert len(p["recall"]["rows"]) == 3 * 2 * 2
    for row in p["reconstruction"]["rows"]:
        assert 0.0 <= row["token_accuracy"] <= 1.0 and row["test_tokens"] > 0


def test_the_suite_and_the_in_training_validation_are_one_evaluator(checkpoint, results):
    """The same windows through ``PerplexityEvaluator`` (what ``metrics.jsonl`` reports during
    training) and through the ``perplexity`` suite give the same number for every setting: one
    set of settings, layouts and targets (``gist_jax.train.evaluation``)."""
    import jax.numpy as jnp

    from gist_jax.evaluate import common
    from gist_jax.train.evaluation import PerplexityEvaluator

    _, payloads = results
    ck = common.load_checkpoint(checkpoint)
    texts = common.documents("stdlib", "validation", ck.tokenizer_spec)
    tokens = jnp.asarray(common.windows(ck, texts, ck.seq_len, SMALL["num_windows"]))
    batch = {"tokens": tokens, "loss_mask": jnp.ones(tokens.shape, bool).at[:, -1].set(False)}
    got = PerplexityEvaluator(ck.cfg, ck.comp, ck.seq_len, [batch])(ck.params)
    rows = payloads["perplexity"]["rows"]
    efficacy = {f"eval/efficacy_{r['setting']}" for r in rows if r["setting"] not in ("full", "local")}
    assert {f"eval/ppl_{r['setting']}" for r in rows} | {"eval/tokens"} | efficacy == set(got)
    for row in rows:
        assert got[f"eval/ppl_{row['setting']}"] == pytest.approx(row["ppl"], rel=1e-5), row["setting"]
        assert got["eval/tokens"] == row["tokens"]
        if row["setting"] in ("r4", "r8"):  # None where the random model's full attention does not beat no memory
            expected = float("nan") if row["efficacy"] is None else row["efficacy"]
            assert got[f"eval/efficacy_{row['setting']}"] == pytest.approx(expected, rel=1e-4, nan_ok=True)


def test_compare_and_cli_errors(checkpoint, tmp_path, capsys):
    from gist_jax.evaluate import compare
    from gist_jax.evaluate.__main__ import main

    merged = compare([checkpoint, checkpoint], "perplexity", tmp_path, num_windows=1)
    assert len(merged["perplexity"]) == 8 and (tmp_path / "compare_perplexity.csv").exists()  # full, local, r4, r8 each
    assert {r["checkpoint"][:2] for r in merged["perplexity"]} == {"0:", "1:"}
    assert main(["--checkpoint", str(checkpoint), "--suite", "nonsense", "--out", str(tmp_path)]) == 2
    assert "--suite='nonsense' is unknown" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing"), "--suite", "uuid", "--out", str(tmp_path)]) == 2
