"""``python -m gist_jax.bench``: one train-step benchmark, a ``--sweep``, or ``--peer``.

Examples::

    python -m gist_jax.bench --model tiny --seq 4096 --variant fine_kv --ratio 8 --attention decomposed
    python -m gist_jax.bench --model tiny --seq 4096 --variant fine_kv --compare   # dense/decomposed/flash
    python -m gist_jax.bench --model tiny --sweep --contexts 1024 2048 4096 --plot sweep.png
    python -m gist_jax.bench --model tiny --seq 2048 --variant fine_kv --peer       # vs PyTorch
    python -m gist_jax.bench --model tiny --seq 4096 --variant fine_kv --decode 256  # + decoding
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gist_jax.bench.train_bench import ATTENTION, COMPARE, VARIANTS, BenchSpec, format_result, run_train_bench


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
                   help="run the KV variant with dense, decomposed and flash attention; print the "
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
    p.add_argument("--json", default=None, help="write all results as JSON here")
    return p.parse_args(argv)


def spec_from_args(args: argparse.Namespace, **changes: Any) -> BenchSpec:
    overrides = tuple((k, int(v)) for k, v in (kv.split("=", 1) for kv in args.set))
    fields = dict(model=args.model, seq=args.seq, variant=args.variant, ratio=args.ratio,
                  attention=args.attention, segment=args.segment, sinks=args.sinks,
                  positions=args.positions, batch=args.batch, steps=args.steps,
                  warmup=args.warmup, remat=args.remat, dtype=args.dtype, overrides=overrides)
    fields.update(changes)
    return BenchSpec(**fields)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else list(argv)}
    if args.sweep:
        from gist_jax.bench.sweep import run_sweep

        out["sweep"] = run_sweep(args, spec_from_args)
    else:
        results = []
        impls = COMPARE if args.compare else (args.attention,)
        for impl in impls:
            r = run_train_bench(spec_from_args(args, attention=impl), args.peak_flops)
            print(format_result(r), flush=True)
            results.append(r)
        out["results"] = results
        if args.compare:
            dense = results[0]
            for impl, r in zip(impls[1:], results[1:]):
                out[f"{impl}_over_dense"] = r["tokens_per_s"] / dense["tokens_per_s"]
                print(f"{impl} ({r['attention']}) / dense tokens/s: {out[f'{impl}_over_dense']:.2f}x; "
                      f"peak memory {_ratio(r['peak_bytes'], dense['peak_bytes'])}")
        if args.decode:
            from gist_jax.bench.decode_bench import format_decode, run_decode_bench

            out["decode"] = run_decode_bench(spec_from_args(args), args.decode)
            print(format_decode(out["decode"]), flush=True)
        if args.peer:
            from gist_jax.bench.peer_torch import run_peer

            out["peer"] = run_peer(spec_from_args(args), ours=results[-1], flex=args.peer_flex)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return out


def _ratio(a: int | None, b: int | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.3f}x"


if __name__ == "__main__":
    main()
