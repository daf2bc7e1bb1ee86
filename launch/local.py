"""Run N JAX processes on this machine, joined by jax.distributed over loopback (gloo on CPU).

    python -m launch.local --num_processes 2 --devices_per_process 2 -- \\
        python -m gist_jax.main --config experiments/demo.py:tiny --workdir /tmp/run

It is the same multi-host code path a TPU pod or a GPU cluster runs, which is why the tests use
it. Output lines are prefixed with the rank. As soon as one rank exits non-zero (or is killed by
a signal), or the timeout passes, launch.local kills the ranks still running (SIGKILL, with any
processes they started): with a peer gone they would only hang in a collective or in
jax.distributed.initialize. It then prints to stderr one line per rank that did not finish
cleanly: how it ended (exit code, signal, still running at the timeout, or stopped by
launch.local after rank N failed) and its last output lines.

Exit status:
  0        every rank exited 0
  N        the exit code of the rank that failed first (the cause, not the ranks stopped after it)
  128+S    the rank that failed first was killed by signal S (137 = SIGKILL, e.g. the OOM killer)
  124      the timeout passed with ranks still running
  130      launch.local was interrupted (Ctrl-C); the ranks are killed
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

TIMEOUT_STATUS = 124
INTERRUPTED_STATUS = 130
TAIL_LINES = 3
TAIL_LINE_CHARS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(rank: int, num_processes: int, port: int, devices_per_process: int,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one rank. Python output is unbuffered (unless the caller chose) so that
    lines reach the rank prefixer as they are printed and a rank's last lines survive its death."""
    env = dict(os.environ if base is None else base)
    env.update(GIST_JAX_COORDINATOR=f"127.0.0.1:{port}", GIST_JAX_NUM_PROCESSES=str(num_processes),
               GIST_JAX_PROCESS_ID=str(rank), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _pump(rank: int, stream, sink, lines: list[str]) -> None:
    """Copies a rank's output with its prefix; a last line cut off by a kill still ends the line."""
    for line in iter(stream.readline, ""):
        lines.append(line)
        sink.write(f"[{rank}] {line}" if line.endswith("\n") else f"[{rank}] {line}\n")
        sink.flush()


def _wait(rank: int, proc: subprocess.Popen, exits: queue.Queue) -> None:
    """One waiter per rank, so exits arrive in the order they happen and the first failure is known."""
    exits.put((rank, proc.wait()))


def _descendants(pids: Sequence[int]) -> list[int]:
    """Every process started, directly or not, by one of `pids` (from /proc; none where it is absent).

    Killing only the rank would leave e.g. the python under a `bash -c` wrapper running (waiting in
    jax.distributed.initialize until its own timeout) and holding the output pipe open.
    """
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(pids)
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_running(procs: Sequence[subprocess.Popen], ranks: Sequence[int]) -> set[int]:
    """SIGKILLs the given ranks that are still running, and their descendants; returns those it killed."""
    running = [r for r in ranks if procs[r].poll() is None]
    for pid in _descendants([procs[r].pid for r in running]):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for r in running:
        procs[r].kill()
    return set(running)


def describe_code(code: int) -> str:
    """`code` as Popen reports it (negative: killed by that signal) in words."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "an unknown signal"
    return f"killed by {name} (signal {-code})"


def exit_status(code: int) -> int:
    """A shell-style status for a Popen return code: 128+S for signal S (Popen says -S, which
    sys.exit would turn into 256-S)."""
    return code if code >= 0 else 128 - code


def last_lines(output: Sequence[str] | str, count: int = TAIL_LINES, width: int = TAIL_LINE_CHARS) -> str:
    """The last `count` non-empty lines of a rank's output on one line, each cut to `width` chars,
    so that the summary stays one line per rank however long a traceback or log line is."""
    text = output if isinstance(output, str) else "".join(output)
    lines = [line.strip() for line in text.splitlines()]
    tail = [line if len(line) <= width else line[:width - 1] + "…" for line in lines if line][-count:]
    return " | ".join(tail) if tail else "(no output)"


@dataclasses.dataclass
class Outcome:
    """How the run ended: which rank failed first, whether the timeout passed or Ctrl-C came, and
    which ranks launch.local killed."""

    codes: list[int]
    exit_order: list[int]
    first_failed: int | None = None
    timed_out: bool = False
    interrupted: bool = False
    killed: set[int] = dataclasses.field(default_factory=set)

    def status(self) -> int:
        if self.first_failed is not None:
            return exit_status(self.codes[self.first_failed])
        if self.timed_out:
            return TIMEOUT_STATUS
        if self.interrupted:
            return INTERRUPTED_STATUS
        return 0

    def stopped(self, rank: int) -> bool:
        """Killed by launch.local rather than ended by itself (one that exits on its own just as the
        kill comes is reported with its own code)."""
        return rank in self.killed and self.codes[rank] == -signal.SIGKILL


def summary(outcome: Outcome, outputs: Sequence[str], timeout: float) -> list[str]:
    """One line per rank that did not finish cleanly, the cause first; then the exit status."""
    if outcome.status() == 0:
        return []
    cause = outcome.first_failed
    ended: list[tuple[int, str]] = []
    if cause is not None:
        ended.append((cause, f"{describe_code(outcome.codes[cause])}, the first rank to fail"))
    after = f", after rank {cause} failed" if cause is not None else ""
    for rank in outcome.exit_order:
        if rank != cause and outcome.codes[rank] != 0 and not outcome.stopped(rank):
            ended.append((rank, describe_code(outcome.codes[rank]) + after))
    for rank in sorted(r for r in range(len(outcome.codes)) if outcome.stopped(r)):
        if cause is not None:
            ended.append((rank, f"stopped by launch.local after rank {cause} failed"))
        elif outcome.timed_out:
            ended.append((rank, f"still running at the {timeout:g}s timeout; stopped"))
        else:
            ended.append((rank, "still running when launch.local was interrupted; stopped"))
    why = (f"from rank {cause}, the first to fail" if cause is not None
           else f"the {timeout:g}s timeout passed" if outcome.timed_out else "interrupted")
    return ([f"launch.local: rank {rank}: {how}; last lines: {last_lines(outputs[rank])}" for rank, how in ended]
            + [f"launch.local: exit status {outcome.status()} ({why})"])


def _watch(procs: Sequence[subprocess.Popen], exits: queue.Queue, timeout: float) -> Outcome:
    """Waits until every rank exited, one failed, the timeout passed or Ctrl-C; kills the rest."""
    outcome = Outcome(codes=[0] * len(procs), exit_order=[])
    pending = set(range(len(procs)))
    deadline = time.monotonic() + timeout
    try:
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome.timed_out = True
                break
            try:
                rank, code = exits.get(timeout=remaining)
            except queue.Empty:
                continue
            pending.discard(rank)
            outcome.exit_order.append(rank)
            if code != 0:
                outcome.first_failed = rank
                break
    except KeyboardInterrupt:
        outcome.interrupted = True
    outcome.killed = _kill_running(procs, sorted(pending))
    outcome.codes = [p.wait() for p in procs]
    while len(outcome.exit_order) < len(procs):
        rank, _ = exits.get()
        if rank not in outcome.exit_order:
            outcome.exit_order.append(rank)
    return outcome


def run_local(command: Sequence[str], num_processes: int = 2, devices_per_process: int = 2,
              timeout: float = 600, env: dict[str, str] | None = None, echo: bool = True,
              cwd: str | None = None) -> tuple[int, list[str]]:
    """Starts the processes and waits for all; returns (exit status, output of each rank).

    The exit status is the one in the module docstring. A failure summary goes to stderr even
    when `echo` is off. Ctrl-C kills the ranks, prints the summary and re-raises.
    """
    port = free_port()
    procs, threads, outputs = [], [], []
    exits: queue.Queue = queue.Queue()
    sink = sys.stdout if echo else open(os.devnull, "w")  # noqa: SIM115 - open while the ranks run
    for rank in range(num_processes):
        p = subprocess.Popen(list(command), env=process_env(rank, num_processes, port, devices_per_process, env),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        lines: list[str] = []
        t = threading.Thread(target=_pump, args=(rank, p.stdout, sink, lines), daemon=True)
        t.start()
        threading.Thread(target=_wait, args=(rank, p, exits), daemon=True).start()
        procs.append(p)
        threads.append(t)
        outputs.append(lines)
    outcome = _watch(procs, exits, timeout)
    for t in threads:
        t.join(timeout=5)
    logs = ["".join(lines) for lines in outputs]
    for line in summary(outcome, logs, timeout):
        print(line, file=sys.stderr, flush=True)
    if outcome.interrupted:
        raise KeyboardInterrupt
    return outcome.status(), logs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the ranks still running are "
                        f"killed (exit status {TIMEOUT_STATUS})")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- followed by the command each process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    try:
        code, _ = run_local(command, args.num_processes, args.devices_per_process, args.timeout)
    except KeyboardInterrupt:
        return INTERRUPTED_STATUS
    return code


if __name__ == "__main__":
    sys.exit(main())
