"""``--sweep``: training-step throughput over context lengths x variants, a table and a plot.

Each point is the resolved run config with ``step.seq_len`` and the architecture keys of a
variant changed (``bench/default_config.py`` ``ARCHITECTURES``; ``recipe.changed`` validates
the result like any run config), timed by ``run_setup_bench`` in this process (compiled
memory analysis is per step, so points do not contaminate each other's peak; process RSS
does). A point that fails (out of memory at a long context with the dense path, for example)
is recorded with its error and the sweep goes on, so one impossible cell does not lose the
table.
"""

from __future__ import annotations

import argparse
from typing import Any

from gist_jax.bench.default_config import ARCHITECTURES
from gist_jax.bench.train_bench import format_result, run_setup_bench


def point_keys(seq: int, variant: str) -> dict[str, Any]:
    """The run-config keys one sweep point changes."""
    return {"step.seq_len": seq, **ARCHITECTURES[variant]}


def run_sweep(args: argparse.Namespace, run) -> list[dict[str, Any]]:
    from gist_jax.bench.recipe import changed, setup_from_run

    rows: list[dict[str, Any]] = []
    for seq in args.contexts:
        for variant in args.variants:
            try:
                setup = setup_from_run(changed(run, point_keys(seq, variant)), run.name)
                r = run_setup_bench(setup, args.steps, args.warmup, args.peak_flops)
                r["variant"] = variant
                print(format_result(r), flush=True)
            except Exception as e:  # noqa: BLE001 - a failed point is data, not a crash
                r = {"variant": variant, "seq": seq, "attention": run.model.attention,
                     "error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(f"{variant} seq={seq}: FAILED {r['error']}", flush=True)
            rows.append(r)
    print(format_table(rows, args.variants, args.contexts))
    if args.plot:
        comp = run.compression
        write_plot(rows, args.variants, args.plot,
                   title=f"{run.name}: train-step tokens/s (attention={run.model.attention}, "
                         f"L={comp.segment_length}, r={comp.ratios})")
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
