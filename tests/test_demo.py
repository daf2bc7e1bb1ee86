"""The demo end to end at toy scale (``experiments/demo.py:tiny``): train, report, plot, export
to Hugging Face and generate from the export with compressed memory, as ``make demo`` does with
the real SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys

from run_helpers import REPO, main_env


def test_tiny_demo_trains_reports_exports_and_generates(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "gist_jax.demo", "--config=experiments/demo.py:tiny", f"--workdir={workdir}"]
    result = subprocess.run(cmd, cwd=REPO, env=main_env(str(tmp_path / "tokens"), devices=1), capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for row in ("| full attention |", "| no memory (each segment alone) |", "| compressed, ratio 4 |",
                "| compressed, ratio 8 |"):
        assert row in out, out[-3000:]
    assert "| efficacy at step 0 | efficacy at step 6 |" in out  # the table says whether the gists carry anything
    rows = json.loads((workdir / "eval" / "perplexity.json").read_text())["rows"]
    assert {r["setting"] for r in rows} == {"full", "local", "r4", "r8"}
    assert all("efficacy_lo" in r for r in rows if r["setting"] in ("r4", "r8"))
    assert (workdir / "perplexity.png").stat().st_size > 1000
    config = json.loads((workdir / "hf" / "config.json").read_text())
    assert config["gist"]["variant"] == "fine_kv" and (workdir / "hf" / "modeling_gist.py").exists()
    assert "compressed memory: " in out and "full attention:    " in out
    assert "docs/study.md" in out.rstrip().splitlines()[-1], "the closing lines point at the study"
    assert (REPO / "docs" / "study.md").is_file()
    for suite, plot in (("perplexity", "perplexity_vs_ratio"), ("boundary", "boundary_loss_by_position"),
                        ("uuid", "uuid_prefix_accuracy")):
        assert f"## {suite} (" in out
        assert (workdir / "eval" / f"{suite}.json").exists() and (workdir / "eval" / f"{plot}.png").exists()


def test_a_rerun_re_exports_what_an_older_gist_jax_exported(tmp_path):
    """The demo's export is reused when current and re-exported when its modeling_gist.py is
    another version's (loading it would be refused), so rerunning ``make demo`` after an upgrade
    still ends by generating."""
    from eval_helpers import tiny_step0_checkpoint

    from gist_jax.demo import current_export
    from gist_jax.hf.own_code import check_modeling_file

    workdir = tiny_step0_checkpoint(tmp_path / "run")
    out = current_export(workdir)
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert current_export(workdir) == out and (out / "model.safetensors").stat().st_mtime_ns == weights
    (out / "modeling_gist.py").write_text((out / "modeling_gist.py").read_text() + "\n# an older version\n")
    current_export(workdir)
    check_modeling_file(out)  # the package's own copy again
