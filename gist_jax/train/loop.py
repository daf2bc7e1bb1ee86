"""The training run, top to bottom in the order it happens: set-up, mesh, model, data, state,
restore, loop, final save. Side effects hang on the loop as hooks (``gist_jax.train.hooks``).

Exactness of resume: the batch at step k is a function of (config, k) (data loader), the
compression ratios of step k are drawn from ``(seed, k)``, and the state carries its own step
and RNG, so a run restored at step k continues exactly as if it had never stopped.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from gist_jax.data.loader import BatchLoader
from gist_jax.errors import ConfigError
from gist_jax.gist.layout import GistLayout, cached_layout, sample_ratios
from gist_jax.gist.params import model_config_for
from gist_jax.gist.specs import layout_arrays
from gist_jax.model.config import ModelConfig, preset
from gist_jax.train.checkpoint import Checkpointer, NonFiniteState, layout_metadata
from gist_jax.train.distributed import is_primary
from gist_jax.train.evaluation import PerplexityEvaluator
from gist_jax.train.experiment import ModelSection, RunConfig, check_model_matches_data, check_model_matches_run
from gist_jax.train.flops import peak_flops, step_objectives, train_flops_per_step
from gist_jax.train.hooks import (
    MetricsWriter,
    PreemptionWatch,
    Profiler,
    Throughput,
    TrainingDiverged,
    format_line,
    non_finite_metric,
)
from gist_jax.train.mesh import batch_sharding, check_batch, make_mesh, replicated
from gist_jax.train.state import TrainState, create_train_state
from gist_jax.train.step import Batch, build_train_step

logger = logging.getLogger(__name__)


def load_base_model(section: ModelSection) -> tuple[ModelConfig, Any]:
    """(config, host params or None for random init) from ``model.init``, with overrides."""
    kind, where = section.init.split(":", 1)
    if kind == "preset":
        cfg, params = preset(where), None
    elif kind == "gguf":
        from gist_jax.hf.gguf import smollm2_gguf_path
        from gist_jax.hf.importer import load_gguf

        cfg, params = load_gguf(smollm2_gguf_path() if where == "smollm2" else where)
    elif kind == "hf":
        from gist_jax.hf.importer import load_hf_dir

        cfg, params = load_hf_dir(where)
    else:
        from gist_jax.model.params_io import load_params

        cfg, params = load_params(where)
    overrides = {k: getattr(section, k) for k in ("dtype", "param_dtype") if getattr(section, k)}
    return cfg.replace(scan_layers=section.scan_layers, remat_policy=section.remat_policy,
                       attention_impl=section.attention_impl, **overrides), params


def memory_plan(base_cfg: ModelConfig, run: RunConfig, mesh: Mesh) -> str:
    """The planner's per-device estimate for this run at its worst-case ratio (``train/plan.py``),
    printed before anything compiles so an out-of-memory run says what it expected; a planner
    failure is reported, never fatal."""
    from gist_jax.train.plan import summary_lines

    try:
        return "\n".join(summary_lines(run.name, base_cfg, run.compression, run.step, mesh.devices.size,
                                        jax.default_backend(), worst_only=True))
    except Exception as e:  # noqa: BLE001 - an estimate, not a precondition of training
        return f"plan: not available ({type(e).__name__}: {str(e)[:200]})"


def step_ratios(run: RunConfig, step: int, num_segments: int) -> tuple[tuple[int, ...], int]:
    """The compression ratios of step ``step``: a function of (seed, step) only."""
    return sample_ratios(run.compression, num_segments, np.random.default_rng([run.step.seed, step, 7]))


class StepFunctions:
    """One AOT-compiled update per layout shape (per ratio with ``per_instance`` sampling).

    The layout's arrays (masks, positions) are data, copied to the devices once per distinct
    layout and kept in a small LRU keyed by the layout's value (``GistLayout.digest``):
    per-segment ratio sampling meets thousands of layouts, and a key by object identity would
    hand a step another layout's masks once ``cached_layout`` evicts and an id is reused.
    """

    MAX_DEVICE_LAYOUTS = 64

    def __init__(self, make: Callable, mesh: Mesh, on_compile: Callable[[str, float], None]) -> None:
        self.make, self.mesh, self.on_compile = make, mesh, on_compile
        self._compiled: dict[Any, Callable] = {}
        self._arrays: collections.OrderedDict[str, dict] = collections.OrderedDict()

    def arrays(self, layout: GistLayout) -> dict:
        key = layout.digest
        if key in self._arrays:
            self._arrays.move_to_end(key)
        else:
            rep = replicated(self.mesh)
            self._arrays[key] = {k: jax.device_put(np.asarray(v), rep) for k, v in layout_arrays(layout).items()}
            if len(self._arrays) > self.MAX_DEVICE_LAYOUTS:
                self._arrays.popitem(last=False)
        return self._arrays[key]

    def __call__(self, state: TrainState, batch: Batch,
                 layout: GistLayout) -> tuple[TrainState, dict[str, jax.Array]]:
        arrays = self.arrays(layout)
        fn = self._compiled.get(layout.shape)
        if fn is None:
            start = time.perf_counter()
            fn = self.make(layout.shape).lower(state, batch, arrays).compile()
            self._compiled[layout.shape] = fn
            self.on_compile(str(layout.shape), time.perf_counter() - start)
        return fn(state, batch, arrays)


def train(run: RunConfig, workdir: str | pathlib.Path) -> dict[str, Any]:
    # ------------------------------------------------------------------ set-up
    if "://" in str(workdir):
        raise ConfigError(f"--workdir={workdir}: use a filesystem path that every process sees (for a bucket, "
                          "mount it with gcsfuse, e.g. /gcs/<bucket>/runs/<name>); URLs are not supported")
    workdir = pathlib.Path(workdir).absolute()
    comp, step_cfg = run.compression, run.step
    run_start = time.perf_counter()

    # ------------------------------------------------------------------ mesh
    mesh = make_mesh(step_cfg.mesh)
    check_batch(step_cfg.batch_size, step_cfg.microbatches, mesh)

    # Before anything heavy loads: a workdir whose checkpoint this config cannot resume is refused.
    # (The checkpoint directory is only created once the model, data and state are known to load.)
    def open_checkpoints() -> Checkpointer:
        return Checkpointer(workdir / "checkpoints", run.checkpoint.keep, run.checkpoint.milestone_every,
                            run.checkpoint.async_save)

    ckpt = open_checkpoints() if (workdir / "checkpoints").is_dir() else None
    if ckpt is not None:
        ckpt.check_resume(run.to_dict())
    if is_primary():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(run.to_dict(), indent=1))
    writer = MetricsWriter(workdir)

    # ------------------------------------------------------------------ model and data
    base_cfg, base_params = load_base_model(run.model)
    check_model_matches_run(base_cfg, run)
    if run.train.plan_memory:
        writer.console(memory_plan(base_cfg, run, mesh))
    from gist_jax.data.tokenizer import tokenizer_from_spec

    tok = tokenizer_from_spec(run.data.tokenizer)
    check_model_matches_data(base_cfg, tok.vocab_size, tok.eos_id, run.data.tokenizer)
    loader = BatchLoader(run.data, step_cfg.seq_len, step_cfg.batch_size, batch_sharding(mesh))

    # ------------------------------------------------------------------ state
    state, tx, shardings = create_train_state(base_cfg, comp, step_cfg, mesh, base_params)
    del base_params
    model_cfg = model_config_for(base_cfg, comp)
    layout_meta = layout_metadata(model_cfg, comp, state)

    # ------------------------------------------------------------------ restore
    ckpt = ckpt or open_checkpoints()
    restored = ckpt.restore_latest(state, layout_meta, run.to_dict())
    start = 0
    if restored is not None:
        start, state, data_state = restored
        loader.restore(data_state)
        writer.console(f"resumed from {ckpt.directory}/{start}")

    def save(step: int) -> None:
        try:
            ckpt.save(step, state, loader.state(), run.to_dict(), layout_meta)
        except NonFiniteState as e:
            raise TrainingDiverged(f"{e}. Last good checkpoint: {ckpt.describe_latest()}. Lower "
                                   "optimizer.learning_rate or check the data, then rerun to resume") from None

    def export_hf(step: int) -> None:  # every process: leaves are gathered collectively, process 0 writes
        from gist_jax.data.tokenizer import hf_tokenizer_copy
        from gist_jax.hf.export import export_params

        out = workdir / "hf" / str(step)
        # config.json is written last, after the collective gather, so every process sees the same
        # answer here; a partial export (a kill mid-write) has none and is redone.
        if not (out / "config.json").exists():
            export_params(base_cfg, comp, state.params, hf_tokenizer_copy(run.data.tokenizer), out)
            writer.console(f"exported Hugging Face model to {out}")

    # ------------------------------------------------------------------ hooks
    total = run.num_steps
    tie, ae = step_objectives(step_cfg, comp)
    throughput = Throughput(step_cfg.batch_size * step_cfg.seq_len, total, peak_flops(), jax.device_count())
    compile_seconds: dict[str, float] = {}

    def on_compile(name: str, seconds: float) -> None:
        compile_seconds[name] = seconds
        throughput.exclude(seconds)
        writer.console(f"compiled train step for {name} in {seconds:.1f}s")

    steps = StepFunctions(lambda shape: build_train_step(base_cfg, comp, step_cfg, shape, tx, mesh, shardings),
                          mesh, on_compile)
    evaluator = make_evaluator(run, base_cfg, mesh)
    profiler = Profiler(workdir, run.train.profile_start, run.train.profile_steps)
    preemption = PreemptionWatch()
    num_segments = comp.num_segments(step_cfg.seq_len) if comp.enabled else 1

    def layout_for(step: int) -> GistLayout:
        if not comp.enabled:
            return cached_layout(step_cfg.seq_len, comp)
        ratios, slots = step_ratios(run, step, num_segments)
        return cached_layout(step_cfg.seq_len, comp, ratios, slots)

    def evaluate(step: int) -> None:
        if evaluator is not None:
            start_eval = time.perf_counter()
            result = evaluator(state.params["model"])
            throughput.exclude(time.perf_counter() - start_eval)
            writer.write(step, result)
            writer.console(f"eval step {step}: " + " | ".join(f"{k[5:]} {v:.3f}" for k, v in result.items()
                                                               if k.startswith("eval/ppl")))

    def finish_step(step: int, metrics_device: dict) -> None:
        metrics = {k: float(v) for k, v in jax.device_get(metrics_device).items()}
        bad = non_finite_metric(metrics)
        if bad is not None:
            # The metrics of step k come from the weights after step k - 1: a checkpoint of that
            # step (or later) holds the weights that diverged, and must not be resumed from.
            suspect = [s for s in ckpt.all_steps() if s >= step - 1]
            moved = [str(ckpt.set_aside(s, "diverged")) for s in suspect]
            note = f" Moved the checkpoints of those weights aside: {', '.join(moved)}." if moved else ""
            raise TrainingDiverged(f"{bad} at step {step}: stopping.{note} Last good checkpoint: "
                                   f"{ckpt.describe_latest()}. Lower optimizer.learning_rate or check the data, "
                                   "then rerun to resume from it")
        if step % run.train.log_every == 0 or step == total:
            metrics.update(throughput.report(step))
            writer.write(step, metrics)
            writer.console(format_line(step, total, metrics))

    # ------------------------------------------------------------------ loop
    if run.train.eval_at_start and start == 0:
        evaluate(0)
    pending: tuple[int, dict] | None = None
    step = start
    stopped_early = False
    while step < total:
        profiler.before_step(step)
        layout = layout_for(step)
        batch = next(loader)
        state, metrics = steps(state, batch, layout)
        throughput.add_step(train_flops_per_step(base_cfg, comp, step_cfg.seq_len, step_cfg.batch_size,
                                                 layout.ratios if comp.enabled else None, tie=tie, ae=ae)["total"])
        if pending is not None:  # one step behind, so the host never waits on the device
            finish_step(*pending)
        step += 1
        pending = (step, metrics)
        profiler.after_step(step)
        if step % run.checkpoint.every == 0 and step < total:
            finish_step(*pending)  # never save a diverged state
            pending = None
            save(step)
        if run.checkpoint.export_hf_every and step % run.checkpoint.export_hf_every == 0 and step < total:
            if pending is not None:
                finish_step(*pending)
                pending = None
            export_hf(step)
        if run.train.eval_every and step % run.train.eval_every == 0 and step < total:
            evaluate(step)
        if preemption.should_stop(step):
            stopped_early = step < total
            break
    if pending is not None:
        finish_step(*pending)

    # ------------------------------------------------------------------ final save
    if step > start or restored is None:
        if ckpt.latest_step() != step:
            save(step)
        if run.checkpoint.export_hf_every and not stopped_early:
            export_hf(step)
    if not stopped_early and (run.train.eval_every or run.train.eval_at_start):
        evaluate(step)
    ckpt.close()
    preemption.close()
    loader.close()
    final = writer.close({"compile_seconds": sum(compile_seconds.values()),
                          "wall_seconds": time.perf_counter() - run_start, "preempted": stopped_early})
    if stopped_early:
        writer.console(f"preempted: saved step {step} to {ckpt.directory}; rerun the same command to resume")
    logger.info("finished at step %d", step)
    return final


def make_evaluator(run: RunConfig, base_cfg: ModelConfig, mesh: Mesh) -> PerplexityEvaluator | None:
    if not (run.train.eval_every or run.train.eval_at_start) or run.train.eval_batches == 0:
        return None
    data = dataclasses.replace(run.data, upsampling=(), prefetch=0)
    loader = BatchLoader(data, run.step.seq_len, run.step.batch_size, batch_sharding(mesh), split=data.eval_split)
    batches = [loader.to_global(loader.host_batch(i)) for i in range(run.train.eval_batches)]
    return PerplexityEvaluator(base_cfg, run.compression, run.step.seq_len, batches)
