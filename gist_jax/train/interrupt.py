"""SIGTERM before the training loop's preemption handler takes over.

A scheduler may stop a job at any moment, also while it imports, loads weights or restores a
checkpoint. Python's default for SIGTERM kills the process with no word (exit -15); from the
first line of ``gist_jax.main`` on, SIGTERM instead prints one line and exits 0.

The handler exits at once (``os._exit``) rather than raising: an exception raised from a
signal handler lands wherever the main thread happens to be, and some of those places swallow
it (a garbage-collection callback of jaxlib's prints "Exception ignored" and carries on, so
the signal would be lost). Exiting at once loses nothing: before the first step there is
nothing newer than the checkpoint being resumed, and every file start-up writes is either
rewritten by the next run or written atomically (token stores, checkpoints), the same property
that makes a SIGKILL safe. Standard library only, so it is installed before jax is imported.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
from types import FrameType


def exit_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _exit_now)


def _workdir_from_argv(argv: list[str]) -> str | None:
    """``--workdir=DIR`` or ``--workdir DIR``, read from the command line itself: the signal may
    come before absl has parsed anything."""
    for i, arg in enumerate(argv):
        if arg.startswith(("--workdir=", "-workdir=")):
            return arg.split("=", 1)[1]
        if arg in ("--workdir", "-workdir") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _exit_now(signum: int, frame: FrameType | None) -> None:
    try:
        print(startup_interrupted_line(_workdir_from_argv(sys.argv)), file=sys.stderr, flush=True)
        sys.stdout.flush()
    finally:
        os._exit(0)


def startup_interrupted_line(workdir: str | None) -> str:
    """What to tell the user: nothing new was saved, and where the run would resume from."""
    steps: list[int] = []
    root = pathlib.Path(workdir or ".").absolute() / "checkpoints"
    try:
        steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if workdir else []
    except OSError:  # no directory yet, or not readable: nothing to point at
        pass
    where = f"the newest checkpoint is {root / str(steps[-1])}" if steps else "no checkpoint yet"
    return (f"stopped by SIGTERM outside the training loop (during start-up, or after the final save): nothing "
            f"new to save ({where}); rerun the same command to continue")
