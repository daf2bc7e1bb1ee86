"""One prepared check for the first minutes on a GPU: ``python -m gist_jax.bench.gpu_check``.

    python -m gist_jax.bench.gpu_check --out "$OUT"            # one H100/H200, at most ~8 min
    python -m gist_jax.bench.gpu_check --out /tmp/c --dry-run  # the same code paths, tiny, on CPU

Device time is counted in minutes, so this measures instead of debugging: every stage runs in
its own ``try`` (a failure is recorded and the next stage runs), stages are skipped once the
time budget is spent, and ``gpu_check.json`` / ``gpu_check.md`` are rewritten after every
stage, so a run killed by its time limit still returns what it measured. In order:

1. versions: jax, jaxlib, cuDNN, device kind, Python, torch;
2. the bf16 GEMM ceiling (TFLOP/s of one large matmul);
3. correctness of ``flash`` and ``split`` against the dense reference in bf16 on a small
   model (logits and gradients), and whether the compiled gradient's HLO holds cuDNN
   forward *and* backward calls;
4. cuDNN attention micro-benchmarks: full causal at 16K and 32K, the flash layout's
   [memory + segment] rows, split's two parts, and whether key lengths skip tiles (half the
   keys valid should take about half the time);
5. end to end, ``bench_1b`` (remat none, 3 timed steps): full attention vs Fine-KV with
   ``flash`` and ``split``, at 32K then 16K;
6. the PyTorch peer on CUDA (transformers Llama, SDPA with the 4D gist mask), alternated with
   ours in one process.

Needs only what the GPU machine has (jax, flax, optax, orbax; torch + transformers for stage
6, skipped without them). ``docs/performance.md`` says how to run it on a lent machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Shapes of a real run, and of the dry run (same code paths, seconds on a CPU).
FULL = {"gemm": 8192, "model": "bench_1b", "contexts": (32768, 16384), "segment": 2048, "micro": (16384, 32768),
        "heads": (32, 8, 64), "check_seq": 512, "check_segment": 128, "peer_seq": 16384, "steps": 3}
DRY = {"gemm": 256, "model": "tiny", "contexts": (512,), "segment": 128, "micro": (256,),
       "heads": (4, 2, 16), "check_seq": 48, "check_segment": 16, "peer_seq": 256, "steps": 1}


class Report:
    """Stage results, written to ``out`` as JSON and a markdown table after every stage."""

    def __init__(self, out: str, budget_s: float):
        self.out, self.budget_s, self.start = out, budget_s, time.monotonic()
        self.stages: dict[str, Any] = {}
        os.makedirs(out, exist_ok=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def run(self, name: str, fn: Callable[[], Any]) -> None:
        if self.elapsed() > self.budget_s:
            self.stages[name] = {"skipped": f"time budget of {self.budget_s:.0f} s spent"}
        else:
            t0 = time.monotonic()
            try:
                self.stages[name] = {"result": fn()}
            except Exception as e:  # noqa: BLE001 - record and go on: the next stage may work
                self.stages[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}",
                                     "trace": traceback.format_exc(limit=4)[-2000:]}
            self.stages[name]["seconds"] = round(time.monotonic() - t0, 2)
        print(f"[gpu_check {self.elapsed():6.1f} s] {name}: {_short(self.stages[name])}", flush=True)
        self.write()

    def write(self) -> None:
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump({"elapsed_s": round(self.elapsed(), 1), "stages": self.stages}, f, indent=2, default=str)
        lines = ["| stage | seconds | result |", "|---|---|---|"]
        lines += [f"| {k} | {v.get('seconds', '')} | {_short(v)} |" for k, v in self.stages.items()]
        with open(os.path.join(self.out, "gpu_check.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


def _short(stage: dict[str, Any]) -> str:
    if "result" not in stage:
        return stage.get("skipped") or stage.get("error", "")
    return json.dumps(stage["result"], default=str)[:600].replace("|", "/")


def _timed(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median seconds of ``repeats`` calls after one warm-up (each synchronised)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def versions() -> dict[str, Any]:
    import jaxlib

    out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
           "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
           "devices": jax.device_count()}
    try:
        from jax._src.lib import cuda_versions

        out["cudnn"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception as e:  # noqa: BLE001 - not a CUDA build
        out["cudnn"] = f"n/a ({type(e).__name__})"
    try:
        import torch

        out["torch"], out["torch_cuda"] = torch.__version__, torch.cuda.is_available()
    except ImportError:
        out["torch"] = None
    from gist_jax.gist import cudnn_stats

    out["split_cudnn_ready"], out["split_unavailable_reason"] = cudnn_stats.ready(), cudnn_stats.unavailable_reason()
    return out


def gemm_ceiling(n: int) -> dict[str, Any]:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    seconds = _timed(lambda: mm(a, b), repeats=10)
    return {"n": n, "seconds": seconds, "tflops": 2 * n ** 3 / seconds / 1e12}


def correctness(shapes: dict[str, Any]) -> dict[str, Any]:
    """flash and split vs dense in bf16: relative error of logits and of parameter gradients,
    and cuDNN custom calls in the compiled gradient's HLO."""
    from gist_jax.gist.config import CompressionConfig
    from gist_jax.gist.forward import compressed_logits, resolve_gist_kernel
    from gist_jax.gist.layout import build_layout
    from gist_jax.gist.params import add_gist_params, model_config_for
    from gist_jax.gist.specs import layout_arrays
    from gist_jax.model.config import preset
    from gist_jax.model.kernels import with_gist_kernel
    from gist_jax.model.transformer import init_params

    n_heads, kv_heads, head_dim = shapes["heads"]
    base = preset("tiny", dtype="bfloat16", num_heads=n_heads, num_kv_heads=kv_heads, head_dim=head_dim,
                  hidden_size=n_heads * head_dim)
    seq = shapes["check_seq"]
    out: dict[str, Any] = {}
    results: dict[str, Any] = {}
    for impl in ("dense", "flash", "split"):
        comp = CompressionConfig(memory="kv", granularity="fine", segment_length=shapes["check_segment"],
                                 ratios=(8,), ratio_sampling="fixed", num_sinks=4)
        cfg = model_config_for(base.replace(attention=with_gist_kernel("auto", impl)), comp)
        params = add_gist_params(init_params(base, jax.random.key(0)), cfg)
        layout = build_layout(seq, comp)
        arrays = layout_arrays(layout)
        tokens = jax.random.randint(jax.random.key(1), (2, seq), 0, base.vocab_size)

        def loss(p, comp=comp, cfg=cfg, layout=layout, arrays=arrays, tokens=tokens):
            logits = compressed_logits(cfg, comp, layout.shape, p, tokens, arrays).astype(jnp.float32)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits

        compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params).compile()
        (_, logits), grads = compiled(params)
        hlo = compiled.as_text()
        results[impl] = (logits, grads)
        out[impl] = {"resolved": resolve_gist_kernel(impl, layout.shape.whole_segments, cfg.dtype),
                     "cudnn_forward_calls": hlo.count('custom_call_target="__cudnn$fmhaSoftmax"'),
                     "cudnn_backward_calls": hlo.count('custom_call_target="__cudnn$fmhaSoftmaxBackward"')}
    ref_logits, ref_grads = results["dense"]
    for impl in ("flash", "split"):
        logits, grads = results[impl]
        diff = jax.tree.map(lambda a, b: jnp.sum((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2),
                            grads, ref_grads)
        norm = jax.tree.map(lambda b: jnp.sum(b.astype(jnp.float32) ** 2), ref_grads)
        out[impl]["logits_max_rel_err"] = float(jnp.max(jnp.abs(logits - ref_logits)) / jnp.max(jnp.abs(ref_logits)))
        out[impl]["grad_rel_err"] = float(jnp.sqrt(sum(jax.tree.leaves(diff)) / sum(jax.tree.leaves(norm))))
    return out


def attention_micro(shapes: dict[str, Any]) -> dict[str, Any]:
    """Forward + backward of one attention call at the shapes a run uses; cuDNN on a GPU."""
    n_heads, kv_heads, head_dim = shapes["heads"]
    impl = "cudnn" if jax.default_backend() == "gpu" else None
    seg = shapes["segment"]

    def bench(batch: int, tq: int, tk: int, causal: bool, kv_len: int | None = None) -> dict[str, Any]:
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (batch, tq, n_heads, head_dim), jnp.bfloat16)
        k = jax.random.normal(keys[1], (batch, tk, kv_heads, head_dim), jnp.bfloat16)
        v = jax.random.normal(keys[2], (batch, tk, kv_heads, head_dim), jnp.bfloat16)
        lengths = None if kv_len is None else jnp.full((batch,), kv_len, jnp.int32)

        def f(q, k, v):
            return jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                                        implementation=impl).astype(jnp.float32))

        step = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
        seconds = _timed(lambda: step(q, k, v))
        pairs = batch * (tq * (tq + 1) / 2 if causal else tq * (kv_len or tk))
        return {"shape": [batch, tq, tk], "seconds": seconds,
                "tflops_fwd_bwd": 3.5 * 4 * n_heads * head_dim * pairs / seconds / 1e12}

    out: dict[str, Any] = {"implementation": impl or "xla"}
    for t in shapes["micro"]:
        out[f"causal_{t}"] = bench(1, t, t, True)
        s = t // seg
        memory = 4 + s * seg // 8
        out[f"flash_layout_{t}"] = bench(s, memory + seg + seg // 8, memory + seg + seg // 8, True)
        out[f"split_local_{t}"] = bench(s, seg + seg // 8, seg + seg // 8, True)
        out[f"split_memory_{t}"] = bench(max(s - 1, 1), seg + seg // 8, memory, False)
        full_keys, half_keys = bench(1, t, t, False, t), bench(1, t, t, False, t // 2)
        out[f"key_lengths_skip_{t}"] = {"half_over_full_time": half_keys["seconds"] / full_keys["seconds"]}
    return out


def end_to_end(shapes: dict[str, Any], seq: int) -> dict[str, Any]:
    from gist_jax.bench.train_bench import BenchSpec, run_train_bench

    out: dict[str, Any] = {}
    for variant, attention in (("full", "auto"), ("fine_kv", "flash"), ("fine_kv", "split")):
        spec = BenchSpec(model=shapes["model"], seq=seq, variant=variant, attention=attention, ratio=8,
                         segment=shapes["segment"], remat="none", steps=shapes["steps"], warmup=1)
        try:
            r = run_train_bench(spec)
            out[f"{variant}:{attention}"] = {k: r.get(k) for k in (
                "attention", "causal_impl", "tokens_per_s", "step_s", "mfu", "model_tflops_per_s",
                "peak_bytes", "compile_s")}
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at 32K: record, go on
            out[f"{variant}:{attention}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    full = out.get("full:auto", {}).get("tokens_per_s")
    for key in ("fine_kv:flash", "fine_kv:split"):
        if full and out[key].get("tokens_per_s"):
            out[key]["over_full"] = out[key]["tokens_per_s"] / full
    return out


def peer(shapes: dict[str, Any]) -> dict[str, Any]:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return {"skipped": f"no {e.name}"}
    from gist_jax.bench.peer_torch import compare_alternating
    from gist_jax.bench.train_bench import BenchSpec, OursStep

    spec = BenchSpec(model=shapes["model"], seq=shapes["peer_seq"], variant="fine_kv", attention="auto",
                     ratio=8, segment=shapes["segment"], remat="none")
    setup = spec.setup()
    return compare_alternating(OursStep(setup), setup, repeats=shapes["steps"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gist_jax.bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="folder for the JSON and markdown")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on any backend (CPU: the tests run it)")
    p.add_argument("--budget-s", type=float, default=450.0, help="start no stage after this many seconds")
    args = p.parse_args(argv)
    shapes = DRY if args.dry_run else FULL
    report = Report(args.out, args.budget_s)
    report.run("versions", versions)
    report.run("gemm_bf16", lambda: gemm_ceiling(shapes["gemm"]))
    report.run("correctness_bf16", lambda: correctness(shapes))
    report.run("attention_micro", lambda: attention_micro(shapes))
    for seq in shapes["contexts"]:
        report.run(f"end_to_end_{seq}", lambda seq=seq: end_to_end(shapes, seq))
    report.run("peer_cuda", lambda: peer(shapes))
    failed = [k for k, v in report.stages.items() if '"error"' in json.dumps(v, default=str)]
    print(f"gpu_check: {len(report.stages)} stages in {report.elapsed():.0f} s, failed: {failed or 'none'}; "
          f"{os.path.join(args.out, 'gpu_check.md')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
