"""Suite ``perplexity``: long documents in windows (stride = window), full attention against
every compression ratio the checkpoint supports, per dataset (method.md section 6).

Settings, layouts and targets are the in-training validation's (``train.evaluation``): the
predictions of positions j >= L (token j + 1) only, where compression changes what a token sees,
so every setting is scored on exactly the same targets.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from gist_jax.evaluate import common
from gist_jax.evaluate.metrics import perplexity
from gist_jax.train.evaluation import scored_positions


def run(ck: common.Checkpoint, out_dir: pathlib.Path, *, datasets: tuple[str, ...] = ("stdlib",),
        split: str = "validation", window: int | None = None, num_windows: int = 4,
        max_documents: int = 0, ratios=None, batch: int = 4, **_: Any) -> dict:
    window = window or ck.seq_len
    scored_M = scored_positions(ck.comp, window)  # the checkpoint's rule, for every setting
    rows, per_window = [], []
    for dataset in datasets:
        texts = common.documents(dataset, split, ck.tokenizer_spec, max_documents)
        tokens = common.windows(ck, texts, window, num_windows)
        for setting in common.settings(ck, ratios):
            nll, _ = common.token_nll(ck, setting, tokens, batch)
            mask = np.broadcast_to(scored_M, nll.shape)
            rows.append({"checkpoint": ck.name, "dataset": dataset, "setting": setting.name,
                         "ratio": setting.ratio or 1, "ppl": perplexity(nll, mask), "tokens": int(mask.sum()),
                         "windows": int(tokens.shape[0]), "window": window})
            # Per window (same order for every setting), for bootstrap intervals over windows.
            per_window.append({"dataset": dataset, "setting": setting.name, "tokens": mask.sum(axis=1),
                               "nll_sum": np.where(mask, nll.astype(np.float64), 0.0).sum(axis=1)})
    _plot(rows, out_dir / "perplexity_vs_ratio.png")
    return common.write_results(out_dir, "perplexity", rows, {"per_window": per_window})


def _plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == dataset]
        comp = [r for r in sub if r["setting"] != "full"]
        line = ax.plot([r["ratio"] for r in comp], [r["ppl"] for r in comp], "o-", label=f"{dataset} compressed")
        full = [r["ppl"] for r in sub if r["setting"] == "full"]
        if full:
            ax.axhline(full[0], ls="--", color=line[0].get_color() if comp else None, label=f"{dataset} full")
    if any(r["setting"] != "full" for r in rows):  # a full-attention checkpoint has no ratio axis to log-scale
        ax.set_xscale("log", base=2)
    common.save_figure(fig, ax, "compression ratio", "perplexity", path)
