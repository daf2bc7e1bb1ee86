"""The loop's hooks that read the train state or its metrics: metrics and the divergence check,
checkpoints, Hugging Face exports, evaluation. The machinery they plug into (``Hook``,
``Cadence``, ``RunContext``) is in ``gist_jax.train.hooks``.

A state is never saved or exported before the metrics of the steps that made it are checked:
``CheckpointHook`` and ``HuggingFaceExportHook`` flush ``MetricsHook`` first, which raises
``TrainingDiverged`` on a non-finite metric instead.
"""

from __future__ import annotations

import time
from typing import Any

import jax

from gist_jax.model.config import ModelConfig
from gist_jax.train.checkpoint import Checkpointer, NonFiniteState
from gist_jax.train.distributed import is_primary
from gist_jax.train.evaluation import PerplexityEvaluator
from gist_jax.train.hooks import Cadence, Hook, RunContext, TrainingDiverged, format_line, non_finite_metric
from gist_jax.utils import bucket


def diverged(checkpointer: Checkpointer, step: int, bad: str) -> TrainingDiverged:
    """The error for a non-finite metric at ``step``, after moving aside the checkpoints that hold
    the weights that diverged: the metrics of step k come from the weights after step k - 1, so a
    checkpoint of that step (or later) must not be resumed from."""
    suspect = [s for s in checkpointer.all_steps() if s >= step - 1]
    moved = [str(checkpointer.set_aside(s, "diverged")) for s in suspect]
    note = f" Moved the checkpoints of those weights aside: {', '.join(moved)}." if moved else ""
    return TrainingDiverged(f"{bad} at step {step}: stopping.{note} {rerun_advice(checkpointer)}")


def rerun_advice(checkpointer: Checkpointer) -> str:
    """What a rerun after a divergence does: resume from the last good checkpoint, or, when there
    is none (none saved yet, or all set aside), start again from step 0 with the weights of
    ``model.init``; the message must not promise a resume that cannot happen."""
    fix = "Lower optimizer.learning_rate or check the data, then rerun"
    if checkpointer.latest_step() is None:
        return (f"No good checkpoint to resume from: a rerun starts from scratch (step 0, the weights of "
                f"model.init). {fix}")
    return f"Last good checkpoint: {checkpointer.describe_latest()}. {fix} to resume from it"


class MetricsHook(Hook):
    """Every step's metrics, read one step behind so the host never waits on the device: the
    metrics of step k are fetched after step k + 1 has been dispatched. Each step's are checked
    for divergence; every ``log_every``-th step's and the last step's are written, with the
    throughput since the previous line. ``flush`` reads the pending ones now (before a save, and
    at the end)."""

    name = "metrics"
    cadence = Cadence(every=1, on_last_step=True, at_end=True)

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self.pending: tuple[int, dict[str, Any]] | None = None

    def run(self, ctx: RunContext) -> None:
        self.flush(ctx)
        assert ctx.metrics is not None, "the loop sets the metrics of the step it took"
        self.pending = (ctx.step, ctx.metrics)

    def at_end(self, ctx: RunContext) -> None:
        self.flush(ctx)

    def flush(self, ctx: RunContext) -> None:
        if self.pending is None:
            return
        step, on_device = self.pending
        metrics = {k: float(v) for k, v in jax.device_get(on_device).items()}
        bad = non_finite_metric(metrics)
        if bad is not None:
            raise diverged(ctx.checkpointer, step, bad)
        self.pending = None
        if step % self.log_every == 0 or step == ctx.total_steps:
            metrics.update(ctx.throughput.report(step))
            ctx.writer.write(step, metrics)
            ctx.writer.console(format_line(step, ctx.total_steps, metrics))


class CheckpointHook(Hook):
    """A checkpoint every ``checkpoint.every`` steps, and at the end at the step the run stopped at
    (a preempted run included: that save is what it resumes from), unless that step is saved
    already or this run resumed and took no step."""

    name = "checkpoint"

    def __init__(self, every: int, layout_meta: dict[str, Any], metrics: MetricsHook) -> None:
        self.cadence = Cadence(every=every, at_end=True)
        self.layout_meta, self.metrics = layout_meta, metrics

    def run(self, ctx: RunContext) -> None:
        self.metrics.flush(ctx)  # never save a diverged state
        try:
            ctx.checkpointer.save(ctx.step, ctx.state, ctx.loader.state(), ctx.run.to_dict(), self.layout_meta)
        except NonFiniteState as e:
            raise TrainingDiverged(f"{e}. {rerun_advice(ctx.checkpointer)}") from None

    def at_end(self, ctx: RunContext) -> None:
        if ctx.trained_this_run and ctx.checkpointer.latest_step() != ctx.step:
            self.run(ctx)


class HuggingFaceExportHook(Hook):
    """A Hugging Face directory ``<workdir>/hf/<step>`` every ``checkpoint.export_hf_every`` steps
    and at the end of a run that finished (a preempted one resumes and exports then).

    Runs on every process: the leaves are gathered collectively, and process 0 writes. Its
    ``config.json`` is written last, after the gather, so every process sees the same answer to
    "done already?"; a partial export (a kill mid-write) has none and is redone.
    """

    name = "hf_export"

    def __init__(self, every: int, base_cfg: ModelConfig, metrics: MetricsHook) -> None:
        self.cadence = Cadence(every=every, at_end=True)
        self.base_cfg, self.metrics = base_cfg, metrics

    def run(self, ctx: RunContext) -> None:
        from gist_jax.data.tokenizer import hf_tokenizer_copy
        from gist_jax.hf.export import export_params

        self.metrics.flush(ctx)  # never export a diverged state
        out = ctx.workdir / "hf" / str(ctx.step)
        if not (out / "config.json").exists():
            with bucket.staged_dir(out, upload=is_primary()) as target:  # gs://: written here, then uploaded
                export_params(self.base_cfg, ctx.run.compression, ctx.state.params,
                              hf_tokenizer_copy(ctx.run.data.tokenizer), target)
            ctx.writer.status(f"exported Hugging Face model to {out}")

    def at_end(self, ctx: RunContext) -> None:
        if ctx.trained_this_run and not ctx.preempted:
            self.run(ctx)


def eval_line(result: dict[str, float]) -> str:
    """``ppl_full 4.536 | ppl_local 9.8 | ppl_r4 ... | efficacy_r4 0.31 | ...``: perplexity per
    setting, then memory efficacy per ratio (1: as good as full attention, 0: as good as no
    memory, below 0: the gists hurt), so a run that carries nothing says so where it is read."""
    keys = [k for k in result if k.startswith("eval/ppl_")] + [k for k in result if k.startswith("eval/efficacy_")]
    return " | ".join(f"{k[5:]} {result[k]:.3f}" for k in keys)


class EvalHook(Hook):
    """Held-out perplexity every ``train.eval_every`` steps, before step 0 with
    ``train.eval_at_start``, and at the end of a run that finished (resumed without a step
    included: the eval of the final weights is what the run reports). Its time is left out of
    the throughput."""

    name = "eval"

    def __init__(self, evaluator: PerplexityEvaluator, every: int, at_start: bool) -> None:
        self.cadence = Cadence(every=every, at_start=at_start, at_end=True)
        self.evaluator = evaluator

    def run(self, ctx: RunContext) -> None:
        started = time.perf_counter()
        result = self.evaluator(ctx.state.params["model"])
        ctx.throughput.exclude(time.perf_counter() - started)
        ctx.writer.write(ctx.step, result)
        ctx.writer.status(f"eval step {ctx.step}: " + eval_line(result))

    def at_end(self, ctx: RunContext) -> None:
        if not ctx.preempted:
            self.run(ctx)
