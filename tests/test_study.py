"""The study in one command (``python -m gist_jax.study``, issue 16 item 2), at its ``smoke`` scale,
through the real entry point as subprocesses:

1. started, then killed (SIGKILL) as soon as the first run of the grid has its final checkpoint;
2. rerun: the killed study resumes -- the finished run is not retrained -- and completes;
3. its report: every table and figure present, every PNG a real PNG, every interval contains
   its point estimate, and the numbers match the checkpoints (the suites' own rows and an
   independent ``python -m gist_jax.evaluate`` of one checkpoint);
4. rerun once more: re-reports from the cache in seconds, with no new checkpoint and no
   evaluation recomputed.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The grid this test runs (``--runs``): experiments/study.py's without ``unigist``, whose smoke run costs
# about 65 s of CPU (measured 2026-12-05); the report renders its row like any other (study/report.py LABELS).
GRID = ("full", "fine_kv", "coarse_kv", "coarse_rec", "fine_kv_ae", "fine_kv_tie", "fine_kv_ae_tie")
SECTIONS = ("## Runs", "## Perplexity by variant and ratio (Table 2)", "## Loss by position in a segment (Fig. 3)",
            "## Continuation at a segment boundary vs mid-segment", "## Surprise", "## UUID recall by prefix length",
            "## Recall suite", "## Reconstruction probe accuracy by ratio (Table 4)", "## All findings")
FIGURES = ("perplexity_by_variant.png", "loss_by_position.png", "boundary_continuation.png", "surprise.png",
           "uuid_prefix.png", "recall.png", "reconstruction.png")
STEPS = 6  # experiments/study.py smoke


def _env(tmp: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as the command runs
    if os.environ.get("GIST_JAX_TEST_XLA_FLAGS"):
        env["XLA_FLAGS"] = os.environ["GIST_JAX_TEST_XLA_FLAGS"]
    env.update(JAX_PLATFORMS="cpu", GIST_JAX_COMPILE_CACHE=str(REPO / ".jax_cache"), TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONUNBUFFERED="1")
    env.setdefault("GIST_JAX_CACHE", str(tmp / "tokcache"))
    return env


def _study(out: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "gist_jax.study", "--scale", "smoke", "--out", str(out), "--runs", ",".join(GRID)]


def _steps(out: pathlib.Path) -> dict[str, list[str]]:
    return {run: sorted(p.name for p in (out / "runs" / run / "checkpoints").glob("*"))
            for run in GRID if (out / "runs" / run / "checkpoints").is_dir()}


def _png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("study")
    out, env = tmp / "out", _env(tmp)
    timings = {}

    # 1. Start, kill as soon as the first run (full) has its last checkpoint.
    first = out / "runs" / "full" / "checkpoints" / str(STEPS)
    start = time.perf_counter()
    proc = subprocess.Popen(_study(out), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        while not first.is_dir() and proc.poll() is None and time.perf_counter() - start < 240:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0]
    assert first.is_dir(), f"the first run never finished:\n{log[-3000:]}"
    killed = {"steps": _steps(out), "full_metrics": (out / "runs/full/metrics.jsonl").read_text(),
              "report": (out / "report" / "study.md").exists()}
    timings["killed"] = time.perf_counter() - start

    # 2. Resume to the end.
    start = time.perf_counter()
    done = subprocess.run(_study(out), check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    timings["resumed"] = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"\nsmoke study: killed after {timings['killed']:.0f}s, resumed in {timings['resumed']:.0f}s")
    # The "[study] training <run>" lines are log lines (stderr); the report's path is on stdout.
    return {"out": out, "env": env, "killed": killed, "resumed": done.stdout + done.stderr, "timings": timings}


def test_a_killed_study_resumes_without_retraining_finished_runs(study):
    out, killed = study["out"], study["killed"]
    assert not killed["report"], "the kill came after the report: the test did not interrupt the study"
    assert "[study] training full" not in study["resumed"], "the finished run was trained again"
    assert (out / "runs/full/metrics.jsonl").read_text() == killed["full_metrics"]
    assert _steps(out) == {run: [str(STEPS)] for run in GRID}
    for run in GRID[1:]:  # the runs the kill interrupted or never reached were trained by the rerun
        assert f"[study] training {run}" in study["resumed"]
        assert (out / "runs" / run / "final_metrics.json").is_file()


def test_report_has_every_table_and_figure(study):
    report = study["out"] / "report"
    md = (report / "study.md").read_text()
    for section in SECTIONS:
        assert section in md, section
    for name in FIGURES:
        assert f"]({name})" in md, name
        width, height = _png_size(report / name)
        assert width > 100 and height > 100
    for block in md.split("\n\n"):  # every row of a table has its header's number of cells
        rows = [line for line in block.splitlines() if line.startswith("|")]
        assert len({line.count("|") for line in rows}) <= 1, block
    summary = json.loads((report / "study.json").read_text())
    assert set(summary["figures"]) == set(FIGURES)
    tables = {e["table"] for e in summary["estimates"]}
    assert tables == {"perplexity", "efficacy", "boundary_gap", "continuation", "surprise", "uuid", "recall",
                      "reconstruction"}
    for e in summary["estimates"]:  # every number has an interval around it
        assert e["lo"] <= e["value"] <= e["hi"] or e["value"] != e["value"], e
    ppl = {(e["run"], e["setting"]): e for e in summary["estimates"] if e["table"] == "perplexity"}
    assert set(ppl) == {("full", "full")} | {(r, s) for r in GRID[1:] for s in ("full", "local", "r4", "r8")}
    # Memory efficacy, one interval per compressed run and ratio, and a sign sentence for each.
    efficacy = {(e["run"], e["setting"]) for e in summary["estimates"] if e["table"] == "efficacy"}
    assert efficacy == {(r, s) for r in GRID[1:] for s in ("r4", "r8")}
    assert "## Memory efficacy" in md
    assert sum(" efficacy at ratio " in f for f in summary["findings"]) == len(efficacy)
    assert any(e["hi"] > e["lo"] for e in ppl.values()), "no interval has any width: the bootstrap did nothing"
    # Orderings are sentences computed from the intervals, one per ratio of Table 2.
    expected = (r"perplexity at ratio \d: the expected order full attention < Fine-KV < Coarse-KV < Coarse-Rec "
                r"(holds|does not)")
    chains = [f for f in summary["findings"] if re.match(expected, f)]
    assert len(chains) == 2 and all(f in md for f in chains)


def test_report_numbers_match_the_checkpoints(study, tmp_path):
    out = study["out"]
    summary = json.loads((out / "report" / "study.json").read_text())
    ppl = {(e["run"], e["setting"]): e["value"] for e in summary["estimates"] if e["table"] == "perplexity"}
    # (a) the point estimates are the suites' own aggregates, for every run and setting
    for run in GRID:
        cached = json.loads((out / "cache" / run / "perplexity.json").read_text())["payload"]
        for row in cached["rows"]:
            assert ppl[(run, row["setting"])] == pytest.approx(row["ppl"], rel=1e-9)
    recon = {(e["run"], e["setting"]): e["value"] for e in summary["estimates"] if e["table"] == "reconstruction"}
    for row in json.loads((out / "cache" / "fine_kv" / "reconstruction.json").read_text())["payload"]["rows"]:
        assert recon[("fine_kv", row["setting"])] == pytest.approx(row["token_accuracy"], rel=1e-9)
    # (b) an independent evaluation of one checkpoint, by the evaluation library entry point, agrees
    from gist_jax.experiments import study as study_file

    opts = {k: study_file.EVAL["smoke"][k] for k in ("num_windows", "max_documents", "batch")}
    code = ("import sys; from gist_jax.evaluate import run_suites; "
            f"run_suites(sys.argv[1], 'perplexity', sys.argv[2], verbose=False, ratios=(4, 8), **{opts!r})")
    done = subprocess.run([sys.executable, "-c", code, str(out / "runs" / "coarse_kv"), str(tmp_path)], check=False,
                          cwd=REPO, env=study["env"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "perplexity.json").read_text())["rows"]
    assert {r["setting"] for r in rows} == {"full", "local", "r4", "r8"}
    eff = {(e["run"], e["setting"]): e["value"] for e in summary["estimates"] if e["table"] == "efficacy"}
    for row in rows:
        assert ppl[("coarse_kv", row["setting"])] == pytest.approx(row["ppl"], rel=1e-5)
        if row["setting"] in ("r4", "r8"):
            expected = float("nan") if row["efficacy"] is None else row["efficacy"]
            assert eff[("coarse_kv", row["setting"])] == pytest.approx(expected, rel=1e-4, nan_ok=True)
    # (c) the markdown prints those numbers
    md = (out / "report" / "study.md").read_text()
    from gist_jax.evaluate.stats import Estimate

    table2 = md.split("## Perplexity by variant and ratio (Table 2)")[1].split("\n## ")[0]
    line = next(l for l in table2.splitlines() if l.startswith("| Coarse-KV |"))
    for e in summary["estimates"]:
        if e["table"] == "perplexity" and e["run"] == "coarse_kv":
            assert Estimate(e["value"], e["lo"], e["hi"], e["n"]).fmt() in line


def test_a_finished_study_re_reports_without_retraining(study):
    out = study["out"]
    caches = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")}
    steps, report_mtime = _steps(out), (out / "report" / "study.md").stat().st_mtime_ns
    done = subprocess.run(_study(out), check=False, cwd=REPO, env=study["env"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = done.stdout + done.stderr
    assert "re-reporting from the cache" in logged  # a log line (stderr)
    assert "[study] evaluating" not in logged and "[study] training" not in logged  # nothing ran, nothing loaded
    assert _steps(out) == steps
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.json")} == caches
    assert (out / "report" / "study.md").stat().st_mtime_ns > report_mtime


def test_a_run_trained_under_another_recipe_is_refused_not_re_reported(study, tmp_path):
    """A run counts as trained by its step; if the recipe changed since (here its AE weight),
    re-reporting that checkpoint under today's recipe would be a false report. The study exits 2
    naming the run, the key with both values, and the fix, before it loads anything."""
    name = "fine_kv_ae"
    saved = json.loads((study["out"] / "runs" / name / "config.json").read_text())
    today = saved["objective"]["ae_lambda"]
    saved["objective"]["ae_lambda"] = today * 5
    (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / name / "config.json").write_text(json.dumps(saved))
    done = subprocess.run([*_study(tmp_path), "--report_only"], check=False, cwd=REPO, env=study["env"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert f"runs/{name}: run {name}" in line and f"objective.ae_lambda {today * 5!r} -> {today!r}" in line, line
    assert "delete" in line and "new --out" in line, line
    assert not (tmp_path / "report").exists()


def test_a_cached_result_of_an_older_suite_version_is_recomputed(study, tmp_path):
    """A suite whose numbers changed meaning (``gist_jax.evaluate.SUITE_VERSIONS``) must not be
    re-reported from a cache written by its older version next to new results."""
    from gist_jax.study import runner
    from gist_jax.study.plan import load_study

    plan = load_study("smoke")
    spec = plan.run("full")
    (tmp_path / "runs" / "full" / "checkpoints" / str(STEPS)).mkdir(parents=True)
    (tmp_path / "cache" / "full").mkdir(parents=True)
    entry = json.loads((study["out"] / "cache" / "full" / "perplexity.json").read_text())
    (tmp_path / "cache" / "full" / "perplexity.json").write_text(json.dumps(entry))
    assert runner.cached(tmp_path, plan, spec, "perplexity") == entry["payload"]
    entry["key"]["version"] -= 1
    (tmp_path / "cache" / "full" / "perplexity.json").write_text(json.dumps(entry))
    assert runner.cached(tmp_path, plan, spec, "perplexity") is None


def test_timings_add_across_resumes_and_restart_for_work_done_again(tmp_path):
    """A run trained in pieces (killed, resumed) sums its pieces; a run retrained from scratch or
    a suite recomputed reports the new time only, not the sum with work whose result is gone."""
    from gist_jax.study.runner import add_timing

    add_timing(tmp_path, "train_seconds", "fine_kv_ae", 100.0)
    add_timing(tmp_path, "train_seconds", "fine_kv_ae", 50.0)  # resumed after a kill
    add_timing(tmp_path, "eval_seconds", "fine_kv_ae/perplexity", 30.0, replace=True)
    add_timing(tmp_path, "eval_seconds", "fine_kv_ae/perplexity", 20.0, replace=True)  # recomputed
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings == {"train_seconds": {"fine_kv_ae": 150.0}, "eval_seconds": {"fine_kv_ae/perplexity": 20.0}}
    add_timing(tmp_path, "train_seconds", "fine_kv_ae", 70.0, replace=True)  # retrained from scratch
    assert json.loads((tmp_path / "timings.json").read_text())["train_seconds"] == {"fine_kv_ae": 70.0}


def test_a_windowed_run_reports_its_window_and_what_its_gists_add_over_it():
    """UniGist's ``window`` control: its efficacy over no memory and each ratio's over it, paired
    per window, from the same per-window NLL sums (``study.numbers.efficacy``)."""
    import numpy as np

    from gist_jax.evaluate import stats
    from gist_jax.study import numbers

    rng = np.random.default_rng(0)
    full = rng.uniform(100, 110, 16)
    sums = {"full": full, "local": full + 40 + rng.uniform(0, 5, 16), "window": full + 10 + rng.uniform(0, 2, 16),
            "r4": full + 8 + rng.uniform(0, 2, 16)}
    per_window = [{"setting": s, "nll_sum": vs.tolist(), "tokens": [64] * 16, "dataset": "stdlib"}
                  for s, vs in sums.items()]
    results = {"unigist": {"perplexity": {"per_window": per_window}},
               "fine_kv": {"perplexity": {"per_window": [w for w in per_window if w["setting"] != "window"]}}}
    eff = numbers.efficacy(results, 200)
    assert set(eff) == {("unigist", "window"), ("unigist", "r4"), ("unigist", "r4_over_window"), ("fine_kv", "r4")}
    want = stats.efficacy(np.array(sums["window"]), np.array(sums["r4"]), np.array(sums["full"]), 200)
    assert eff[("unigist", "r4_over_window")].value == pytest.approx(want.value)
    assert 0 < eff[("unigist", "r4_over_window")].value < eff[("unigist", "r4")].value < 1


def test_a_suite_own_option_keys_only_that_suite():
    """RULER's lengths and the kvpress presses key their own suite's cache only: adding them to
    a study must not throw away every other suite's cached result; changing them recomputes
    their suite."""
    import dataclasses

    from gist_jax.study import runner
    from gist_jax.study.plan import load_study

    plan = load_study("smoke")
    spec = plan.run("full")
    more = dataclasses.replace(plan, eval_options={**plan.eval_options, "ruler_lengths": (1024, 4096),
                                                   "presses": ("knorm",), "ruler_presses": ("knorm",)})
    for suite in ("perplexity", "boundary", "recall"):
        assert runner.cache_key(more, spec, suite, 6) == runner.cache_key(plan, spec, suite, 6)
    for suite in ("ruler", "ruler_press"):
        assert runner.cache_key(more, spec, suite, 6) != runner.cache_key(plan, spec, suite, 6)
        assert runner.cache_key(more, spec, suite, 6)["options"]["ruler_lengths"] == [1024, 4096]
    assert runner.cache_key(more, spec, "kvpress", 6)["options"]["presses"] == ["knorm"]
    assert "presses" not in runner.cache_key(more, spec, "ruler", 6)["options"]
    assert "ruler_presses" not in runner.cache_key(more, spec, "ruler", 6)["options"]
    assert "ruler_presses" not in runner.cache_key(more, spec, "kvpress", 6)["options"]
    assert runner.cache_key(more, spec, "ruler_press", 6)["options"]["ruler_presses"] == ["knorm"]


def test_ruler_and_kvpress_join_a_finished_study_and_its_report(study, tmp_path):
    """``--add_suites ruler,kvpress`` on a finished study computes only those two (every other
    suite stays cached: their options key their own caches) and the report lays them out: RULER
    per length and task, and one table of the references, the run's trained gists and each press
    at each ratio's budget."""
    import shutil

    from gist_jax.study import runner
    from gist_jax.study.plan import load_study

    out = tmp_path / "out"
    for part in ("runs/full", "runs/fine_kv", "cache/full", "cache/fine_kv"):
        shutil.copytree(study["out"] / part, out / part)
    plan = load_study("smoke", only=("full", "fine_kv"), add_suites=("ruler", "kvpress", "ruler_press"))
    assert runner.missing_suites(out, plan, plan.run("fine_kv")) == ["ruler", "kvpress", "ruler_press"]
    assert runner.missing_suites(out, plan, plan.run("full")) == ["ruler"]
    done = subprocess.run(_study(out)[:-1] + ["full,fine_kv", "--add_suites", "ruler,kvpress,ruler_press"], check=False,
                          cwd=REPO, env=study["env"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "training" not in done.stderr and not re.search(r"evaluating \w+ step \d+: .*perplexity", done.stderr)
    text = (out / "report" / "study.md").read_text()
    ruler_part = text.split("## RULER")[1].split("\n## ")[0]
    assert "### 2048 tokens" in ruler_part and "niah_single_1" in ruler_part and "vt" in ruler_part
    assert all(f"| {name} | {s} |" in ruler_part for name, s in
               (("Full attention", "full"), ("Fine-KV", "full"), ("Fine-KV", "r4"), ("Fine-KV", "r8"),
                ("kvpress (training-free)", "streaming_llm_r4"), ("kvpress (training-free)", "streaming_llm_r8")))
    press_part = text.split("## Trained gists vs training-free KV presses")[1].split("\n## ")[0]
    for method in ("full", "local", "Fine-KV (trained gists)", "knorm", "streaming_llm"):
        assert f"| {method} |" in press_part, method
    # The smoke model is random: its full attention does not beat no memory, so efficacy is
    # undefined and the report must say so instead of ordering anything.
    assert "| stdlib | full | " in press_part and "no press is ordered against the gists" in text


def test_ruler_section_sets_presses_beside_the_gists(tmp_path):
    """RULER through a press is one more row of the run's RULER table, and its pooled score is
    ordered against the gists at the same ratio only where the intervals separate."""
    from gist_jax.study import report_peers
    from gist_jax.study.plan import load_study
    from gist_jax.study.report import Report

    def row(setting, ratio, task, score):
        return {"checkpoint": "ck", "setting": setting, "ratio": ratio, "task": task, "context_tokens": 1024,
                "score": score[0], "score_lo": score[1], "score_hi": score[2], "examples": 8}

    gists = {"rows": [row("full", 1, "vt", (0.9, 0.8, 1.0)), row("full", 1, "mean", (0.9, 0.8, 1.0)),
                      row("r4", 4, "vt", (0.1, 0.0, 0.2)), row("r4", 4, "mean", (0.1, 0.0, 0.2)),
                      row("r8", 8, "vt", (0.1, 0.0, 0.3)), row("r8", 8, "mean", (0.1, 0.0, 0.3))]}
    presses = {"rows": [row("expected_attention_r4", 4, "vt", (0.6, 0.4, 0.8)),
                        row("expected_attention_r4", 4, "mean", (0.6, 0.4, 0.8)),
                        row("expected_attention_r8", 8, "vt", (0.2, 0.0, 0.4)),
                        row("expected_attention_r8", 8, "mean", (0.2, 0.0, 0.4))]}
    report = Report(tmp_path, load_study("smoke", only=("fine_kv",)),
                    {"fine_kv": {"ruler": gists, "ruler_press": presses}})
    report_peers.ruler(report)
    text = "\n".join(report.md)
    assert "| kvpress (training-free) | expected_attention_r4 |" in text and "| Fine-KV | r4 |" in text
    above = "Fine-KV gists r4 (0.100 [0, 0.200]) < kvpress expected_attention_r4 (0.600 [0.400, 0.800])"
    assert any(above in f for f in report.findings), report.findings
    assert any("expected_attention_r8" in f and "do not separate" in f for f in report.findings)


def test_kvpress_section_orders_only_separated_efficacies(tmp_path):
    """The press table's findings: a press whose efficacy interval lies above the gists' is
    stated as such, overlapping ones are not ordered (rows as the two suites write them)."""
    from gist_jax.study import report_peers
    from gist_jax.study.plan import load_study
    from gist_jax.study.report import Report

    def row(setting, ppl, eff=None, press=None, ratio=1):
        lo_hi = {} if eff is None else {"efficacy": eff[0], "efficacy_lo": eff[1], "efficacy_hi": eff[2]}
        return {"checkpoint": "ck", "dataset": "stdlib", "setting": setting, "ratio": ratio, "ppl": ppl,
                "tokens": 100, **({"press": press} if press else {}), **lo_hi}

    ours = {"rows": [row("full", 5.0), row("local", 10.0), row("r4", 8.0, (0.3, 0.25, 0.35), ratio=4)]}
    theirs = {"rows": [row("full", 5.0, press="none"), row("local", 10.0, press="none"),
                       row("streaming_llm_r4", 6.5, (0.6, 0.55, 0.7), "streaming_llm", 4),
                       row("knorm_r4", 7.9, (0.32, 0.2, 0.4), "knorm", 4)]}
    report = Report(tmp_path, load_study("smoke", only=("fine_kv",)),
                    {"fine_kv": {"perplexity": ours, "kvpress": theirs}})
    report_peers.kvpress(report)
    text = "\n".join(report.md)
    assert "| stdlib | Fine-KV (trained gists) | 8 | 0.300 [0.250, 0.350] |" in text
    separated = "Fine-KV (trained gists) (0.300 [0.250, 0.350]) < streaming_llm (0.600 [0.550, 0.700]), intervals"
    assert any(separated in f for f in report.findings)
    assert any("knorm" in f and "do not separate" in f for f in report.findings)
