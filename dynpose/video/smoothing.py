"""Keypoint smoothing over time: the one-euro filter (Casiez, Roussel and Vogel, CHI 2012).

A low-pass filter whose cut-off rises with the signal's speed: a still person's keypoints are smoothed hard (less
jitter), a moving one's lightly (less lag). Per track, on image pixels, with time in seconds (frame index / fps):

    cutoff = min_cutoff + beta * |smoothed speed|      alpha = 1 / (1 + 1 / (2 pi cutoff dt))

`--smooth one-euro[:MIN_CUTOFF,BETA]` (Hz, and 1/pixel); off by default, and only what is written changes: the
tracker associates and makes boxes from the raw keypoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dynpose.errors import DynPoseError

USAGE = "use one-euro or one-euro:MIN_CUTOFF,BETA (e.g. one-euro:1.0,0.05), or none"


@dataclass(frozen=True)
class OneEuroConfig:
    min_cutoff: float = 1.0  # Hz: the cut-off of a still keypoint (lower: smoother, more lag)
    beta: float = 0.05  # how fast the cut-off rises with speed (pixels/s): higher follows motion better
    d_cutoff: float = 1.0  # Hz: the cut-off of the speed estimate itself

    def __str__(self) -> str:
        return f"one-euro:{self.min_cutoff:g},{self.beta:g}"


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray:
    tau = 1.0 / (2.0 * math.pi * np.asarray(cutoff, dtype=np.float64))
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One-euro filter of an array signal (e.g. a track's (K,2) keypoint positions), every element on its own."""

    def __init__(self, config: OneEuroConfig | None = None) -> None:
        self.config = config or OneEuroConfig()
        self._t: float | None = None
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None

    def __call__(self, t: float, x: np.ndarray) -> np.ndarray:
        """The smoothed value of `x` observed at time `t` (seconds, increasing)."""
        x = np.asarray(x, dtype=np.float64)
        if self._x is None or self._t is None or self._x.shape != x.shape or t <= self._t:
            self._t, self._x, self._dx = t, x.copy(), np.zeros_like(x)
            return x.copy()
        c = self.config
        dt = t - self._t
        ok = np.isfinite(x)  # a NaN keypoint (broken engine) keeps its last value rather than poisoning the filter
        x_in = np.where(ok, x, self._x)
        dx = (x_in - self._x) / dt
        a_d = _alpha(c.d_cutoff, dt)
        assert self._dx is not None
        self._dx = a_d * dx + (1.0 - a_d) * self._dx
        a = _alpha(c.min_cutoff + c.beta * np.abs(self._dx), dt)
        self._x = a * x_in + (1.0 - a) * self._x
        self._t = t
        return self._x.copy()


def parse_smoothing(text: str | None) -> OneEuroConfig | None:
    """'one-euro' / 'one-euro:1.0,0.05' -> OneEuroConfig; None, '' or 'none' -> None (no smoothing)."""
    if text is None or not text.strip() or text.strip().lower() in ("none", "off"):
        return None
    kind, _, arg = text.strip().partition(":")
    if kind.strip().lower() not in ("one-euro", "one_euro", "oneeuro"):
        raise DynPoseError(f"--smooth {text!r}: unknown filter {kind!r}; {USAGE}")
    if not arg.strip():
        return OneEuroConfig()
    parts = [p.strip() for p in arg.split(",")]
    if len(parts) != 2:
        raise DynPoseError(f"--smooth {text!r}: expected two numbers MIN_CUTOFF,BETA after ':'; {USAGE}")
    try:
        min_cutoff, beta = (float(p) for p in parts)
    except ValueError:
        raise DynPoseError(f"--smooth {text!r}: {arg!r} is not two numbers; {USAGE}") from None
    if not (math.isfinite(min_cutoff) and min_cutoff > 0 and math.isfinite(beta) and beta >= 0):
        raise DynPoseError(f"--smooth {text!r}: MIN_CUTOFF must be > 0 Hz and BETA >= 0; {USAGE}")
    return OneEuroConfig(min_cutoff, beta)
