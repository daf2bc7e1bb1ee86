"""``python -m gist_jax.bench``: the train step of a run config, timed; or a ``--sweep``, or ``--peer``.

Examples::

    python -m gist_jax.bench --peer                                          # built-in config vs PyTorch
    python -m gist_jax.bench --config.model.attention=decomposed --config.step.seq_len=4096
    python -m gist_jax.bench --compare                                       # dense/decomposed/flash/split
    python -m gist_jax.bench --sweep --contexts 1024 2048 4096 --plot sweep.png
    python -m gist_jax.bench --decode 256                                    # + decoding
    python -m gist_jax.bench --config.objective.tie=True --config.objective.ae=True --config.step.seq_len=8192 \
        --config.compression.segment_length=256
    python -m gist_jax.bench --config experiments/demo.py:tiny,coarse_kv --config.step.seq_len=2048
    python -m gist_jax.bench --config experiments/demo.py --config.objective.tie=True \
        --against objective.tie_source=precomputed --steps 3          # online vs precomputed TIE

The step is exactly the step of the run config (``bench/recipe.py``), read as ``gist_jax.main``
reads it (``gist_jax/cli_config.py``); without ``--config``, the built-in
``gist_jax/bench/default_config.py`` (random ``preset:tiny``, Fine-KV, 4096 tokens, L=512,
r=8, one device; its docstring lists the keys people change). Everything else is a benchmark
option, not run config. ``--compare`` times the config with each KV attention implementation;
``--sweep`` times ``--contexts`` x ``--variants`` (``step.seq_len`` and the architecture keys
of the default config's variants, changed on the resolved run). ``--peer`` alternates ours and
the PyTorch peer in one process and reports the median of the per-pair ratios
(``bench/peer_torch.py``); ``--against KEY=VALUE ...`` does the same with the run's step and the
step of the run with those keys changed (e.g. ``objective.tie_source=precomputed``: the step
without TIE's two reference forwards), so load on a shared machine hits both alike.
``--threads`` pins XLA's CPU threads (``XLA_FLAGS``, set before jax
starts its backend) and torch's (``torch.set_num_threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from gist_jax import cli_config
from gist_jax.bench.default_config import ARCHITECTURES
from gist_jax.bench.recipe import DEFAULT_CONFIG
from gist_jax.bench.train_bench import COMPARE, OursStep, StepSetup, format_result, step_result, time_steps

if TYPE_CHECKING:
    from gist_jax.train.experiment import RunConfig


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(options, ``--config.<key>=<value>`` overrides)."""
    p = argparse.ArgumentParser(prog="python -m gist_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_config.add_config_flag(p, default=DEFAULT_CONFIG, what="the step to time")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported); 0: compile only")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-flops", type=float, default=None,
                   help="device peak FLOP/s for MFU (default: flops.PEAK_FLOPS_PER_DEVICE; none on CPU)")
    p.add_argument("--compare", action="store_true",
                   help="run the KV variant with dense, decomposed, flash and split attention; print the "
                        "ratios to dense")
    p.add_argument("--sweep", action="store_true", help="sweep --contexts x --variants")
    p.add_argument("--contexts", type=int, nargs="*", default=[4096, 8192, 16384, 32768],
                   help="sweep: step.seq_len values")
    p.add_argument("--variants", nargs="*", default=["full", "fine_kv", "coarse_kv"], choices=sorted(ARCHITECTURES),
                   help="sweep: architectures (bench/default_config.py ARCHITECTURES)")
    p.add_argument("--plot", default="bench_sweep.png", help="sweep plot path (PNG)")
    p.add_argument("--peer", action="store_true",
                   help="also time the PyTorch transformers Llama peer (SDPA 4D mask, FlexAttention)")
    p.add_argument("--peer-flex", action="store_true", help="peer: also try FlexAttention + BlockMask")
    p.add_argument("--decode", type=int, default=0, metavar="K",
                   help="also time decoding K new tokens (multiple of 16) after a step.seq_len prompt "
                        "(gist_jax.inference), with cache bytes")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads for XLA (XLA_FLAGS, before jax starts) and torch (default: all)")
    p.add_argument("--against", nargs="+", default=None, metavar="KEY=VALUE",
                   help="also compile the run with these keys changed (e.g. objective.tie_source=precomputed) and "
                        "alternate the two steps; reports the median per-pair speed-up of that step over the run's")
    p.add_argument("--json", default=None, help="write all results as JSON here")
    return cli_config.parse_tool_args(p, argv)


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


def _setups(run, args: argparse.Namespace) -> list[StepSetup]:
    """The steps to time: the run's, or with ``--compare`` one per KV attention implementation."""
    from gist_jax.bench.recipe import changed, setup_from_run

    if not args.compare:
        return [setup_from_run(run)]
    # UniGist (compression.window > 0) has its dense reference and one structured path.
    impls = ("dense", "decomposed") if run.compression.windowed else COMPARE
    from gist_jax.model.kernels import with_gist_kernel

    return [setup_from_run(changed(run, {"model.attention": with_gist_kernel(run.model.attention, impl)}))
            for impl in impls]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, overrides = parse_args(argv)
    out: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else list(argv),
                           "xla_threads": pin_threads(args.threads)}
    from gist_jax.bench.recipe import load_run
    from gist_jax.errors import ConfigError

    try:
        run = load_run(args.config, overrides)
        setups = [] if args.sweep else _setups(run, args)
        other = _against(run, args.against) if args.against else None
    except (cli_config.CliConfigError, ConfigError) as e:
        cli_config.exit_config_error(e)
    if other is not None:
        out["against"] = compare_programs(setups[-1], other, max(args.steps, 1), args.warmup)
    elif args.sweep:
        from gist_jax.bench.sweep import run_sweep

        out["sweep"] = run_sweep(args, run)
    else:
        results = []
        last = None
        for setup in setups:
            last = OursStep(setup)
            r = step_result(last, time_steps(last, args.steps, args.warmup) if args.steps else [],
                            args.peak_flops)
            r.update(model=setup.name, argv=out["argv"], xla_threads=out["xla_threads"])
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

            out["decode"] = run_decode_bench(setups[-1], args.decode)
            print(format_decode(out["decode"]), flush=True)
        if args.peer:
            from gist_jax.bench.peer_torch import compare_alternating

            out["peer"] = compare_alternating(last, setups[-1], max(args.steps, 1), args.warmup,
                                              flex=args.peer_flex, threads=args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return out


def _against(run: RunConfig, pairs: list[str]) -> StepSetup:
    """The setup of ``run`` with ``KEY=VALUE`` pairs changed (values parsed as Python literals,
    else kept as strings), validated like any run config."""
    import ast

    from gist_jax.bench.recipe import changed, setup_from_run
    from gist_jax.errors import ConfigError

    keys: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key.count(".") != 1:
            raise ConfigError(f"--against {pair!r}: give <section>.<key>=<value>, "
                              "e.g. objective.tie_source=precomputed")
        try:
            keys[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            keys[key] = value
    try:
        other = changed(run, keys)
    except KeyError as e:
        raise ConfigError(f"--against: no config key {e}") from None
    return setup_from_run(other, f"{run.name} with {' '.join(pairs)}")


def compare_programs(base: StepSetup, other: StepSetup, repeats: int, warmup: int) -> dict[str, Any]:
    """Both steps compiled in this process, then timed alternately (A B A B ...); the speed-up is
    the median over pairs of base seconds / other seconds, with its spread and the load average
    before and after (a shared machine's load moves both programs of a pair alike)."""
    import statistics

    from gist_jax.bench.peer_torch import alternate, pair_ratios
    from gist_jax.bench.train_bench import environment

    a, b = OursStep(base), OursStep(other)
    load_before = list(os.getloadavg())
    base_s, other_s = alternate(a, b, repeats, warmup)  # the peer comparison's A B A B loop
    ratio = pair_ratios(other_s, base_s)  # per pair: base seconds / other seconds
    r = {"base": base.name, "other": other.name, "repeats": repeats, "warmup": warmup, "base_step_s": base_s,
         "other_step_s": other_s, "base_compile_s": a.compile_s, "other_compile_s": b.compile_s,
         "speedup": ratio["median"], "ratio": ratio, "loadavg_before": load_before,
         "loadavg_after": list(os.getloadavg()), **environment()}
    print(f"{base.name}: step median {statistics.median(base_s):.3f} s; {other.name}: "
          f"{statistics.median(other_s):.3f} s; speed-up (base / other, per pair) median {ratio['median']:.3f}x "
          f"(IQR {ratio['q1']:.3f}-{ratio['q3']:.3f}, min {ratio['min']:.3f}, max {ratio['max']:.3f}, "
          f"{repeats} pairs after {warmup} warm-up); [{r['platform']}: {r['device']}], load "
          f"{load_before[0]:.2f} -> {r['loadavg_after'][0]:.2f}", flush=True)
    return r


def _ratio(a: int | None, b: int | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.3f}x"


def run() -> None:
    """The console script ``gist-bench`` (``main`` returns the results for callers in Python)."""
    main()


if __name__ == "__main__":
    run()
