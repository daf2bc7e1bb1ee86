"""One training-step benchmark on synthetic tokens: the real jitted step of ``train/step.py``.

What is timed: ``build_train_step`` (compressed forward, LM loss, TIE's reference passes and
the AE decoder when on, backward, AdamW; state donated), batch of random token ids, layout
arrays built once. The step comes from a ``StepSetup``: built from flags (``BenchSpec``: one
device) or from an experiment file (``bench/recipe.py``: exactly the run's model, compression,
objectives, optimizer and mesh). ``compile_s`` is
``lower + compile`` of that step. ``step_s`` is the median wall time of ``steps`` calls after
``warmup`` calls, each ended by ``block_until_ready`` on the new state and the metrics (the
loop itself has no other host work). Throughput is raw tokens/s (gists are work, not text).

Peak memory: ``peak_bytes`` is XLA's compiled memory analysis of the step,
``temp_size + argument_size`` (+ output size not aliased with donated arguments): what the
step needs on the device, available on every backend including CPU, and independent of
other processes. ``rss_max_bytes`` (process peak RSS, CPU only meaningful) is reported too
but is a lifetime maximum, so it only grows across benchmarks run in one process.

MFU: sparsity-aware model FLOPs (``gist_jax/train/flops.py``: visible attention pairs, gist tokens
counted) over step time and the device's dense bf16 peak; CPU has no listed peak, so MFU is
None unless ``peak_flops`` is given. ``model_tflops_per_s`` is always reported.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.gist.config import CompressionConfig
from gist_jax.gist.forward import resolve_gist_kernel
from gist_jax.gist.layout import GistLayout, build_layout
from gist_jax.gist.specs import layout_arrays
from gist_jax.model.config import ModelConfig, preset
from gist_jax.model.kernels import BOTH, CAUSAL_KERNELS, GIST_KERNEL_NAMES, AttentionChoice
from gist_jax.train import flops
from gist_jax.train.config import MeshConfig, ObjectiveConfig, OptimizerConfig, StepConfig
from gist_jax.train.mesh import make_mesh
from gist_jax.train.objectives import objectives
from gist_jax.train.state import create_train_state
from gist_jax.train.step import build_train_step

VARIANTS = {  # name -> (memory, granularity)
    "full": ("none", "fine"),
    "fine_kv": ("kv", "fine"),
    "coarse_kv": ("kv", "coarse"),
    "coarse_rec": ("recurrent", "coarse"),
}
ATTENTION = BOTH + GIST_KERNEL_NAMES  # --attention: the gist part of model.attention
COMPARE = ("dense", "decomposed", "flash", "split")  # --compare (bank: TPU only, interpret mode elsewhere)
TRAINABLE = ("all", "gist_only")  # compression.trainable
CAUSAL = BOTH + CAUSAL_KERNELS  # --causal: its causal part (passes without gists)


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """Everything the benchmarked train step depends on: what ``train/loop.py`` would compile
    for its first step (base model config, compression, step config, that step's layout)."""

    name: str
    base_cfg: ModelConfig
    comp: CompressionConfig
    step_cfg: StepConfig
    layout: GistLayout
    mesh_devices: int = 1  # devices the step's mesh spans (flags: 1; a config: its mesh)

    @property
    def variant(self) -> str:
        if self.comp.windowed:
            return f"unigist(W={self.comp.window})"
        key = (self.comp.memory, "fine" if self.comp.memory == "none" else self.comp.granularity)
        return next((k for k, v in VARIANTS.items() if v == key), "/".join(key))

    @property
    def attention_used(self) -> str:
        """The KV implementation that runs on this backend (``auto``/``bank`` resolved)."""
        if self.comp.memory != "kv":
            return "n/a"
        return resolve_gist_kernel(self.base_cfg.kernels.gist, self.layout.shape.whole_segments,
                                   self.base_cfg.dtype, windowed=self.comp.windowed)


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One benchmark point from flags. ``attention`` (the gist part of ``model.attention``) applies
    to the KV variants only (full attention and Coarse-Rec have one implementation each; their
    results say ``attention='n/a'``); ``causal`` (its causal part) is the kernel of every pass
    without gists (full attention, TIE's reference passes, Coarse-Rec's segment steps)."""

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
    tie: bool = False  # online TIE (two frozen reference passes in the step)
    ae: bool = False  # autoencoding objective (lambda 1)
    trainable: str = "all"  # compression.trainable: all | gist_only
    bptt: int = 0  # compression.bptt_segments (Coarse-Rec truncation; 0 = unlimited)
    causal: str = "auto"  # the causal part of model.attention

    def model_config(self) -> ModelConfig:
        extra: dict[str, Any] = dict(self.overrides)
        if self.dtype:
            extra["dtype"] = self.dtype
        if self.attention not in ATTENTION:
            raise ValueError(f"--attention {self.attention!r} is not one of {ATTENTION}")
        gist = self.attention if VARIANTS.get(self.variant, ("kv",))[0] == "kv" else "auto"
        cfg = preset(self.model, remat_policy=self.remat, attention=AttentionChoice(self.causal, gist).name, **extra)
        return cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, 2 * self.seq))

    def compression(self) -> CompressionConfig:
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant {self.variant!r} is not one of {sorted(VARIANTS)}")
        memory, granularity = VARIANTS[self.variant]
        return CompressionConfig(memory=memory, granularity=granularity,
                                 segment_length=min(self.segment, self.seq), ratios=(self.ratio,),
                                 ratio_sampling="fixed", num_sinks=self.sinks,
                                 positions=self.positions,
                                 trainable=self.trainable if memory != "none" else "all",
                                 bptt_segments=self.bptt if memory == "recurrent" else 0)

    def step_config(self) -> StepConfig:
        return StepConfig(batch_size=self.batch, seq_len=self.seq, mesh=MeshConfig(1, 1, 1),
                          optimizer=OptimizerConfig(learning_rate=1e-4, total_steps=1000),
                          objective=ObjectiveConfig(tie=self.tie, ae=self.ae))

    def setup(self) -> StepSetup:
        comp = self.compression()
        return StepSetup(f"flags:{self.variant}", self.model_config(), comp, self.step_config(),
                         build_layout(self.seq, comp))

    @property
    def attention_used(self) -> str:
        """The implementation that runs on this backend (``auto``/``bank`` resolved)."""
        if VARIANTS[self.variant][0] != "kv":
            return "n/a"
        return resolve_gist_kernel(self.attention, self.seq % min(self.segment, self.seq) == 0,
                                   self.model_config().dtype)


def _memory_bytes(compiled: Any) -> dict[str, int | None]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        m = None
    if m is None:
        return {"peak_bytes": None, "temp_bytes": None, "argument_bytes": None}
    extra_out = max(0, m.output_size_in_bytes - m.alias_size_in_bytes)
    return {"peak_bytes": int(m.temp_size_in_bytes + m.argument_size_in_bytes + extra_out),
            "temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes)}


class OursStep:
    """The compiled step of a ``StepSetup``, ready to time one call at a time (so the peer
    comparison can alternate it with the PyTorch step). ``compile_s`` is lower + compile."""

    def __init__(self, setup: StepSetup, devices: list | None = None):
        self.setup = setup
        cfg, comp, step_cfg = setup.base_cfg, setup.comp, setup.step_cfg
        if devices is None:
            devices = jax.devices()[:setup.mesh_devices]
        mesh = make_mesh(step_cfg.mesh, devices)
        self.state, tx, shardings = create_train_state(cfg, comp, step_cfg, mesh)
        self.arrays = layout_arrays(setup.layout)
        step = build_train_step(cfg, comp, step_cfg, setup.layout.shape, tx, mesh, shardings)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, cfg.vocab_size, (step_cfg.batch_size, step_cfg.seq_len), dtype=np.int32)
        self.batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.ones(tokens.shape, bool)}
        obj = step_cfg.objective
        if obj.tie and obj.tie_source == "precomputed" and comp.enabled:
            # what the loader serves from the precomputed file (values do not change the step's time)
            self.batch["tie_weights"] = jnp.ones(tokens.shape, jnp.float32)
        t0 = time.perf_counter()
        self.compiled = step.lower(self.state, self.batch, self.arrays).compile()
        self.compile_s = time.perf_counter() - t0
        self.memory = _memory_bytes(self.compiled)
        self.metrics: dict[str, Any] = {}

    def __call__(self) -> float:
        """One step, ended by ``block_until_ready`` on the new state and metrics; seconds."""
        t0 = time.perf_counter()
        self.state, self.metrics = self.compiled(self.state, self.batch, self.arrays)
        jax.block_until_ready((self.state, self.metrics))
        return time.perf_counter() - t0


def describe_setup(setup: StepSetup) -> dict[str, Any]:
    """The fields that say which step this is (recorded with every result)."""
    cfg, comp, step_cfg = setup.base_cfg, setup.comp, setup.step_cfg
    terms = objectives(step_cfg, comp)
    tie, ae = terms.tie_online, terms.ae
    pairs = flops.attention_pairs(cfg, comp, step_cfg.seq_len, setup.layout.ratios if comp.enabled else None,
                                  tie=tie)
    return {
        "setup": setup.name, "model": setup.name,
        "variant": setup.variant, "attention": setup.attention_used, "causal_impl": pairs["causal_impl"],
        "seq": step_cfg.seq_len, "ratio": (setup.layout.ratios[0] if comp.enabled else None),
        "segment": comp.segment_length if comp.enabled else None,
        "sinks": comp.num_sinks, "positions": comp.positions, "batch": step_cfg.batch_size,
        "tie": tie, "ae": ae, "trainable": comp.trainable, "bptt": comp.bptt_segments,
        "tie_precomputed": step_cfg.objective.tie and step_cfg.objective.tie_source == "precomputed" and comp.enabled,
        "remat": cfg.remat_policy, "dtype": cfg.dtype, "layout_tokens": setup.layout.length,
        "attention_pairs": pairs, "attention_pairs_computed_over_exact": pairs["computed_over_exact"],
    }


def environment() -> dict[str, Any]:
    """Device, host, date and load average: recorded next to every measurement."""
    device = jax.devices()[0]
    return {"device": device.device_kind, "platform": device.platform, "host_cpu": _cpu_model(),
            "nproc": os.cpu_count(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "loadavg": list(os.getloadavg()), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def step_result(ours: OursStep, times: list[float], peak_flops: float | None = None) -> dict[str, Any]:
    """The flat result dict of timed steps ``times`` (median reported)."""
    setup = ours.setup
    cfg, comp, step_cfg = setup.base_cfg, setup.comp, setup.step_cfg
    out = describe_setup(setup)
    out.update(compile_s=ours.compile_s, **ours.memory)
    if not times:  # compile and memory analysis only (e.g. a point too slow to run)
        return {**out, **environment()}
    step_s = statistics.median(times)
    tie, ae = out["tie"], out["ae"]
    ratios = setup.layout.ratios if comp.enabled else None
    train = flops.train_flops_per_step(cfg, comp, step_cfg.seq_len, step_cfg.batch_size, ratios, tie=tie, ae=ae)
    peak = flops.peak_flops(jax.devices()[0], peak_flops)
    raw_tokens = step_cfg.batch_size * step_cfg.seq_len
    out.update(
        steps=len(times), step_s=step_s, step_s_min=min(times), step_s_max=max(times), step_times_s=times,
        tokens_per_s=raw_tokens / step_s, train_flops_per_step=train["total"], train_flops=train,
        model_tflops_per_s=train["total"] / step_s / 1e12,
        mfu=flops.mfu(train["total"], step_s, setup.mesh_devices, peak), peak_flops=peak,
        peak_source="xla memory_analysis: temp + arguments + unaliased outputs",
        rss_max_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        loss=float(ours.metrics["loss"]), **environment())
    return out


def time_steps(step: Callable[[], float], steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    return [step() for _ in range(steps)]


def run_setup_bench(setup: StepSetup, steps: int = 5, warmup: int = 1,
                    peak_flops: float | None = None) -> dict[str, Any]:
    """Compile and time the training step of ``setup``; returns a flat dict of results."""
    ours = OursStep(setup)
    return step_result(ours, time_steps(ours, steps, warmup) if steps else [], peak_flops)


def run_train_bench(spec: BenchSpec, peak_flops: float | None = None) -> dict[str, Any]:
    """Compile and time the training step for ``spec``; returns a flat dict of results."""
    r = run_setup_bench(spec.setup(), spec.steps, spec.warmup, peak_flops)
    r["model"] = spec.model
    return r


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def format_result(r: dict[str, Any]) -> str:
    peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f} MiB"
    what = (f"{r['model']} {r['variant']} attention={r['attention']} causal={r['causal_impl']} "
            f"seq={r['seq']} r={r['ratio']} L={r['segment']} batch={r['batch']}"
            + "".join(f" +{k}" for k in ("tie", "ae") if r.get(k))
            + (" +tie(precomputed weights)" if r.get("tie_precomputed") else "")
            + (f" trainable={r['trainable']}" if r.get("trainable") != "all" else "")
            + (f" bptt={r['bptt']}" if r.get("bptt") else ""))
    over = r["attention_pairs_computed_over_exact"]
    pairs = f"attention pairs computed/exact {'n/a' if over is None else f'{over:.2f}x'}"
    if "step_s" not in r:  # --steps 0: compiled, not run
        return f"{what}: compile {r['compile_s']:.1f} s, peak {peak}, {pairs} (compile only)"
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (f"{what}: {r['tokens_per_s']:,.0f} tok/s, step {1e3 * r['step_s']:.1f} ms (median of "
            f"{r['steps']}), compile {r['compile_s']:.1f} s, peak {peak}, {pairs}, "
            f"{r['model_tflops_per_s'] * 1e3:.2f} model GFLOP/s, MFU {mfu} [{r['platform']}: {r['device']}, "
            f"load {r['loadavg'][0]:.2f}]")
