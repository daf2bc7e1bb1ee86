"""``python -m gist_jax.bench``: one train-step benchmark, a ``--sweep``, or ``--peer``.

Examples::

    python -m gist_jax.bench --model tiny --seq 4096 --variant fine_kv --ratio 8 --attention decomposed
    python -m gist_jax.bench --model tiny --seq 4096 --variant fine_kv --compare   # dense/decomposed/flash/split
    python -m gist_jax.bench --model tiny --sweep --contexts 1024 2048 4096 --plot sweep.png
    python -m gist_jax.bench --model tiny --seq 2048 --variant fine_kv --peer       # vs PyTorch
    python -m gist_jax.bench --model tiny --seq 4096 --variant fine_kv --decode 256  # + decoding
    python -m gist_jax.bench --model tiny --seq 8192 --segment 256 --variant fine_kv --tie --ae
    python -m gist_jax.bench --config experiments/demo.py:tiny,coarse_kv --config.step.seq_len=2048

``--config`` benchmarks exactly the step of a run config (``bench/recipe.py``); the flags that
describe a step (model, seq, variant, ...) are then ignored, ``--steps``/``--peer`` still apply.
``--peer`` alternates ours and the PyTorch peer in one process and reports the median of the
per-pair ratios (``bench/peer_torch.py``). ``--threads`` pins XLA's CPU threads (``XLA_FLAGS``,
set before jax starts its backend) and torch's (``torch.set_num_threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from gist_jax.bench.train_bench import (
    ATTENTION,
    CAUSAL,
    COMPARE,
    TRAINABLE,
    VARIANTS,
    BenchSpec,
    OursStep,
    StepSetup,
    format_result,
    step_result,
    time_steps,
)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(flags, ``--config.<key>=<value>`` overrides)."""
    p = argparse.ArgumentParser(prog="python -m gist_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="model preset (gist_jax.model.config.PRESETS)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                   help="integer model overrides, e.g. num_layers=4 hidden_size=256")
    p.add_argument("--seq", type=int, default=4096, help="raw tokens per sequence")
    p.add_argument("--variant", default="fine_kv", choices=sorted(VARIANTS))
    p.add_argument("--ratio", type=int, default=8)
    p.add_argument("--attention", default="auto", choices=ATTENTION,
                   help="KV variants' attention implementation (auto: flash on GPU, decomposed elsewhere)")
    p.add_argument("--segment", type=int, default=512, help="segment length L")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--positions", default="compressed", choices=("compressed", "aligned"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--remat", default="none", help="model.remat_policy")
    p.add_argument("--dtype", default=None, help="compute dtype override (e.g. bfloat16)")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="device peak FLOP/s for MFU (default: flops.PEAK_FLOPS_PER_DEVICE; none on CPU)")
    p.add_argument("--compare", action="store_true",
                   help="run the KV variant with dense, decomposed, flash and split attention; print the "
                        "ratios to dense")
    p.add_argument("--sweep", action="store_true", help="sweep --contexts x --variants")
    p.add_argument("--contexts", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    p.add_argument("--variants", nargs="*", default=["full", "fine_kv", "coarse_kv"],
                   choices=sorted(VARIANTS))
    p.add_argument("--plot", default="bench_sweep.png", help="sweep plot path (PNG)")
    p.add_argument("--peer", action="store_true",
                   help="also time the PyTorch transformers Llama peer (SDPA 4D mask, FlexAttention)")
    p.add_argument("--peer-flex", action="store_true", help="peer: also try FlexAttention + BlockMask")
    p.add_argument("--decode", type=int, default=0, metavar="K",
                   help="also time decoding K new tokens (multiple of 16) after a --seq prompt "
                        "(gist_jax.inference), with cache bytes")
    p.add_argument("--tie", action="store_true", help="online TIE (two frozen reference passes)")
    p.add_argument("--ae", action="store_true", help="autoencoding objective (lambda 1)")
    p.add_argument("--trainable", default="all", choices=TRAINABLE, help="compression.trainable")
    p.add_argument("--bptt", type=int, default=0, help="compression.bptt_segments (Coarse-Rec truncation)")
    p.add_argument("--causal", default="auto", choices=CAUSAL,
                   help="model.attention_impl: kernel of the passes without gists (full attention, TIE)")
    p.add_argument("--config", default=None, metavar="FILE.py[:VARIANTS]",
                   help="benchmark the step of this run config; --config.<key>=<value> overrides follow")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads for XLA (XLA_FLAGS, before jax starts) and torch (default: all)")
    p.add_argument("--json", default=None, help="write all results as JSON here")
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith(("--config.", "-config."))]
    if len(overrides) != len(rest) or (overrides and not args.config):
        p.error(f"unrecognized arguments: {' '.join(a for a in rest if a not in overrides) or ' '.join(rest)}"
                + ("" if args.config else " (--config.<key> overrides need --config)"))
    return args, overrides


def pin_threads(threads: int | None) -> str:
    """Ask XLA's CPU backend for ``threads`` intra-op threads; only possible before jax starts
    its backend (later, the running backend keeps its pool: say so instead)."""
    from jax._src import xla_bridge

    if not threads:
        return "not pinned"
    if xla_bridge.backends_are_initialized():
        return "not pinned: jax backend already started in this process"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith(("--xla_cpu_multi_thread_eigen", "intra_op_parallelism_threads"))]
    flags += ["--xla_cpu_multi_thread_eigen=true", f"intra_op_parallelism_threads={threads}"]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return f"intra_op_parallelism_threads={threads}"


def spec_from_args(args: argparse.Namespace, **changes: Any) -> BenchSpec:
    overrides = tuple((k, int(v)) for k, v in (kv.split("=", 1) for kv in args.set))
    fields = dict(model=args.model, seq=args.seq, variant=args.variant, ratio=args.ratio,
                  attention=args.attention, segment=args.segment, sinks=args.sinks,
                  positions=args.positions, batch=args.batch, steps=args.steps,
                  warmup=args.warmup, remat=args.remat, dtype=args.dtype, overrides=overrides,
                  tie=args.tie, ae=args.ae, trainable=args.trainable, bptt=args.bptt, causal=args.causal)
    fields.update(changes)
    return BenchSpec(**fields)


def _setups(args: argparse.Namespace, overrides: list[str]) -> tuple[list[StepSetup], list[str]]:
    """The steps to time and, per step, the name its result is filed under."""
    if args.config:
        from gist_jax.bench.recipe import setup_from_config

        return [setup_from_config(args.config, overrides)], [args.config]
    impls = COMPARE if args.compare else (args.attention,)
    return [spec_from_args(args, attention=impl).setup() for impl in impls], [args.model] * len(impls)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, overrides = parse_args(argv)
    out: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else list(argv),
                           "xla_threads": pin_threads(args.threads)}
    if args.sweep:
        from gist_jax.bench.sweep import run_sweep

        out["sweep"] = run_sweep(args, spec_from_args)
    else:
        results = []
        setups, names = _setups(args, overrides)
        last = None
        for setup, name in zip(setups, names):
            last = OursStep(setup)
            r = step_result(last, time_steps(last, args.steps, args.warmup) if args.steps else [],
                            args.peak_flops)
            r.update(model=name, argv=out["argv"], xla_threads=out["xla_threads"])
            print(format_result(r), flush=True)
            results.append(r)
        out["results"] = results
        if args.compare:
            dense = results[0]
            for r in results[1:]:
                impl = r["attention"]
                out[f"{impl}_over_dense"] = r["tokens_per_s"] / dense["tokens_per_s"]
                print(f"{impl} / dense tokens/s: {out[f'{impl}_over_dense']:.2f}x; "
                      f"peak memory {_ratio(r['peak_bytes'], dense['peak_bytes'])}")
        if args.decode:
            from gist_jax.bench.decode_bench import format_decode, run_decode_bench

            out["decode"] = run_decode_bench(spec_from_args(args), args.decode)
            print(format_decode(out["decode"]), flush=True)
        if args.peer:
            from gist_jax.bench.peer_torch import compare_alternating

            out["peer"] = compare_alternating(last, setups[-1], max(args.steps, 1), args.warmup,
                                              flex=args.peer_flex, threads=args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return out


def _ratio(a: int | None, b: int | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.3f}x"


if __name__ == "__main__":
    main()
