"""Markdown pieces the study's report and its sections share: run labels, ``value [lo, hi]``
cells and tables (one place, so every section prints a number the same way)."""

from __future__ import annotations

from collections.abc import Sequence

from gist_jax.evaluate.stats import Estimate

LABELS = {"full": "Full attention", "fine_kv": "Fine-KV", "coarse_kv": "Coarse-KV", "coarse_rec": "Coarse-Rec",
          "fine_kv_ae": "Fine-KV + AE", "fine_kv_tie": "Fine-KV + TIE", "fine_kv_ae_tie": "Fine-KV + AE + TIE",
          "unigist": "UniGist"}


def label(run: str) -> str:
    return LABELS.get(run, run)


def cell(e: Estimate | None, percent: bool = False, digits: int = 3) -> str:
    return "n/a" if e is None else e.fmt(digits, percent=percent)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
