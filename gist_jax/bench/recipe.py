"""``--config experiments/X.py:variants [--config.<key>=<value> ...]``: benchmark exactly the step
a run config defines.

The file is loaded the way ``python -m gist_jax.main`` loads it (ml_collections' ``config_flags``
on a private flag set: same variants, same ``--config.<key>`` overrides, same validation through
``experiment.run_config``), the base model config comes from ``train.loop.load_base_model`` (its
weights are dropped: a step's time and memory do not depend on the values, so the state is
randomly initialised with the same shapes), and the layout is the one the loop compiles for its
first step (``loop.step_ratios(run, 0, ...)``: with ``per_instance`` sampling, step 0's ratio).
What the run has and a benchmark ignores: the data pipeline (tokens are random), evaluation,
checkpoints. ml_collections and absl are imported only here, only when ``--config`` is given.
"""

from __future__ import annotations

import dataclasses

from gist_jax.bench.train_bench import StepSetup


def load_run(config: str, overrides: list[str]):
    """The validated ``RunConfig`` of ``--config=config`` plus ``--config.<key>=<value>``
    ``overrides`` (given as typed on the command line)."""
    from absl import flags
    from ml_collections import config_flags

    from gist_jax.experiment import run_config

    bad = [o for o in overrides if not o.startswith(("--config.", "-config."))]
    if bad:
        raise ValueError(f"unexpected arguments {bad}; only --config.<key>=<value> overrides may follow --config")
    argv = ["gist_jax.bench", f"--config={config}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment file: experiments/<file>.py[:<variants>]",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return run_config(fv["config"].value)


def setup_from_config(config: str, overrides: list[str] = (), seq: int | None = None) -> StepSetup:
    """The ``StepSetup`` of a run config (``seq``: override ``step.seq_len``, e.g. for a sweep)."""
    from gist_jax.experiment import check_model_matches_run
    from gist_jax.gist.layout import cached_layout
    from gist_jax.train.loop import load_base_model, step_ratios
    from gist_jax.train.mesh import make_mesh

    run = load_run(config, list(overrides))
    if seq is not None:
        run = dataclasses.replace(run, step=dataclasses.replace(run.step, seq_len=seq))
    base_cfg, _ = load_base_model(run.model)  # weights dropped (see the module docstring)
    check_model_matches_run(base_cfg, run)
    comp, step_cfg = run.compression, run.step
    base_cfg = base_cfg.replace(max_position_embeddings=max(base_cfg.max_position_embeddings, 2 * step_cfg.seq_len))
    if comp.enabled:
        ratios, slots = step_ratios(run, 0, comp.num_segments(step_cfg.seq_len))
        layout = cached_layout(step_cfg.seq_len, comp, ratios, slots)
    else:
        layout = cached_layout(step_cfg.seq_len, comp)
    devices = make_mesh(step_cfg.mesh).devices.size
    return StepSetup(f"{config} ({run.name})", base_cfg, comp, step_cfg, layout, mesh_devices=devices)
