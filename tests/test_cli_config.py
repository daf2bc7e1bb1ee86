"""Every tool reads the run config the same way (``gist_jax/cli_config.py``): each entry point's
``--help`` shows ``--config``; the planner plans a paper recipe from its own file; the helper's
errors are main's one line and exit code 2."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from gist_jax import cli_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOLS = ("gist_jax.main", "gist_jax.train.plan", "gist_jax.bench", "gist_jax.train.flops", "gist_jax.inspect_data",
         "gist_jax.evaluate", "gist_jax.export_hf", "gist_jax.compare_hf", "gist_jax.convert")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}


def _run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Concurrent subprocesses (each is mostly a JAX import)."""
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def test_every_tool_help_shows_config():
    results = _run_all({tool: [sys.executable, "-m", tool, "--help"] for tool in TOOLS})
    for tool, r in results.items():
        ok = (0, 1) if tool == "gist_jax.main" else (0,)  # absl's --help exits 1
        assert r.returncode in ok, f"{tool}: {r.stderr[-1500:]}"
        assert "--config" in r.stdout, f"{tool} --help does not show --config:\n{r.stdout[:1500]}"


def test_planner_plans_the_paper_recipe_from_its_file():
    """The recipe as the file says (16K, 128 x 16 microbatches, ratios {4..32} per instance, AE
    and TIE on), only the model's shape from a preset: a per-device figure for the worst ratio."""
    r = subprocess.run([sys.executable, "-m", "gist_jax.train.plan", "--config",
                        "experiments/llama3_8b_paper.py:ae,tie", "--config.model.init=preset:llama3_8b",
                        "--devices", "64"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "16384 tokens x 128 sequences in 16 microbatch(es)" in out and "64 gpu devices" in out
    assert "ratios (4, 8, 16, 32) (per_instance): planned the worst case r=4" in out
    total = next(line for line in out.splitlines() if line.strip().startswith("total:"))
    assert "GiB per device" in total and 5 < float(total.split()[1]) < 80
    assert "estimate fits in 80 GiB per device" in out


def test_placeholder_weights_and_open_mesh_are_one_line_exit_2():
    """The paper file names a placeholder HF dir and a mesh with -1: both say the fix."""
    results = _run_all({
        "weights": [sys.executable, "-m", "gist_jax.train.plan", "--config", "experiments/llama3_8b_paper.py",
                    "--devices", "64"],
        "mesh": [sys.executable, "-m", "gist_jax.train.plan", "--config", "experiments/llama3_8b_paper.py",
                 "--config.model.init=preset:llama3_8b"],
        "key": [sys.executable, "-m", "gist_jax.train.flops", "--config", "experiments/demo.py:tiny",
                "--config.compression.no_such_key=1"],
    })
    expected = {"weights": "--config.model.init=preset:", "mesh": "--devices",
                "key": "--config.compression.no_such_key"}
    for name, r in results.items():
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("config error:"), (name, r.stderr)
        assert expected[name] in lines[0], (name, lines[0])


def test_load_run_matches_main_and_checkpoint_overrides_are_limited():
    run = cli_config.load_run(f"{REPO}/experiments/demo.py:tiny", ["--config.step.seq_len=128"])
    assert run.step.seq_len == 128 and run.model.init == "preset:tiny"
    with pytest.raises(cli_config.CliConfigError, match="does not exist"):
        cli_config.load_run(f"{REPO}/experiments/no_such_file.py")
    with pytest.raises(cli_config.CliConfigError, match="unknown variant"):
        cli_config.load_run(f"{REPO}/experiments/demo.py:tiny,nope")
    with pytest.raises(cli_config.CliConfigError, match="not a whole number of segments"):
        cli_config.load_run(f"{REPO}/experiments/demo.py:tiny", ["--config.step.seq_len=100"])
    stored = run.to_dict()
    changed = cli_config.checkpoint_run(stored, ["--config.compression.ratios=(8,)"], ("compression.ratios",))
    assert tuple(changed["compression"]["ratios"]) == (8,) and changed["step"] == stored["step"]
    with pytest.raises(cli_config.CliConfigError, match="only --config.compression.ratios may be overridden"):
        cli_config.checkpoint_run(stored, ["--config.compression.memory=none"], ("compression.ratios",))
    rest, overrides = cli_config.split_overrides(["--steps", "1", "--config.step.seq_len", "64", "--json=x"])
    assert rest == ["--steps", "1", "--json=x"] and overrides == ["--config.step.seq_len=64"]
