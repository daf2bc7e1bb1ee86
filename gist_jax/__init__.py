"""gist_jax: gist-token context compression for long-context language models in JAX/Flax."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import pathlib
import sys
from collections.abc import Sequence
from types import ModuleType

_EXPERIMENTS = __name__ + ".experiments"


class _CheckoutExperiments(importlib.abc.MetaPathFinder):
    """``gist_jax.experiments`` is the repository's ``experiments/`` folder. An install maps it
    (pyproject.toml's package-dir, for a wheel and an editable install alike); this finder does the
    same for a checkout that is only on ``sys.path`` (``PYTHONPATH=.``, the twin's .pth file, a copy
    of the tree on another machine). It is consulted last, so an installed mapping wins."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _EXPERIMENTS:
            return None
        return importlib.util.spec_from_file_location(fullname, self.folder / "__init__.py",
                                                      submodule_search_locations=[str(self.folder)])


def _map_checkout_experiments() -> None:
    folder = pathlib.Path(__file__).resolve().parent.parent / "experiments"
    if (folder / "__init__.py").is_file() and not any(isinstance(f, _CheckoutExperiments) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutExperiments(folder))


_map_checkout_experiments()
