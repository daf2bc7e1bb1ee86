"""Run N JAX processes on this machine, joined by jax.distributed over loopback (gloo on CPU).

    python -m launch.local --num_processes 2 --devices_per_process 2 -- \
        python -m gist_jax.main --config experiments/demo.py:tiny --workdir /tmp/run

It is the same multi-host code path a TPU pod or a GPU cluster runs, which is why the tests use
it. Output lines are prefixed with the rank; if one process fails or the timeout passes, the
others are stopped and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(rank: int, num_processes: int, port: int, devices_per_process: int,
                base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(GIST_JAX_COORDINATOR=f"127.0.0.1:{port}", GIST_JAX_NUM_PROCESSES=str(num_processes),
               GIST_JAX_PROCESS_ID=str(rank), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    return env


def _pump(rank: int, stream, sink, lines: list[str]) -> None:
    for line in iter(stream.readline, ""):
        lines.append(line)
        sink.write(f"[{rank}] {line}")
        sink.flush()


def run_local(command: Sequence[str], num_processes: int = 2, devices_per_process: int = 2,
              timeout: float = 600, env: dict[str, str] | None = None, echo: bool = True,
              cwd: str | None = None) -> tuple[int, list[str]]:
    """Starts the processes, waits for all; returns (worst exit code, output lines of each rank)."""
    port = free_port()
    procs, threads, outputs = [], [], []
    sink = sys.stdout if echo else open(os.devnull, "w")
    for rank in range(num_processes):
        p = subprocess.Popen(list(command), env=process_env(rank, num_processes, port, devices_per_process, env),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        lines: list[str] = []
        t = threading.Thread(target=_pump, args=(rank, p.stdout, sink, lines), daemon=True)
        t.start()
        procs.append(p)
        threads.append(t)
        outputs.append(lines)
    deadline = time.monotonic() + timeout
    codes: list[int | None] = [None] * num_processes
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            codes[i] = p.poll()
        failed = any(c not in (None, 0) for c in codes)
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            codes = [p.wait() for p in procs]
            if not failed:
                codes = [c if c else 124 for c in codes]
            break
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=5)
    worst = max(codes, key=lambda c: (c != 0, abs(c or 0)))
    return int(worst or 0), ["".join(lines) for lines in outputs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- followed by the command each process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    code, _ = run_local(command, args.num_processes, args.devices_per_process, args.timeout)
    return code


if __name__ == "__main__":
    sys.exit(main())
