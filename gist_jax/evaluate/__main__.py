"""python -m gist_jax.evaluate --checkpoint DIR --suite boundary[,perplexity,...|all] --out DIR [options]
    [--config.compression.ratios='(4,8)'] [--config.step.seq_len=N]

    --checkpoint  a run's --workdir, its checkpoints/ dir or one <step> dir (newest step unless --step)
    --compare     several checkpoints side by side (instead of --checkpoint)
The run config is the one stored with the checkpoint (``gist_jax/cli_config.py``); of it, the
ratios to evaluate (default: the ratios the run trained) and the window length (default: the
run's ``step.seq_len``) may be overridden. See docs/evaluation.md for every suite and option.
"""

from __future__ import annotations

import argparse
import sys

from gist_jax import cli_config

# Run-config keys an evaluation may change: what is evaluated, never what was trained.
OVERRIDABLE = ("compression.ratios", "step.seq_len")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gist_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run workdir, its checkpoints/ dir, or a <step> dir")
    src.add_argument("--compare", nargs="+", help="several checkpoints, evaluated side by side")
    p.add_argument("--suite", default="all", help="comma-separated: perplexity, boundary, surprise, uuid, recall, "
                                                  "reconstruction, ruler, kvpress, ruler_press; all: the first six")
    p.add_argument("--out", required=True, help="output directory for JSON, CSV and PNG files")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--datasets", type=_strs, default=("stdlib",), help="source specs: stdlib, files:<glob>, ...")
    p.add_argument("--split", default="validation")
    p.add_argument(*cli_config.option("max_documents"), dest="max_documents", type=int, default=0)
    p.add_argument(*cli_config.option("num_windows"), dest="num_windows", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(*cli_config.option("num_examples"), dest="num_examples", type=int, default=8)
    p.add_argument(*cli_config.option("context_tokens"), dest="context_tokens", type=int, default=None,
                   help="probe contexts (default: seq_len)")
    p.add_argument(*cli_config.option("recall_lengths"), dest="recall_lengths", type=_ints, default=None)
    p.add_argument("--depths", type=_floats, default=(0.1, 0.5, 0.9))
    p.add_argument("--kinds", type=_strs, default=("passkey", "multikey_needle"))
    p.add_argument(*cli_config.option("gen_tokens"), dest="gen_tokens", type=int, default=None,
                   help="boundary continuation tokens (default L/2)")
    p.add_argument(*cli_config.option("context_segments"), dest="context_segments", type=int, default=None,
                   help="boundary continuation context in segments (default window/L - 2)")
    p.add_argument("--edge", type=int, default=16, help="boundary: first-k vs last-k positions")
    p.add_argument(*cli_config.option("probe_steps"), dest="probe_steps", type=int, default=200,
                   help="reconstruction probe training steps")
    p.add_argument(*cli_config.option("probe_lr"), dest="probe_lr", type=float, default=1e-3,
                   help="reconstruction probe Adam learning rate")
    p.add_argument("--ruler_lengths", type=_ints, default=(1024, 4096), help="ruler: context lengths in tokens")
    p.add_argument("--ruler_tasks", type=_strs, default=None, help="ruler: task names (default: all)")
    p.add_argument("--presses", type=_strs, default=None, help="kvpress: press names (default: the four it compares)")
    p.add_argument("--ruler_presses", type=_strs, default=None,
                   help="ruler_press: press names (default: streaming_llm, expected_attention)")
    p.add_argument("--seed", type=int, default=0)
    cli_config.add_checkpoint_overrides(p, OVERRIDABLE)
    args, overrides = cli_config.parse_tool_args(p, argv)
    try:
        window, ratios = _overridden(args, overrides)
    except (cli_config.CliConfigError, ValueError, FileNotFoundError) as e:  # ValueError: ConfigError too
        print(f"config error: {e}", file=sys.stderr)
        return 2
    args.window, args.ratios = window, ratios
    from gist_jax import evaluate
    from gist_jax.errors import ConfigError

    options = {k: getattr(args, k) for k in ("datasets", "split", "max_documents", "window", "num_windows", "ratios",
                                             "batch", "num_examples", "context_tokens", "recall_lengths", "depths",
                                             "kinds", "gen_tokens", "context_segments", "edge", "probe_steps",
                                             "probe_lr", "ruler_lengths", "ruler_tasks", "presses", "ruler_presses",
                                             "seed")}
    try:
        if args.compare:
            evaluate.compare(args.compare, args.suite, args.out, **options)
        else:
            evaluate.run_suites(args.checkpoint, args.suite, args.out, step=args.step, **options)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _overridden(args: argparse.Namespace, overrides: list[str]) -> tuple[int | None, tuple[int, ...] | None]:
    """(window, ratios) from ``--config.step.seq_len`` / ``--config.compression.ratios``, parsed
    and validated against the (first) checkpoint's stored run; None where not overridden."""
    if not overrides:
        return None, None
    checkpoint = args.checkpoint or args.compare[0]
    run = cli_config.checkpoint_run(cli_config.stored_run(checkpoint, args.step), overrides, OVERRIDABLE)
    keys = cli_config.override_keys(overrides)
    window = int(run["step"]["seq_len"]) if "step.seq_len" in keys else None
    ratios = tuple(int(r) for r in run["compression"]["ratios"]) if "compression.ratios" in keys else None
    return window, ratios


if __name__ == "__main__":
    sys.exit(main())
