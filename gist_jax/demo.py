"""The demo (the README's first command): continue training the real SmolLM2-135M as a Fine-KV
compressor with AE and TIE on the built-in corpus, checkpointing as it goes, then print the
validation perplexity of full attention vs compression at each ratio, before and after
training, and write the plot.

    python -m gist_jax.demo --workdir runs/demo
    python -m gist_jax.demo --workdir runs/demo_tiny --config experiments/demo.py:tiny

It is ``python -m gist_jax.main`` with ``experiments/demo.py`` plus the report; rerunning it
resumes (or, when finished, just re-evaluates and reprints).
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the data path imports tensorflow; its C++ start-up log is noise here

from absl import app, flags, logging
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
_CONFIG = config_flags.DEFINE_config_file("config", str(REPO / "experiments" / "demo.py"),
                                          "Experiment file (default: experiments/demo.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run directory")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from gist_jax.distributed import enable_compilation_cache, initialize_from_env
    from gist_jax.experiment import run_config
    from gist_jax.model.config import ConfigError
    from gist_jax.train.report import perplexity_table, plot_perplexity

    try:
        run = run_config(_CONFIG.value)
        enable_compilation_cache()
        initialize_from_env()
        from gist_jax.train.loop import train

        final = train(run, _WORKDIR.value)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"\nValidation perplexity on held-out stdlib files ({run.data.tokenizer} tokens after the first "
          f"segment of {run.compression.segment_length}):\n")
    print(perplexity_table(_WORKDIR.value))
    png = plot_perplexity(_WORKDIR.value)
    print(f"\nplot: {png}\nrun: {pathlib.Path(_WORKDIR.value).absolute()} (checkpoints, metrics.jsonl, tensorboard)")
    print(f"wall time {final['wall_seconds']:.0f}s, of which train-step compilation {final['compile_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
