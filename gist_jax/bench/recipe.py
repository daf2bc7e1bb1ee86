"""The step a benchmark times: exactly the step a run config defines.

The config is read by ``gist_jax.cli_config`` (the same file, variants, ``--config.<key>``
overrides and validation as ``python -m gist_jax.main``; without ``--config`` the built-in
``bench/default_config.py``). The base model config comes from ``train.loop.load_base_model``
(its weights are dropped: a step's time and memory do not depend on the values, so the state is
randomly initialised with the same shapes), and the layout is the one the loop compiles for its
first step (``step_layouts.step_layout_key(run, 0)``: with ``per_instance`` sampling, step 0's ratio).
What the run has and a benchmark ignores: the data pipeline (tokens are random), evaluation,
checkpoints. ``--compare`` and ``--sweep`` change keys of the resolved run (``changed``), which
is validated again, so a swept point is a run ``main`` would accept too.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

from gist_jax.bench.train_bench import StepSetup

DEFAULT_CONFIG = str(pathlib.Path(__file__).with_name("default_config.py"))


def load_run(config: str, overrides: list[str]):
    """The validated ``RunConfig`` of ``--config=config`` plus ``--config.<key>=<value>``
    ``overrides`` (as typed on the command line); ``cli_config.CliConfigError`` on a fault."""
    from gist_jax.cli_config import load_run as resolve

    return resolve(config, overrides)


def changed(run, keys: dict[str, Any]):
    """``run`` with ``{"section.key": value}`` changed, validated like any run config."""
    from gist_jax.train.experiment import run_config

    d = run.to_dict()
    for key, value in keys.items():
        section, field = key.split(".")
        d[section][field] = value
    return run_config(d)


def setup_from_run(run, name: str | None = None) -> StepSetup:
    """The ``StepSetup`` of a resolved ``RunConfig``."""
    from gist_jax.train.experiment import check_model_matches_run
    from gist_jax.train.loop import load_base_model
    from gist_jax.train.mesh import make_mesh
    from gist_jax.train.step_layouts import host_layout, step_layout_key

    base_cfg, _ = load_base_model(run.model)  # weights dropped (see the module docstring)
    check_model_matches_run(base_cfg, run)
    comp, step_cfg = run.compression, run.step
    base_cfg = base_cfg.replace(max_position_embeddings=max(base_cfg.max_position_embeddings, 2 * step_cfg.seq_len))
    layout = host_layout(run, step_layout_key(run, 0))
    sizes = step_cfg.mesh.sizes()  # a mesh without -1 runs on its first devices (the default config: one)
    devices = math.prod(sizes.values()) if -1 not in sizes.values() else make_mesh(step_cfg.mesh).devices.size
    return StepSetup(name or run.name, base_cfg, comp, step_cfg, layout, mesh_devices=devices)


def setup_from_config(config: str, overrides: list[str] = ()) -> StepSetup:
    """The ``StepSetup`` of ``--config`` and its overrides."""
    return setup_from_run(load_run(config, list(overrides)), config)
