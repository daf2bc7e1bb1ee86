"""What reaches stderr: the logging set-up every entry point calls, and a guard that keeps
native libraries' start-up chatter out of it.

Library modules log with ``logging.getLogger(__name__)`` (loggers ``gist_jax.*``), never
``print``; tables and reports a tool exists to produce stay on stdout. `setup_logging` shows
those loggers' INFO lines in absl's format (``I1202 12:00:00.123456 4242 store.py:77] ...``:
level, date, time, thread, file and line), on stderr, and keeps third-party INFO out: Orbax
logs every file it writes through absl's logger at INFO, which would drown ours. An explicit
``--verbosity``/``-v`` given to an absl app (``gist_jax.main``, ``gist_jax.demo``) is left as is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

# Our loggers' roots: gist_jax.* (the library and its CLIs) and launch.* (the launchers).
OUR_LOGGERS = ("gist_jax", "launch")


class _StderrHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stderr`` is when a record is emitted, not the object it
    was when the handler was made: a tool's ``main`` also runs inside tests, whose captured
    stderr is replaced (and closed) per test."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        del value  # always sys.stderr


def setup_logging(level: int = logging.INFO) -> None:
    """Once per entry point, first thing in its ``main``: our loggers at ``level`` on stderr with
    absl's prefix, everything else at WARNING. Idempotent."""
    from absl import flags
    from absl import logging as absl_logging

    root = logging.getLogger()
    absl_handler = absl_logging.get_absl_handler()
    if absl_handler not in root.handlers and not any(isinstance(h, _StderrHandler) for h in root.handlers):
        # Not under absl.app.run (an argparse tool): absl's own handler would first warn that flags
        # are not parsed, so a stderr handler with absl's formatter gives the same lines.
        handler = _StderrHandler()
        handler.setFormatter(absl_logging.PythonFormatter())
        root.addHandler(handler)
    explicit = "verbosity" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present
    if not explicit:
        root.setLevel(logging.WARNING)
        logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-file INFO goes through this one
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null for the block, keeping Python's ``sys.stderr`` on the
    real stderr.

    TensorFlow's C++ runtime writes its start-up lines ("All log messages before
    absl::InitializeLog() ...", "oneDNN custom operations are on", "Could not find cuda
    drivers") straight to fd 2 while it loads, before ``TF_CPP_MIN_LOG_LEVEL`` applies, so only
    the descriptor can hide them. Python's writes (a traceback, a warning, the SIGTERM handler's
    line) go through ``sys.stderr``, which points at a duplicate of the real descriptor for the
    duration, so nothing a person needs is lost; an exception propagates after fd 2 is restored.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (closed, or a replaced stderr): nothing to silence
        yield
        return
    python_stderr = sys.stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    replacement = None
    try:
        os.dup2(devnull, 2)
        replacement = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(python_stderr, "encoding", None),
                                errors="backslashreplace")
        sys.stderr = replacement
        yield
    finally:
        if replacement is not None:
            replacement.flush()
        sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        if replacement is not None:
            replacement.close()

