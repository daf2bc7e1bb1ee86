"""Bootstrap confidence intervals and the sentences that compare them.

Every number in the study's report is an ``Estimate``: the statistic on the whole sample and a
95% percentile interval from resampling the sample's units (evaluation windows or examples)
with replacement. Resampling indices depend only on (the number of units, the seed), so two
settings scored on the same windows are resampled *together*: a paired difference is the
statistic of the difference, and its interval is honest about the shared windows.

Sentences are written from the numbers: an ordering is claimed only where the two intervals do
not overlap (a conservative test; overlapping intervals can still differ), a sign only where the
interval of a difference excludes zero.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point value and its bootstrap interval [lo, hi] (``n`` resampled units)."""

    value: float
    lo: float
    hi: float
    n: int

    def fmt(self, digits: int = 3, percent: bool = False) -> str:
        """``value [lo, hi]`` to ``digits`` significant digits (``percent``: times 100)."""
        if math.isnan(self.value):
            return "n/a"
        scale = 100.0 if percent else 1.0
        return f"{_num(self.value * scale, digits)} [{_num(self.lo * scale, digits)}, {_num(self.hi * scale, digits)}]"

    def contains(self, x: float, tol: float = 1e-9) -> bool:
        return self.lo - tol <= x <= self.hi + tol

    def below(self, other: Estimate) -> bool:
        """Separated and lower: this interval ends before the other's begins."""
        return self.hi < other.lo

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _num(x: float, digits: int) -> str:
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{max(digits - 1 - math.floor(math.log10(abs(x))), 0)}f}"


@functools.lru_cache(maxsize=32)
def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` unit indices; the same for every statistic over ``n`` units."""
    return np.random.default_rng([seed, n]).integers(0, n, size=(resamples, n))


def _interval(value: float, boots: np.ndarray, n: int) -> Estimate:
    boots = boots[np.isfinite(boots)]
    if n < 2 or boots.size == 0:
        return Estimate(float(value), float(value), float(value), n)
    a = (1.0 - LEVEL) / 2
    lo, hi = np.quantile(boots, [a, 1.0 - a])
    return Estimate(float(value), float(min(lo, value)), float(max(hi, value)), n)


def ratio(num_N: Sequence[float], den_N: Sequence[float], resamples: int = 1000, seed: int = 0,
          exp: bool = False) -> Estimate:
    """sum(num) / sum(den) over units (``exp``: its exponential, i.e. perplexity from per-window
    NLL sums and token counts); units resampled whole, as the windows they are."""
    num, den = np.asarray(num_N, np.float64), np.asarray(den_N, np.float64)
    n = len(num)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    f = np.exp if exp else (lambda x: x)
    value = f(num.sum() / den.sum())
    idx = _indices(n, resamples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = f(num[idx].sum(axis=1) / den[idx].sum(axis=1))
    return _interval(value, boots, n)


def efficacy(local_nll_N: Sequence[float], compressed_nll_N: Sequence[float], full_nll_N: Sequence[float],
             resamples: int = 1000, seed: int = 0) -> Estimate:
    """Memory efficacy ``(NLL_local - NLL_r) / (NLL_local - NLL_full)`` from per-window NLL sums
    of the three settings on the same targets (``train.evaluation.memory_efficacy``); windows are
    resampled together for the three, so the interval is the paired one. A resample whose
    full-attention gain is not positive has no efficacy and is left out."""
    from gist_jax.train.evaluation import memory_efficacy

    local, comp, full = (np.asarray(x, np.float64) for x in (local_nll_N, compressed_nll_N, full_nll_N))
    n = len(local)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    value = memory_efficacy(local.sum(), comp.sum(), full.sum())
    if math.isnan(value):  # no context gain on the whole sample: nothing to interval either
        return Estimate(value, value, value, n)
    idx = _indices(n, resamples, seed)
    gap = local[idx].sum(axis=1) - full[idx].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = np.where(gap > 0, (local[idx].sum(axis=1) - comp[idx].sum(axis=1)) / gap, np.nan)
    return _interval(value, boots, n)


def mean(values_N: Sequence[float], resamples: int = 1000, seed: int = 0) -> Estimate:
    values = np.asarray(values_N, np.float64)
    return ratio(values, np.ones_like(values), resamples, seed)


def paired_difference(a_N: Sequence[float], b_N: Sequence[float], resamples: int = 1000, seed: int = 0) -> Estimate:
    """mean(a - b) over units scored both ways (same windows, or the two halves of a pair)."""
    return mean(np.asarray(a_N, np.float64) - np.asarray(b_N, np.float64), resamples, seed)


def curve(curves_NxL: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean curve over units and its pointwise interval: (mean_L, lo_L, hi_L)."""
    c = np.asarray(curves_NxL, np.float64)
    idx = _indices(len(c), resamples, seed)
    with np.errstate(invalid="ignore"):
        boots_BxL = np.nanmean(c[idx], axis=1)  # [B, N, L] -> [B, L]
    a = (1.0 - LEVEL) / 2
    mean_L = np.nanmean(c, axis=0)
    if len(c) < 2:
        return mean_L, mean_L, mean_L
    return mean_L, np.nanquantile(boots_BxL, a, axis=0), np.nanquantile(boots_BxL, 1 - a, axis=0)


# ----------------------------------------------------------------------------- sentences
def compare(a: str, ea: Estimate, b: str, eb: Estimate, quantity: str, digits: int = 3) -> str:
    """One sentence: which is lower, if their intervals separate; otherwise that they do not."""
    if math.isnan(ea.value) or math.isnan(eb.value):
        return f"{a} vs {b}: {quantity} not available."
    if ea.below(eb):
        return f"{quantity}: {a} ({ea.fmt(digits)}) < {b} ({eb.fmt(digits)}), intervals separate."
    if eb.below(ea):
        return f"{quantity}: {b} ({eb.fmt(digits)}) < {a} ({ea.fmt(digits)}), intervals separate."
    return f"{quantity}: {a} ({ea.fmt(digits)}) and {b} ({eb.fmt(digits)}) do not separate (intervals overlap)."


def chain(items: Sequence[tuple[str, Estimate]], quantity: str, digits: int = 3) -> str:
    """The expected ordering ``items[0] < items[1] < ...``, checked pair by adjacent pair."""
    holds, parts = [], []
    for (a, ea), (b, eb) in itertools.pairwise(items):
        if ea.below(eb):
            parts.append(f"{a} < {b} (separate)")
            holds.append(True)
        elif eb.below(ea):
            parts.append(f"{b} < {a} (separate, reversed)")
            holds.append(False)
        else:
            parts.append(f"{a} vs {b} do not separate")
            holds.append(False)
    names = " < ".join(name for name, _ in items)
    verdict = "holds with separated intervals" if all(holds) else "does not hold throughout"
    return f"{quantity}: the expected order {names} {verdict}: " + "; ".join(parts) + "."


def sign(label: str, e: Estimate, positive: str, negative: str, digits: int = 3) -> str:
    """A difference's sign, claimed only where its interval excludes zero."""
    if math.isnan(e.value):
        return f"{label}: not available."
    if e.lo > 0:
        return f"{label} = {e.fmt(digits)}: {positive} (interval excludes 0)."
    if e.hi < 0:
        return f"{label} = {e.fmt(digits)}: {negative} (interval excludes 0)."
    return f"{label} = {e.fmt(digits)}: interval includes 0, no direction claimed."
