"""One way for every tool to read a run config: ``--config FILE.py[:VARIANTS]`` plus
``--config.<key>=<value>`` overrides, resolved and validated into the ``RunConfig`` the
training loop uses, with the same one-line errors (exit code 2) as ``python -m gist_jax.main``.

Why one module: the planner, the benchmark, the FLOP counter and the data inspector must see
the run exactly as ``main`` trains it (same variants, same override parsing by ml_collections'
``config_flags``, same validation by ``experiment.run_config``), or a plan or a benchmark
describes some other run. Tools that read a checkpoint take the run's resolved config from the
checkpoint instead (``<step>/run/metadata``, written by the loop) and accept overrides only of
the keys that cannot change what was trained (``checkpoint_run``).

Flag convention of every tool: ``--config`` and ``--config.<key>`` as here; tool options that are
not run config are spelled with dashes (``--device-gib``, ``--sample-rows``); the old
underscore spellings still parse where a tool had them.

ml_collections, absl and ``gist_jax.train.experiment`` (which imports the data layer's config) are
imported where used, so importing this module costs nothing and pulls in no data code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from gist_jax.model.config import ModelConfig
    from gist_jax.train.experiment import RunConfig

CONFIG_METAVAR = "FILE.py[:VARIANTS]"
OVERRIDE_PREFIXES = ("--config.", "-config.")
OVERRIDES_HELP = ("then --config.<key>=<value> to change any key, e.g. --config.step.seq_len=4096 "
                  "(keys: gist_jax/train/experiment.py; variants: experiments/README.md)")


class CliConfigError(ValueError):
    """A configuration fault as the one line a tool prints (``config error: <line>``)."""


# ----------------------------------------------------------------------------- argparse side
def add_config_flag(parser: argparse.ArgumentParser, *, default: str | None = None, required: bool = True,
                    what: str = "the run config") -> None:
    """``--config FILE.py[:VARIANTS]`` with the override syntax in its help."""
    where = f" (default: {default})" if default else ""
    parser.add_argument("--config", default=default, required=required and default is None,
                        metavar=CONFIG_METAVAR, help=f"experiment file of {what}{where}; {OVERRIDES_HELP}")


def add_checkpoint_overrides(parser: argparse.ArgumentParser, allowed: Sequence[str]) -> None:
    """Help text for a checkpoint tool: its run config is the checkpoint's, and only ``allowed``
    keys may be overridden (argparse never sees the overrides: ``split_overrides`` takes them)."""
    parser.add_argument_group(
        "run config", "--config.<key>=<value>: the run config is the one stored with --checkpoint "
                      f"(<step>/run/metadata); only these keys may be overridden: {', '.join(allowed)}")


def option(name: str) -> tuple[str, ...]:
    """``"max_documents"`` -> ``("--max-documents", "--max_documents")``: the dashed spelling of
    a tool option, and the old underscore one where a tool had it (still parses)."""
    dashed = "--" + name.replace("_", "-")
    return (dashed,) if "_" not in name else (dashed, "--" + name)


def stored_run(checkpoint: str, step: int | None = None) -> dict[str, Any]:
    """The resolved run config a training checkpoint was written with (``<step>/run/metadata``),
    from the step a tool will read (a damaged newest step is skipped, see ``step_reader.sound_step``)."""
    from gist_jax.train.step_reader import read_item, sound_step

    return sound_step(checkpoint, step, lambda step_dir: read_item(step_dir, "run"))


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(other arguments, ``--config.<key>=<value>`` overrides as ``--config.key=value``).
    ``--config.key value`` (absl's spaced form) is accepted too."""
    rest, overrides = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(OVERRIDE_PREFIXES):
            if "=" not in arg and i + 1 < len(args):
                arg, i = f"{arg}={args[i + 1]}", i + 1
            overrides.append("--" + arg.lstrip("-"))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def parse_tool_args(parser: argparse.ArgumentParser,
                    argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """``parser.parse_args`` with the ``--config.<key>`` overrides split off first; then the
    logging every tool shares (``gist_jax.utils.logs.setup_logging``), since each calls this first."""
    from gist_jax.utils.logs import setup_logging

    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    setup_logging()
    return args, overrides


def exit_config_error(error: Exception) -> NoReturn:
    print(f"config error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


# ----------------------------------------------------------------------------- resolving
def load_config_dict(config: str, overrides: Sequence[str] = ()) -> Any:
    """The ml_collections ConfigDict of ``--config=config`` plus ``overrides``, parsed by
    ``config_flags`` on a private flag set exactly as ``gist_jax.main`` parses its own;
    faults raise ``CliConfigError`` with main's one-line message."""
    from absl import flags

    from gist_jax import experiments

    argv = ["tool", f"--config={config}", *overrides]
    bad = [o for o in overrides if not o.startswith(OVERRIDE_PREFIXES)]
    if bad:
        raise CliConfigError(f"unexpected arguments {bad}; only --config.<key>=<value> overrides may follow --config")
    fv = flags.FlagValues()
    experiments.DEFINE_config_file("config", None, "Experiment file", flag_values=fv, lock_config=True,
                                   sys_argv=argv)  # a shipped recipe's path works outside a checkout too
    return _parse_config_flags(fv, argv)


def _parse_config_flags(fv: Any, argv: list[str]) -> Any:
    from absl import flags

    try:
        fv(argv)
        value = fv["config"].value
        value.get("name")  # a file that failed to load is a placeholder whose first use raises OSError
        return value
    except OSError as e:
        raise CliConfigError(config_file_line(argv, e)) from None
    except (AttributeError, KeyError) as e:  # ml_collections, when an override names a key the config lacks
        line = unknown_override_line(argv, missing_key(e))
        if line is None:  # not an override: a bug in the experiment file, whose traceback helps
            raise
        raise CliConfigError(line) from None
    except flags.Error as e:
        raise CliConfigError(flag_error_line(e)) from None


def load_run(config: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The validated ``RunConfig`` of a ``--config`` value and its overrides; ``CliConfigError``
    (a ``ConfigError`` from validation is re-raised as one) on any fault."""
    from gist_jax.errors import ConfigError
    from gist_jax.train.experiment import run_config

    cd = load_config_dict(config, overrides)
    try:
        return run_config(cd)
    except ConfigError as e:
        raise CliConfigError(str(e)) from None


def load_run_or_exit(config: str, overrides: Sequence[str] = ()) -> RunConfig:
    """``load_run``; a fault is printed as ``config error: <line>`` and the process exits 2."""
    try:
        return load_run(config, overrides)
    except CliConfigError as e:
        exit_config_error(e)


def checkpoint_run(run: dict[str, Any], overrides: Sequence[str], allowed: Sequence[str]) -> dict[str, Any]:
    """A checkpoint's stored run dict with ``overrides`` of the ``allowed`` keys applied (same
    value parsing as ``--config``), validated; returned in the stored, sectioned shape."""
    if not overrides:
        return run
    import ml_collections
    from absl import flags
    from ml_collections import config_flags

    from gist_jax.errors import ConfigError
    from gist_jax.train.experiment import run_config

    for override in overrides:
        key = override.split("=", 1)[0].lstrip("-").split(".", 1)[1]
        if key not in allowed:
            raise CliConfigError(f"--config.{key}: the run config comes from the checkpoint; only "
                                 f"{', '.join('--config.' + a for a in allowed)} may be overridden here")
    argv = ["tool", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", ml_collections.ConfigDict(_tuples(run)), flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    cd = _parse_config_flags(fv, argv)
    try:
        return run_config(cd).to_dict()
    except ConfigError as e:
        raise CliConfigError(str(e)) from None


def _tuples(x: Any) -> Any:
    """JSON lists back to the tuples experiment files use (ml_collections keeps field types)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def override_keys(overrides: Sequence[str]) -> list[str]:
    """``["--config.step.seq_len=64"]`` -> ``["step.seq_len"]``."""
    return [o.split("=", 1)[0].lstrip("-").split(".", 1)[1] for o in overrides]


def model_shape(section: Any) -> ModelConfig:
    """The base model config of ``model.init`` without reading weights (a preset, an HF
    ``config.json``, a GGUF header, a params dir's config), with the run's model settings."""
    import dataclasses

    from gist_jax.hf.importer import base_model_config
    from gist_jax.model.config import PRESETS

    try:
        cfg = base_model_config(dataclasses.asdict(section))
    except OSError as e:
        raise CliConfigError(f"model.init={section.init!r}: {getattr(e, 'strerror', None) or e} "
                             f"({getattr(e, 'filename', '') or ''}); this tool needs only the model's shape: "
                             f"give a preset of the same shape, --config.model.init=preset:<name> "
                             f"({', '.join(sorted(PRESETS))})") from None
    return cfg.replace(scan_layers=section.scan_layers, remat_policy=section.remat_policy,
                       attention=section.attention)


# ----------------------------------------------------------------------------- one-line errors
def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value given to ``--name`` (``--name=v`` or ``--name v``), as typed."""
    for i, arg in enumerate(argv):
        for dashes in ("--", "-"):
            if arg.startswith(f"{dashes}{name}="):
                return arg.split("=", 1)[1]
            if arg == f"{dashes}{name}" and i + 1 < len(argv):
                return argv[i + 1]
    return None


def config_file_line(argv: Sequence[str], error: OSError) -> str:
    value = flag_value(argv, "config") or ""
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
        return (f"--config={value}: experiment file {path!r} does not exist (relative paths are from {os.getcwd()}); "
                "give experiments/<file>.py[:<variants>]")
    cause = error.__cause__ or error
    return f"--config={value}: cannot read {path!r} ({getattr(cause, 'strerror', None) or cause})"


def missing_key(error: BaseException) -> str:
    """The key name in ml_collections' lookup errors: ``AttributeError(KeyError("'foo'\\nDid you mean ..."))``."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else ""
    return (text.splitlines() or [""])[0].strip("\"'")


def unknown_override_line(argv: Sequence[str], name: str) -> str | None:
    """Which ``--config.<key>`` names the missing ``name``, and the keys its section has; None
    when no override does."""
    from gist_jax.train.experiment import default_config

    keys = override_keys([a for a in argv if a.startswith(OVERRIDE_PREFIXES)])
    key = next((k for k in keys if name in k.split(".")), None)
    if key is None:
        return None
    parts = key.split(".")
    defaults = default_config()
    section = parts[0] if len(parts) > 1 and parts[0] in defaults else None
    known = sorted(defaults[section].keys()) if section else sorted(defaults.keys())
    where = f"known keys of '{section}'" if section else "top-level keys"
    return f"--config.{key}: no such config key; {where}: {', '.join(known)}"


def flag_error_line(error: Exception) -> str:
    """absl's message on one line; for an error raised inside the experiment file (ml_collections
    wraps it in a message with the whole traceback) the original ``ConfigError``'s message."""
    from gist_jax.errors import ConfigError

    cause: BaseException = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    if isinstance(cause, ConfigError) or "\n" in str(error):
        return " ".join(str(cause).split())
    return str(error)
