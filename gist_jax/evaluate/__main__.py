"""python -m gist_jax.evaluate --checkpoint DIR --suite boundary[,perplexity,...|all] --out DIR [options]

    --checkpoint  a run's --workdir, its checkpoints/ dir or one <step> dir (newest step unless --step)
    --compare     several checkpoints side by side (instead of --checkpoint)
See docs/evaluation.md for every suite and option.
"""

from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run workdir, its checkpoints/ dir, or a <step> dir")
    src.add_argument("--compare", nargs="+", help="several checkpoints, evaluated side by side")
    p.add_argument("--suite", default="all", help="comma-separated: perplexity, boundary, surprise, uuid, recall, "
                                                  "reconstruction, or all")
    p.add_argument("--out", required=True, help="output directory for JSON, CSV and PNG files")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--datasets", type=_strs, default=("stdlib",), help="source specs: stdlib, files:<glob>, ...")
    p.add_argument("--split", default="validation")
    p.add_argument("--max_documents", type=int, default=0)
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: the run's seq_len)")
    p.add_argument("--num_windows", type=int, default=4)
    p.add_argument("--ratios", type=_ints, default=None, help="default: the ratios the checkpoint trained")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num_examples", type=int, default=8)
    p.add_argument("--context_tokens", type=int, default=None, help="probe contexts (default: seq_len)")
    p.add_argument("--recall_lengths", type=_ints, default=None)
    p.add_argument("--depths", type=_floats, default=(0.1, 0.5, 0.9))
    p.add_argument("--kinds", type=_strs, default=("passkey", "multikey_needle"))
    p.add_argument("--gen_tokens", type=int, default=None, help="boundary continuation tokens (default L/2)")
    p.add_argument("--context_segments", type=int, default=None,
                   help="boundary continuation context in segments (default window/L - 2)")
    p.add_argument("--edge", type=int, default=16, help="boundary: first-k vs last-k positions")
    p.add_argument("--probe_steps", type=int, default=200, help="reconstruction probe training steps")
    p.add_argument("--probe_lr", type=float, default=1e-3, help="reconstruction probe Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from gist_jax import evaluate
    from gist_jax.model.config import ConfigError

    options = {k: getattr(args, k) for k in ("datasets", "split", "max_documents", "window", "num_windows", "ratios",
                                             "batch", "num_examples", "context_tokens", "recall_lengths", "depths",
                                             "kinds", "gen_tokens", "context_segments", "edge", "probe_steps",
                                             "probe_lr", "seed")}
    try:
        if args.compare:
            evaluate.compare(args.compare, args.suite, args.out, **options)
        else:
            evaluate.run_suites(args.checkpoint, args.suite, args.out, step=args.step, **options)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
