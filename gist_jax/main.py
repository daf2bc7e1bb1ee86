"""Train a gist compressor.

    python -m gist_jax.main --config experiments/demo.py --workdir runs/demo
    python -m gist_jax.main --config experiments/llama3_8b_paper.py:fine_kv --workdir /gcs/bucket/run \
        --config.model.init=hf:/models/Meta-Llama-3.1-8B --config.optimizer.total_steps=5000

Rerunning the same command resumes from the newest complete checkpoint in the workdir. Several
processes (TPU pod, SLURM, ``python -m launch.local``) join through ``gist_jax.distributed``.
Exit codes (docs/training.md has the table of faults):
  0  done; or preempted by SIGTERM (checkpoint saved); or SIGTERM during start-up (nothing to save)
  2  configuration or input error: one line naming the key or file and the fix, nothing written
  3  diverged: non-finite loss or weights; the checkpoints of the diverged weights are set aside
  4  no space left for a checkpoint: the newest complete checkpoint is intact
"""

from __future__ import annotations

import errno
import os
import sys

from gist_jax.interrupt import exit_on_sigterm

exit_on_sigterm()  # from the first moment: jax, the model and the data take a while to load

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the data path imports tensorflow; its C++ start-up log is noise here

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file: experiments/<file>.py[:<variants>]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard events")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config, --workdir, --config.<key>=<value>")
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv):
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    from gist_jax.distributed import DistributedInitError, enable_compilation_cache, initialize_from_env
    from gist_jax.experiment import run_config
    from gist_jax.model.config import ConfigError
    from gist_jax.train.checkpoint import DiskFull
    from gist_jax.train.hooks import TrainingDiverged

    try:
        run = run_config(_CONFIG.value)
        from gist_jax.preflight import check_paths

        check_paths(run, _WORKDIR.value)  # every file the run names, before anything loads or is written
        enable_compilation_cache()
        initialize_from_env()
        from gist_jax.train.loop import train

        train(run, _WORKDIR.value)
    except (ConfigError, DistributedInitError) as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingDiverged as e:
        print(f"diverged: {e}", file=sys.stderr, flush=True)
        return 3
    except DiskFull as e:
        print(f"disk full: {e}", file=sys.stderr, flush=True)
        return 4
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"disk full: no space left on device writing {e.filename or 'a file'} ({e.strerror}); the newest "
              "complete checkpoint is intact. Free space, then rerun to resume", file=sys.stderr, flush=True)
        return 4
    return 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every configuration fault found there as one line and exit code 2.

    The experiment file is loaded, its variants applied and the ``--config.<key>`` overrides set
    while absl parses the flags, inside ``app.run`` and before ``main``: an unknown variant, a
    missing experiment file or an override of a key that does not exist would otherwise end in
    absl's multi-line report (exit 1) or a traceback, or (a missing file without overrides) only
    when ``main`` first reads the config.
    """
    try:
        remaining = flags.FLAGS(argv)
        _CONFIG.value.get("name")  # a file that failed to load is a placeholder whose first use raises OSError
        return remaining
    except OSError as e:
        line = _config_file_line(argv, e)
    except (AttributeError, KeyError) as e:  # ml_collections, when an override names a key the config lacks
        line = _unknown_override_line(argv, _missing_key(e))
        if line is None:  # not an override: a bug in the experiment file, whose traceback helps
            raise
    except flags.Error as e:
        line = _flag_error_line(e)
    print(f"config error: {line}", file=sys.stderr, flush=True)
    sys.exit(2)


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value given to ``--name`` (``--name=v`` or ``--name v``), as typed."""
    for i, arg in enumerate(argv):
        for dashes in ("--", "-"):
            if arg.startswith(f"{dashes}{name}="):
                return arg.split("=", 1)[1]
            if arg == f"{dashes}{name}" and i + 1 < len(argv):
                return argv[i + 1]
    return None


def _config_file_line(argv: list[str], error: OSError) -> str:
    value = _flag_value(argv, "config") or ""
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
        return (f"--config={value}: experiment file {path!r} does not exist (relative paths are from {os.getcwd()}); "
                "give experiments/<file>.py[:<variants>]")
    cause = error.__cause__ or error
    return f"--config={value}: cannot read {path!r} ({getattr(cause, 'strerror', None) or cause})"


def _missing_key(error: BaseException) -> str:
    """The key name in ml_collections' lookup errors: ``AttributeError(KeyError("'foo'\\nDid you mean ..."))``."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else ""
    return (text.splitlines() or [""])[0].strip("\"'")


def _unknown_override_line(argv: list[str], name: str) -> str | None:
    """Which ``--config.<key>`` names the missing ``name``, and the keys its section has; None
    when no override does."""
    from gist_jax.experiment import default_config

    keys = [a.split("=", 1)[0].lstrip("-").split(".", 1)[1] for a in argv if a.startswith(("--config.", "-config."))]
    key = next((k for k in keys if name in k.split(".")), None)
    if key is None:
        return None
    parts = key.split(".")
    defaults = default_config()
    section = parts[0] if len(parts) > 1 and parts[0] in defaults else None
    known = sorted(defaults[section].keys()) if section else sorted(defaults.keys())
    where = f"known keys of '{section}'" if section else "top-level keys"
    return f"--config.{key}: no such config key; {where}: {', '.join(known)}"


def _flag_error_line(error: Exception) -> str:
    """absl's message on one line; for an error raised inside the experiment file (ml_collections
    wraps it in a message with the whole traceback) the original ``ConfigError``'s message."""
    from gist_jax.model.config import ConfigError

    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ConfigError) or "\n" in str(error):
        return " ".join(str(cause).split())
    return str(error)


def run() -> None:
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
