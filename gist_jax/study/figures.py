"""The report's PNG figures (matplotlib, Agg). Every point carries its bootstrap interval: error
bars on bars and points, shaded bands on curves. Each function takes the ``numbers`` dicts and
returns the file it wrote."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from gist_jax.evaluate.stats import Estimate


def pyplot():
    """matplotlib on the Agg backend (files only); not evaluate.common's, which imports jax: a
    re-report loads no model and should not pay for one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    plt = pyplot()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _yerr(ests: Sequence[Estimate], scale: float = 1.0) -> np.ndarray:
    return np.array([[(e.value - e.lo) * scale for e in ests], [(e.hi - e.value) * scale for e in ests]])


def grouped_bars(path: pathlib.Path, groups: Sequence[str], series: dict[str, Sequence[Estimate | None]],
                 ylabel: str, title: str, label: Callable[[str], str] = str, scale: float = 1.0,
                 hline: tuple[str, Estimate] | None = None, log: bool = False,
                 ylim: tuple[float, float] | None = None) -> pathlib.Path:
    """Bars per group (x) and series (colour), with interval error bars; ``hline``: a reference
    value (e.g. full attention) with its band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) + 2), 3.6))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, ests) in enumerate(series.items()):
        keep = [j for j, e in enumerate(ests) if e is not None and np.isfinite(e.value)]
        if not keep:
            continue
        sel = [ests[j] for j in keep]
        ax.bar(x[keep] + (i - (len(series) - 1) / 2) * width, [e.value * scale for e in sel], width,
               yerr=_yerr(sel, scale), capsize=3, label=name)
    if hline is not None and np.isfinite(hline[1].value):
        name, e = hline
        ax.axhline(e.value * scale, color="k", ls="--", lw=1, label=name)
        ax.axhspan(e.lo * scale, e.hi * scale, color="k", alpha=0.1)
    ax.set_xticks(x, [label(g) for g in groups], rotation=20, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def curves(path: pathlib.Path, panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]],
           xlabel: str, ylabel: str) -> pathlib.Path:
    """One panel per key of ``panels`` (e.g. per ratio), one line with its band per inner key."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for name, (mean_L, lo_L, hi_L) in lines.items():
            x = np.arange(1, len(mean_L) + 1)
            line = ax.plot(x, mean_L, ls="--" if name.startswith("full") else "-", label=name)
            ax.fill_between(x, lo_L, hi_L, color=line[0].get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def lines_with_errors(path: pathlib.Path, panels: dict[str, dict[str, tuple[Sequence[float], Sequence[Estimate]]]],
                      xlabel: str, ylabel: str, scale: float = 1.0, log2x: bool = False,
                      ylim: tuple[float, float] | None = None) -> pathlib.Path:
    """One panel per key, one line per inner key through (x, estimate) points with error bars."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for name, (xs, ests) in lines.items():
            ax.errorbar(xs, [e.value * scale for e in ests], yerr=_yerr(ests, scale), marker="o", capsize=3,
                        ls="--" if name.startswith("full") else "-", label=name)
        if log2x:
            ax.set_xscale("log", base=2)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)
