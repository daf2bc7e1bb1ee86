"""Console scripts (``gist-train``, ``gist-demo``, ...; pyproject.toml lists them) for absl apps.

``python -m gist_jax.demo --help`` shows the module's docstring and flags because the module *is*
``__main__``; under a console script ``__main__`` is pip's two-line wrapper, so absl would print
neither. ``run_absl`` makes the wrapper's help the module's before ``app.run``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def run_absl(module_name: str, main: Callable[[list[str]], Any], **app_kwargs: Any) -> None:
    """``absl.app.run(main, **app_kwargs)`` with ``--help`` describing module ``module_name``."""
    from absl import app, flags

    wrapper = sys.modules["__main__"]
    module = sys.modules[module_name]
    if wrapper is not module:
        wrapper.__doc__ = module.__doc__
        for flag in flags.FLAGS.get_key_flags_for_module(module_name):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, **app_kwargs)
