"""The report's numbers, each with its bootstrap interval, from the suites' cached payloads.

Units resampled: evaluation windows for perplexity, loss by position, the boundary continuation
and the reconstruction probe (all settings of a checkpoint share their windows, so differences
are paired); examples for the generation probes (surprise pairs are resampled as pairs).
Keys are ``(run, setting)`` with setting ``full``, ``local`` (no memory) or ``r<ratio>``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from gist_jax.evaluate import stats
from gist_jax.evaluate.metrics import edge_gap, score_uuid_prefixes
from gist_jax.evaluate.stats import Estimate

Key = tuple[str, str]
Results = dict[str, dict[str, dict[str, Any]]]  # run -> suite -> payload
PREFIXES = (8, 16, 32)


def _suite(results: Results, suite: str):
    for run, suites in results.items():
        if suite in suites:
            yield run, suites[suite]


def perplexity(results: Results, resamples: int, dataset: str | None = None) -> dict[Key, Estimate]:
    """exp(total NLL / total targets), windows resampled whole."""
    out = {}
    for run, payload in _suite(results, "perplexity"):
        for w in payload["per_window"]:
            if dataset is None or w["dataset"] == dataset:
                out[(run, w["setting"])] = stats.ratio(w["nll_sum"], w["tokens"], resamples, exp=True)
    return out


def efficacy(results: Results, resamples: int, dataset: str | None = None) -> dict[Key, Estimate]:
    """Memory efficacy per compressed setting, ``(run, 'r<k>')``: from the per-window NLL sums of
    full, local (no memory) and that ratio, the three resampled together
    (``stats.efficacy``). Runs evaluated without a ``local`` setting have none. A windowed (UniGist)
    run also has ``(run, 'window')`` (its window and sinks without gists, over no memory) and
    ``(run, 'r<k>_over_window')`` (the ratio over that control, paired per window)."""
    out = {}
    for run, payload in _suite(results, "perplexity"):
        sums = {w["setting"]: w["nll_sum"] for w in payload["per_window"]
                if dataset is None or w["dataset"] == dataset}
        if "local" not in sums or "full" not in sums:
            continue
        for setting, nll in sums.items():
            if setting not in ("full", "local"):
                out[(run, setting)] = stats.efficacy(sums["local"], nll, sums["full"], resamples)
            if "window" in sums and setting.startswith("r") and setting[1:].isdigit():
                # UniGist: what its gists add to its window and sinks (the ``window`` control).
                out[(run, f"{setting}_over_window")] = stats.efficacy(sums["window"], nll, sums["full"], resamples)
    return out


def position_curves(results: Results, resamples: int) -> dict[Key, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Mean loss by 1-based position inside a segment (first segment skipped), pointwise band."""
    out = {}
    for run, payload in _suite(results, "boundary"):
        for setting, curves in payload["loss_by_position_per_window"].items():
            out[(run, setting)] = stats.curve(np.asarray(curves, np.float64), resamples)
    return out


def edge_gaps(results: Results, resamples: int, edge: int = 16) -> dict[Key, Estimate]:
    """First-k minus last-k mean loss inside a segment, per window, then averaged (k = the
    suite's: min(edge, L / 2)). Positive: the segment start is harder ("lost by the boundary")."""
    out = {}
    for run, payload in _suite(results, "boundary"):
        for setting, curves in payload["loss_by_position_per_window"].items():
            gaps = [edge_gap(np.asarray(c, np.float64), edge)[2] for c in curves]
            out[(run, setting)] = stats.mean(gaps, resamples)
    return out


def continuation(results: Results, resamples: int) -> dict[Key, dict[str, Estimate]]:
    """Continuation NLL / accuracy after a context cut at a segment boundary vs mid-segment, and
    the paired difference (boundary - mid) over the same windows and tokens."""
    out: dict[Key, dict[str, Estimate]] = {}
    for run, payload in _suite(results, "boundary"):
        by = {(c["setting"], c["start"]): c for c in payload["continuation_per_window"]}
        for setting in dict.fromkeys(s for s, _ in by):
            b, m = by[(setting, "boundary")], by[(setting, "mid_segment")]
            out[(run, setting)] = {
                "boundary_nll": stats.mean(b["nll"], resamples), "mid_nll": stats.mean(m["nll"], resamples),
                "diff_nll": stats.paired_difference(b["nll"], m["nll"], resamples),
                "boundary_acc": stats.mean(b["accuracy"], resamples), "mid_acc": stats.mean(m["accuracy"], resamples),
                "diff_acc": stats.paired_difference(b["accuracy"], m["accuracy"], resamples)}
    return out


def surprise(results: Results, resamples: int) -> dict[Key, dict[str, Estimate]]:
    """Needle accuracy, relevant subject vs unrelated name, and the paired gap (relevant - unrelated):
    pair i of both lists shares its seed, document and needle position."""
    out = {}
    for run, payload in _suite(results, "surprise"):
        scores: dict[tuple[str, bool], list[float]] = defaultdict(list)
        for e in payload["examples"]:
            scores[(e["setting"], bool(e["relevant"]))].append(float(e["score"]))
        for setting in dict.fromkeys(s for s, _ in scores):
            rel, unrel = scores[(setting, True)], scores[(setting, False)]
            out[(run, setting)] = {"relevant": stats.mean(rel, resamples), "unrelated": stats.mean(unrel, resamples),
                                   "gap": stats.paired_difference(rel, unrel, resamples)}
    return out


def uuid(results: Results, resamples: int) -> dict[Key, dict[Any, Estimate]]:
    """Exact match of the first 8 / 16 / 32 UUID characters, and the decay prefix8 - prefix32
    (paired per example)."""
    out = {}
    for run, payload in _suite(results, "uuid"):
        per: dict[str, list[dict[int, float]]] = defaultdict(list)
        for e in payload["examples"]:
            per[e["setting"]].append(score_uuid_prefixes(e["prediction"], e["uuid"], PREFIXES))
        for setting, scores in per.items():
            est: dict[Any, Estimate] = {p: stats.mean([s[p] for s in scores], resamples) for p in PREFIXES}
            est["decay"] = stats.paired_difference([s[8] for s in scores], [s[32] for s in scores], resamples)
            out[(run, setting)] = est
    return out


def recall(results: Results, resamples: int) -> dict[Key, dict[str, Estimate]]:
    """Accuracy per recall kind and over all of them (examples resampled)."""
    out = {}
    for run, payload in _suite(results, "recall"):
        per: dict[tuple[str, str], list[float]] = defaultdict(list)
        for e in payload["examples"]:
            per[(e["setting"], e["kind"])].append(float(e["score"]))
            per[(e["setting"], "all")].append(float(e["score"]))
        for (setting, kind), scores in per.items():
            out.setdefault((run, setting), {})[kind] = stats.mean(scores, resamples)
    return out


def reconstruction(results: Results, resamples: int) -> dict[Key, Estimate]:
    """Probe token accuracy on held-out windows (correct / reconstructed tokens, windows resampled)."""
    out = {}
    for run, payload in _suite(results, "reconstruction"):
        for w in payload["per_window"]:
            out[(run, w["setting"])] = stats.ratio(w["correct"], w["tokens"], resamples)
    return out
