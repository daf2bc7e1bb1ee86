"""The recipe ablation driver (``python -m gist_jax.study.ablation``, docs/recipe.md): every row
is a valid run config that spells out the whole recipe, bad input exits 2 in one line, and a row
runs end to end (train through ``gist_jax.main``, score with the perplexity suite, tabulate
efficacy with its interval), resuming without retraining."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from run_helpers import REPO, main_env

from gist_jax.cli_config import load_run
from gist_jax.study import ablation


@pytest.mark.parametrize("name", list(ablation.ROWS))
def test_every_row_is_a_valid_run_that_spells_out_the_whole_recipe(name):
    run = load_run("experiments/demo.py", ablation.row_overrides(name, 20, (20,)))
    recipe = {**ablation.RECIPE, **ablation.ROWS[name][1]}
    assert run.compression.trainable == recipe["compression.trainable"]
    assert run.compression.positions == recipe["compression.positions"]
    assert run.step.optimizer.learning_rate == float(recipe["optimizer.learning_rate"])
    assert run.step.objective.ae == (recipe["objective.ae"] == "True")
    assert run.step.optimizer.total_steps == 20 and run.train.eval_every == 0
    assert set(ablation.ROWS[name][1]) <= set(ablation.RECIPE), "a row changes a key the recipe does not fix"


def test_the_table_puts_no_gist_controls_in_their_own_column():
    base = {"step": 20, "steps": 20, "what": "w", "ppl_full": 5.0, "ppl_local": 10.0, "machine": "CPU",
            "command": "c", "ppl_r4": 6.0, "efficacy_r4": [0.7, 0.6, 0.8]}
    table = ablation.markdown([{**base, "row": "fine"},
                               {**base, "row": "uni", "ppl_window": 6.5, "efficacy_window": [0.6, 0.5, 0.7]}])
    header, _, fine, uni = table.splitlines()[:4]
    assert "efficacy r4" in header and "no-gist control: efficacy" in header and "efficacy window" not in header
    assert "window +0.600 [+0.500, +0.700]" in uni and "+0.700 [+0.600, +0.800]" in uni
    assert fine.count("|") == uni.count("|")


def test_a_curve_keeps_every_evaluated_step():
    flags = dict(f.removeprefix("--config.").split("=", 1) for f in ablation.row_overrides("lead", 200, (20, 50, 200)))
    assert flags["checkpoint.every"] == "20" and flags["checkpoint.milestone_every"] == "20"


def _driver(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gist_jax.study.ablation", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=main_env(str(tmp_path / "tokens"), devices=1), check=False)


def test_bad_rows_and_curves_exit_2_in_one_line(tmp_path):
    done = _driver("--out", str(tmp_path / "x"), "--rows", "lead,nope", tmp_path=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"--rows: unknown row 'nope'; use any of {', '.join(ablation.ROWS)}"]
    done = _driver("--out", str(tmp_path / "x"), "--rows", "lead", "--steps", "6", "--curve", "2,4", tmp_path=tmp_path)
    assert done.returncode == 2 and "its last step must be --steps" in done.stderr
    assert not (tmp_path / "x").exists()


def test_a_tiny_row_trains_scores_and_tabulates_then_resumes(tmp_path):
    out = tmp_path / "abl"
    args = ("--out", str(out), "--rows", "lead", "--steps", "4", "--curve", "2,4", "--windows", "3",
            "--config", "experiments/demo.py:tiny")
    done = _driver(*args, tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = json.loads((out / "ablation.json").read_text())
    assert [(r["row"], r["steps"], r["step"]) for r in records] == [("lead", 4, 2), ("lead", 4, 4)]
    for r in records:
        assert r["windows"] == 3 and {"ppl_full", "ppl_local", "ppl_r4", "ppl_r8"} <= set(r)
        for ratio in ("r4", "r8"):
            value, lo, hi = r[f"efficacy_{ratio}"]
            assert value is None or lo <= value <= hi  # None where the random model gains nothing from context
        assert "--config.compression.trainable=gist_only" in r["command"] and r["date"] and r["machine"]
    md = (out / "ablation.md").read_text()
    assert md.startswith("| row | step of | what | efficacy r4 | efficacy r8 |") and "| lead | 4/4 |" in md
    mtime = (out / "runs" / "lead_4" / "final_metrics.json").stat().st_mtime
    again = _driver(*args, tmp_path=tmp_path)
    assert again.returncode == 0 and (out / "runs" / "lead_4" / "final_metrics.json").stat().st_mtime == mtime
    assert json.loads((out / "ablation.json").read_text()) == records
    # The sinks-only control on the same tiny run: every ratio's gain over the sinks alone, the
    # sinks' own efficacy, each with its interval.
    from gist_jax.study import sink_control

    assert sink_control.main(["--checkpoint", str(out / "runs" / "lead_4"), "--out", str(tmp_path / "sc"),
                              "--num-windows", "3"]) == 0
    control = json.loads((tmp_path / "sc" / "sink_control.json").read_text())
    assert set(control["ppl"]) == {"full", "local", "sinks", "r4", "r8"} and control["num_sinks"] > 0
    assert set(control["efficacy"]) == {"sinks", "r4", "r8"} and set(control["over_sinks"]) == {"r4", "r8"}
    assert "| sinks |" in (tmp_path / "sc" / "sink_control.md").read_text()
