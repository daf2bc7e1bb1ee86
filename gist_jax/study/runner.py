"""Training and evaluating the grid, each step skipped when its result is already on disk.

* Training: ``gist_jax.train.loop.train`` (the entry point ``gist_jax.main`` calls) in
  ``<out>/runs/<name>``; it resumes a run from its newest checkpoint by itself. A run whose
  newest complete checkpoint is its last step is not touched at all (``train`` would reload
  the model just to find nothing to do).
* Evaluation: ``gist_jax.evaluate.run_suites`` per checkpoint; every suite's payload is cached
  in ``<out>/cache/<run>/<suite>.json``, written atomically (temporary file + rename), keyed by
  the checkpoint step and the suite options. A cache entry whose key differs is recomputed.

Directory layout of a study (``--out``): ``runs/<name>/`` (workdirs), ``eval/<name>/`` (the
suites' own JSON/CSV/PNG), ``cache/<name>/<suite>.json``, ``timings.json``, ``report/``.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

from gist_jax.errors import ConfigError
from gist_jax.evaluate import suite_version
from gist_jax.study.plan import RunSpec, Study

logger = logging.getLogger(__name__)


def write_json_atomic(path: pathlib.Path, payload: Any) -> None:
    """Readers see the old file or the new one, never a half-written one (a kill mid-write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, set)):
        return list(x)
    return str(x)


def read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- paths and state
def workdir(out: pathlib.Path, spec: RunSpec) -> pathlib.Path:
    return out / "runs" / spec.name


def cache_path(out: pathlib.Path, spec: RunSpec, suite: str) -> pathlib.Path:
    return out / "cache" / spec.name / f"{suite}.json"


def latest_step(run_dir: pathlib.Path) -> int | None:
    """Newest finished checkpoint step (Orbax renames a step directory into place only once it is
    complete, so a numeric name means a finished save)."""
    root = run_dir / "checkpoints"
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
    return max(steps) if steps else None


def check_trained_configs(out: pathlib.Path, study: Study) -> None:
    """Refuses a run directory trained under other values of the keys a resume may not change
    (``train.integrity.changed_keys``: the model, compression, objective, data...). Without it, a
    recipe edited after a study finished would re-report the old checkpoints under the new
    recipe's name, since a run counts as trained by its step alone. Reads each run's
    ``config.json`` (written when its training starts); a run never started has none."""
    from gist_jax.train.integrity import changed_keys

    for spec in study.runs:
        saved = read_json(workdir(out, spec) / "config.json")
        changed = changed_keys(saved, spec.run.to_dict()) if saved is not None else {}
        if changed:
            detail = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(f"{workdir(out, spec)}: run {spec.name} was trained with other values than "
                              f"{study.config_path.name} now gives ({detail}); to retrain it, delete "
                              f"{workdir(out, spec)} and {out / 'cache' / spec.name}, or use a new --out")


def is_trained(out: pathlib.Path, spec: RunSpec) -> bool:
    return latest_step(workdir(out, spec)) == spec.run.num_steps


# Options only some suites read: they key those suites' caches and no other, so adding RULER or the
# kvpress peers to a study computes just them and keeps every other suite's cached result.
SUITE_OWN_OPTIONS: dict[str, tuple[str, ...]] = {
    "ruler_lengths": ("ruler", "ruler_press"), "ruler_tasks": ("ruler", "ruler_press"),
    "presses": ("kvpress",), "ruler_presses": ("ruler_press",)}


def cache_key(study: Study, spec: RunSpec, suite: str, step: int) -> dict[str, Any]:
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(study.eval_options.items())
               if suite in SUITE_OWN_OPTIONS.get(k, (suite,))}
    return {"run": spec.name, "suite": suite, "version": suite_version(suite), "step": step,
            "ratios": list(study.ratios), "options": options}


def cached(out: pathlib.Path, study: Study, spec: RunSpec, suite: str) -> dict | None:
    """The cached payload if its key matches the newest checkpoint and today's options."""
    step = latest_step(workdir(out, spec))
    entry = read_json(cache_path(out, spec, suite))
    if step is None or entry is None or entry.get("key") != json.loads(json.dumps(cache_key(study, spec, suite, step))):
        return None
    return entry["payload"]


def missing_suites(out: pathlib.Path, study: Study, spec: RunSpec) -> list[str]:
    return [s for s in study.suites_for(spec) if cached(out, study, spec, s) is None]


def add_timing(out: pathlib.Path, section: str, name: str, seconds: float, *, replace: bool = False) -> None:
    """Adds ``seconds`` to ``timings.json[section][name]`` (a run trained in pieces across kills),
    or replaces it (a run trained from scratch, a suite recomputed: the old time is of work whose
    result is gone)."""
    timings = read_json(out / "timings.json") or {}
    timings.setdefault(section, {})
    timings[section][name] = (0.0 if replace else timings[section].get(name, 0.0)) + seconds
    write_json_atomic(out / "timings.json", timings)


# ----------------------------------------------------------------------------- the two stages
def train_all(out: pathlib.Path, study: Study, log: Callable[[str], None] = logger.info) -> list[str]:
    """Trains every unfinished run (resuming each from its own checkpoints); returns their names."""
    todo = [spec for spec in study.runs if not is_trained(out, spec)]
    if not todo:
        return []
    from gist_jax.train.loop import train

    for i, spec in enumerate(todo):
        log(f"[study] training {spec.name} ({i + 1}/{len(todo)}): {spec.command.replace('<out>', str(out))}")
        fresh = latest_step(workdir(out, spec)) is None  # no checkpoint: an earlier time is not of this run
        start = time.perf_counter()
        train(spec.run, workdir(out, spec))
        add_timing(out, "train_seconds", spec.name, time.perf_counter() - start, replace=fresh)
    return [spec.name for spec in todo]


def evaluate_all(out: pathlib.Path, study: Study,
                 log: Callable[[str], None] = logger.info) -> list[tuple[str, str]]:
    """Runs every suite not cached for its checkpoint's newest step; returns (run, suite) computed."""
    done: list[tuple[str, str]] = []
    for spec in study.runs:
        todo = missing_suites(out, study, spec)
        if not todo:
            continue
        if not is_trained(out, spec):
            raise RuntimeError(f"run {spec.name} is not trained to step {spec.run.num_steps}; train it first")
        from gist_jax.evaluate import run_suites

        step = latest_step(workdir(out, spec))
        log(f"[study] evaluating {spec.name} step {step}: {', '.join(todo)}")

        def save(suite: str, payload: dict, spec: RunSpec = spec, step: int = step) -> None:
            write_json_atomic(cache_path(out, spec, suite), {"key": cache_key(study, spec, suite, step),
                                                             "payload": payload})
            add_timing(out, "eval_seconds", f"{spec.name}/{suite}", float(payload.get("seconds", 0.0)),
                       replace=True)
            done.append((spec.name, suite))
            log(f"[study]   {spec.name}/{suite}: {payload.get('seconds', 0.0):.1f}s")

        ratios = study.ratios if spec.compressed else None
        run_suites(workdir(out, spec), todo, out / "eval" / spec.name, verbose=False, on_result=save,
                   ratios=ratios, **study.eval_options)
    return done


def load_results(out: pathlib.Path, study: Study) -> dict[str, dict[str, dict]]:
    """``{run: {suite: payload}}`` of every cached suite (missing ones absent)."""
    results: dict[str, dict[str, dict]] = {}
    for spec in study.runs:
        for suite in study.suites_for(spec):
            payload = cached(out, study, spec, suite)
            if payload is not None:
                results.setdefault(spec.name, {})[suite] = payload
    return results
