"""Side effects of the training loop, kept out of it, and the hooks that hang them on it.

The loop (``gist_jax.train.loop.train``) takes steps and, after each, calls ``HookList.after_step``;
everything else it does is a ``Hook``: an object with a name, a ``Cadence`` (every N steps, at the
start of a fresh run, at the end) and a ``run`` that receives the ``RunContext`` explicitly
(the state, the step, the checkpointer, the loader...), never closed-over locals of ``train()``.
This module holds the machinery (``Cadence``, ``Hook``, ``HookList``, ``RunContext``), the tools
the hooks share (``MetricsWriter``, ``Throughput``, ``CompileLog``) and the hooks that need no
train state: the profiler and the preemption watch. The hooks that read or write the train
state (metrics and divergence, checkpoint, Hugging Face export, evaluation) are in
``gist_jax.train.state_hooks``.

Only process 0 writes files; every process computes the same numbers and runs the same hooks at
the same steps (a collective inside one, the export's gather, needs every process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import signal
import time
from collections.abc import Sequence
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import jax

from gist_jax.train.distributed import is_primary
from gist_jax.utils import bucket

if TYPE_CHECKING:
    from gist_jax.data.loader import BatchLoader
    from gist_jax.train.checkpoint import Checkpointer
    from gist_jax.train.experiment import RunConfig
    from gist_jax.train.state import TrainState

logger = logging.getLogger(__name__)

FINITE_KEYS = ("loss", "lm_loss", "grad_norm", "ae_loss")


class TrainingDiverged(RuntimeError):
    pass


def non_finite_metric(metrics: dict[str, float]) -> str | None:
    """``key=value`` of the first non-finite training metric, or None."""
    for key in FINITE_KEYS:
        if key in metrics and not math.isfinite(metrics[key]):
            return f"{key}={metrics[key]}"
    return None


# ---------------------------------------------------------------------- the hook machinery


@dataclasses.dataclass
class RunContext:
    """What a hook may read or change, handed to it explicitly.

    The services are fixed for the run; ``state``, ``step`` and ``metrics`` are set by the loop
    after every step (``step`` counts the updates done: ``state`` holds the weights after
    ``step`` steps, ``metrics`` are that step's, still on the device); ``stop`` and ``preempted``
    are set by the preemption watch.
    """

    run: RunConfig
    workdir: pathlib.Path
    checkpointer: Checkpointer
    loader: BatchLoader
    writer: MetricsWriter
    throughput: Throughput
    state: TrainState
    start_step: int  # the step this run began at (0, or the restored checkpoint's)
    total_steps: int
    resumed: bool  # restored from a checkpoint
    step: int
    metrics: dict[str, Any] | None = None
    stop: bool = False  # the loop ends after this step
    preempted: bool = False  # ... and stopped before total_steps

    @property
    def trained_this_run(self) -> bool:
        """This run took a step, or began from scratch: a resumed run that took none has nothing
        new to save or export."""
        return self.step > self.start_step or not self.resumed


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When a hook runs.

    ``every``: after each step ``s`` with ``s % every == 0`` (0: never). ``on_last_step``: the
    periodic runs include the run's last step (``s == total``); off for what the end of the run
    does anyway (a save, an export, an eval), so the last step does not do it twice. ``at_start``:
    once before the first step of a run that begins at step 0 (a resumed run did it when it
    began). ``at_end``: once after the loop, through ``Hook.at_end``, which decides on how the run
    ended (preempted, resumed without a step).
    """

    every: int = 0
    on_last_step: bool = False
    at_start: bool = False
    at_end: bool = False

    def due(self, step: int, total: int) -> bool:
        """Whether the periodic run happens after step ``step`` of a run of ``total`` steps."""
        return self.every > 0 and step % self.every == 0 and (step < total or self.on_last_step)


class Hook:
    """One side effect of the loop. Subclasses set ``name`` and ``cadence`` and implement
    ``run``; ``before_step``, ``at_end`` and ``close`` default to nothing, ``run`` and nothing."""

    name = "hook"
    cadence = Cadence()

    def before_step(self, ctx: RunContext) -> None:
        """Before the step that follows ``ctx.step`` is taken, every step (a trace that must
        contain the step starts here)."""

    def run(self, ctx: RunContext) -> None:
        """The side effect at ``ctx.step``: when the cadence is due, and at the start."""
        raise NotImplementedError

    def at_end(self, ctx: RunContext) -> None:
        """Once after the loop, where ``cadence.at_end``; a hook with conditions overrides it."""
        self.run(ctx)

    def close(self) -> None:
        """After the checkpointer has finished its last save."""


class HookList:
    """The run's hooks, called in the order they are given: that order is the order of the side
    effects within a step (metrics first, so a save never sees unchecked metrics; preemption
    last, so the loop stops after the step's own saves)."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = list(hooks)

    def at_start(self, ctx: RunContext) -> None:
        if ctx.step != 0:
            return
        for hook in self.hooks:
            if hook.cadence.at_start:
                hook.run(ctx)

    def before_step(self, ctx: RunContext) -> None:
        for hook in self.hooks:
            hook.before_step(ctx)

    def after_step(self, ctx: RunContext) -> None:
        for hook in self.hooks:
            if hook.cadence.due(ctx.step, ctx.total_steps):
                hook.run(ctx)

    def at_end(self, ctx: RunContext) -> None:
        for hook in self.hooks:
            if hook.cadence.at_end:
                hook.at_end(ctx)

    def close(self) -> None:
        for hook in self.hooks:
            hook.close()


# ---------------------------------------------------------------------- tools the hooks share


class MetricsWriter:
    """Console lines, ``metrics.jsonl`` and TensorBoard events; the last value of every metric is
    kept for ``final_metrics.json``."""

    def __init__(self, workdir: pathlib.Path, tensorboard: bool = True):
        self.primary = is_primary()
        self.workdir = workdir
        self.final: dict[str, float] = {}
        self._tb = None
        if self.primary:
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl: IO[str] | bucket.ObjectLog
            if bucket.is_url(workdir):  # gs://: no append; the object is rewritten whole (utils/bucket.py)
                self._jsonl = bucket.ObjectLog(workdir / "metrics.jsonl")
            else:
                trim_torn_record(workdir / "metrics.jsonl")  # a killed run's half line would swallow our first
                self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - open for the run
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self.final.update(metrics)
        self.final["step"] = step
        if not self.primary:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, step)

    def sync(self) -> None:
        """Everything written so far is in the workdir (a local file is line-buffered; a bucket's
        object is uploaded): called before each checkpoint, so a run resumed from it has its steps' lines."""
        if self.primary:
            self._jsonl.flush()

    def console(self, line: str) -> None:
        """A line of the run's report on stdout (the per-step metrics, the memory plan): what a
        person runs training to read, and what a log scraper parses; process 0 only."""
        if self.primary:
            print(line, flush=True)

    def status(self, line: str) -> None:
        """A status line (resumed, compiled, exported, evaluated, preempted) through logging:
        stderr with absl's timestamp prefix (``gist_jax.utils.logs``); process 0 only."""
        if self.primary:
            logger.info("%s", line, stacklevel=2)  # file:line of the caller

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        final = {**self.final, **(extra or {})}
        if self.primary:
            bucket.write_text(self.workdir / "final_metrics.json", json.dumps(final, indent=1, sort_keys=True))
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
        return final


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError of a cut multi-byte character
        return False


def trim_torn_record(path: pathlib.Path) -> None:
    """Makes ``path`` (a JSON-lines log) end in a complete record and a newline before it is
    appended to: a kill or a full disk mid-write leaves half a line, which the next record would
    otherwise be glued onto, losing both. That tail is cut off with one warning naming the file
    and the bytes dropped; a complete last record that only lacks its newline gets one. Only the
    last line is looked at: anything before it was followed by a newline, so it was written whole
    (``gist_jax.train.report.read_records`` reports older damage)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "r+b") as f:
        start, body, ends_line = size, b"", False  # body: the file from start on, less its final newline
        while start > 0 and b"\n" not in body:  # back until the newline before the last line
            start = max(0, start - (1 << 16))
            f.seek(start)
            tail = f.read(size - start)
            ends_line = tail.endswith(b"\n")
            body = tail[:-1] if ends_line else tail
        cut = body.rfind(b"\n") + 1  # where the last line begins, from start
        if _is_record(body[cut:]):
            if not ends_line:
                f.seek(size)
                f.write(b"\n")
            return
        f.truncate(start + cut)
    logger.warning("%s ended in a partial record (%d bytes, what a kill or a full disk leaves); dropped it so the "
                   "records of this run start on a line of their own", path, size - start - cut)


class Throughput:
    """Raw tokens/s, step time, MFU and ETA over the interval since the last report; compile
    time is measured apart and excluded."""

    def __init__(self, tokens_per_step: int, total_steps: int, peak_flops: float | None, num_devices: int):
        self.tokens_per_step, self.total_steps = tokens_per_step, total_steps
        self.peak, self.num_devices = peak_flops, num_devices
        self._reset(0)

    def _reset(self, step: int) -> None:
        self.t0, self.step0, self.flops, self.excluded = time.perf_counter(), step, 0.0, 0.0

    def add_step(self, flops: float) -> None:
        self.flops += flops

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def report(self, step: int) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        steps = max(step - self.step0, 1)
        out = {"tokens_per_s": self.tokens_per_step * steps / seconds, "step_seconds": seconds / steps,
               "eta_seconds": (self.total_steps - step) * seconds / steps}
        if self.peak:
            out["mfu"] = self.flops / seconds / (self.peak * self.num_devices)
        self._reset(step)
        return out


class CompileLog:
    """Called by ``StepFunctions`` after each train-step compilation: the time is left out of
    throughput (it is not training), printed, and summed into the final metrics."""

    def __init__(self, throughput: Throughput, writer: MetricsWriter) -> None:
        self.throughput, self.writer = throughput, writer
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, seconds: float) -> None:
        self.seconds[name] = seconds
        self.throughput.exclude(seconds)
        self.writer.status(f"compiled train step for {name} in {seconds:.1f}s")

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def format_line(step: int, total: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in (("loss", ".4f"), ("lm_loss", ".4f"), ("ae_loss", ".4f"), ("accuracy", ".3f"),
                     ("grad_norm", ".3g"), ("learning_rate", ".2e"), ("tokens_per_s", ",.0f"), ("mfu", ".1%")):
        if key in metrics:
            parts.append(f"{key.replace('tokens_per_s', 'tok/s')} {metrics[key]:{fmt}}")
    if "eta_seconds" in metrics:
        parts.append(f"eta {time.strftime('%H:%M:%S', time.gmtime(metrics['eta_seconds']))}")
    return " | ".join(parts)


# ---------------------------------------------------------------------- hooks without train state


class Profiler(Hook):
    """``jax.profiler`` trace of steps [start, start + count) into ``<workdir>/profile``: started
    before step ``start`` is taken, stopped once ``start + count`` steps are done (or never, when
    the run ends first)."""

    name = "profile"
    cadence = Cadence(every=1, on_last_step=True)

    def __init__(self, workdir: pathlib.Path, start: int, count: int):
        self.dir, self.start, self.stop, self.active = workdir / "profile", start, start + count, False

    def before_step(self, ctx: RunContext) -> None:
        if self.stop > self.start and ctx.step == self.start and is_primary():
            jax.profiler.start_trace(str(self.dir))
            self.active = True

    def run(self, ctx: RunContext) -> None:
        if self.active and ctx.step >= self.stop:
            jax.profiler.stop_trace()
            self.active = False


class PreemptionWatch(Hook):
    """Stops the loop after the current step when the job is being preempted; the end of the run
    then saves that step (and skips the export and eval a finished run would do).

    Checked after every step, the last included, and last of the hooks, after the step's own
    saves. One process: a SIGTERM handler. Several processes: JAX's preemption sync point (its
    distributed runtime catches SIGTERM itself), so every process stops at the same step even
    when only one of them received the signal; a Python handler there would replace JAX's.
    """

    name = "preemption"
    cadence = Cadence(every=1, on_last_step=True)

    def __init__(self) -> None:
        self.requested = False
        self.multi = jax.process_count() > 1
        self._previous = None if self.multi else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if not self.multi:
            return self.requested
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # preemption service unavailable in this runtime
            return False

    def run(self, ctx: RunContext) -> None:
        if self.should_stop(ctx.step):
            ctx.stop = True
            ctx.preempted = ctx.step < ctx.total_steps

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
