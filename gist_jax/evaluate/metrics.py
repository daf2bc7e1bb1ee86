"""Pure metric functions (numpy in, numbers out), checked against hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gist_jax.data.synthetic import score_exact, score_uuid_prefixes  # noqa: F401 (re-exported)


def perplexity(nll: np.ndarray, mask: np.ndarray | None = None) -> float:
    """exp(mean NLL) over the masked tokens; NaN when none."""
    nll = np.asarray(nll, np.float64)
    mask = np.ones(nll.shape, bool) if mask is None else np.asarray(mask, bool)
    count = mask.sum()
    return float(math.exp(nll[mask].sum() / count)) if count else float("nan")


def target_positions_in_segment(num_targets: int, segment_length: int) -> tuple[np.ndarray, np.ndarray]:
    """For target token j + 1 (predicted from token j, j = 0..num_targets-1): its segment and
    its 1-based position inside that segment. Raw token index p sits in segment p // L at
    position p % L + 1."""
    p = np.arange(1, num_targets + 1)
    return p // segment_length, p % segment_length + 1


def log_buckets(segment_length: int) -> list[tuple[int, int]]:
    """Position buckets [lo, hi] on a log2 scale: 1, 2-3, 4-7, 8-15, ..., up to L."""
    out, lo = [], 1
    while lo <= segment_length:
        hi = min(2 * lo - 1, segment_length)
        out.append((lo, hi))
        lo *= 2
    return out


def loss_by_position(nll_BxT: np.ndarray, segment_length: int, skip_first_segment: bool = True) -> np.ndarray:
    """Mean NLL per 1-based target position inside a segment ``[L]`` (NaN where no target);
    the first segment is skipped by default (it has no compressed context)."""
    seg, pos = target_positions_in_segment(nll_BxT.shape[1], segment_length)
    keep = seg >= 1 if skip_first_segment else np.ones_like(seg, bool)
    sums = np.zeros(segment_length)
    counts = np.zeros(segment_length)
    np.add.at(sums, pos[keep] - 1, np.asarray(nll_BxT, np.float64)[:, keep].sum(axis=0))
    np.add.at(counts, pos[keep] - 1, nll_BxT.shape[0])
    with np.errstate(invalid="ignore"):
        return sums / counts


def bucket_means(per_position: np.ndarray, buckets: Sequence[tuple[int, int]]) -> list[float]:
    """Unweighted mean of per-position values inside each [lo, hi] bucket (1-based)."""
    return [float(np.nanmean(per_position[lo - 1:hi])) for lo, hi in buckets]


def edge_gap(per_position: np.ndarray, k: int = 16) -> tuple[float, float, float]:
    """(mean of the first k positions, mean of the last k, first - last): the paper's "lost by
    the boundary" is first > last for compressed models and no gap for full attention."""
    k = min(k, len(per_position) // 2)
    first, last = float(np.nanmean(per_position[:k])), float(np.nanmean(per_position[-k:]))
    return first, last, first - last


def mean_prefix_scores(predictions: Sequence[str], uuids: Sequence[str],
                       prefixes: Sequence[int] = (8, 16, 32)) -> dict[int, float]:
    """Exact match of the first 8 / 16 / 32 characters, averaged over examples."""
    if not predictions:
        return {int(p): float("nan") for p in prefixes}
    scores = [score_uuid_prefixes(pred, uuid, prefixes) for pred, uuid in zip(predictions, uuids)]
    return {int(p): float(np.mean([s[p] for s in scores])) for p in prefixes}
