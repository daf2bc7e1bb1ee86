"""Train a gist compressor.

    python -m gist_jax.main --config experiments/demo.py --workdir runs/demo
    python -m gist_jax.main --config experiments/llama3_8b_paper.py:fine_kv --workdir gs://bucket/run \
        --config.model.init=hf:/models/Meta-Llama-3.1-8B --config.optimizer.total_steps=5000

Rerunning the same command resumes from the newest complete checkpoint in the workdir. Several
processes (TPU pod, SLURM, ``python -m launch.local``) join through ``gist_jax.distributed``.
Exit codes: 0 done or preempted cleanly (checkpoint saved), 2 configuration error, 3 diverged.
"""

from __future__ import annotations

import os
import sys

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
    from gist_jax.train.hooks import TrainingDiverged

    try:
        run = run_config(_CONFIG.value)
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
    return 0


def run() -> None:
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
