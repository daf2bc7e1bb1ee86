"""Side effects of the training loop, kept out of it: metrics (console, JSONL, TensorBoard),
throughput and MFU, divergence checks, profiling, preemption. Only process 0 writes files;
every process computes the same numbers.
"""

from __future__ import annotations

import json
import math
import pathlib
import signal
import time
from types import FrameType
from typing import Any

import jax

from gist_jax.train.distributed import is_primary

FINITE_KEYS = ("loss", "lm_loss", "grad_norm", "ae_loss")


class TrainingDiverged(RuntimeError):
    pass


def non_finite_metric(metrics: dict[str, float]) -> str | None:
    """``key=value`` of the first non-finite training metric, or None."""
    for key in FINITE_KEYS:
        if key in metrics and not math.isfinite(metrics[key]):
            return f"{key}={metrics[key]}"
    return None


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

    def console(self, line: str) -> None:
        if self.primary:
            print(line, flush=True)

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        final = {**self.final, **(extra or {})}
        if self.primary:
            tmp = self.workdir / "final_metrics.json.tmp"
            tmp.write_text(json.dumps(final, indent=1, sort_keys=True))
            tmp.rename(self.workdir / "final_metrics.json")
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
        return final


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


def format_line(step: int, total: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in (("loss", ".4f"), ("lm_loss", ".4f"), ("ae_loss", ".4f"), ("accuracy", ".3f"),
                     ("grad_norm", ".3g"), ("learning_rate", ".2e"), ("tokens_per_s", ",.0f"), ("mfu", ".1%")):
        if key in metrics:
            parts.append(f"{key.replace('tokens_per_s', 'tok/s')} {metrics[key]:{fmt}}")
    if "eta_seconds" in metrics:
        parts.append(f"eta {time.strftime('%H:%M:%S', time.gmtime(metrics['eta_seconds']))}")
    return " | ".join(parts)


class Profiler:
    """``jax.profiler`` trace of steps [start, start + count) into ``<workdir>/profile``."""

    def __init__(self, workdir: pathlib.Path, start: int, count: int):
        self.dir, self.start, self.stop, self.active = workdir / "profile", start, start + count, False

    def before_step(self, step: int) -> None:
        if self.stop > self.start and step == self.start and is_primary():
            jax.profiler.start_trace(str(self.dir))
            self.active = True

    def after_step(self, step: int) -> None:
        if self.active and step >= self.stop:
            jax.profiler.stop_trace()
            self.active = False


class PreemptionWatch:
    """Asks the loop to save and exit at the next step when the job is being preempted.

    One process: a SIGTERM handler. Several processes: JAX's preemption sync point (its
    distributed runtime catches SIGTERM itself), so every process stops at the same step even
    when only one of them received the signal; a Python handler there would replace JAX's.
    """

    def __init__(self):
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

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
