"""Confidence intervals for speed ratios measured in interleaved rounds, and the rule for when to stop timing.

Every round runs each configuration once, back to back, so a slow spell of a shared machine hits a round's
configurations alike. The speed of a configuration against the reference (large-only) is therefore taken per
round, ratio_i = t_ref,i / t_cfg,i (equal work per call), and summarised by the median over rounds; its 95%
interval is a percentile bootstrap over rounds (rounds resampled with replacement, the median recomputed). The
benchmark keeps adding rounds until every ratio's interval is within +-5% of the ratio or a time limit is hit.

`clustered_mean_ci` is the interval of a mean over persons when persons come in clusters (the frames of footage):
persons of one frame share its lighting, crowd and camera, so they are not independent draws, and resampling
persons one by one would give an interval too narrow. Whole clusters are resampled instead (a percentile bootstrap
of the ratio sum / count over clusters, `scipy.stats.bootstrap`, paired).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CI_LEVEL = 0.95
TARGET_HALF_WIDTH = 0.05  # +-5% of the ratio
RESAMPLES = 2000


@dataclass(frozen=True)
class RatioCI:
    """A speed ratio (> 1: faster than the reference) with its bootstrap interval over `rounds` rounds."""

    ratio: float
    lo: float
    hi: float
    rounds: int

    @property
    def half_width(self) -> float:
        """Half the interval's width relative to the ratio (0.05 = +-5%); inf when it cannot be told yet."""
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or self.ratio <= 0:
            return math.inf
        return (self.hi - self.lo) / 2.0 / self.ratio

    def text(self) -> str:
        """'1.83x [1.71, 1.95]' (the interval in brackets; '[?]' with fewer than two rounds)."""
        if not math.isfinite(self.half_width):
            return f"{self.ratio:.2f}x [?]"
        return f"{self.ratio:.2f}x [{self.lo:.2f}, {self.hi:.2f}]"

    def to_dict(self) -> dict[str, Any]:
        ok = math.isfinite(self.half_width)
        return {
            "ratio": self.ratio,
            "ci_lo": self.lo if ok else None,
            "ci_hi": self.hi if ok else None,
            "half_width": self.half_width if ok else None,
            "rounds": self.rounds,
        }


def paired_ratio_ci(
    ref_s: Sequence[float],
    test_s: Sequence[float],
    level: float = CI_LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> RatioCI:
    """Speed of `test` against `ref` from their per-round times (round i of both ran back to back): the median of
    the per-round ratios ref_i / test_i, with a percentile-bootstrap interval over rounds at `level`."""
    ref = np.asarray(ref_s, dtype=np.float64)
    test = np.asarray(test_s, dtype=np.float64)
    n = min(len(ref), len(test))
    if n == 0:
        return RatioCI(math.nan, math.nan, math.nan, 0)
    r = ref[:n] / test[:n]
    point = float(np.median(r))
    if n < 2:
        return RatioCI(point, math.nan, math.nan, n)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    meds = np.median(r[idx], axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(meds, [tail, 100.0 - tail])
    return RatioCI(point, float(lo), float(hi), n)


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap interval at `level` (lo, hi)."""

    value: float
    lo: float
    hi: float
    level: float = CI_LEVEL

    def text(self, digits: int = 3) -> str:
        """'0.952 [0.931, 0.968]'."""
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "level": self.level}

    @classmethod
    def from_dict(cls, d: Any) -> Interval:
        return cls(float(d["value"]), float(d["lo"]), float(d["hi"]), float(d.get("level", CI_LEVEL)))


def clustered_mean_ci(
    values: np.ndarray, clusters: np.ndarray, level: float = CI_LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> Interval:
    """Mean of `values` (one per person) with a percentile-bootstrap interval that resamples whole clusters
    (`clusters`: each person's frame); see the module doc. With one cluster the interval is the point."""
    from scipy.stats import bootstrap

    v = np.asarray(values, dtype=np.float64)
    _, inv = np.unique(np.asarray(clusters), return_inverse=True)
    sums, counts = np.bincount(inv, weights=v), np.bincount(inv).astype(np.float64)
    point = float(v.mean()) if len(v) else math.nan
    if len(sums) < 2:
        return Interval(point, point, point, level)

    def ratio(s: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(s.sum(axis=axis) / c.sum(axis=axis))

    res = bootstrap(
        (sums, counts), ratio, paired=True, vectorized=True, n_resamples=resamples, confidence_level=level,
        method="percentile", random_state=np.random.default_rng(seed),
    )  # fmt: skip
    ci = res.confidence_interval
    return Interval(point, float(ci.low), float(ci.high), level)


def converged(cis: Sequence[RatioCI], target: float = TARGET_HALF_WIDTH) -> bool:
    """Every interval within +-target of its ratio."""
    return all(ci.half_width <= target for ci in cis)
