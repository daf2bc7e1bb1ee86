"""What every experiment file shares: the variant convention and the named variant tables.

Convention (one for every file in ``experiments/``): the text after ``:`` in
``--config experiments/<file>.py:<arg>`` is a comma-separated list of named variants, applied
left to right on top of the file's base config, e.g. ``llama3_8b_paper.py:coarse_rec,noae,tiny``.
Names, not ``key=value`` pairs, because a variant is usually several keys that only make sense
together (Coarse-Rec is memory *and* granularity); single keys are changed with
``--config.<key>=<value>`` after the variants. Each variant belongs to a group (architecture,
ae, tie, size); naming two of one group is an error, so ``fine_kv,coarse_kv`` never silently
means whichever came last.

The files import these tables as ``from gist_jax.experiments import _common``: this folder is the
package ``gist_jax.experiments`` (``experiments/__init__.py``), installed or not, so that works
whatever the working directory and however the file is loaded (config_flags, importlib, the sweep
launcher), and no file edits ``sys.path``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import ml_collections

from gist_jax.errors import ConfigError
from gist_jax.model.kernels import parse_attention, with_gist_kernel

ConfigDict = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named change to a config. ``group``: at most one variant per group per run."""

    group: str
    apply: Callable[[ConfigDict], None]
    help: str = ""


# -- architectures (Deng et al. 2025 names) ----------------------------------------------------------
def _architecture(memory: str, granularity: str) -> Callable[[ConfigDict], None]:
    def apply(c: ConfigDict) -> None:
        c.compression.memory = memory
        c.compression.granularity = granularity
        if memory == "none":  # the full-attention baseline has no gists to autoencode or weigh against
            c.objective.ae = False
            c.objective.tie = False
            if c.compression.trainable == "gist_only":
                # It trains every weight instead; a gist-only learning rate is ~10x a full-parameter one
                # (docs/recipe.md), so the baseline takes a tenth of it rather than a rate that would
                # rewrite the base model.
                c.optimizer.learning_rate = c.optimizer.learning_rate / 10
            c.compression.trainable = "all"
            c.compression.bptt_segments = 0
        if memory != "recurrent":
            c.compression.bptt_segments = 0
        c.compression.window = 0  # chunked: the paper's three architectures

    return apply


def _unigist(c: ConfigDict) -> None:
    """UniGist (Deng et al., NeurIPS 2025): Fine-KV's layout without chunks, aligned positions,
    a sliding window of one segment length (``make_tiny`` keeps it so when it shrinks the
    segments), one ratio per sequence."""
    _architecture("kv", "fine")(c)
    c.compression.positions = "aligned"
    c.compression.window = c.compression.segment_length
    if c.compression.ratio_sampling == "per_segment":
        c.compression.ratio_sampling = "per_instance"
    if parse_attention(c.model.attention).gist not in ("dense", "decomposed", "auto"):
        c.model.attention = with_gist_kernel(c.model.attention, "auto")  # the window's one structured kernel


def _switch(key: str, value: bool) -> Callable[[ConfigDict], None]:
    section, field = key.split(".")

    def apply(c: ConfigDict) -> None:
        c[section][field] = value

    return apply


ARCHITECTURES: dict[str, Variant] = {
    "fine_kv": Variant("architecture", _architecture("kv", "fine"), "Fine-KV: a gist after every r tokens, KV memory"),
    "coarse_kv": Variant("architecture", _architecture("kv", "coarse"),
                         "Coarse-KV: gists after the segment, KV memory"),
    "coarse_rec": Variant("architecture", _architecture("recurrent", "coarse"),
                          "Coarse-Rec: gists after the segment, last-layer states fed back as inputs"),
    "full": Variant("architecture", _architecture("none", "fine"), "full-attention baseline (no gists, no AE/TIE)"),
    "unigist": Variant("architecture", _unigist,
                       "UniGist: a gist every r tokens, no chunks, a sliding window of one segment length"),
}
OBJECTIVES: dict[str, Variant] = {
    "ae": Variant("ae", _switch("objective.ae", True), "fine-grained autoencoding loss on"),
    "noae": Variant("ae", _switch("objective.ae", False), "fine-grained autoencoding loss off"),
    "tie": Variant("tie", _switch("objective.tie", True), "token importance estimation weighting on"),
    "notie": Variant("tie", _switch("objective.tie", False), "token importance estimation weighting off"),
}
SHARED: dict[str, Variant] = {**ARCHITECTURES, **OBJECTIVES}


def parse_variants(arg: str | None) -> list[str]:
    """``"coarse_rec, tiny"`` -> ``["coarse_rec", "tiny"]``; None or "" -> []."""
    return [name.strip() for name in (arg or "").split(",") if name.strip()]


def apply_variants(config: ConfigDict, arg: str | None, table: Mapping[str, Variant], file: str) -> ConfigDict:
    """Applies the variants named in ``arg`` in order; unknown or conflicting names raise
    ``ConfigError`` (a ValueError), which ``gist_jax.main`` reports as one line, exit code 2."""
    names = parse_variants(arg)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(f"{file}:{arg}: unknown variant {unknown[0]!r}; known variants: "
                          f"{', '.join(sorted(table))}. Give a comma-separated list, e.g. {file}:{next(iter(table))}")
    seen: dict[str, str] = {}
    for name in names:
        group = table[name].group
        if group in seen:
            raise ConfigError(f"{file}:{arg}: variants {seen[group]!r} and {name!r} both set the {group}; "
                              "name one")
        seen[group] = name
    for name in names:
        table[name].apply(config)
    config.name = f"{file.removesuffix('.py')}:{','.join(names)}" if names else file.removesuffix(".py")
    return config


def describe(table: Mapping[str, Variant]) -> str:
    """One line per variant, for error messages and ``--help``-like listings."""
    return "\n".join(f"  {name:<11} [{v.group}] {v.help}" for name, v in sorted(table.items()))


# -- the long-run tail ----------------------------------------------------------------------------------
def recipe_cadence(c: ConfigDict, *, every: int, eval_batches: int, milestone_every: int) -> None:
    """The cadence every long recipe shares: a log line every 10 steps; an eval on
    ``eval_batches`` batches and a checkpoint every ``every`` steps, the newest 3 checkpoints
    kept, and a milestone kept for good every ``milestone_every`` steps."""
    c.train.log_every = 10
    c.train.eval_every = every
    c.train.eval_batches = eval_batches
    c.checkpoint.every = every
    c.checkpoint.keep = 3
    c.checkpoint.milestone_every = milestone_every


# -- the small local variant ---------------------------------------------------------------------------
def make_tiny(c: ConfigDict, *, seq_len: int = 64, segment_length: int = 16, ratios: tuple[int, ...] = (4, 8),
              batch_size: int = 8, total_steps: int = 6, max_documents: int = 20) -> None:
    """Shrinks a recipe to seconds on one CPU while keeping its structure (variant, ratio sampling,
    objectives, packing): random ``preset:tiny`` weights, the byte tokenizer, the stdlib corpus,
    float32, one device's mesh, a checkpoint every 2 steps and an eval at the start and end."""
    c.model.init = "preset:tiny"
    c.model.dtype = "float32"
    c.model.param_dtype = ""
    c.model.remat_policy = "none"
    c.data.tokenizer = "bytes"
    c.data.sources = (("stdlib", 1.0),)
    c.data.upsampling = ()
    c.data.max_documents = max_documents
    c.data.add_bos = False
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.step.batch_size = batch_size
    c.step.seq_len = seq_len
    c.step.microbatches = 1
    c.compression.segment_length = segment_length
    if c.compression.window:  # UniGist's window follows the segment length it was set from
        c.compression.window = segment_length
    c.compression.ratios = ratios if c.compression.ratio_sampling != "fixed" else (min(ratios),)
    c.compression.num_sinks = min(c.compression.num_sinks, segment_length // 4)
    c.optimizer.total_steps = total_steps
    c.optimizer.warmup_fraction = 0.0
    c.train.max_steps = 0
    c.train.log_every = 1
    c.train.eval_every = total_steps
    c.train.eval_batches = 2
    c.train.eval_at_start = True
    c.train.plan_memory = False  # the plan's trace would cost more than these six steps
    c.train.profile_steps = 0
    c.checkpoint.every = 2
    # A recipe's AE depth and warm-up are sized for its model and run (the demo: layer 15 of 30,
    # half of 20 steps); the tiny model's AE reads its last layer and trains from step 0.
    c.objective.ae_layer = -1
    c.objective.ae_base_warmup_steps = 0
    c.checkpoint.keep = 2
    c.checkpoint.milestone_every = 0
    c.checkpoint.async_save = False
