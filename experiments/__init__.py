"""The recipes: one ml_collections config file per experiment (README.md in this folder).

In the repository this is the folder ``experiments/``; installed, it is the package
``gist_jax.experiments`` (``pyproject.toml`` maps the one to the other, for a wheel and an
editable install alike; a checkout that is only on ``sys.path`` gets the same mapping from
``gist_jax/__init__.py``). So a config file imports the shared tables with
``from gist_jax.experiments import _common`` however it is loaded, and none edits ``sys.path``.

``--config`` takes a config file's path, ``experiments/demo.py[:<variants>]``, loaded by
ml_collections as before. ``resolve_config`` also finds a recipe that is not at that path (a
command run outside a checkout, against an installed gist_jax) in this package: when
``experiments/<file>.py`` or ``<file>.py`` does not exist relative to the working directory, the
packaged ``<file>.py`` is used, so ``gist-train --config experiments/demo.py:tiny`` and
``--config demo.py:tiny`` run the shipped demo recipe from any directory. A path that exists is
used as given. ``DEFINE_config_file`` is ml_collections' flag of the same name with that lookup.
"""

from __future__ import annotations

import pathlib
from typing import Any

DIR = pathlib.Path(__file__).resolve().parent
_PREFIX = "experiments"


def resolve_config(spec: str) -> str:
    """``<path>[:<variants>]`` with ``<path>`` replaced by the packaged recipe when it does not
    exist as given but names one (``experiments/<file>.py`` or ``<file>.py``, ``sweeps/`` too)."""
    path, sep, arg = spec.partition(":")
    if not path or pathlib.Path(path).exists():
        return spec
    rel = pathlib.PurePosixPath(path.replace("\\", "/"))
    if rel.is_absolute():
        return spec
    if rel.parts[:1] == (_PREFIX,):
        rel = pathlib.PurePosixPath(*rel.parts[1:])
    packaged = DIR.joinpath(*rel.parts)
    return f"{packaged}{sep}{arg}" if rel.parts and packaged.is_file() else spec


def DEFINE_config_file(name: str = "config", default: str | None = None, help_string: str = "",
                       **kwargs: Any) -> Any:
    """``ml_collections.config_flags.DEFINE_config_file`` whose paths go through ``resolve_config``
    (the default and the command line's value alike); same arguments, same flag holder."""
    from absl import flags
    from ml_collections import config_flags

    flags.disclaim_key_flags()  # the flag belongs to (and --help lists it under) the module calling this
    holder = config_flags.DEFINE_config_file(name, resolve_config(default) if default else default, help_string,
                                             **kwargs)
    flag = (kwargs.get("flag_values") or flags.FLAGS)[name]
    flag.parser = _ResolvingParser(flag.parser)
    return holder


class _ResolvingParser:
    """A config file flag's own parser, handed the resolved path; everything else passes through."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def parse(self, argument: str) -> Any:
        return self._inner.parse(resolve_config(argument))

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)
