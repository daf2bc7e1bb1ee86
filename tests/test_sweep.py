"""The sweep launcher: grid expansion of both sweep files, printed commands that main's own flag
parser accepts, the run/skip/fail bookkeeping (with a stand-in for main), the summary table, and
one real end-to-end sweep of the tiny config (slow)."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shlex
import subprocess
import sys
import textwrap

import pytest
from run_helpers import parse_like_main

from gist_jax.train.experiment import run_config
from launch import sweep as sw

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "sweeps" / "tiny_variants.py"
PAPER = REPO / "experiments" / "sweeps" / "paper_variants.py"
TINY_NAMES = ["fine_kv-r4", "fine_kv-r8", "coarse_kv-r4", "coarse_kv-r8"]


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))



# -- expansion ----------------------------------------------------------------------------------------
def test_tiny_grid(tmp_path):
    runs = sw.expand(sw.load_sweep(TINY), tmp_path)
    assert [r.name for r in runs] == TINY_NAMES
    by_name = {r.name: r for r in runs}
    r = by_name["coarse_kv-r8"]
    assert r.config == "experiments/demo.py:tiny,coarse_kv"
    assert r.labels == {"variant": "coarse_kv", "ratio": "r8"}
    assert r.overrides["compression.ratios"] == (8,) and r.overrides["compression.ratio_sampling"] == "fixed"
    assert r.overrides["train.eval_batches"] == 1  # COMMON
    assert r.workdir == str(tmp_path / "coarse_kv-r8")
    for run in runs:
        cfg = sw.check_run(run)
        assert cfg.compression.ratios == (int(run.labels["ratio"][1:]),)
        assert cfg.compression.granularity == run.labels["variant"].split("_")[0]
        assert cfg.name == f"tiny_variants/{run.name}"


def test_paper_grid(tmp_path):
    runs = sw.expand(sw.load_sweep(PAPER), tmp_path)
    names = [r.name for r in runs]
    assert len(runs) == 3 * 5 * 2 * 2 + 1 and len(set(names)) == len(names)
    assert [n for n in names if n.startswith("full")] == ["full-mix"]
    assert {"coarse_rec-mix", "coarse_kv-r4", "fine_kv-r32-ae-tie", "fine_kv-mix-tie"} <= set(names)
    r = {r.name: r for r in runs}["fine_kv-r8-ae-tie"]
    assert r.config == "experiments/llama3_8b_paper.py:fine_kv,ae,tie"
    assert r.overrides["compression.ratios"] == (8,)
    modules: dict = {}
    for run in runs:
        cfg = sw.check_run(run, modules=modules)
        assert cfg.step.seq_len == 16384 and cfg.step.objective.ae == ("ae" in run.name.split("-"))
    mix = sw.check_run({r.name: r for r in runs}["coarse_rec-mix"])
    assert mix.compression.ratios == (4, 8, 16, 32) and mix.compression.ratio_sampling == "per_instance"
    for run in sw.expand(sw.load_sweep(PAPER), tmp_path, add_variants=["tiny"]):  # the grid at toy scale
        assert sw.check_run(run, modules=modules).model.init == "preset:tiny"


def test_select_patterns():
    runs = sw.expand(sw.load_sweep(PAPER), "r")
    assert [r.name for r in sw.select(runs, ["fine_kv-mix*"])] == [
        "fine_kv-mix", "fine_kv-mix-tie", "fine_kv-mix-ae", "fine_kv-mix-ae-tie"]
    assert len(sw.select(runs, ["full-mix,coarse_kv-r4"])) == 2
    with pytest.raises(sw.SweepError, match="matches no run"):
        sw.select(runs, ["nope"])


def write_sweep(tmp_path, body: str) -> pathlib.Path:
    path = tmp_path / "s.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_bad_sweep_files_fail_with_the_reason(tmp_path):
    with pytest.raises(sw.SweepError, match="both set compression.ratios"):
        sw.expand(sw.load_sweep(write_sweep(tmp_path, """
            BASE = "experiments/demo.py:tiny"
            AXES = {"a": [("x", {"compression.ratios": (4,)})], "b": [("y", {"compression.ratios": (8,)})]}
            """)), tmp_path)
    with pytest.raises(sw.SweepError, match="occur twice"):
        sw.expand(sw.load_sweep(write_sweep(tmp_path, """
            BASE = "experiments/demo.py"
            AXES = {"a": [("", "ae"), ("", "noae")]}
            """)), tmp_path)
    with pytest.raises(sw.SweepError, match="BASE"):
        sw.load_sweep(write_sweep(tmp_path, "AXES = {'a': ['tiny']}\n"))
    with pytest.raises(sw.SweepError, match="entry"):
        sw.load_sweep(write_sweep(tmp_path, "BASE = 'experiments/demo.py'\nAXES = {'a': [3]}\n"))
    bad_key = sw.expand(sw.load_sweep(write_sweep(tmp_path, """
        BASE = "experiments/demo.py:tiny"
        AXES = {"a": [("x", {"compression.no_such_key": 1})]}
        """)), tmp_path)
    with pytest.raises(sw.SweepError, match="unknown config key 'compression.no_such_key'"):
        sw.check_run(bad_key[0])
    bad_variant = sw.expand(sw.load_sweep(write_sweep(tmp_path, """
        BASE = "experiments/demo.py"
        AXES = {"a": ["tiny,fine_kvv"]}
        """)), tmp_path)
    with pytest.raises(sw.SweepError, match="unknown variant 'fine_kvv'"):
        sw.check_run(bad_variant[0])


# -- printed commands ---------------------------------------------------------------------------------
def test_print_commands_parse_like_main(tmp_path, capsys):
    root = tmp_path / "root"
    assert sw.main([str(TINY), "--print", "--workdir_root", str(root)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    for line, name in zip(lines, TINY_NAMES):
        argv = shlex.split(line)
        assert argv[:3] == ["python", "-m", "gist_jax.main"]
        args = [str(REPO / a) if a.startswith("experiments/") else a for a in argv[3:]]
        fv = parse_like_main(args)
        assert fv.workdir == str(root / name)
        cfg = run_config(fv.config)
        assert cfg.compression.ratio_sampling == "fixed" and cfg.name == f"tiny_variants/{name}"
    manifest = json.loads((root / sw.MANIFEST).read_text())
    assert [r["name"] for r in manifest["runs"]] == TINY_NAMES and manifest["axes"] == ["variant", "ratio"]


def test_print_with_launcher_only_and_extra(tmp_path, capsys):
    argv = [str(PAPER), "--print", "--only", "full-mix", "--workdir_root", str(tmp_path), "--launcher",
            "sbatch --nodes=8 launch/slurm.sbatch", "--extra", "--config.model.init=hf:/models/llama 3",
            "--config.data.sources=(('jsonl:/d/*.jsonl#text', 1.0),)"]
    assert sw.main(argv) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    args = shlex.split(line)
    assert args[:3] == ["sbatch", "--nodes=8", "launch/slurm.sbatch"]
    fv = parse_like_main([str(REPO / a) if a.startswith("experiments/") else a for a in args[3:]])
    cfg = run_config(fv.config)
    assert cfg.model.init == "hf:/models/llama 3" and cfg.data.sources == (("jsonl:/d/*.jsonl#text", 1.0),)
    assert cfg.compression.memory == "none"


def test_bad_extra_fails_before_anything_runs(tmp_path, capsys):
    code = sw.main([str(TINY), "--print", "--workdir_root", str(tmp_path), "--extra", "--config.step.seq_len=100"])
    assert code == 2 and "not a whole number of segments" in capsys.readouterr().err
    assert not (tmp_path / sw.MANIFEST).exists()


# -- running (with a stand-in for gist_jax.main) -------------------------------------------------------
FAKE_MAIN = """
import json, pathlib, sys
args = sys.argv[1:]
config, workdir = args[args.index("--config") + 1], pathlib.Path(args[args.index("--workdir") + 1])
if "coarse_kv" in config and "r8" in workdir.name:
    print("boom", flush=True)
    sys.exit(1)
workdir.mkdir(parents=True, exist_ok=True)
(workdir / "final_metrics.json").write_text(json.dumps({"step": 6, "loss": 1.5, "eval/ppl_r4": 3.0}))
print("trained", workdir.name)
"""


def test_run_skips_finished_runs_and_reports_failures(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fake_main.py"
    fake.write_text(FAKE_MAIN)
    monkeypatch.setattr(sw, "MAIN", (str(fake),))
    root = tmp_path / "root"
    assert sw.main([str(TINY), "--workdir_root", str(root), "--no_check"]) == 1
    out = capsys.readouterr().out
    assert "3 done, 0 skipped" in out and "FAILED coarse_kv-r8" in out and "[fine_kv-r4] trained" in out
    assert "boom" in (root / "coarse_kv-r8" / sw.LOG).read_text()
    assert sw.main([str(TINY), "--workdir_root", str(root), "--no_check", "--quiet"]) == 1
    assert "0 done, 3 skipped" in capsys.readouterr().out
    rows = read_csv(root / "summary.csv")
    assert [(r["name"], r["status"]) for r in rows] == [
        ("fine_kv-r4", "done"), ("fine_kv-r8", "done"), ("coarse_kv-r4", "done"), ("coarse_kv-r8", "failed")]


# -- summary ------------------------------------------------------------------------------------------
def test_summary_over_fake_runs(tmp_path, capsys):
    root = tmp_path / "root"
    assert sw.main([str(TINY), "--print", "--workdir_root", str(root)]) == 0
    for i, name in enumerate(TINY_NAMES[:3]):
        (root / name).mkdir(parents=True)
        metrics = {"step": 6, "loss": 2.0 + i, "lm_loss": 1.0 + i, "eval/ppl_r4": 10.0 + i, "tokens_per_s": 99.5}
        (root / name / "final_metrics.json").write_text(json.dumps(metrics))
    (root / "stray").mkdir()  # a run that is not in the manifest still gets its row
    (root / "stray" / "final_metrics.json").write_text(json.dumps({"step": 3, "loss": 9.0}))
    capsys.readouterr()
    assert sw.main(["summary", str(root)]) == 0
    printed = capsys.readouterr().out
    rows = read_csv(root / "summary.csv")
    assert [r["name"] for r in rows] == [*TINY_NAMES, "stray"]
    assert [r["status"] for r in rows] == ["done", "done", "done", "missing", "done"]
    header = (root / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["name", "status", "variant", "ratio", "step", "loss"]
    assert header.index("eval/ppl_r4") < header.index("overrides") and header[-1] == "overrides"
    assert float(rows[1]["loss"]) == 3.0 and rows[1]["variant"] == "fine_kv" and rows[1]["ratio"] == "r8"
    assert "compression.ratios=(8,)" in rows[1]["overrides"]
    markdown = (root / "summary.md").read_text()
    assert markdown in printed
    assert len(markdown.strip().splitlines()) == 2 + 5 and "| fine_kv-r8 | done | fine_kv | r8 | 6 | 3 |" in markdown


def test_summary_of_missing_root_fails(tmp_path, capsys):
    assert sw.main(["summary", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- end to end ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
    """Four real 6-step runs through ``python -m gist_jax.main``, then their summary."""
    root = tmp_path / "tiny_variants"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-m", "launch.sweep", str(TINY), "--workdir_root", str(root)],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "4 done, 0 skipped" in proc.stdout
    rows = read_csv(root / "summary.csv")
    assert [r["name"] for r in rows] == TINY_NAMES
    for row in rows:
        assert row["status"] == "done" and int(float(row["step"])) == 6
        assert 0 < float(row["loss"]) < 100
        assert any(k.startswith("eval/") and row[k] for k in row)
    for name in TINY_NAMES:
        config = json.loads((root / name / "config.json").read_text())
        assert config["compression"]["ratios"] == [int(name.split("-r")[1])]
    again = subprocess.run([sys.executable, "-m", "launch.sweep", str(TINY), "--workdir_root", str(root)],
                           check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 done, 4 skipped" in again.stdout


# -- cluster scripts (with stand-ins for gcloud, srun and scontrol) ------------------------------------
def fake_bin(tmp_path: pathlib.Path) -> dict[str, str]:
    """A PATH with fake gcloud/srun/scontrol and a fake interpreter that prints what it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "gcloud": 'while [[ $# -gt 0 ]]; do if [[ "$1" == --command ]]; then exec bash -c "$2"; fi; shift; done',
        "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
                'per_node=$(( SLURM_NTASKS / SLURM_JOB_NUM_NODES ))\n'
                'for ((i=0; i<SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$(( i % per_node )) "$@"; done',
        "scontrol": "echo node-a; echo node-b",
        "fakepy": 'echo "rank=${GIST_JAX_PROCESS_ID:-} n=${GIST_JAX_NUM_PROCESSES:-} coord=${GIST_JAX_COORDINATOR:-} '
                  'auto=${GIST_JAX_DISTRIBUTED:-} gpu=${CUDA_VISIBLE_DEVICES:-all}"; printf "<%s>" "$@"; echo',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "fakepy")}


def test_tpu_pod_script_runs_main_on_every_worker_with_auto_detection(tmp_path):
    env = {**fake_bin(tmp_path), "TPU": "pod", "ZONE": "zone", "REPO_DIR": str(REPO), "LOG": str(tmp_path / "log"),
           "PIDFILE": str(tmp_path / "pid")}
    args = ["--config", "experiments/demo.py:tiny", "--workdir", "gs://b/run 1",
            "--config.data.sources=(('stdlib', 1.0),)"]
    out = subprocess.run(["bash", str(REPO / "launch/tpu_pod.sh"), *args], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "auto=auto" in out and "".join(f"<{a}>" for a in ["-m", "gist_jax.main", *args]) in out
    dry = subprocess.run(["bash", str(REPO / "launch/tpu_pod.sh"), "stop"], env={**env, "DRY_RUN": "1"},
                         capture_output=True, text=True, check=True).stdout
    assert (tmp_path / "pid").read_text().strip().isdigit()
    argv = shlex.split(dry)
    assert argv[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone"] and "--worker=all" in argv
    assert f"kill -TERM $(cat {tmp_path / 'pid'})" in argv[argv.index("--command") + 1]


@pytest.mark.parametrize("nodes,tasks,mode", [(2, 2, "explicit"), (1, 8, "auto")])
def test_slurm_script_sets_up_the_processes(tmp_path, nodes, tasks, mode):
    env = {**fake_bin(tmp_path), "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS": str(tasks),
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_SUBMIT_DIR": str(REPO)}
    out = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), "--config", "experiments/demo.py", "--workdir",
                          "/shared/run"], env=env, capture_output=True, text=True, check=True).stdout
    assert f"mode {mode}" in out
    ranks = [line for line in out.splitlines() if line.startswith("rank=")]
    assert len(ranks) == tasks
    if mode == "explicit":  # one process per node: the script names coordinator, count and rank
        assert ranks == [f"rank={i} n=2 coord=node-a:{61440 + 7} auto= gpu=all" for i in range(2)]
    else:  # one per GPU: JAX reads SLURM's variables itself
        assert all(r == "rank= n= coord= auto=auto gpu=all" for r in ranks)
    assert "<-m><gist_jax.main><--config><experiments/demo.py><--workdir></shared/run>" in out
