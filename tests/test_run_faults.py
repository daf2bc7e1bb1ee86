"""Faults a run meets in the field, through ``python -m gist_jax.main`` as a user starts it:
damaged checkpoints of every kind, a data state that names another step, weights that blow up
inside one step, a config that changed between runs, SIGTERM during start-up, a full disk.
Each test checks the class of fault: the run never trains on wrong data, never stays stuck, and
says what happened in one line. ``docs/training.md`` has the table these tests guard."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest
from run_helpers import REPO, checkpoint_steps, losses, main_command, main_env, run

STEPS = 6
RUN = (f"--config.optimizer.total_steps={STEPS}", "--config.checkpoint.every=2", "--config.checkpoint.keep=3",
       "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_at_start=False")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_cache):
    workdir = tmp_path_factory.mktemp("reference")
    result = run(workdir, token_cache, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_steps(workdir) == [2, 4, 6]
    return workdir, losses(workdir)


def copy_run(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    (dst / "metrics.jsonl").unlink()
    (dst / "final_metrics.json").unlink()
    return dst


def run_all(workdirs: dict[str, pathlib.Path], token_cache: str, *overrides: str) -> dict[str, tuple[int, str, str]]:
    """Every workdir at once (the machine has two cores; each run is mostly start-up)."""
    procs = {k: subprocess.Popen(main_command(w, *overrides), cwd=REPO, env=main_env(token_cache),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, w in workdirs.items()}
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=400)
        results[key] = (proc.returncode, out, err)
    return results


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _truncate(path: pathlib.Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _flip_a_bit(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _empty(step_dir: pathlib.Path) -> None:
    for child in step_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


DAMAGE = {
    "truncated array file": lambda d: _truncate(_largest_array_file(d)),
    "bit-rotted array file": lambda d: _flip_a_bit(_largest_array_file(d)),
    "missing _METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
    "empty step directory": _empty,
    "garbage data state": lambda d: (d / "data" / "metadata").write_text("garbage{"),
    "wrong-shaped data state": lambda d: (d / "data" / "metadata").write_text('{"position": 3}'),
    "missing data state": lambda d: shutil.rmtree(d / "data"),
    "cut-off layout JSON": lambda d: _truncate(d / "layout" / "metadata"),
}


def test_a_damaged_final_checkpoint_is_set_aside_and_the_run_finishes(reference, token_cache, tmp_path):
    """Every kind of damage to the newest step of a *finished* run: one warning naming the step,
    the step moved aside (kept), resume from the previous one, the lost steps redone exactly and
    saved again; a second rerun then finds a sound run."""
    ref_dir, ref = reference
    workdirs = {}
    for i, (name, damage) in enumerate(DAMAGE.items()):
        workdirs[name] = copy_run(ref_dir, tmp_path / f"case{i}")
        damage(workdirs[name] / "checkpoints" / str(STEPS))
    results = run_all(workdirs, token_cache, *RUN)
    for name, workdir in workdirs.items():
        code, out, err = results[name]
        assert code == 0, (name, err[-3000:])
        warnings = [line for line in err.splitlines() if "is damaged" in line]
        assert len(warnings) == 1 and f"checkpoints/{STEPS} is damaged" in warnings[0], (name, err[-2000:])
        assert "TensorStore" not in warnings[0] and "Traceback" not in err, (name, warnings)
        assert "Exception ignored" not in err, (name, err[-2000:])  # Orbax's abandoned reads, dropped
        assert f"resumed from {workdir / 'checkpoints'}/{STEPS - 2}" in out + err, (name, out[-1000:])
        assert (workdir / "checkpoints_set_aside" / f"{STEPS}.damaged").is_dir(), name
        assert checkpoint_steps(workdir) == [STEPS - 4, STEPS - 2, STEPS], name
        assert_same_losses(losses(workdir), ref, (STEPS - 1, STEPS))
    again = run(workdirs["bit-rotted array file"], token_cache, *RUN)
    assert again.returncode == 0 and "is damaged" not in again.stderr, again.stderr[-2000:]
    assert f"resumed from {workdirs['bit-rotted array file'] / 'checkpoints'}/{STEPS}" in again.stdout + again.stderr


def test_a_data_state_naming_another_step_is_rebuilt_from_the_checkpoint_step(reference, token_cache, tmp_path):
    ref_dir, ref = reference
    workdir = copy_run(ref_dir, tmp_path / "run")
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    data = workdir / "checkpoints" / str(STEPS - 2) / "data" / "metadata"
    data.write_text(json.dumps({**json.loads(data.read_text()), "step": 1}))
    result = run(workdir, token_cache, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "names step 1; rebuilding it from step 4" in result.stderr
    assert_same_losses(losses(workdir), ref, (STEPS - 1, STEPS))


def test_resuming_with_changed_keys_is_refused_unless_they_may_change(reference, token_cache, tmp_path):
    ref_dir, _ = reference
    workdir = copy_run(ref_dir, tmp_path / "run")
    config_before = (workdir / "config.json").read_text()
    refused = run(workdir, token_cache, *RUN, "--config.step.seed=1", "--config.objective.ae=False")
    assert refused.returncode == 2, refused.stderr[-2000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert "step.seed 0 -> 1" in line and "objective.ae" in line and "new --workdir" in line
    assert (workdir / "config.json").read_text() == config_before and not (workdir / "metrics.jsonl").exists()
    longer = run(workdir, token_cache, *RUN, f"--config.optimizer.total_steps={STEPS + 2}",
                 "--config.train.log_every=2", "--config.checkpoint.keep=4", "--config.optimizer.learning_rate=5e-5")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert f"resumed from {workdir / 'checkpoints'}/{STEPS}" in longer.stdout + longer.stderr
    assert sorted(losses(workdir)) == [STEPS + 2]


def test_weights_that_blow_up_inside_a_step_are_never_named_as_the_good_checkpoint(token_cache, tmp_path):
    """A learning rate of 1e30 (allowed on resume) makes the update after step 3 produce huge but
    finite weights; they are saved at step 3 and give a NaN loss at step 4. The checkpoint of
    those weights is set aside, the message names step 2, and a rerun with a sane learning rate
    resumes from it and finishes. A rate that makes the weights non-finite is never saved."""
    sane = (*RUN, "--config.checkpoint.every=1", "--config.optimizer.warmup_fraction=0.0")
    first = run(tmp_path, token_cache, *sane, "--config.train.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    blow_up = run(tmp_path, token_cache, *sane, "--config.optimizer.learning_rate=1e30",
                  "--config.optimizer.grad_clip_norm=1e30")
    assert blow_up.returncode == 3, blow_up.stdout[-2000:] + blow_up.stderr[-2000:]
    message = blow_up.stderr.strip().splitlines()[-1]
    assert "at step 4" in message and f"Last good checkpoint: {tmp_path / 'checkpoints'}/2" in message, message
    assert checkpoint_steps(tmp_path) == [1, 2]
    assert (tmp_path / "checkpoints_set_aside" / "3.diverged").is_dir()
    resumed = run(tmp_path, token_cache, *sane)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tmp_path / 'checkpoints'}/2" in resumed.stdout + resumed.stderr
    assert max(losses(tmp_path)) == STEPS

    inf_dir = tmp_path / "inf"
    never = run(inf_dir, token_cache, *sane, "--config.optimizer.learning_rate=1e39",
                "--config.optimizer.grad_clip_norm=1e30")
    assert never.returncode == 3, never.stderr[-2000:]
    assert "NaN or inf; it was not saved" in never.stderr.strip().splitlines()[-1]
    assert checkpoint_steps(inf_dir) == []


@pytest.mark.parametrize("resume", [False, True])
def test_sigterm_during_start_up_exits_zero_with_one_line(reference, token_cache, tmp_path, resume):
    """SIGTERM at several moments of start-up (imports, model, data, restore, compilation):
    exit 0, one line, no traceback; a signal that lands in the loop is the ordinary preemption."""
    ref_dir, _ = reference
    delays = (0.6, 1.5, 3.0, 4.5, 6.0)
    procs = []
    for i, delay in enumerate(delays):
        workdir = copy_run(ref_dir, tmp_path / f"w{i}") if resume else tmp_path / f"w{i}"
        overrides = (*RUN, f"--config.optimizer.total_steps={STEPS + 4}") if resume else RUN
        procs.append((delay, workdir, subprocess.Popen(main_command(workdir, *overrides), cwd=REPO,
                                                       env=main_env(token_cache), stdout=subprocess.PIPE,
                                                       stderr=subprocess.PIPE, text=True)))
    started = time.monotonic()
    for delay, _, proc in sorted(procs, key=lambda p: p[0]):
        time.sleep(max(0.0, started + delay - time.monotonic()))
        proc.send_signal(signal.SIGTERM)
    for delay, workdir, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (delay, proc.returncode, err[-2000:])
        assert "Traceback" not in err, (delay, err[-2000:])
        said = [line for line in (out + err).splitlines() if "SIGTERM" in line or "preempted" in line]
        assert len(said) == 1, (delay, out[-1000:], err[-1000:])
        if "SIGTERM" in said[0]:
            expected = f"{workdir / 'checkpoints'}/{STEPS}" if resume else "no checkpoint yet"
            assert expected in said[0], said
            assert checkpoint_steps(workdir) == ([2, 4, 6] if resume else [])


def _mount_small_disk(path: pathlib.Path, megabytes: int) -> None:
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()}); the disk-full test needs root")


def test_a_full_disk_stops_with_one_line_and_loses_no_checkpoint(token_cache, tmp_path):
    disk = tmp_path / "disk"
    _mount_small_disk(disk, 12)
    try:
        workdir = disk / "run"
        overrides = (*RUN, "--config.optimizer.total_steps=16", "--config.checkpoint.every=1",
                     "--config.checkpoint.keep=100")
        full = run(workdir, token_cache, *overrides)
        assert full.returncode == 4, full.stdout[-2000:] + full.stderr[-2000:]
        err_lines = [line for line in full.stderr.splitlines() if line.strip()]
        # Start-up logs of TensorFlow's C++ runtime (when a token store is built) are not the fault.
        about_the_fault = [line for line in err_lines if any(w in line for w in ("orbax", "Traceback", "Error",
                                                                               "No space", "checkpoint"))]
        assert len(about_the_fault) == 1, full.stderr[-3000:]
        newest = checkpoint_steps(workdir)[-1]
        message = err_lines[-1]
        assert (f"no space left writing checkpoint {newest + 1} at {workdir / 'checkpoints'}" in message
                and f"newest complete checkpoint {workdir / 'checkpoints'}/{newest}" in message), message
        assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
        moved = tmp_path / "moved"
        shutil.copytree(workdir, moved)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    resumed = run(moved, token_cache, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {moved / 'checkpoints'}/{newest}" in resumed.stdout + resumed.stderr
