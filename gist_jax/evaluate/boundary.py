"""Suite ``boundary`` ("lost by the boundary", method.md section 6).

1. Mean loss by position inside a segment (1-based, first segment skipped) for full attention
   and each ratio, on the same windows; log2 position buckets; the first-k vs last-k gap
   (k = 16, or L / 2 when segments are shorter than 32).
2. Continuation starting exactly at a segment boundary vs mid-segment: the same ``gen_tokens``
   reference tokens are scored after a context truncated to the last ``k`` tokens, with
   ``k = m * L`` (the continuation opens a fresh segment: everything before it is compressed)
   or ``k = m * L + L / 2`` (half a segment of raw context is still visible). Scored by teacher
   forcing: mean NLL and greedy (argmax) next-token accuracy of the continuation.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from gist_jax.errors import ConfigError
from gist_jax.evaluate import common
from gist_jax.evaluate.metrics import bucket_means, edge_gap, log_buckets, loss_by_position
from gist_jax.utils.progress import progress


def run(ck: common.Checkpoint, out_dir: pathlib.Path, *, datasets: tuple[str, ...] = ("stdlib",),
        split: str = "validation", window: int | None = None, num_windows: int = 4, max_documents: int = 0,
        ratios=None, batch: int = 4, edge: int = 16, gen_tokens: int | None = None,
        context_segments: int | None = None, **_: Any) -> dict:
    if not ck.comp.enabled:
        raise ConfigError(f"{ck.step_dir} is a full-attention checkpoint (compression.memory='none'); "
                                 "the boundary suite needs a compressed one")
    L = ck.comp.segment_length
    window = window or ck.seq_len
    texts = common.documents(datasets[0], split, ck.tokenizer_spec, max_documents)
    tokens = common.windows(ck, texts, window, num_windows)
    buckets = log_buckets(L)
    rows, curves, gen_rows = [], {}, []
    window_curves, window_continuation = {}, []  # per window, for bootstrap intervals over windows
    # Continuation probe: context of m * L (+ L / 2) tokens before a fixed start.
    m = context_segments or max(1, window // L - 2)
    gen = gen_tokens or L // 2
    start = m * L + L // 2
    if start + gen > window:
        raise ConfigError(f"--config.step.seq_len={window} (the window) is too short for a {m}-segment "
                                 "context plus half a segment "
                                 f"and {gen} continuation tokens; lower --context-segments or --gen-tokens")
    settings = common.settings(ck, ratios)
    # Three scoring passes per setting: the windows, then the two continuation contexts.
    bar = progress(desc="boundary", total=3 * len(settings), unit="pass")
    for setting in settings:
        nll, _ = common.token_nll(ck, setting, tokens, batch)
        bar.update()
        curve = loss_by_position(nll, L)
        curves[setting.name] = curve
        window_curves[setting.name] = [loss_by_position(nll[i:i + 1], L) for i in range(len(nll))]
        first, last, gap = edge_gap(curve, edge)
        row = {"checkpoint": ck.name, "setting": setting.name, "ratio": setting.ratio or 1,
               f"first{min(edge, L // 2)}": first, f"last{min(edge, L // 2)}": last, "gap": gap}
        row.update({f"pos{lo}-{hi}": v for (lo, hi), v in zip(buckets, bucket_means(curve, buckets))})
        rows.append(row)
        for kind, k in (("boundary", m * L), ("mid_segment", m * L + L // 2)):
            ctx = tokens[:, start - k:start + gen]
            g_nll, g_ok = common.token_nll(ck, setting, ctx, batch)
            bar.update()
            gen_rows.append({"checkpoint": ck.name, "setting": setting.name, "ratio": setting.ratio or 1,
                             "start": kind, "context_tokens": k, "continuation_nll": float(g_nll[:, k - 1:].mean()),
                             "continuation_accuracy": float(g_ok[:, k - 1:].mean())})
            window_continuation.append({"setting": setting.name, "start": kind, "nll": g_nll[:, k - 1:].mean(axis=1),
                                        "accuracy": g_ok[:, k - 1:].mean(axis=1)})
    bar.close()
    _plot(curves, L, out_dir / "boundary_loss_by_position.png")
    extra = {"loss_by_position": {k: v.tolist() for k, v in curves.items()}, "continuation": gen_rows,
             "buckets": buckets, "segment_length": L, "windows": int(tokens.shape[0]), "window": window,
             "loss_by_position_per_window": window_curves, "continuation_per_window": window_continuation}
    payload = common.write_results(out_dir, "boundary", rows, extra)
    common.write_results(out_dir, "boundary_continuation", gen_rows)
    return payload


def _plot(curves: dict[str, np.ndarray], L: int, path: pathlib.Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = np.arange(1, L + 1)
    for name, curve in curves.items():
        ax.plot(x, curve, label=name, ls="--" if name == "full" else "-")
    ax.set_xscale("log", base=2)
    common.save_figure(fig, ax, "position inside segment (first segment skipped)", "mean loss", path)
