"""The prepared GPU check: its dry run takes every code path of the real one (tiny shapes, CPU)
through the real entry point, and a failing or late stage never loses what was measured."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from gist_jax.bench import gpu_check

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGES = ["versions", "gemm_bf16", "correctness_bf16", "attention_micro", "end_to_end_512", "peer_cuda"]


def test_dry_run_measures_every_stage_and_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("GIST_JAX_TEST_XLA_FLAGS", ""),
               TF_CPP_MIN_LOG_LEVEL="3", GIST_JAX_COMPILE_CACHE=str(REPO / ".jax_cache"))
    proc = subprocess.run([sys.executable, "-m", "gist_jax.bench.gpu_check", "--dry-run", "--out", str(tmp_path),
                           "--budget-s", "3000"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert list(report) == STAGES and all("result" in report[k] for k in STAGES)
    assert '"error"' not in json.dumps(report)
    check = report["correctness_bf16"]["result"]
    for impl in ("flash", "split"):
        assert check[impl]["resolved"] == impl  # off GPU: flash/split run their XLA paths
        assert check[impl]["logits_max_rel_err"] < 0.05 and check[impl]["grad_rel_err"] < 0.05
        assert check[impl]["cudnn_forward_calls"] == check[impl]["cudnn_backward_calls"] == 0  # CPU
    e2e = report["end_to_end_512"]["result"]
    assert set(e2e) == {"full:auto", "fine_kv:flash", "fine_kv:split"}
    assert all(r["tokens_per_s"] > 0 for r in e2e.values())
    assert e2e["fine_kv:split"]["attention"] == "split"
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {k} |" in markdown for k in STAGES)


def test_a_failing_stage_is_recorded_and_later_stages_still_run_or_are_skipped(tmp_path):
    report = gpu_check.Report(str(tmp_path), budget_s=3600)
    report.run("broken", lambda: 1 / 0)
    report.run("fine", lambda: {"value": 1})
    written = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert "ZeroDivisionError" in written["broken"]["error"] and written["fine"]["result"] == {"value": 1}
    report.budget_s = 0.0
    report.run("late", lambda: {"value": 2})
    written = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert "budget" in written["late"]["skipped"]
