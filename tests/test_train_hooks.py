"""The training loop's hooks without a model: when each runs (cadence, start, end, preemption) and
the order rules between them (metrics one step behind, checked before any save; nothing saved
twice; a preempted run saves but neither exports nor evaluates). Fakes stand in for the state,
the checkpointer and the loader; nothing compiles."""

from __future__ import annotations

import json
import math
import pathlib
import types

import pytest

from gist_jax.train.hooks import (
    Cadence,
    Hook,
    HookList,
    MetricsWriter,
    PreemptionWatch,
    RunContext,
    Throughput,
    TrainingDiverged,
)
from gist_jax.train.state_hooks import CheckpointHook, EvalHook, HuggingFaceExportHook, MetricsHook


class Recorder(Hook):
    """Appends ``(name, event, step)`` to a shared log."""

    def __init__(self, name: str, cadence: Cadence, log: list, end_if=lambda ctx: True) -> None:
        self.name, self.cadence, self.log, self.end_if = name, cadence, log, end_if

    def before_step(self, ctx: RunContext) -> None:
        self.log.append((self.name, "before", ctx.step))

    def run(self, ctx: RunContext) -> None:
        self.log.append((self.name, "run", ctx.step))

    def at_end(self, ctx: RunContext) -> None:
        if self.end_if(ctx):
            self.log.append((self.name, "end", ctx.step))


class StopAt(Hook):
    """The preemption watch's contract, at a chosen step."""

    name = "stop"
    cadence = Cadence(every=1, on_last_step=True)

    def __init__(self, at: int) -> None:
        self.at = at

    def run(self, ctx: RunContext) -> None:
        if ctx.step == self.at:
            ctx.stop, ctx.preempted = True, ctx.step < ctx.total_steps


class FakeCheckpointer:
    directory = pathlib.Path("/nowhere")

    def __init__(self, steps=()) -> None:
        self.steps, self.saved, self.aside = list(steps), [], []

    def save(self, step, state, data_state, run, layout) -> None:
        self.saved.append((step, data_state))
        self.steps.append(step)

    def latest_step(self):
        return max(self.steps, default=None)

    def all_steps(self):
        return sorted(self.steps)

    def set_aside(self, step, why):
        self.steps.remove(step)
        self.aside.append(step)
        return self.directory / f"{step}.{why}"

    def describe_latest(self) -> str:
        return f"step {self.latest_step()}"


def make_ctx(tmp_path, total: int, start: int = 0, resumed: bool = False, ckpt=None) -> RunContext:
    run = types.SimpleNamespace(to_dict=dict, compression=None, data=types.SimpleNamespace(tokenizer="byte"))
    loader = types.SimpleNamespace(position=start)
    loader.state = lambda: {"position": loader.position}
    return RunContext(run=run, workdir=tmp_path, checkpointer=ckpt or FakeCheckpointer(), loader=loader,
                      writer=MetricsWriter(tmp_path, tensorboard=False), throughput=Throughput(1, total, None, 1),
                      state=types.SimpleNamespace(params={"model": None}), start_step=start, total_steps=total,
                      resumed=resumed, step=start)


def drive(ctx: RunContext, hooks: HookList, loss=lambda step: 1.0 / step) -> None:
    """``train()``'s loop with the step function replaced by a metric of the step number."""
    hooks.at_start(ctx)
    while ctx.step < ctx.total_steps and not ctx.stop:
        hooks.before_step(ctx)
        ctx.loader.position += 1
        ctx.step += 1
        ctx.metrics = {"loss": loss(ctx.step)}
        hooks.after_step(ctx)
    hooks.at_end(ctx)


@pytest.mark.parametrize("cadence, total, want", [
    (Cadence(every=3), 10, [3, 6, 9]),
    (Cadence(every=5), 10, [5]),  # 10 is the last step: the end of the run covers it
    (Cadence(every=5, on_last_step=True), 10, [5, 10]),
    (Cadence(every=1, on_last_step=True), 4, [1, 2, 3, 4]),
    (Cadence(every=0, on_last_step=True), 10, []),
])
def test_cadence_due_steps(cadence, total, want):
    assert [s for s in range(1, total + 1) if cadence.due(s, total)] == want


def test_hooks_run_in_registration_order_at_their_cadence_start_and_end(tmp_path):
    log: list = []
    hooks = HookList([Recorder("a", Cadence(every=2, at_start=True, at_end=True), log),
                      Recorder("b", Cadence(every=3, on_last_step=True), log)])
    drive(make_ctx(tmp_path, total=6), hooks)
    runs = [(name, event, step) for name, event, step in log if event != "before"]
    assert runs == [("a", "run", 0), ("a", "run", 2), ("b", "run", 3), ("a", "run", 4), ("b", "run", 6),
                    ("a", "end", 6)]
    assert [step for name, event, step in log if (name, event) == ("a", "before")] == [0, 1, 2, 3, 4, 5]


def test_start_hooks_do_not_run_again_on_resume_and_end_hooks_see_the_stop(tmp_path):
    log: list = []
    hooks = HookList([Recorder("a", Cadence(every=4, at_start=True, at_end=True), log,
                               end_if=lambda ctx: not ctx.preempted), StopAt(7)])
    ctx = make_ctx(tmp_path, total=10, start=3, resumed=True)
    drive(ctx, hooks)
    assert [(e, s) for _, e, s in log if e != "before"] == [("run", 4)], "no start run at 3, no end when preempted"
    assert ctx.step == 7 and ctx.stop and ctx.preempted


def test_metrics_are_read_one_step_behind_and_logged_at_the_cadence_and_the_last_step(tmp_path):
    log: list = []

    class Probe(Hook):  # runs after the metrics hook: what has been written by then
        name, cadence = "probe", Cadence(every=1, on_last_step=True)

        def run(self, ctx):
            log.append((ctx.step, ctx.writer.final.get("step")))

    ctx = make_ctx(tmp_path, total=7)
    drive(ctx, HookList([MetricsHook(log_every=3), Probe()]))
    assert log == [(1, None), (2, None), (3, None), (4, 3), (5, 3), (6, 3), (7, 6)]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 6, 7], "the last step is flushed and logged at the end"
    assert lines[-1]["loss"] == pytest.approx(1 / 7) and "tokens_per_s" in lines[-1]


def test_a_checkpoint_is_saved_only_after_the_metrics_that_made_it_are_checked(tmp_path):
    ckpt = FakeCheckpointer(steps=[2])
    metrics = MetricsHook(log_every=1)
    ctx = make_ctx(tmp_path, total=10, ckpt=ckpt)
    with pytest.raises(TrainingDiverged) as error:
        drive(ctx, HookList([metrics, CheckpointHook(4, {}, metrics)]),
              loss=lambda step: math.nan if step == 4 else 1.0)
    # step 4's loss is read before the step-4 save, not one step later
    assert ctx.step == 4 and ckpt.saved == [] and ckpt.aside == []
    assert str(error.value).startswith("loss=nan at step 4: stopping. Last good checkpoint: step 2.")

    ckpt = FakeCheckpointer(steps=[2, 3, 4])  # the metrics of step 4 come from the weights of step 3
    metrics = MetricsHook(log_every=1)
    ctx = make_ctx(tmp_path, total=10, ckpt=ckpt)
    with pytest.raises(TrainingDiverged, match=r"Moved the checkpoints of those weights aside: .*3\.diverged, "
                                               r".*4\.diverged\. Last good checkpoint: step 2\."):
        drive(ctx, HookList([metrics, CheckpointHook(5, {}, metrics)]),
              loss=lambda step: math.nan if step == 4 else 1.0)
    assert ckpt.aside == [3, 4] and ckpt.saved == []


def test_checkpoint_cadence_and_final_save(tmp_path):
    ckpt = FakeCheckpointer()
    metrics = MetricsHook(log_every=1)
    drive(make_ctx(tmp_path, total=10, ckpt=ckpt), HookList([metrics, CheckpointHook(4, {}, metrics)]))
    assert ckpt.saved == [(4, {"position": 4}), (8, {"position": 8}), (10, {"position": 10})]

    ckpt = FakeCheckpointer()
    drive(make_ctx(tmp_path, total=8, ckpt=ckpt), HookList([metrics, CheckpointHook(4, {}, metrics)]))
    assert [s for s, _ in ckpt.saved] == [4, 8], "the last step is saved once, at the end"

    ckpt = FakeCheckpointer(steps=[10])
    drive(make_ctx(tmp_path, total=10, start=10, resumed=True, ckpt=ckpt),
          HookList([metrics, CheckpointHook(4, {}, metrics)]))
    assert ckpt.saved == [], "resumed at the end: nothing new to save"


def test_preempted_run_saves_its_step_but_neither_exports_nor_evaluates(tmp_path, monkeypatch):
    ckpt = FakeCheckpointer()
    metrics = MetricsHook(log_every=1)
    exported: list[int] = []
    monkeypatch.setattr(HuggingFaceExportHook, "run", lambda self, ctx: exported.append(ctx.step))
    evaluated: list[int] = []

    def evaluator(params):
        evaluated.append(ctx.step)
        return {"eval/ppl_r1": 2.0}

    watch = PreemptionWatch()
    try:
        hooks = HookList([metrics, CheckpointHook(100, {}, metrics), HuggingFaceExportHook(2, None, metrics),
                          EvalHook(evaluator, 3, at_start=True), watch])
        ctx = make_ctx(tmp_path, total=10, ckpt=ckpt)
        hooks.at_start(ctx)
        assert evaluated == [0]
        for _ in range(5):
            hooks.before_step(ctx)
            ctx.step += 1
            ctx.metrics = {"loss": 1.0}
            if ctx.step == 5:
                watch.requested = True  # what SIGTERM sets
            hooks.after_step(ctx)
        assert ctx.stop and ctx.preempted
        hooks.at_end(ctx)
    finally:
        watch.close()
    assert [s for s, _ in ckpt.saved] == [5]
    assert exported == [2, 4] and evaluated == [0, 3]
