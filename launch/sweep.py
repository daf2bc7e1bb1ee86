"""Sweeps: a grid of runs over one experiment config, run here one after another or printed as
commands for a cluster, and one table of their final metrics.

    python -m launch.sweep experiments/sweeps/tiny_variants.py                      # run all here
    python -m launch.sweep experiments/sweeps/paper_variants.py --print             # commands, one a line
    python -m launch.sweep experiments/sweeps/paper_variants.py --variants tiny --only 'fine_kv-*'  # toy scale
    python -m launch.sweep experiments/sweeps/paper_variants.py --print --only 'fine_kv-*' \\
        --launcher "sbatch launch/slurm.sbatch" --extra --config.model.init=hf:/models/llama3
    python -m launch.sweep summary runs/tiny_variants                               # summary.csv + summary.md

A sweep file (``experiments/sweeps/<name>.py``) is plain data:

    BASE = "experiments/demo.py:tiny"            # config file[:variants] every run starts from
    COMMON = {"train.eval_batches": 1}           # optional: --config overrides for every run
    AXES = {                                     # the grid: every combination, axes in this order
        "variant": ["fine_kv", "coarse_kv"],     # a bare name: a config variant, also the label
        "ratio": [("r4", {"compression.ratios": (4,), "compression.ratio_sampling": "fixed"}),
                  ("r8", {"compression.ratios": (8,), "compression.ratio_sampling": "fixed"})],
        "ae": [("", "noae"), ("ae", "ae")],      # (label, overrides) or (label, "variant[,variant]")
    }
    def include(labels: dict[str, str]) -> bool:  # optional: keep only some combinations
        return True

A run's name is its non-empty labels joined by "-" (``fine_kv-r4``, ``fine_kv-r4-ae``), its
workdir ``<root>/<name>``; it runs ``python -m gist_jax.main --config <BASE file>:<BASE
variants + the choices' variants> --workdir <root>/<name> --config.name=<sweep>/<name>
--config.<key>=<value> ...`` (COMMON first, then each axis; two axes may not set one key).
Every run's config is resolved here before anything starts, so a typo fails in a second, not
after the first run. ``<root>/sweep.json`` records the whole grid (names, labels, overrides,
commands) for ``summary``.

``--run`` (the default) runs them in order, skips a run whose ``final_metrics.json`` exists
(so re-running the sweep finishes what is missing), logs each to ``<workdir>/sweep.log``,
carries on after a failure and exits non-zero if any failed. It adds nothing to the
environment: set ``JAX_PLATFORMS`` etc. on the command line as for a single run.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import fnmatch
import importlib.util
import io
import itertools
import json
import os
import pathlib
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
MAIN = ("-m", "gist_jax.main")
MANIFEST = "sweep.json"
FINAL_METRICS = "final_metrics.json"
LOG = "sweep.log"
FIRST_METRICS = ("step", "loss", "lm_loss", "ae_loss", "accuracy", "grad_norm", "tokens_per_s")


class SweepError(ValueError):
    """A sweep file or command line that cannot work; the message says which part and why."""


# == the sweep file ====================================================================================
@dataclasses.dataclass(frozen=True)
class Choice:
    """One value of one axis: a label for the run name and what it changes."""

    label: str
    variants: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    path: pathlib.Path
    config_file: str  # as written in BASE, relative to the repository root
    base_variants: tuple[str, ...]
    common: Mapping[str, Any]
    axes: dict[str, list[Choice]]
    include: Callable[[dict[str, str]], bool] | None = None


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    labels: dict[str, str]  # axis -> label
    config: str  # "<file>:<variants>" as passed to --config
    overrides: dict[str, Any]  # config key -> Python value
    workdir: str

    def config_args(self) -> list[str]:
        return [f"--config.{key}={format_value(value)}" for key, value in self.overrides.items()]


def _choice(axis: str, entry: Any) -> Choice:
    if isinstance(entry, str):
        return Choice(entry, _split_variants(entry))
    if isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str):
        label, what = entry
        if isinstance(what, str):
            return Choice(label, _split_variants(what))
        if isinstance(what, Mapping):
            return Choice(label, (), dict(what))
    raise SweepError(f"axis {axis!r}: entry {entry!r} must be a variant name, (label, {{key: value}}) or "
                     "(label, 'variant[,variant]')")


def _split_variants(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Imports a sweep file by path and checks its shape (not yet the configs: see ``check_run``)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"gist_jax_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = getattr(module, "BASE", None)
    axes = getattr(module, "AXES", None)
    if not isinstance(base, str) or not base.split(":", 1)[0].endswith(".py"):
        raise SweepError(f"{path}: BASE must be 'experiments/<file>.py[:<variants>]', got {base!r}")
    if not isinstance(axes, Mapping) or not axes or not all(isinstance(v, (list, tuple)) and v for v in axes.values()):
        raise SweepError(f"{path}: AXES must map each axis name to a non-empty list of choices")
    config_file, _, variants = base.partition(":")
    common = dict(getattr(module, "COMMON", {}) or {})
    include = getattr(module, "include", None)
    return Sweep(name=getattr(module, "NAME", path.stem), path=path, config_file=config_file,
                 base_variants=_split_variants(variants), common=common,
                 axes={axis: [_choice(axis, e) for e in entries] for axis, entries in axes.items()},
                 include=include)


def expand(sweep: Sweep, root: str | os.PathLike, add_variants: Sequence[str] = ()) -> list[Run]:
    """Every combination of the axes (in their order) that ``include`` keeps, as named runs;
    ``add_variants`` go after each run's own (``--variants tiny``: the whole grid at toy scale)."""
    runs: list[Run] = []
    for combo in itertools.product(*sweep.axes.values()):
        labels = {axis: choice.label for axis, choice in zip(sweep.axes, combo)}
        if sweep.include is not None and not sweep.include(dict(labels)):
            continue
        overrides: dict[str, Any] = dict(sweep.common)
        set_by: dict[str, str] = {}
        variants = list(sweep.base_variants)
        for axis, choice in zip(sweep.axes, combo):
            for key, value in choice.overrides.items():
                if key in set_by:
                    raise SweepError(f"{sweep.path}: axes {set_by[key]!r} and {axis!r} both set {key}")
                set_by[key] = axis
                overrides[key] = value
            variants.extend(choice.variants)
        variants.extend(add_variants)
        name = "-".join(label for label in labels.values() if label) or "base"
        config = f"{sweep.config_file}:{','.join(variants)}" if variants else sweep.config_file
        overrides = {"name": f"{sweep.name}/{name}", **overrides}
        runs.append(Run(name, labels, config, overrides, str(pathlib.Path(root) / name)))
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SweepError(f"{sweep.path}: run names {duplicates} occur twice; give the choices distinct labels")
    if not runs:
        raise SweepError(f"{sweep.path}: include() kept no run")
    return runs


def select(runs: list[Run], only: Sequence[str]) -> list[Run]:
    """Runs whose name matches one of the ``--only`` patterns (fnmatch; comma-separated allowed)."""
    patterns = [p for item in only for p in item.split(",") if p]
    if not patterns:
        return runs
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(r.name, p) for r in runs)]
    if unmatched:
        raise SweepError(f"--only {unmatched[0]!r} matches no run; runs: {', '.join(r.name for r in runs)}")
    return [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]


# == commands ==========================================================================================
def format_value(value: Any) -> str:
    """A Python value as ``--config.<key>=`` text that ml_collections' config_flags parses back to it."""
    if isinstance(value, (list, tuple)):
        return repr(_as_tuple(value))
    if isinstance(value, str):
        return value
    return repr(value)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def command(run: Run, extra: Sequence[str] = (), python: str = "python", launcher: str | None = None) -> list[str]:
    """The argv that trains ``run``; ``launcher`` (e.g. ``sbatch launch/slurm.sbatch``) replaces
    ``python -m gist_jax.main`` for scripts that take the same arguments."""
    head = shlex.split(launcher) if launcher else [python, *MAIN]
    return [*head, "--config", run.config, "--workdir", run.workdir, *run.config_args(), *extra]


# == checking a run's config here, before launching ====================================================
def _load_config_module(config_file: str) -> Any:
    path = pathlib.Path(config_file)
    path = path if path.is_absolute() else (REPO / path if (REPO / path).is_file() else path.resolve())
    if not path.is_file():  # outside a checkout: the recipe shipped in the installed package
        from gist_jax.experiments import resolve_config

        path = pathlib.Path(resolve_config(config_file))
    if not path.is_file():
        raise SweepError(f"config file {config_file!r} does not exist (paths are relative to {REPO})")
    spec = importlib.util.spec_from_file_location(f"gist_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _set_key(cd: Any, key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    node = cd
    for section in sections:
        if section not in node:
            raise SweepError(f"unknown config key {key!r} (no section {section!r})")
        node = node[section]
    if leaf not in node:
        raise SweepError(f"unknown config key {key!r}")
    node[leaf] = _as_tuple(value) if isinstance(value, list) else value


def _parse_extra(extra: Sequence[str], cd: Any) -> dict[str, Any]:
    """``--config.<key>=<text>`` extras as values (strings stay strings where the config has one)."""
    out: dict[str, Any] = {}
    for arg in extra:
        if not arg.startswith("--config.") or "=" not in arg:
            continue
        key, text = arg[len("--config."):].split("=", 1)
        node = cd
        for part in key.split(".")[:-1]:
            node = node.get(part, {}) if hasattr(node, "get") else {}
        current = node.get(key.split(".")[-1]) if hasattr(node, "get") else None
        if isinstance(current, str):
            out[key] = text
            continue
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def check_run(run: Run, extra: Sequence[str] = (), modules: dict[str, Any] | None = None) -> Any:
    """Builds the run's config exactly as main would and validates it; returns the RunConfig."""
    from gist_jax.train.experiment import run_config  # here: ``--print --no_check`` needs no jax

    file, _, variants = run.config.partition(":")
    modules = {} if modules is None else modules
    if file not in modules:
        modules[file] = _load_config_module(file)
    try:
        cd = modules[file].get_config(variants or None)
        for key, value in {**run.overrides, **_parse_extra(extra, cd)}.items():
            _set_key(cd, key, value)
        return run_config(cd)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise SweepError(f"run {run.name!r} ({run.config}): {e}") from e


def write_manifest(sweep: Sweep, runs: list[Run], root: pathlib.Path, extra: Sequence[str]) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "sweep": str(sweep.path), "base": sweep.config_file, "axes": list(sweep.axes), "extra": list(extra),
        "runs": [{"name": r.name, "labels": r.labels, "config": r.config,
                  "overrides": {k: _as_tuple(v) for k, v in r.overrides.items()},
                  "command": shlex.join(command(r, extra))} for r in runs],
    }
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, default=list) + "\n")
    return path


# == running here =====================================================================================
@dataclasses.dataclass
class Outcome:
    name: str
    status: str  # done | skipped | failed
    seconds: float
    detail: str = ""


def run_one(run: Run, extra: Sequence[str], timeout: float | None, echo: bool) -> Outcome:
    workdir = pathlib.Path(run.workdir)
    if (workdir / FINAL_METRICS).is_file():
        return Outcome(run.name, "skipped", 0.0, f"{workdir / FINAL_METRICS} exists")
    workdir.mkdir(parents=True, exist_ok=True)
    argv = command(run, extra, python=sys.executable)
    start = time.monotonic()
    with open(workdir / LOG, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        for line in proc.stdout:
            log.write(line)
            if echo:
                sys.stdout.write(f"[{run.name}] {line}")
                sys.stdout.flush()
        code = proc.wait()
        if timer:
            timer.cancel()
    seconds = time.monotonic() - start
    if code != 0:
        return Outcome(run.name, "failed", seconds, f"exit code {code}; log: {workdir / LOG}")
    if not (workdir / FINAL_METRICS).is_file():
        return Outcome(run.name, "failed", seconds, f"exit code 0 but no {FINAL_METRICS}; log: {workdir / LOG}")
    return Outcome(run.name, "done", seconds)


def run_all(runs: list[Run], extra: Sequence[str], timeout: float | None = None, echo: bool = True) -> list[Outcome]:
    outcomes = []
    for i, run in enumerate(runs, start=1):
        print(f"== [{i}/{len(runs)}] {run.name}: {shlex.join(command(run, extra))}", flush=True)
        outcome = run_one(run, extra, timeout, echo)
        print(f"== [{i}/{len(runs)}] {run.name}: {outcome.status} ({outcome.seconds:.0f}s) {outcome.detail}",
              flush=True)
        outcomes.append(outcome)
    return outcomes


# == summary ==========================================================================================
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return ""
    return str(value)


def collect(root: str | os.PathLike) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per run of ``root`` (from its manifest, plus any other subdirectory holding a
    ``final_metrics.json``): name, status, one column per axis, the metrics, the overrides."""
    root = pathlib.Path(root)
    manifest = json.loads((root / MANIFEST).read_text()) if (root / MANIFEST).is_file() else {"axes": [], "runs": []}
    entries = list(manifest["runs"])
    known = {e["name"] for e in entries}
    for metrics_file in sorted(root.glob(f"*/{FINAL_METRICS}")):
        if metrics_file.parent.name not in known:
            entries.append({"name": metrics_file.parent.name, "labels": {}, "overrides": {}})
    rows, metric_keys = [], set()
    for entry in entries:
        metrics_file = root / entry["name"] / FINAL_METRICS
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        status = "done" if metrics else ("failed" if (root / entry["name"] / LOG).is_file() else "missing")
        metric_keys |= set(metrics)
        overrides = {k: v for k, v in entry.get("overrides", {}).items() if k != "name"}
        rows.append({"name": entry["name"], "status": status,
                     **{axis: entry.get("labels", {}).get(axis, "") for axis in manifest["axes"]},
                     **metrics, "overrides": " ".join(f"{k}={format_value(v)}" for k, v in overrides.items())})
    ordered = [k for k in FIRST_METRICS if k in metric_keys]
    ordered += sorted(k for k in metric_keys if k.startswith("eval/"))
    ordered += sorted(metric_keys - set(ordered))
    columns = ["name", "status", *[a for a in manifest["axes"] if a not in ("name", "status")], *ordered, "overrides"]
    return columns, rows


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)).replace("|", "\\|") or "-" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def summarize(root: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path, str]:
    """Writes ``summary.csv`` and ``summary.md`` into ``root``; returns their paths and the markdown."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise SweepError(f"sweep root {str(root)!r} does not exist")
    columns, rows = collect(root)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path, md_path = root / "summary.csv", root / "summary.md"
    csv_path.write_text(buffer.getvalue())
    markdown = to_markdown(columns, rows)
    md_path.write_text(markdown)
    return csv_path, md_path, markdown


# == command line =====================================================================================
def _split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--extra" in argv:
        i = argv.index("--extra")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["summary"]:
        argv = ["--summary", *argv[1:]]
    argv, extra = _split_extra(argv)
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", help="experiments/sweeps/<name>.py")
    parser.add_argument("--workdir_root", help="where the runs' workdirs go (default: runs/<sweep name>)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run them here, one after another (default)")
    mode.add_argument("--print", action="store_true", help="print one shell-quoted command per run")
    mode.add_argument("--list", action="store_true", help="print the run names and their overrides")
    mode.add_argument("--summary", metavar="ROOT", help="write ROOT/summary.csv and summary.md from the runs")
    parser.add_argument("--only", action="append", default=[], help="run names or fnmatch patterns (repeatable)")
    parser.add_argument("--variants", default="", help="config variants added to every run, e.g. 'tiny'")
    parser.add_argument("--launcher", help="replaces 'python -m gist_jax.main' in --print, e.g. "
                                           "'sbatch launch/slurm.sbatch' or 'launch/tpu_pod.sh'")
    parser.add_argument("--python", default="python", help="interpreter named in --print commands")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run before it is killed (--run)")
    parser.add_argument("--quiet", action="store_true", help="--run: keep run output in the logs only")
    parser.add_argument("--no_check", action="store_true", help="skip resolving every run's config first")
    args, unknown = parser.parse_known_args(argv)
    bad = [a for a in unknown if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (pass main's own flags after --extra)")
    extra = [*unknown, *extra]

    try:
        if args.summary:
            csv_path, md_path, markdown = summarize(args.summary)
            print(markdown, end="")
            print(f"wrote {csv_path} and {md_path}")
            return 0
        if not args.sweep:
            parser.error("give a sweep file (experiments/sweeps/<name>.py) or 'summary <root>'")
        sweep = load_sweep(args.sweep)
        root = pathlib.Path(args.workdir_root or pathlib.Path("runs") / sweep.name)
        if not (args.print or args.list):
            root = root.resolve()  # runs start in the repository root
        every = expand(sweep, root, _split_variants(args.variants))
        runs = select(every, args.only)
        if not args.no_check:
            modules: dict[str, Any] = {}
            for run in runs:
                check_run(run, extra, modules)
        if args.list:
            for run in runs:
                print(f"{run.name:<28} {run.config} {' '.join(run.config_args()[1:])}")
            return 0
        write_manifest(sweep, every, root, extra)
        if args.print:
            for run in runs:
                print(shlex.join(command(run, extra, python=args.python, launcher=args.launcher)))
            return 0
        outcomes = run_all(runs, extra, timeout=args.timeout, echo=not args.quiet)
        _, _, markdown = summarize(root)
        print(markdown, end="")
        failed = [o for o in outcomes if o.status == "failed"]
        done = sum(o.status == "done" for o in outcomes)
        skipped = sum(o.status == "skipped" for o in outcomes)
        print(f"sweep {sweep.name}: {done} done, {skipped} skipped (already finished), {len(failed)} failed; "
              f"summary in {root / 'summary.md'}")
        for o in failed:
            print(f"  FAILED {o.name}: {o.detail}")
        return 1 if failed else 0
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
