"""One training-step benchmark on synthetic tokens: the real jitted step of ``train/step.py``.

What is timed: ``build_train_step`` (compressed forward, LM loss, backward, AdamW; state
donated) on one device, batch of random token ids, layout arrays built once. ``compile_s`` is
``lower + compile`` of that step. ``step_s`` is the median wall time of ``steps`` calls after
``warmup`` calls, each ended by ``block_until_ready`` on the new state and the metrics (the
loop itself has no other host work). Throughput is raw tokens/s (gists are work, not text).

Peak memory: ``peak_bytes`` is XLA's compiled memory analysis of the step,
``temp_size + argument_size`` (+ output size not aliased with donated arguments): what the
step needs on the device, available on every backend including CPU, and independent of
other processes. ``rss_max_bytes`` (process peak RSS, CPU only meaningful) is reported too
but is a lifetime maximum, so it only grows across benchmarks run in one process.

MFU: sparsity-aware model FLOPs (``gist_jax/flops.py``: visible attention pairs, gist tokens
counted) over step time and the device's dense bf16 peak; CPU has no listed peak, so MFU is
None unless ``peak_flops`` is given. ``model_tflops_per_s`` is always reported.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax import flops
from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.layout import build_layout
from gist_jax.gist.parallel import resolve_attention_impl
from gist_jax.gist.specs import layout_arrays
from gist_jax.model.config import ModelConfig, preset
from gist_jax.train.config import MeshConfig, OptimizerConfig, StepConfig
from gist_jax.train.mesh import make_mesh
from gist_jax.train.state import create_train_state
from gist_jax.train.step import build_train_step

VARIANTS = {  # name -> (memory, granularity)
    "full": ("none", "fine"),
    "fine_kv": ("kv", "fine"),
    "coarse_kv": ("kv", "coarse"),
    "coarse_rec": ("recurrent", "coarse"),
}
ATTENTION = ("dense", "decomposed", "flash", "bank", "auto")
COMPARE = ("dense", "decomposed", "flash")  # --compare (bank: TPU only, interpret mode elsewhere)


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One benchmark point. ``attention`` applies to the KV variants only (full attention and
    Coarse-Rec have one implementation each; their results say ``attention='n/a'``)."""

    model: str = "tiny"
    seq: int = 4096
    variant: str = "fine_kv"
    ratio: int = 8
    attention: str = "auto"
    segment: int = 512
    sinks: int = 4
    positions: str = "compressed"
    batch: int = 1
    steps: int = 5
    warmup: int = 1
    remat: str = "none"
    dtype: str | None = None  # compute dtype override (preset default otherwise)
    overrides: tuple[tuple[str, int], ...] = ()

    def model_config(self) -> ModelConfig:
        extra: dict[str, Any] = dict(self.overrides)
        if self.dtype:
            extra["dtype"] = self.dtype
        cfg = preset(self.model, remat_policy=self.remat, **extra)
        return cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, 2 * self.seq))

    def compression(self) -> CompressionConfig:
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant {self.variant!r} is not one of {sorted(VARIANTS)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"--attention {self.attention!r} is not one of {ATTENTION}")
        memory, granularity = VARIANTS[self.variant]
        impl = self.attention if memory == "kv" else "dense"
        return CompressionConfig(memory=memory, granularity=granularity,
                                 segment_length=min(self.segment, self.seq), ratios=(self.ratio,),
                                 ratio_sampling="fixed", num_sinks=self.sinks,
                                 positions=self.positions, attention_impl=impl)

    @property
    def attention_used(self) -> str:
        """The implementation that runs on this backend (``auto``/``bank`` resolved)."""
        if VARIANTS[self.variant][0] != "kv":
            return "n/a"
        return resolve_attention_impl(self.attention, self.seq % min(self.segment, self.seq) == 0,
                                      self.model_config().dtype)


def _memory_bytes(compiled: Any) -> dict[str, int | None]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # backend without memory analysis
        m = None
    if m is None:
        return {"peak_bytes": None, "temp_bytes": None, "argument_bytes": None}
    extra_out = max(0, m.output_size_in_bytes - m.alias_size_in_bytes)
    return {"peak_bytes": int(m.temp_size_in_bytes + m.argument_size_in_bytes + extra_out),
            "temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes)}


def run_train_bench(spec: BenchSpec, peak_flops: float | None = None) -> dict[str, Any]:
    """Compile and time the training step for ``spec``; returns a flat dict of results."""
    cfg, comp = spec.model_config(), spec.compression()
    step_cfg = StepConfig(batch_size=spec.batch, seq_len=spec.seq, mesh=MeshConfig(1, 1, 1),
                          optimizer=OptimizerConfig(learning_rate=1e-4, total_steps=1000))
    mesh = make_mesh(step_cfg.mesh, jax.devices()[:1])
    state, tx, shardings = create_train_state(cfg, comp, step_cfg, mesh)
    layout = build_layout(spec.seq, comp)
    arrays = layout_arrays(layout)
    step = build_train_step(cfg, comp, step_cfg, layout.shape, tx, mesh, shardings)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (spec.batch, spec.seq), dtype=np.int32)
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.ones(tokens.shape, bool)}

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, arrays).compile()
    compile_s = time.perf_counter() - t0
    memory = _memory_bytes(compiled)

    if spec.steps == 0:  # compile and memory analysis only (e.g. a point too slow to run)
        return {"model": spec.model, "variant": spec.variant, "attention": spec.attention_used,
                "seq": spec.seq, "segment": comp.segment_length, "compile_s": compile_s, **memory}
    times = []
    for i in range(spec.warmup + spec.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, arrays)
        jax.block_until_ready((state, metrics))
        if i >= spec.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    train_flops = flops.train_flops_per_step(cfg, comp, spec.seq, spec.batch)["total"]
    device = jax.devices()[0]
    peak = flops.peak_flops(device, peak_flops)
    raw_tokens = spec.batch * spec.seq
    return {
        "model": spec.model, "variant": spec.variant, "attention": spec.attention_used,
        "seq": spec.seq, "ratio": spec.ratio if comp.enabled else None,
        "segment": comp.segment_length if comp.enabled else None, "sinks": spec.sinks,
        "positions": spec.positions, "batch": spec.batch, "layout_tokens": layout.length,
        "steps": spec.steps, "step_s": step_s, "step_s_min": min(times), "step_s_max": max(times),
        "tokens_per_s": raw_tokens / step_s, "compile_s": compile_s,
        "train_flops_per_step": train_flops, "model_tflops_per_s": train_flops / step_s / 1e12,
        "mfu": flops.mfu(train_flops, step_s, 1, peak), "peak_flops": peak,
        **memory, "peak_source": "xla memory_analysis: temp + arguments + unaliased outputs",
        "rss_max_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss": float(metrics["loss"]), "device": device.device_kind, "platform": device.platform,
        "host_cpu": _cpu_model(), "nproc": os.cpu_count(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def format_result(r: dict[str, Any]) -> str:
    peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f} MiB"
    if "step_s" not in r:  # --steps 0: compiled, not run
        return (f"{r['model']} {r['variant']} attention={r['attention']} seq={r['seq']} "
                f"L={r['segment']}: compile {r['compile_s']:.1f} s, peak {peak} (compile only)")
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (f"{r['model']} {r['variant']} attention={r['attention']} seq={r['seq']} "
            f"r={r['ratio']} L={r['segment']} batch={r['batch']}: {r['tokens_per_s']:,.0f} tok/s, "
            f"step {1e3 * r['step_s']:.1f} ms (median of {r['steps']}), compile {r['compile_s']:.1f} s, "
            f"peak {peak}, {r['model_tflops_per_s'] * 1e3:.2f} model GFLOP/s, MFU {mfu} "
            f"[{r['platform']}: {r['device']}]")
