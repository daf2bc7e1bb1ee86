"""The demo (the README's first command): train the real SmolLM2-135M into a Fine-KV compressor
on the built-in corpus with the recipe docs/recipe.md measured best, checkpointing as it goes,
then print the validation perplexity of full attention, no memory and compression at each
ratio, before and after training, with each ratio's memory efficacy (1: as good as full
attention, 0: no better than dropping the earlier segments), write the plot, run the evaluation
suites (perplexity with efficacy intervals over 32 windows, loss by position in a segment, UUID
recall), export the result to Hugging Face and generate from it with transformers and
compressed memory.

    python -m gist_jax.demo --workdir runs/demo
    python -m gist_jax.demo --workdir runs/demo_tiny --config experiments/demo.py:tiny

It is ``python -m gist_jax.main`` with ``experiments/demo.py`` plus the report; rerunning it
resumes (or, when finished, just re-evaluates and reprints).
"""

from __future__ import annotations

import os
import pathlib
import sys

# The data path imports tensorflow; its C++ start-up log is noise here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags

from gist_jax import experiments

_CONFIG = experiments.DEFINE_config_file("config", str(experiments.DIR / "demo.py"),
                                         "Experiment file (default: experiments/demo.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run directory")
EVAL_SUITES = "boundary,uuid"
# Efficacy needs enough windows for an interval that says something (docs/recipe.md uses 32).
PERPLEXITY_WINDOWS = 32


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from gist_jax.utils.logs import setup_logging

    setup_logging()  # our INFO lines with timestamps on stderr, not Orbax's per-file INFO
    from gist_jax.errors import ConfigError
    from gist_jax.train.distributed import enable_compilation_cache, initialize_from_env
    from gist_jax.train.experiment import run_config
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
    if run.compression.enabled:
        workdir = pathlib.Path(_WORKDIR.value)
        evaluate(workdir)
        export_and_generate(workdir)
    print(STUDY_POINTER)
    return 0


# The demo's closing lines: where the larger, interval-backed comparison lives.
STUDY_POINTER = ("\nThe paper's full grid (full attention, Fine-KV, Coarse-KV, Coarse-Rec, AE, TIE) at a "
                 "larger scale, with 95% intervals and which findings reproduce: docs/study.md "
                 "(python -m gist_jax.study --scale cpu --out runs/study_cpu, about 45 min on 2 CPU cores)")


def evaluate(workdir: pathlib.Path) -> None:
    """The paper's probes at demo scale (docs/evaluation.md): perplexity by ratio, loss by
    position inside a segment, UUID recall; tables printed, JSON/CSV/PNG in <workdir>/eval."""
    from gist_jax.evaluate import run_suites

    print(f"\nEvaluation suites (python -m gist_jax.evaluate): perplexity and memory efficacy with 95% intervals "
          f"over {PERPLEXITY_WINDOWS} validation windows; at small scale, loss by position (4 windows) and UUID "
          "recall (4 examples)")
    run_suites(workdir, "perplexity", workdir / "eval", num_windows=PERPLEXITY_WINDOWS, batch=4)
    run_suites(workdir, EVAL_SUITES, workdir / "eval", num_windows=4, batch=2, num_examples=4)
    print(f"\nplots: {workdir / 'eval'}/*.png")


def current_export(workdir: pathlib.Path) -> pathlib.Path:
    """``workdir/hf``, exported if missing or re-exported if an older gist_jax wrote it (its
    ``modeling_gist.py`` differs from this package's, which a rerun of the demo would refuse to load)."""
    from gist_jax.errors import ConfigError
    from gist_jax.hf.own_code import check_modeling_file
    from gist_jax.train.hf_export import export_checkpoint

    out = workdir / "hf"
    try:
        check_modeling_file(out)
        stale = False
    except ConfigError:
        stale = True
    if stale or not (out / "config.json").exists():
        export_checkpoint(workdir, out, overwrite=stale)
    return out


def export_and_generate(workdir: pathlib.Path, prompt_chars: int = 1200, new_tokens: int = 24) -> None:
    """Ships the trained compressor the way a user would: a Hugging Face export, reloaded by
    transformers with the exported ``modeling_gist.py``, generating from a held-out file with
    compressed memory (and, for comparison, the same weights with full attention)."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from gist_jax.data.sources import stdlib_files
    from gist_jax.hf.own_code import load_gist_model

    out = current_export(workdir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = load_gist_model(out, dtype=torch.float32).eval()  # what trust_remote_code=True gives, but our own code
    prompt = stdlib_files("validation")[0].read_text(encoding="utf-8", errors="replace")[:prompt_chars]
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    gist = model.config.gist
    compressed = model.generate(ids, max_new_tokens=new_tokens)[0, ids.shape[1]:]
    full = model.generate(ids, max_new_tokens=new_tokens, compressed=False, do_sample=False)[0, ids.shape[1]:]
    print(f"\nexported to {out} ({gist['variant']}, segments of {gist['segment_length']}, ratio "
          f"{gist['inference_ratio']}); reloaded with transformers "
          f"AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)")
    print(f"prompt: the first {ids.shape[1]} tokens of {stdlib_files('validation')[0].name}, ending "
          f"{prompt[-80:]!r}")
    print(f"compressed memory: {tokenizer.decode(compressed)!r}")
    print(f"full attention:    {tokenizer.decode(full)!r}")


def run() -> None:
    """The console script ``gist-demo``."""
    from gist_jax.console import run_absl

    run_absl(__name__, lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
