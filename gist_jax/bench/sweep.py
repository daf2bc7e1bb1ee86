"""``--sweep``: training-step throughput over context lengths x variants, a table and a plot.

Each point is one ``run_train_bench`` in this process (compiled memory analysis is per step,
so points do not contaminate each other's peak; process RSS does). A point that fails (out of
memory at a long context with the dense path, for example) is recorded with its error and the
sweep goes on, so one impossible cell does not lose the table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from gist_jax.bench.train_bench import BenchSpec, format_result, run_train_bench


def run_sweep(args: argparse.Namespace, make_spec: Callable[..., BenchSpec]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for seq in args.contexts:
        for variant in args.variants:
            spec = make_spec(args, seq=seq, variant=variant)
            try:
                r = run_train_bench(spec, args.peak_flops)
                print(format_result(r), flush=True)
            except Exception as e:  # noqa: BLE001 - a failed point is data, not a crash
                r = {"variant": variant, "seq": seq, "attention": spec.attention_used,
                     "error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(f"{variant} seq={seq}: FAILED {r['error']}", flush=True)
            rows.append(r)
    print(format_table(rows, args.variants, args.contexts))
    if args.plot:
        write_plot(rows, args.variants, args.plot,
                   title=f"{args.model}: train-step tokens/s (attention={args.attention}, "
                         f"L={args.segment}, r={args.ratio})")
        print(f"plot: {args.plot}")
    return rows


def _cell(rows: list[dict[str, Any]], variant: str, seq: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["variant"] == variant and r["seq"] == seq), None)


def format_table(rows: list[dict[str, Any]], variants: list[str], contexts: list[int]) -> str:
    """Markdown table: one row per context, tokens/s and peak MiB per variant."""
    head = "| context | " + " | ".join(f"{v} tok/s | {v} peak MiB" for v in variants) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(variants))]
    for seq in contexts:
        cells = []
        for v in variants:
            r = _cell(rows, v, seq)
            if r is None or "error" in r:
                cells += ["failed", "-"]
            else:
                peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:,.0f}"
                cells += [f"{r['tokens_per_s']:,.0f}", peak]
        lines.append(f"| {seq:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(rows: list[dict[str, Any]], variants: list[str], path: str, title: str = "") -> None:
    """tokens/s vs context, one line per variant (log-2 x axis). matplotlib, Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for v in variants:
        pts = sorted((r["seq"], r["tokens_per_s"]) for r in rows if r["variant"] == v and "error" not in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (raw tokens)")
    ax.set_ylabel("train-step tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
