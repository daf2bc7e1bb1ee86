"""Training runs as a user starts them (``python -m gist_jax.main`` subprocesses): exact resume
after SIGKILL, clean SIGTERM, damaged checkpoints, two processes, startup errors, divergence."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest
from run_helpers import REPO, checkpoint_steps, logged, losses, main_command, main_env, run, start, wait_for_step

# Fine-KV with AE + TIE (the tiny variant's defaults), 16 steps, no eval: seconds per run.
STEPS = 16
RUN = (f"--config.optimizer.total_steps={STEPS}", "--config.checkpoint.every=2", "--config.checkpoint.keep=3",
       "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_at_start=False",
       "--config.objective.ae=True", "--config.objective.tie=True")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_cache):
    """An uninterrupted run: its per-step losses are what every resumed run must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run(workdir, token_cache, *RUN, "--config.train.plan_memory=True")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # main prints the planner's estimate before it compiles (the tiny variant turns it off)
    assert "planned the worst case r=4" in result.stdout and "total:" in result.stdout, result.stdout[-3000:]
    ref = losses(workdir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return workdir, ref


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])


@pytest.mark.slow
def test_sigkill_at_three_points_then_resume_is_exact(reference, token_cache, tmp_path):
    _, ref = reference
    for kill_at in (3, 7, 11):
        proc = start(tmp_path, token_cache, *RUN)
        wait_for_step(proc, tmp_path, kill_at)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "final_metrics.json").exists(), "the run ended before it was killed"
    result = run(tmp_path, token_cache, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    assert_same_losses(losses(tmp_path), ref, range(1, STEPS + 1))


def test_sigterm_saves_the_current_step_and_exits_zero(reference, token_cache, tmp_path):
    _, ref = reference
    overrides = (*RUN, "--config.checkpoint.every=1000")  # only the preemption save can write a checkpoint
    proc = start(tmp_path, token_cache, *overrides)
    wait_for_step(proc, tmp_path, 4)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)  # the grace period a scheduler gives
    assert proc.returncode == 0, out[-3000:]
    final = logged(tmp_path)
    stopped = max(losses(tmp_path))
    assert checkpoint_steps(tmp_path) == [stopped] and stopped < STEPS
    assert "preempted" in out
    result = run(tmp_path, token_cache, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints'}/{stopped}" in result.stdout + result.stderr
    assert_same_losses(losses(tmp_path), ref, range(1, STEPS + 1))
    assert final


def test_damaged_newest_checkpoint_falls_back_to_the_previous(reference, token_cache, tmp_path):
    ref_dir, ref = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    ckpts = workdir / "checkpoints"
    assert checkpoint_steps(workdir) == [STEPS - 4, STEPS - 2, STEPS]
    shutil.rmtree(ckpts / str(STEPS) / "state")  # newest step dir present but incomplete
    shutil.copytree(ckpts / str(STEPS - 2), ckpts / f"{STEPS + 2}.orbax-checkpoint-tmp-1234")  # an unfinished save
    (workdir / "metrics.jsonl").unlink()
    result = run(workdir, token_cache, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {ckpts}/{STEPS - 2}" in result.stdout + result.stderr
    assert sorted(losses(workdir)) == [STEPS - 1, STEPS]
    assert_same_losses(losses(workdir), ref, (STEPS - 1, STEPS))


def test_restore_refuses_a_different_layout(reference, token_cache, tmp_path):
    ref_dir, _ = reference
    shutil.copytree(ref_dir, tmp_path / "run")
    result = run(tmp_path / "run", token_cache, *RUN, "--config.compression.gist_embedding=per_slot")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]  # refused by the run config, before the model loads
    assert "cannot change on resume" in line and "compression.gist_embedding 'shared' -> 'per_slot'" in line


@pytest.mark.slow
def test_two_processes_train_like_one(token_cache, tmp_path):
    sys.path.insert(0, str(REPO))
    from launch.local import run_local

    overrides = (*RUN, "--config.optimizer.total_steps=10", "--config.mesh.data=2", "--config.mesh.fsdp=4")
    single = run(tmp_path / "single", token_cache, *overrides)
    assert single.returncode == 0, single.stderr[-3000:]
    code, logs = run_local(main_command(tmp_path / "multi", *overrides), num_processes=2, devices_per_process=4,
                           timeout=400, env=main_env(token_cache), echo=False, cwd=str(REPO))
    assert code == 0, logs[0][-3000:] + logs[1][-3000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    assert checkpoint_steps(tmp_path / "multi") == [6, 8, 10]


BAD_CONFIGS = {
    "compression.foo": ("--config.compression.foo=1",),
    "mesh.data": ("--config.mesh.data=3",),
    "step.batch_size": ("--config.step.batch_size=4",),
    "compression.segment_length": ("--config.compression.segment_length=18",),
    "step.seq_len": ("--config.step.seq_len=72",),
    "data.tokenizer": ("--config.data.tokenizer=gguf:smollm2",),
}


def test_config_errors_exit_nonzero_naming_the_key(token_cache, tmp_path):
    procs = {key: subprocess.Popen(main_command(tmp_path / key, *RUN, *args), cwd=REPO, env=main_env(token_cache),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, args in BAD_CONFIGS.items()}
    for key, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, key
        lines = [line for line in err.splitlines() if key.split(".")[-1] in line]
        assert lines, (key, err[-2000:])
        assert not (tmp_path / key / "checkpoints").exists(), key  # failed before doing anything


def test_divergence_stops_with_step_metric_and_checkpoint(token_cache, tmp_path):
    result = run(tmp_path, token_cache, *RUN, "--config.optimizer.learning_rate=1e30",
                 "--config.optimizer.warmup_fraction=0.0", "--config.optimizer.grad_clip_norm=1e30")
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    # it diverges before the first checkpoint: the message says a rerun starts from scratch, not "resume"
    assert "at step" in message and ("Last good checkpoint" in message or "a rerun starts from scratch" in message)
    assert "loss" in message or "grad_norm" in message


def test_url_workdir_other_than_gs_is_refused_before_anything_loads():
    """gs:// workdirs run in the bucket (tests/test_bucket_workdir.py); other schemes are refused."""
    from gist_jax.errors import ConfigError
    from gist_jax.train.experiment import default_config, run_config
    from gist_jax.train.loop import train

    with pytest.raises(ConfigError, match=r"s3:// is not supported; use gs://<bucket>/<path> or a local path"):
        train(run_config(default_config()), "s3://bucket/run")


def test_missing_worker_fails_within_the_timeout_with_the_fix(token_cache, tmp_path):
    """Process 0 of 2 alone: JAX's client aborts after GIST_JAX_INIT_TIMEOUT; the log says why and what to do."""
    env = {**main_env(token_cache), "GIST_JAX_COORDINATOR": "127.0.0.1:29531", "GIST_JAX_NUM_PROCESSES": "2",
           "GIST_JAX_PROCESS_ID": "0", "GIST_JAX_INIT_TIMEOUT": "3"}
    result = subprocess.run(main_command(tmp_path, *RUN), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode != 0
    assert "a worker is missing" in result.stderr and "GIST_JAX_NUM_PROCESSES" in result.stderr
    assert "DEADLINE_EXCEEDED" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_context_parallel_run_resumes_and_matches_the_unsplit_run(token_cache, tmp_path):
    """``--config.mesh.context=4`` through ``gist_jax.main`` (4 blocks of one segment each, fsdp 2
    on the 8 fake devices; AE and online TIE on): it trains what the unsplit run trains, and a
    SIGTERM'd run resumes (from a step loaded from the compilation cache: the collectives stay
    ordered, ``distributed.order_cpu_collectives``)."""
    overrides = (*RUN, "--config.objective.tie=True", "--config.objective.tie_source=online",
                 "--config.checkpoint.every=1000")
    unsplit = run(tmp_path / "unsplit", token_cache, *overrides)
    assert unsplit.returncode == 0, unsplit.stderr[-3000:]
    ref = losses(tmp_path / "unsplit")
    workdir = tmp_path / "split"
    proc = start(workdir, token_cache, *overrides, "--config.mesh.context=4")
    wait_for_step(proc, workdir, 4)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "preempted" in out, out[-3000:]
    stopped = max(losses(workdir))
    result = run(workdir, token_cache, *overrides, "--config.mesh.context=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'}/{stopped}" in result.stdout + result.stderr
    got = losses(workdir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in got:  # float32 summation order differs from the unsplit run's, nothing else
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got[step], ref[step])
