"""The paper's study (Deng et al., ACL 2025) at four scales: one base model, the grid of variants,
every checkpoint through the evaluation suites, one report (``gist_jax.study``, docs/study.md).

    python -m gist_jax.study --scale smoke --out /tmp/study_smoke
    python -m gist_jax.study --scale cpu --out runs/study_cpu
    python -m gist_jax.study --scale gpu --out runs/study_gpu
    python -m gist_jax.study --scale paper --out runs/study_paper

Rerunning a command resumes: finished runs are not retrained, cached evaluations are not
recomputed, and the report is rewritten from the cached JSON. Each run of the grid is an
ordinary experiment of this file, trained through ``gist_jax.train.loop.train``; one alone:

    python -m gist_jax.main --config experiments/study.py:smoke,fine_kv,noae,notie --workdir /tmp/study_one
    python -m gist_jax.main --config experiments/study.py:cpu,coarse_rec,noae,notie --workdir /tmp/study_rec
    python -m gist_jax.main --config experiments/study.py:tiny --workdir /tmp/study_tiny

The text after ``:`` is the shared variant list (experiments/README.md) plus one *scale* name
(``smoke``, ``cpu``, ``gpu``, ``paper``; default ``cpu``), which is applied first whatever its
position, so an architecture named with it always wins. ``tiny`` is the shared toy shrink.

Scales (``SCALE_BUILDERS`` below build them; ``EVAL`` the suite options, ``GRID`` the runs):

* ``smoke``: random ``preset:tiny`` byte model (the ``demo.py:tiny`` model), 64 tokens = 4
  segments of 16, ratios {4, 8} drawn per segment (one compiled step per run instead of one per
  ratio), 6 steps, tiny suites. Minutes on a 2-core CPU; ``tests/test_study.py`` runs it.
* ``cpu``: the real SmolLM2-135M (the packaged GGUF, as ``demo.py``) with the demo's recipe
  (docs/recipe.md: gist parameters only, aligned positions, lr 1e-3; the full-attention run
  trains every weight at a tenth of it), 512 tokens = 4 segments of 128, ratios {4, 8} per
  instance, batch 1, ``CPU_STEPS`` = 25 steps per run; suites on 8 windows and 4 examples per
  probe (``EVAL``). Every scale builds on ``demo.base()``, so it follows the demo's recipe.
  Timed with the earlier full-parameter recipe on the 2-core development machine, idle
  (2026-12-02; docs/study.md's report is that run): the five runs without AE
  trained and evaluated in 29 min 48 s (training 137-211 s per run, the suites 27 s for full
  attention and 200-240 s per compressed checkpoint); the whole grid about 45 min (the AE runs
  202 and 219 s to train, all seven 22 min of training and 23 min of suites; docs/study.md).
  That is well inside the 2-hour budget the scale is meant to fill, and the compressed models'
  recall is still 0 after 25 steps, so a later change should spend the rest on steps and
  examples.
* ``gpu``: the same model on one H200 in about 8 minutes: 2048 tokens = 4 x 512, batch 8,
  bf16, 150 steps per run (configuration only: not run yet).
* ``paper``: ``experiments/_paper.py`` (Llama-3.1-8B, 16K = 8 x 2K, ratios {4, 8, 16, 32} per
  instance, 2.5B tokens); the study evaluates ratios 4 and 8. Configuration only: point
  ``PAPER_HF_DIR`` and ``PAPER_CORPUS`` at local copies.
"""

from __future__ import annotations

from gist_jax.experiments import _common, _paper, demo
from gist_jax.train.experiment import default_config

# -- the grid: run name -> variants (Deng et al. Table 2 rows, UniGist beside them, plus the AE / TIE additions
# on Fine-KV)
GRID: dict[str, str] = {
    "full": "full",
    "fine_kv": "fine_kv,noae,notie",
    "coarse_kv": "coarse_kv,noae,notie",
    "coarse_rec": "coarse_rec,noae,notie",
    "unigist": "unigist,noae,notie",  # UniGist (Deng et al., NeurIPS 2025): no chunks, a window of one segment
    "fine_kv_ae": "fine_kv,ae,notie",
    "fine_kv_tie": "fine_kv,noae,tie",
    "fine_kv_ae_tie": "fine_kv,ae,tie",
}
RATIOS = (4, 8)  # the ratios every report table shows
BOOTSTRAP = 1000  # resamples per confidence interval (95%, percentile)

# -- cpu sizing (measured, docs/study.md): seconds per step on a 2-core CPU, and per checkpoint's suites
CPU_STEPS = 25

PAPER_HF_DIR = "/path/to/Meta-Llama-3.1-8B"  # placeholder: a local Hugging Face download
PAPER_CORPUS = _paper.SLIMPAJAMA


def _study_defaults(c: _common.ConfigDict) -> None:
    """What every scale shares: no in-training evaluation (the suites evaluate every checkpoint),
    Fine-KV without AE/TIE as the base (the grid names the rest), synchronous checkpoints."""
    c.compression.memory, c.compression.granularity = "kv", "fine"
    c.objective.ae = False
    c.objective.tie = False
    c.train.eval_every = 0
    c.train.eval_at_start = False
    c.train.eval_batches = 0
    c.checkpoint.async_save = False
    c.checkpoint.keep = 1


def smoke() -> _common.ConfigDict:
    c = demo.base()  # the demo's objective settings (AE weight, TIE) are the project's defaults
    c.compression.ratio_sampling = "per_segment"  # one compiled update per run: compiles dominate at this size
    _common.make_tiny(c, seq_len=64, segment_length=16, ratios=RATIOS, batch_size=8, total_steps=6,
                      max_documents=20)
    _study_defaults(c)
    c.train.log_every = 3
    c.checkpoint.every = 6  # the final step only: a kill loses at most one run's seconds of training
    return c


def cpu() -> _common.ConfigDict:
    c = demo.base()  # SmolLM2-135M GGUF, stdlib corpus, float32, 512 = 4 x 128, ratios {4, 8} per instance
    _study_defaults(c)
    c.optimizer.total_steps = CPU_STEPS
    c.optimizer.warmup_fraction = 0.05
    c.train.log_every = 5
    c.checkpoint.every = 20
    return c


def gpu() -> _common.ConfigDict:
    c = demo.base()
    _study_defaults(c)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "none"
    c.model.attention = "auto"
    c.compression.segment_length = 512
    c.step.seq_len = 2048
    c.step.batch_size = 8
    c.optimizer.total_steps = 150
    c.optimizer.warmup_fraction = 0.05
    c.train.log_every = 10
    c.checkpoint.every = 50
    return c


def paper() -> _common.ConfigDict:
    c = default_config()
    _paper.paper_recipe(c, hf_dir=PAPER_HF_DIR, tensor=8, microbatches=16)
    c.data.sources = ((PAPER_CORPUS, 1.0),)
    _study_defaults(c)
    c.train.eval_every, c.train.eval_batches = 100, 32  # the recipe's own held-out perplexity curve
    c.checkpoint.async_save = True
    c.checkpoint.keep = 3
    return c


SCALE_BUILDERS = {"smoke": smoke, "cpu": cpu, "gpu": gpu, "paper": paper}
DEFAULT_SCALE = "cpu"

# -- the suites per scale (options of gist_jax.evaluate.run_suites; docs/evaluation.md)
RULER_CPU_TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery", "vt",
                   "cwe", "fwe", "qa_1")
EVAL: dict[str, dict] = {
    "smoke": dict(suites="perplexity,boundary,surprise,uuid,recall,reconstruction", num_windows=8, batch=4,
                  num_examples=4, context_tokens=128, recall_lengths=(128,), depths=(0.25, 0.75), kinds=("passkey",),
                  probe_steps=10, max_documents=20, ruler_lengths=(2048,), ruler_tasks=("niah_single_1", "vt"),
                  presses=("knorm", "streaming_llm"), ruler_presses=("streaming_llm",)),
    # smoke: --add_suites ruler,kvpress,ruler_press (bytes: RULER needs 2K)
    # cpu: ~150 forward passes of 512 tokens per compressed checkpoint (see the docstring): 8 windows,
    # continuation contexts of 1 segment, 4 examples per probe at 256-token contexts, an 8-step probe.
    # cpu: RULER (1K and 4K, nine task kinds), the kvpress presses and RULER through the presses only with
    # `--add_suites ruler,kvpress,ruler_press`: on 2 cores they take longer than the rest of the study
    # (docs/results.md). Their options key their own caches only (study.runner), so adding them to a
    # finished study computes just them.
    "cpu": dict(suites="perplexity,boundary,surprise,uuid,recall,reconstruction", num_windows=8,
                batch=4, context_segments=1, num_examples=4, context_tokens=256, recall_lengths=(256,),
                depths=(0.25, 0.75), kinds=("passkey",), probe_steps=8, ruler_lengths=(1024, 4096),
                ruler_tasks=RULER_CPU_TASKS),
    "gpu": dict(suites="perplexity,boundary,surprise,uuid,recall,reconstruction,ruler,kvpress,ruler_press",
                num_windows=64, batch=8, num_examples=32, recall_lengths=(1024, 2048), depths=(0.1, 0.5, 0.9),
                kinds=("passkey", "multikey_needle"), probe_steps=300, ruler_lengths=(1024, 4096)),
    "paper": dict(suites="perplexity,boundary,surprise,uuid,recall,reconstruction,ruler,kvpress,ruler_press",
                  num_windows=256, batch=8, num_examples=100, recall_lengths=(8192, 16384), depths=(0.1, 0.5, 0.9),
                  kinds=("passkey", "multikey_needle"), probe_steps=1000, ruler_lengths=(4096, 16384)),
}


def _reset_to(build):
    def apply(c: _common.ConfigDict) -> None:
        fresh = build()
        for key, value in fresh.items():
            c[key] = value

    return apply


VARIANTS: dict[str, _common.Variant] = {
    **_common.SHARED,
    **{name: _common.Variant("scale", _reset_to(build), f"the study's {name} scale")
       for name, build in SCALE_BUILDERS.items()},
    "tiny": _common.Variant("size", _common.make_tiny, "random preset:tiny, bytes, 64-token sequences, 6 steps"),
}


def split_scale(arg: str | None) -> tuple[str, list[str]]:
    """(scale, the other variant names) of a variant list; the default scale when none is named."""
    names = _common.parse_variants(arg)
    scales = [n for n in names if n in SCALE_BUILDERS]
    return (scales[0] if scales else DEFAULT_SCALE), [n for n in names if n not in SCALE_BUILDERS]


def get_config(arg: str | None = None) -> _common.ConfigDict:
    names = _common.parse_variants(arg)
    ordered = [n for n in names if n in SCALE_BUILDERS] + [n for n in names if n not in SCALE_BUILDERS]
    return _common.apply_variants(SCALE_BUILDERS[DEFAULT_SCALE](), ",".join(ordered), VARIANTS, "study.py")
