"""What a study is: the scale's runs (name, variants, resolved config) and its suite options,
read from the experiment-style file ``experiments/study.py`` (its docstring has the commands).

The file is loaded by path, as ``gist_jax.main`` loads any experiment file, so a copy with other
numbers (``--config my_study.py``) is a different study with the same code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import types
from typing import Any

from gist_jax import experiments as _recipes
from gist_jax.errors import ConfigError

DEFAULT_CONFIG = _recipes.DIR / "study.py"  # experiments/study.py in a checkout, packaged when installed
# The suites that need gists or ratios: on the full-attention run they have nothing to measure
# (kvpress and ruler_press compare presses with a run's gists at each of its ratios' budgets).
COMPRESSED_ONLY = ("boundary", "reconstruction", "kvpress", "ruler_press")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of the grid: trains in ``<out>/runs/<name>``."""

    name: str
    variants: str  # the experiment-file variant list, scale first: "smoke,fine_kv,ae,notie"
    run: Any  # gist_jax.train.experiment.RunConfig

    @property
    def compressed(self) -> bool:
        return self.run.compression.enabled

    @property
    def command(self) -> str:
        return f"python -m gist_jax.main --config experiments/study.py:{self.variants} --workdir <out>/runs/{self.name}"


@dataclasses.dataclass(frozen=True)
class Study:
    scale: str
    config_path: pathlib.Path
    runs: tuple[RunSpec, ...]
    suites: tuple[str, ...]
    eval_options: dict[str, Any]  # run_suites keyword options (without ``suites``)
    ratios: tuple[int, ...]
    bootstrap: int

    def suites_for(self, spec: RunSpec) -> tuple[str, ...]:
        return tuple(s for s in self.suites if spec.compressed or s not in COMPRESSED_ONLY)

    def run(self, name: str) -> RunSpec:
        return next(r for r in self.runs if r.name == name)


def load_module(path: str | pathlib.Path) -> types.ModuleType:
    path = pathlib.Path(path)
    if not path.is_file():  # outside a checkout: the shipped recipe of that name, as every --config tool
        path = pathlib.Path(_recipes.resolve_config(str(path)))
    path = path.absolute()
    if not path.is_file():
        raise ConfigError(f"--config={path}: no such study file; use experiments/study.py")
    spec = importlib.util.spec_from_file_location(f"study_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_study(scale: str, config_path: str | pathlib.Path = DEFAULT_CONFIG,
               only: tuple[str, ...] = (), max_steps: int = 0, add_suites: tuple[str, ...] = ()) -> Study:
    """The study of ``scale``: every run's config resolved and validated before anything trains.
    ``max_steps``: stop every run there (``train.max_steps``; the schedule is unchanged), to time
    a scale before running it whole. ``add_suites``: suites beyond the scale's list (``ruler``,
    ``kvpress``, ``ruler_press``: their options are in the scale's ``EVAL`` too), computed for a finished study
    without recomputing the others (``runner.SUITE_OWN_OPTIONS``)."""
    from gist_jax.evaluate import resolve_suites
    from gist_jax.train.experiment import run_config

    module = load_module(config_path)
    if scale not in module.SCALE_BUILDERS:
        raise ConfigError(f"--scale={scale!r}: use one of {', '.join(module.SCALE_BUILDERS)}")
    unknown = [n for n in only if n not in module.GRID]
    if unknown:
        raise ConfigError(f"--runs: no run {unknown[0]!r} in the grid; runs: {', '.join(module.GRID)}")
    runs = []
    for name, variants in module.GRID.items():
        if only and name not in only:
            continue
        arg = f"{scale},{variants}"
        cd = module.get_config(arg)
        if max_steps:
            cd.train.max_steps = min(max_steps, cd.optimizer.total_steps)
        runs.append(RunSpec(name, arg, run_config(cd)))
    options = dict(module.EVAL[scale])
    suites = tuple(resolve_suites(options.pop("suites", "all")))
    suites += tuple(s for s in resolve_suites(add_suites) if s not in suites) if add_suites else ()
    ratios = tuple(int(r) for r in module.RATIOS)
    for spec in runs:
        if spec.compressed and not set(ratios) <= set(spec.run.compression.ratios):
            raise ConfigError(f"run {spec.name} trains ratios {spec.run.compression.ratios}; the study reports "
                              f"{ratios}: train them all (compression.ratios)")
    return Study(scale, pathlib.Path(config_path).absolute(), tuple(runs), suites, options, ratios,
                 int(module.BOOTSTRAP))
