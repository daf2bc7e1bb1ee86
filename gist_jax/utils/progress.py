"""Progress bars (tqdm, with rate and ETA) for the steps that otherwise run silently for minutes:
building a token store, the evaluation suites, conversion and export.

One policy for all of them, so that CI logs, test output and the non-primary processes of a
multi-host run stay clean while a person at a terminal sees what is happening:

* ``GIST_JAX_PROGRESS=0`` (or ``false``/``off``/``no``) turns every bar off;
* ``GIST_JAX_PROGRESS=1`` (or ``true``/``on``/``yes``) forces bars on, also when stderr is not a
  terminal (a log file, a test that wants to see them);
* otherwise a bar is shown only when stderr is a terminal;
* never on a process other than process 0 (``GIST_JAX_PROCESS_ID``, or the rank
  ``jax.distributed`` was initialised with), whatever the variable says: N copies of one bar
  interleaved on a shared terminal tell nobody anything.

Bars go to stderr, like the log, so stdout keeps only the tables and reports a tool prints.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

ENV = "GIST_JAX_PROGRESS"
_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes")

T = TypeVar("T")
__all__ = ["ENV", "enabled", "progress", "write"]


def _process_index() -> int:
    """This process's rank without initialising a JAX backend (which must wait for
    ``jax.distributed.initialize``: a bar may be created before it, while a token store builds)."""
    rank = os.environ.get("GIST_JAX_PROCESS_ID", "").strip()
    if rank.isdigit():
        return int(rank)
    try:
        from jax._src import distributed  # the rank jax.distributed.initialize recorded, if it ran

        return int(distributed.global_state.process_id or 0)
    except (ImportError, AttributeError, TypeError, ValueError):  # a jax without that attribute: one process
        return 0


def enabled() -> bool:
    """Whether a bar created now is shown (see the module docstring for the rules)."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in _OFF or _process_index() != 0:
        return False
    if setting in _ON:
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress(iterable: Iterable[T] | None = None, *, desc: str, total: float | None = None, unit: str = "it",
             **kwargs: Any) -> tqdm:
    """``tqdm(iterable, ...)`` on stderr, shown or not by `enabled`. Iterate it like ``iterable``,
    or use it as a context manager and call ``.update(n)``; a hidden bar costs nothing visible.

    ``total=None`` takes ``len(iterable)`` where there is one (then the bar has an ETA); a stream of
    unknown length shows the count and the rate only.
    """
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", None)  # the outermost bar stays as a record; nested ones clear when done
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, disable=not enabled(), **kwargs)


def write(text: str = "") -> None:
    """Prints ``text`` to stdout (a table, a report line) without tearing a bar being drawn on the
    same terminal: tqdm clears its bars, prints, and redraws them. Without bars it is ``print``."""
    tqdm.write(text, file=sys.stdout)
