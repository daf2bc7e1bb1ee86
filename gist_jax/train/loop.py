"""The training run, ``train()``, top to bottom in the order it happens: set-up, mesh, checkpoint
check, model and data, state, restore, step functions and hooks, loop, the end-of-run hooks
(final metrics, save, export, eval), close.

The loop itself only takes steps: per step, the layout, the batch, the compiled update, then
``HookList.after_step``. Every side effect is a hook (``gist_jax.train.hooks``, and
``gist_jax.train.state_hooks`` for those that touch the train state) with its own cadence,
registered in the order it runs within a step: metrics of the previous step first (so nothing is
saved before its metrics are checked for divergence), profiler, checkpoint, Hugging Face export,
eval, and the preemption watch last (it ends the loop after the step's own saves). The hooks
read and change the run through an explicit ``RunContext``, not through ``train()``'s locals.

Exactness of resume: the batch at step k is a function of (config, k) (data loader), the
compression ratios of step k are drawn from ``(seed, k)``, and the state carries its own step
and RNG, so a run restored at step k continues exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from gist_jax.data.loader import BatchLoader
from gist_jax.gist.params import model_config_for
from gist_jax.model.config import ModelConfig, preset
from gist_jax.train import workdir_lock
from gist_jax.train.checkpoint import Checkpointer, layout_metadata
from gist_jax.train.distributed import is_primary
from gist_jax.train.evaluation import PerplexityEvaluator
from gist_jax.train.experiment import ModelSection, RunConfig, check_model_matches_data, check_model_matches_run
from gist_jax.train.flops import peak_flops
from gist_jax.train.hooks import CompileLog, HookList, MetricsWriter, PreemptionWatch, Profiler, RunContext, Throughput
from gist_jax.train.mesh import batch_sharding, check_batch, make_mesh
from gist_jax.train.objectives import objectives
from gist_jax.train.state import TrainState, create_train_state
from gist_jax.train.state_hooks import CheckpointHook, EvalHook, HuggingFaceExportHook, MetricsHook
from gist_jax.train.step import Batch, build_train_step
from gist_jax.train.step_layouts import StepLayout, StepLayouts
from gist_jax.utils import bucket

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
                       attention=section.attention, **overrides), params


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


class StepFunctions:
    """One AOT-compiled update per layout shape (per ratio with ``per_instance`` sampling); the
    layout's arrays come already on the devices (``step_layouts.StepLayouts``)."""

    def __init__(self, make: Callable, on_compile: Callable[[str, float], None]) -> None:
        self.make, self.on_compile = make, on_compile
        self._compiled: dict[Any, Callable] = {}

    def __call__(self, state: TrainState, batch: Batch,
                 step_layout: StepLayout) -> tuple[TrainState, dict[str, jax.Array]]:
        shape, arrays = step_layout.layout.shape, step_layout.arrays
        fn = self._compiled.get(shape)
        if fn is None:
            start = time.perf_counter()
            fn = self.make(shape).lower(state, batch, arrays).compile()
            self._compiled[shape] = fn
            self.on_compile(str(shape), time.perf_counter() - start)
        # Everything the step reads is already on its devices: an implicit transfer here would be
        # a host round trip in the hot loop (the step tests run under the same guard).
        with jax.transfer_guard("disallow"):
            return fn(state, batch, arrays)


def open_checkpointer(run: RunConfig, workdir: pathlib.Path) -> Checkpointer:
    return Checkpointer(workdir / "checkpoints", run.checkpoint.keep, run.checkpoint.milestone_every,
                        run.checkpoint.async_save)


def train(run: RunConfig, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains ``run`` in ``workdir``, resuming from its newest sound checkpoint; returns the final
    metrics (also written to ``<workdir>/final_metrics.json``)."""
    # ------------------------------------------------------------------ set-up
    if bucket.is_url(workdir):  # gs://: checkpoints, config, metrics and exports in the bucket (utils/bucket.py)
        bucket.check_url("--workdir", workdir)
    workdir = bucket.as_path(workdir)
    # One run per workdir (process 0 holds the lock until train() returns or raises): a second
    # command on the same workdir is refused here, before anything reads or writes it.
    with workdir_lock.hold(workdir, primary=is_primary()):
        return _train(run, workdir)


def _train(run: RunConfig, workdir: pathlib.Path) -> dict[str, Any]:
    comp, step_cfg = run.compression, run.step
    run_start = time.perf_counter()

    # ------------------------------------------------------------------ mesh
    mesh = make_mesh(step_cfg.mesh)
    check_batch(step_cfg.batch_size, step_cfg.microbatches, mesh)

    # ------------------------------------------------------------------ checkpoint check
    ckpt, writer = _open_workdir(run, workdir)

    # ------------------------------------------------------------------ model and data
    base_cfg, base_params = load_base_model(run.model)
    check_model_matches_run(base_cfg, run)
    if run.train.plan_memory:
        writer.console(memory_plan(base_cfg, run, mesh))
    from gist_jax.data.tokenizer import tokenizer_from_spec

    tok = tokenizer_from_spec(run.data.tokenizer)
    check_model_matches_data(base_cfg, tok.vocab_size, tok.eos_id, run.data.tokenizer)
    loader = make_train_loader(run, mesh)

    # ------------------------------------------------------------------ state
    state, tx, shardings = create_train_state(base_cfg, comp, step_cfg, mesh, base_params)
    del base_params
    layout_meta = layout_metadata(model_config_for(base_cfg, comp), comp, state)

    # ------------------------------------------------------------------ restore
    ckpt = ckpt or open_checkpointer(run, workdir)
    ckpt.before_save = writer.sync  # metrics.jsonl is in the workdir (a bucket: uploaded) before each save
    restored = ckpt.restore_latest(state, layout_meta, run.to_dict())
    start = 0
    if restored is not None:
        start, state, data_state = restored
        loader.restore(data_state)
        writer.status(f"resumed from {ckpt.directory}/{start}")

    # ------------------------------------------------------------------ step functions and hooks
    total = run.num_steps
    throughput = Throughput(step_cfg.batch_size * step_cfg.seq_len, total, peak_flops(), jax.device_count())
    compile_log = CompileLog(throughput, writer)
    steps = StepFunctions(functools.partial(build_train_step, base_cfg, comp, step_cfg, tx=tx, mesh=mesh,
                                            state_shardings=shardings), compile_log)
    layouts = StepLayouts(run, base_cfg, mesh)
    evaluator = make_evaluator(run, base_cfg, mesh)
    hooks = make_hooks(run, workdir, layout_meta, base_cfg, evaluator)
    ctx = RunContext(run=run, workdir=workdir, checkpointer=ckpt, loader=loader, writer=writer,
                     throughput=throughput, state=state, start_step=start, total_steps=total,
                     resumed=restored is not None, step=start)
    del state  # ctx.state from here on: the hooks save, export and evaluate that one

    # ------------------------------------------------------------------ loop
    hooks.at_start(ctx)
    while ctx.step < total and not ctx.stop:
        hooks.before_step(ctx)
        step_layout = layouts.for_step(ctx.step)
        batch = next(loader)
        ctx.state, ctx.metrics = steps(ctx.state, batch, step_layout)
        throughput.add_step(step_layout.flops)
        ctx.step += 1
        hooks.after_step(ctx)

    # ------------------------------------------------------------------ final metrics, save, export, eval
    hooks.at_end(ctx)

    # ------------------------------------------------------------------ close
    ckpt.close()
    hooks.close()
    loader.close()
    final = writer.close({"compile_seconds": compile_log.total_seconds,
                          "wall_seconds": time.perf_counter() - run_start, "preempted": ctx.preempted})
    if ctx.preempted:
        writer.status(f"preempted: saved step {ctx.step} to {ckpt.directory}; rerun the same command to resume")
    logger.info("finished at step %d", ctx.step)
    return final


def _open_workdir(run: RunConfig, workdir: pathlib.Path) -> tuple[Checkpointer | None, MetricsWriter]:
    """Before anything heavy loads: a workdir whose checkpoint this config cannot resume is
    refused. The checkpoint directory itself is only created once the model, data and state are
    known to load; the run's config is written now."""
    ckpt = open_checkpointer(run, workdir) if (workdir / "checkpoints").is_dir() else None
    if ckpt is not None:
        ckpt.check_resume(run.to_dict())
    if is_primary():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(run.to_dict(), indent=1))
    return ckpt, MetricsWriter(workdir)


def make_hooks(run: RunConfig, workdir: pathlib.Path, layout_meta: dict, base_cfg: ModelConfig,
               evaluator: PerplexityEvaluator | None) -> HookList:
    """The run's hooks in run order within a step: metrics of the previous step (checked before
    anything is saved), trace stop, save, export, eval, and last the preemption check that ends
    the loop."""
    metrics_hook = MetricsHook(run.train.log_every)
    return HookList([
        metrics_hook,
        Profiler(workdir, run.train.profile_start, run.train.profile_steps),
        CheckpointHook(run.checkpoint.every, layout_meta, metrics_hook),
        *([HuggingFaceExportHook(run.checkpoint.export_hf_every, base_cfg, metrics_hook)]
          if run.checkpoint.export_hf_every else []),
        *([EvalHook(evaluator, run.train.eval_every, run.train.eval_at_start)] if evaluator is not None else []),
        PreemptionWatch(),
    ])


def make_train_loader(run: RunConfig, mesh: Mesh) -> BatchLoader:
    """The training batches; with precomputed TIE, each batch also carries ``tie_weights`` for
    exactly its rows, read from the file checked against the run and its opened token stores
    (``train/tie_store.py``), so resume and any process count see the weights of their tokens."""
    from gist_jax.data.loader import open_stores
    from gist_jax.train import tie_store

    stores = open_stores(run.data, run.data.train_split)
    extra = {}
    if objectives(run.step, run.compression).tie_precomputed:
        from gist_jax.train.preflight import model_config_before_loading

        extra["tie_weights"] = tie_store.open_weights(run, model_config_before_loading(run.model), stores)
    return BatchLoader(run.data, run.step.seq_len, run.step.batch_size, batch_sharding(mesh), stores=stores,
                       extra_rows=extra)


def make_evaluator(run: RunConfig, base_cfg: ModelConfig, mesh: Mesh) -> PerplexityEvaluator | None:
    if not (run.train.eval_every or run.train.eval_at_start) or run.train.eval_batches == 0:
        return None
    data = dataclasses.replace(run.data, upsampling=(), prefetch=0)
    loader = BatchLoader(data, run.step.seq_len, run.step.batch_size, batch_sharding(mesh), split=data.eval_split)
    batches = [loader.to_global(loader.host_batch(i)) for i in range(run.train.eval_batches)]
    return PerplexityEvaluator(base_cfg, run.compression, run.step.seq_len, batches)
