"""Suite ``perplexity``: long documents in windows (stride = window), full attention against
every compression ratio the checkpoint supports, per dataset (method.md section 6).

Settings, layouts and targets are the in-training validation's (``train.evaluation``): the
predictions of positions j >= L (token j + 1) only, where compression changes what a token sees,
so every setting is scored on exactly the same targets. A compressing checkpoint is also scored
with no memory (``local``: each segment alone), and each ratio's row carries its memory efficacy
(``train.evaluation.memory_efficacy``) beside its perplexity, with a 95% bootstrap interval over
the windows (``gist_jax.evaluate.stats``, the resampling the study uses).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np

from gist_jax.evaluate import common, stats
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
        sums_by_setting = {}
        for setting in common.settings(ck, ratios, local=True):
            nll, _ = common.token_nll(ck, setting, tokens, batch)
            mask = np.broadcast_to(scored_M, nll.shape)
            rows.append({"checkpoint": ck.name, "dataset": dataset, "setting": setting.name,
                         "ratio": setting.ratio or 1, "ppl": perplexity(nll, mask), "tokens": int(mask.sum()),
                         "windows": int(tokens.shape[0]), "window": window})
            # Per window (same order for every setting), for bootstrap intervals over windows.
            sums_by_setting[setting.name] = np.where(mask, nll.astype(np.float64), 0.0).sum(axis=1)
            per_window.append({"dataset": dataset, "setting": setting.name, "tokens": mask.sum(axis=1),
                               "nll_sum": sums_by_setting[setting.name]})
        _add_efficacy(rows, sums_by_setting, dataset)
    _plot(rows, out_dir / "perplexity_vs_ratio.png")
    return common.write_results(out_dir, "perplexity", rows, {"per_window": per_window})


def _add_efficacy(rows: list[dict], sums_by_setting: dict[str, np.ndarray], dataset: str) -> None:
    """Each compressed row of ``dataset`` gains ``efficacy`` and its 95% interval
    (``efficacy_lo``, ``efficacy_hi``), from the per-window NLL sums of full, local and that
    ratio, the windows resampled together for the three."""
    if "local" not in sums_by_setting:
        return
    for row in rows:
        name = row["setting"]
        if row["dataset"] != dataset or name in ("full", "local"):
            continue
        e = stats.efficacy(sums_by_setting["local"], sums_by_setting[name], sums_by_setting["full"])
        # None (JSON null, an empty CSV cell) where full attention does not beat no memory.
        row.update({k: None if math.isnan(v) else v for k, v in
                    (("efficacy", e.value), ("efficacy_lo", e.lo), ("efficacy_hi", e.hi))})


def _plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == dataset]
        comp = [r for r in sub if r["setting"] not in ("full", "local")]
        line = ax.plot([r["ratio"] for r in comp], [r["ppl"] for r in comp], "o-", label=f"{dataset} compressed")
        full = [r["ppl"] for r in sub if r["setting"] == "full"]
        if full:
            ax.axhline(full[0], ls="--", color=line[0].get_color() if comp else None, label=f"{dataset} full")
        local = [r["ppl"] for r in sub if r["setting"] == "local"]
        if local:
            ax.axhline(local[0], ls=":", color=line[0].get_color(), label=f"{dataset} no memory")
    # A full-attention checkpoint has no ratio axis to log-scale.
    if any(r["setting"] not in ("full", "local") for r in rows):
        ax.set_xscale("log", base=2)
    common.save_figure(fig, ax, "compression ratio", "perplexity", path)
