"""Routing policies: which crops go to the small model and which to the large one.

A policy is parsed from a short string (the form the CLI's `--route` and the manifest's `route` take):

| policy | a crop goes to the large model when | router? |
| --- | --- | --- |
| `band:LO,HI` | LO <= score[1] <= HI (the DynPose release rule, default 0.59,0.69) | yes |
| `threshold:T` | score[1] >= T | yes |
| `fraction:F` | it is among the round(F*N) crops with the highest score[1] of this call | yes |
| `all-small` / `all-large` | never / always | no |
| `box:AREA` | its box has w*h >= AREA px² (small boxes go to the small model) | no |

A NaN router score (a broken crop or a numeric blow-up) sends the crop to the large model, the safe choice, and is
counted so a run can report it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dynpose.errors import DynPoseError

KINDS = ("band", "threshold", "fraction", "all-small", "all-large", "box")
USAGE = "use band:LO,HI | threshold:T | fraction:F | all-small | all-large | box:AREA (e.g. band:0.59,0.69)"


@dataclass(frozen=True)
class Decision:
    """Per-crop routing: `large[i]` is True when crop i goes to the large model; `nan` counts NaN router scores."""

    large: np.ndarray
    nan: int = 0

    @property
    def num_large(self) -> int:
        return int(self.large.sum())

    @property
    def num_small(self) -> int:
        return int(self.large.size - self.large.sum())


@dataclass(frozen=True)
class Policy:
    kind: str
    params: tuple[float, ...] = ()

    @property
    def needs_router(self) -> bool:
        """all-* and box decide without the router, so the runtime skips running it."""
        return self.kind in ("band", "threshold", "fraction")

    def __str__(self) -> str:
        if not self.params:
            return self.kind
        return f"{self.kind}:" + ",".join(f"{p:g}" for p in self.params)

    def decide(self, scores: np.ndarray | None, boxes_xywh: np.ndarray) -> Decision:
        """Route N crops. `scores` is the router output (N,C>=2) (column 1 is used) or None for router-free
        policies; `boxes_xywh` is (N,>=4)."""
        boxes = np.asarray(boxes_xywh, dtype=np.float64)
        boxes = boxes.reshape(len(boxes), -1) if boxes.size else np.zeros((len(boxes), 4))
        n = boxes.shape[0]
        if self.kind == "all-small":
            return Decision(np.zeros(n, dtype=bool))
        if self.kind == "all-large":
            return Decision(np.ones(n, dtype=bool))
        if self.kind == "box":
            return Decision(boxes[:, 2] * boxes[:, 3] >= self.params[0])
        if scores is None:
            raise DynPoseError(f"routing policy {self}: needs router scores, none were given")
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 2 or s.shape[0] != n or s.shape[1] < 2:
            raise DynPoseError(f"routing policy {self}: router output must be (N={n}, >=2), got {s.shape}")
        s1 = s[:, 1]
        isnan = ~np.isfinite(s1)
        if self.kind == "band":
            lo, hi = self.params
            with np.errstate(invalid="ignore"):
                large = (s1 >= lo) & (s1 <= hi)
        elif self.kind == "threshold":
            with np.errstate(invalid="ignore"):
                large = s1 >= self.params[0]
        else:  # fraction
            k = int(round(self.params[0] * n))
            large = np.zeros(n, dtype=bool)
            if k > 0:
                # stable sort on -score: ties keep input order, so a call's routing is reproducible
                order = np.argsort(-np.where(isnan, np.inf, s1), kind="stable")
                large[order[:k]] = True
        return Decision(large | isnan, int(isnan.sum()))


def _floats(text: str, arg: str, count: int) -> tuple[float, ...]:
    parts = [p.strip() for p in arg.split(",")] if arg.strip() else []
    if len(parts) != count:
        raise DynPoseError(f"routing policy {text!r}: expected {count} number(s) after ':'; {USAGE}")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise DynPoseError(f"routing policy {text!r}: {arg!r} is not a number list; {USAGE}") from None
    if not all(math.isfinite(v) for v in vals):
        raise DynPoseError(f"routing policy {text!r}: values must be finite; {USAGE}")
    return vals


def parse_policy(text: str | Policy) -> Policy:
    """'band:0.59,0.69' -> Policy; a bad string raises DynPoseError naming the accepted forms."""
    if isinstance(text, Policy):
        return text
    if not isinstance(text, str) or not text.strip():
        raise DynPoseError(f"routing policy {text!r}: empty; {USAGE}")
    raw = text.strip()
    kind, _, arg = raw.partition(":")
    kind = kind.strip().lower()
    if kind in ("all-small", "all-large"):
        if arg.strip():
            raise DynPoseError(f"routing policy {raw!r}: {kind} takes no value; {USAGE}")
        return Policy(kind)
    if kind == "band":
        lo, hi = _floats(raw, arg, 2)
        if lo > hi:
            raise DynPoseError(f"routing policy {raw!r}: LO must be <= HI; {USAGE}")
        return Policy(kind, (lo, hi))
    if kind == "threshold":
        return Policy(kind, _floats(raw, arg, 1))
    if kind == "fraction":
        (f,) = _floats(raw, arg, 1)
        if not 0.0 <= f <= 1.0:
            raise DynPoseError(f"routing policy {raw!r}: the fraction must be in [0, 1]; {USAGE}")
        return Policy(kind, (f,))
    if kind == "box":
        (a,) = _floats(raw, arg, 1)
        if a < 0:
            raise DynPoseError(f"routing policy {raw!r}: AREA must be >= 0 px²; {USAGE}")
        return Policy(kind, (a,))
    raise DynPoseError(f"routing policy {raw!r}: unknown kind {kind!r}; {USAGE}")
