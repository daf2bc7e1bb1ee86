"""launch.local when a rank dies: which rank, how, its last lines, and the exit status.

Through the real entry point (``python -m launch.local``) with plain-python ranks that pick their
part from GIST_JAX_PROCESS_ID, so no JAX starts and each run takes a fraction of a second.
launch.local is imported inside the tests that call it in-process, so that each test fails on its
own against an older launch.local.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SLOW_RANK = 60  # seconds a rank that launch.local should stop would otherwise run


def launch(script: str, *args: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Runs two ranks of `script` (``python -c``, `args` after it). The timeout is below
    ``SLOW_RANK``: a rank that launch.local failed to stop would raise TimeoutExpired here, so a
    returned result means every rank was stopped (no wall-clock bound of its own)."""
    command = [sys.executable, "-m", "launch.local", "--num_processes", "2", *flags, "--",
               sys.executable, "-c", "import os, sys, time\nrank = int(os.environ['GIST_JAX_PROCESS_ID'])\n"
               + textwrap.dedent(script), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=SLOW_RANK - 10, check=False)


def summary_line(result: subprocess.CompletedProcess, rank: int) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"launch.local: rank {rank}: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def is_gone(pid: int) -> bool:
    """No such process, or a zombie waiting for whoever inherited it to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_rank_exiting_with_code_3_is_the_cause_and_the_waiting_rank_is_stopped(tmp_path):
    # Rank 0 waits behind a child process (like the python under a `bash -c` wrapper waiting in
    # jax.distributed.initialize); rank 1 fails once that child runs.
    started = tmp_path / "child_pid"
    result = launch(f"""
        import pathlib, subprocess
        started = pathlib.Path(sys.argv[1])
        if rank == 0:
            print("rank 0 waiting for every worker")
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep({SLOW_RANK})"])
            started.write_text(str(child.pid))
            child.wait()
        else:
            while not started.exists():
                time.sleep(0.05)
            for line in ("step 0", "step 1", "", "step 2", "rank 1 gives up"):
                print(line)
            sys.exit(3)
        """, str(started))
    assert result.returncode == 3, result.stderr
    cause = summary_line(result, 1)
    assert "exit code 3, the first rank to fail" in cause
    assert cause.endswith("last lines: step 1 | step 2 | rank 1 gives up")
    stopped = summary_line(result, 0)
    assert "stopped by launch.local after rank 1 failed" in stopped and "rank 0 waiting for every worker" in stopped
    assert "exit status 3" in result.stderr.splitlines()[-1]
    child = int(started.read_text())
    if os.path.isdir("/proc"):
        deadline = time.monotonic() + 5
        while not is_gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_gone(child), "the child of the stopped rank is still running"


def test_a_rank_killed_by_sigkill_is_named_with_its_signal_and_its_last_line():
    result = launch(f"""
        if rank == 1:
            print("rank 1 allocating too much")  # not flushed: launch.local makes python unbuffered
            os.kill(os.getpid(), 9)
        print("rank 0 in a collective")
        time.sleep({SLOW_RANK})
        """)
    assert result.returncode == 128 + 9, result.stderr
    cause = summary_line(result, 1)
    assert "killed by SIGKILL (signal 9), the first rank to fail" in cause and "rank 1 allocating too much" in cause
    assert "stopped by launch.local after rank 1 failed" in summary_line(result, 0)


@pytest.mark.parametrize("rank_0_finishes", [True, False])
def test_the_timeout_stops_the_ranks_still_running_and_exits_124(rank_0_finishes):
    result = launch(f"""
        print(f"rank {{rank}} started")
        if rank == 1 or not {rank_0_finishes}:
            print(f"rank {{rank}} stuck in a collective")
            time.sleep({SLOW_RANK})
        """, flags=("--timeout", "3"))
    assert result.returncode == 124, result.stderr
    line = summary_line(result, 1)
    assert "still running at the 3s timeout; stopped" in line
    assert line.endswith("last lines: rank 1 started | rank 1 stuck in a collective")
    if rank_0_finishes:
        assert "launch.local: rank 0:" not in result.stderr  # it finished cleanly
    else:
        assert "still running at the 3s timeout; stopped" in summary_line(result, 0)


def test_a_clean_run_says_nothing_and_exits_0():
    result = launch("print(f'rank {rank} done')")
    assert result.returncode == 0 and "launch.local" not in result.stderr, result.stderr
    assert "[0] rank 0 done" in result.stdout and "[1] rank 1 done" in result.stdout


def test_run_local_returns_the_status_and_every_rank_s_output():
    from launch.local import run_local

    # Rank 1 fails only after rank 0 has finished, so rank 0's output is complete (not cut by the kill).
    script = ("import os, sys, time; rank = int(os.environ['GIST_JAX_PROCESS_ID']); time.sleep(2.0 * rank); "
              "print('rank', rank); sys.exit(rank * 4)")
    code, logs = run_local([sys.executable, "-c", script], num_processes=2, timeout=30, echo=False)
    assert code == 4
    assert logs[0] == "rank 0\n" and logs[1] == "rank 1\n"


def test_last_lines_keeps_one_line_per_rank():
    from launch.local import last_lines

    assert last_lines("a\n\nb\r\n  step 2 \n  \nc\n") == "b | step 2 | c"
    long = last_lines("x" * 500 + "\n", width=50)
    assert len(long) == 50 and long.endswith("…")
    assert last_lines("") == "(no output)"


def test_help_documents_the_exit_status(capsys):
    from launch.local import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for status in ("128+S", "124", "130", "the rank that failed first"):
        assert status in out
