"""One run per workdir (``gist_jax/train/workdir_lock.py``): the lock itself against real
processes (held, killed with SIGKILL, a recycled pid, garbage, another host's heartbeat), and two
``python -m gist_jax.main`` commands on one workdir, the second refused in seconds with one line."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from run_helpers import REPO, logged, run, start, wait_for_step

from gist_jax.train import workdir_lock
from gist_jax.train.workdir_lock import LOCK_NAME, STALE_S, WorkdirLocked, acquire, hold

HOLDER = ("import pathlib, sys, time\n"
          "from gist_jax.train.workdir_lock import acquire\n"
          "acquire(pathlib.Path(sys.argv[1]))\n"
          "print('held', flush=True)\n"
          "time.sleep(600)\n")


@pytest.fixture
def holder(tmp_path):
    """A real process that holds ``tmp_path``'s lock (killed at the end of the test)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def record(**fields) -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time(),
                       "boot": workdir_lock._boot_id(), "start": workdir_lock._proc_start(os.getpid()), **fields})


def takeovers(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]


def test_acquire_records_the_holder_and_release_leaves_nothing(tmp_path):
    workdir = tmp_path / "runs" / "new"
    lock = acquire(workdir)
    held = json.loads((workdir / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["start"] == workdir_lock._proc_start(os.getpid())
    lock.release()
    assert list(tmp_path.iterdir()) == []  # the directories it created, empty again, are gone too
    acquire(tmp_path).release()  # and it can be taken again
    assert list(tmp_path.iterdir()) == []


def test_a_live_holder_refuses_a_second_run_in_one_line_and_nothing_is_written(tmp_path, holder):
    before = (tmp_path / LOCK_NAME).read_bytes(), (tmp_path / LOCK_NAME).stat().st_mtime_ns
    with pytest.raises(WorkdirLocked) as refused:
        acquire(tmp_path)
    message = str(refused.value)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in message, message
    assert f"kill {holder.pid}" in message and "another --workdir" in message and "\n" not in message
    assert ((tmp_path / LOCK_NAME).read_bytes(), (tmp_path / LOCK_NAME).stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
    with hold(tmp_path, primary=False) as lock:  # the other processes of a run never lock
        assert lock is None


def test_a_holder_killed_with_sigkill_is_taken_over_with_one_warning(tmp_path, holder, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING), hold(tmp_path, primary=True) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert lock is not None and not (tmp_path / LOCK_NAME).exists()
    said = takeovers(caplog)
    assert len(said) == 1 and f"pid {holder.pid}" in said[0], said


@pytest.mark.parametrize("content", [b"\x00\xffnot json", b'{"pid": "x"}', b"[1, 2]", b"{" * 70000,
                                     record(pid=-1).encode(), record(pid=0).encode()])
def test_a_lock_file_with_garbage_is_taken_over_with_one_warning(tmp_path, caplog, content):
    (tmp_path / LOCK_NAME).write_bytes(content)
    with caplog.at_level(logging.WARNING):
        acquire(tmp_path).release()
    said = takeovers(caplog)
    assert len(said) == 1 and "unreadable" in said[0], said


def test_the_record_of_a_live_process_refuses_even_where_flock_is_not_shared(tmp_path, caplog):
    """A record without a flock (gcsfuse and other FUSE mounts do not share flock): a live
    process with the recorded start time still holds it; a recycled pid or a reboot does not."""
    (tmp_path / LOCK_NAME).write_text(record())
    with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
        acquire(tmp_path)
    for stale in (record(start=1), record(boot="another boot"), record(pid=2**22 + 1)):
        (tmp_path / LOCK_NAME).write_text(stale)
        with caplog.at_level(logging.WARNING):
            acquire(tmp_path).release()
    assert len(takeovers(caplog)) == 3


def test_another_host_holds_the_lock_while_its_heartbeat_is_fresh(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_text(record(host="elsewhere", pid=1234))
    with pytest.raises(WorkdirLocked, match="pid 1234 on host elsewhere.*heartbeat is 0s old"):
        acquire(tmp_path)
    (tmp_path / LOCK_NAME).write_text(record(host="elsewhere", pid=1234, heartbeat=time.time() - STALE_S - 1))
    with caplog.at_level(logging.WARNING):
        acquire(tmp_path).release()
    assert len(takeovers(caplog)) == 1


def test_only_process_0_locks():
    """The other processes share the workdir (a gs:// one's lock: tests/test_bucket_workdir.py)."""
    with hold("gs://bucket/run", primary=False) as lock:
        assert lock is None


# ------------------------------------------------------------------ two commands on one workdir
STEPS = 20
RUN = (f"--config.optimizer.total_steps={STEPS}", "--config.checkpoint.every=2", "--config.checkpoint.keep=2",
       "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.eval_at_start=False")


def test_the_same_command_twice_refuses_the_second_and_trains_each_step_once(token_cache, tmp_path):
    first = start(tmp_path, token_cache, *RUN)
    try:
        wait_for_step(first, tmp_path, 1)
        second = run(tmp_path, token_cache, *RUN, timeout=60)
        assert first.poll() is None, "the first run ended before the second was refused: make it longer"
    finally:
        out, _ = first.communicate(timeout=300)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    # Refused at start-up, before a mesh, a model or a step existed: nothing compiled, nothing trained.
    both = second.stdout + second.stderr
    assert "compiled train step" not in both and "| loss" not in both, both[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {first.pid} on host" in lines[0] and "another --workdir" in lines[0], lines
    assert first.returncode == 0, out[-3000:]
    assert [m["step"] for m in logged(tmp_path) if "loss" in m] == list(range(1, STEPS + 1))
    assert not (tmp_path / LOCK_NAME).exists()
