"""Train a gist compressor.

    python -m gist_jax.main --config experiments/demo.py --workdir runs/demo
    python -m gist_jax.main --config experiments/llama3_8b_paper.py:fine_kv --workdir /gcs/bucket/run \
        --config.model.init=hf:/models/Meta-Llama-3.1-8B --config.optimizer.total_steps=5000

Rerunning the same command resumes from the newest complete checkpoint in the workdir. Several
processes (TPU pod, SLURM, ``python -m launch.local``) join through ``gist_jax.train.distributed``.
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

from gist_jax.train.interrupt import exit_on_sigterm

exit_on_sigterm()  # from the first moment: jax, the model and the data take a while to load

# The data path imports tensorflow; its C++ start-up log is noise here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# E402: these imports come after exit_on_sigterm() on purpose, so a SIGTERM while they load exits cleanly.
from absl import app, flags  # noqa: E402

from gist_jax import experiments  # noqa: E402

# A path that does not exist but names a shipped recipe (experiments/<file>.py) runs the packaged one.
_CONFIG = experiments.DEFINE_config_file("config", None, "Experiment file: experiments/<file>.py[:<variants>]",
                                         lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, a path or gs://<bucket>/<path>: checkpoints, metrics, "
                                "TensorBoard events")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; "
                             "options are --config, --workdir, --config.<key>=<value>")
    from gist_jax.utils.logs import setup_logging

    setup_logging()  # our INFO lines with timestamps on stderr, not Orbax's per-file INFO
    from gist_jax.errors import ConfigError
    from gist_jax.train.checkpoint import DiskFull
    from gist_jax.train.distributed import (
        DistributedInitError,
        enable_compilation_cache,
        initialize_from_env,
        order_cpu_collectives,
    )
    from gist_jax.train.experiment import run_config
    from gist_jax.train.hooks import TrainingDiverged

    try:
        run = run_config(_CONFIG.value)
        order_cpu_collectives(run.step.mesh.context)  # before anything starts the backend
        from gist_jax.train.preflight import check_paths

        check_paths(run, _WORKDIR.value, sys.argv[1:])  # every file the run names, before anything loads or is written
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
    from gist_jax import cli_config  # the same one-line errors as every other tool's --config

    try:
        remaining = flags.FLAGS(argv)
        _CONFIG.value.get("name")  # a file that failed to load is a placeholder whose first use raises OSError
        return remaining
    except OSError as e:
        line = cli_config.config_file_line(argv, e)
    except (AttributeError, KeyError) as e:  # ml_collections, when an override names a key the config lacks
        line = cli_config.unknown_override_line(argv, cli_config.missing_key(e))
        if line is None:  # not an override: a bug in the experiment file, whose traceback helps
            raise
    except flags.Error as e:
        line = cli_config.flag_error_line(e)
    print(f"config error: {line}", file=sys.stderr, flush=True)
    sys.exit(2)


def run() -> None:
    """``python -m gist_jax.main`` and the console script ``gist-train``."""
    from gist_jax.console import run_absl

    run_absl(__name__, lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
