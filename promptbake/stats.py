"""Confidence intervals for rates and means measured over a few dozen queries (bootstrap over queries)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float
    hi: float
    n: int

    def fmt(self, percent: bool = True) -> str:
        if percent:
            return f"{self.value:.0%} [{self.lo:.0%}, {self.hi:.0%}]"
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.lo, self.hi], "n": self.n}


def bootstrap(
    columns: Sequence[Sequence[float]],
    statistic: Callable[..., float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Percentile 95 % interval of `statistic(*columns)`, resampling rows (queries) jointly, so paired
    measurements (baked and base on the same query) stay paired."""
    arrays = [np.asarray(c, dtype=float) for c in columns]
    n = len(arrays[0])
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    value = float(statistic(*arrays))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    stats = np.array([statistic(*(a[i] for a in arrays)) for i in idx], dtype=float)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return Estimate(value, float("nan"), float("nan"), n)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return Estimate(value, float(lo), float(hi), n)


def mean_ci(values: Sequence[float], **kw) -> Estimate:
    return bootstrap([values], lambda a: float(a.mean()), **kw)


def ratio_of_means_ci(numerator: Sequence[float], denominator: Sequence[float], **kw) -> Estimate:
    """mean(numerator) / mean(denominator), paired by query."""
    def ratio(a, b):
        d = b.mean()
        return float(a.mean() / d) if d != 0 else float("nan")
    return bootstrap([numerator, denominator], ratio, **kw)


def gap_closed(kl_baked: np.ndarray, kl_base: np.ndarray, tokens_baked: np.ndarray, tokens_base: np.ndarray) -> float:
    """1 - KL(baked)/KL(base) from per-query KLs, each side a mean weighted by its own answers' tokens."""
    base = (kl_base * tokens_base).sum() / max(tokens_base.sum(), 1)
    baked = (kl_baked * tokens_baked).sum() / max(tokens_baked.sum(), 1)
    return float(1 - baked / base) if base > 0 else float("nan")


def gap_closed_ci(kl_baked: Sequence[float], kl_base: Sequence[float], tokens_baked: Sequence[float],
                  tokens_base: Sequence[float], **kw) -> Estimate:
    """`gap_closed`, resampling queries jointly."""
    return bootstrap([kl_baked, kl_base, tokens_baked, tokens_base], gap_closed, **kw)


# Two-sided 95 % quantiles of Student's t, by degrees of freedom (1..30); beyond 30 the normal 1.96 is close.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def seeds_mean_ci(values: Sequence[float], bounds: tuple[float, float] | None = None) -> Estimate:
    """Mean over a few seeds with a 95 % t-interval (mean +- t * sd / sqrt(n)); one seed gives no interval.

    `bounds` clips the interval to a metric's range (a rate's t-interval can reach past 100 % otherwise)."""
    a = np.asarray(values, dtype=float)
    n = len(a)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(a.mean())
    if n == 1:
        return Estimate(mean, mean, mean, 1)
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    half = t * float(a.std(ddof=1)) / np.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return Estimate(mean, lo, hi, n)
