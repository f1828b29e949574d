"""Routing policies: which persons the large model answers for. One small class per family, parsed once.

A policy is written as a short string (the CLI's `--route`, the manifest's `route`, a request's `route`):

| policy | the large model answers for a person when | reads |
| --- | --- | --- |
| `all-small` / `all-large` | never / always | - |
| `box:AREA` | its box has w*h >= AREA px² (small boxes go to the small model) | the box |
| `box-below:AREA` | its box has w*h < AREA px² (small, far-away persons go to the large model) | the box |
| `band:LO,HI` | LO <= router score[1] <= HI (the DynPose release rule, default 0.59,0.69) | the router |
| `threshold:T` | router score[1] >= T | the router |
| `fraction:F` | it is among the round(F*N) persons of the batch with the highest router score[1] | the router |
| `box-threshold:AREA,T` | w*h >= AREA and router score[1] >= T | the box, the router |
| `cascade:T` | the small model ran first and its confidence (mean keypoint score) is below T | the small model |
| `cascade-visible:T,S` | the small model ran first and the mean score of its joints above S is below T | the small model |

What a policy reads decides the plan's first stage (`plan.py`): nothing (every person goes straight to its
model), the router (router crops first), or the small model (every person runs on the small model; the ones it is
unsure of are run again on the large model, whose answer replaces the small one's).

A NaN signal (a broken crop, a numeric blow-up) sends the person to the large model, the safe choice, and is
counted so a run can report it.

Why `box-threshold`: the box area is a free signal. The large model's extra input resolution can only help where the
box holds more pixels than the small model's input, so a person far away gains little whatever the router says.

Why both box directions: which persons the small model gets wrong depends on the footage. On a pedestrian video the
largest boxes disagreed slightly more with the large model (Spearman -0.11 between box area and the small model's OKS
to the large one); on the shared footage the smallest do (+0.22: far, blurred persons), where `box-below` reaches an
agreement of 0.95 with about 20 points less of the persons sent large than `box` (`benchmarks/route_agreement.py`).
Label-free calibration tries both.

Why the cascade's confidence is a statistic of the small model's own keypoint scores: on a real pedestrian video
the mean keypoint score ranks the persons where the small model disagrees with the large one far better than the
box area does (Spearman +0.65 against the small model's OKS to the large model's keypoints, box area -0.11), it is
free (the decoder computes it), and it means the same for heatmap and SimCC models (both scores are per-joint
maxima). `cascade-visible` averages only the joints the small model sees (score above S): the agreement it predicts
is an OKS over the joints the large model sees, so a joint out of frame or hidden, which both models score low and
the OKS never counts, should not make a clear person look unsure. On the shared footage (68 persons, picodet boxes
at score >= 0.3) it ranks disagreement better than the mean (Spearman +0.56 against +0.50, the paired frame-bootstrap
difference [+0.01, +0.13]; +0.64 against +0.58 over the 214 boxes at score >= 0.1); S = 0.3 is the score above which
the label-free reference counts a large-model joint as seen (`router.targets.TEACHER_VIS_THR`).
Measured: `benchmarks/route_agreement.py --signals`; which family wins on your footage: `dynpose-train-router
--calibrate --unlabelled`.

`toward_large(step)` / `toward_small(step)` move a policy one step towards sending more (fewer) persons to the
large model, within its family: what the live audit's `--audit-target` does when the measured agreement falls
short (`dynpose/runtime/audit.py`). A score, threshold or share moves by `step` (clipped to [0, 1]); a box area by
the factor `1 + AREA_STEP * step` (1.5 at the default step 0.05: box areas spread over orders of magnitude, so an
additive or 5% step would barely move the share). `all-small` and `all-large` are fixed: they never move. Scores
and shares are rounded to 6 decimals, so a step and its way back give the same policy string (areas print to 6
significant digits, which hides the float error of a multiply and divide).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import numpy as np

from dynpose.errors import DynPoseError

AREA_STEP = 10.0  # a box area moves by the factor 1 + AREA_STEP * step (see the module doc)


def _num(x: float) -> str:
    """A number as a policy string writes it: short (`17734`, `0.3`) and read back to the same float."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


USAGE = (
    "use all-small | all-large | box:AREA | box-below:AREA | band:LO,HI | threshold:T | fraction:F | box-threshold:AREA,T | "
    "cascade:T | cascade-visible:T,S (e.g. band:0.59,0.69)"
)


class Signal(Enum):
    """What a policy reads before it decides, besides the box."""

    ROUTER = "router score"  # score[1] of the router
    CONFIDENCE = "small-model confidence"  # a statistic of the small model's keypoint scores (`Policy.confidence`)


@dataclass(frozen=True)
class Signals:
    """The signals of N persons: box areas always, router scores and the small model's confidence when read."""

    areas: np.ndarray  # (N,) box w*h in px²
    router: np.ndarray | None = None  # (N,) router score[1]
    confidence: np.ndarray | None = None  # (N,) the small model's confidence (`Policy.confidence`)

    def __len__(self) -> int:
        return len(self.areas)


@dataclass(frozen=True)
class Routing:
    """Per person: True where the large model answers; `nan` counts persons sent large by a NaN signal."""

    large: np.ndarray
    nan: int = 0


@dataclass(frozen=True)
class ModelCosts:
    """Measured per-crop costs in ms (one batch size, backend, device): each pose model's whole way (crop,
    normalise, infer, decode) and the router's; `large_crop` is the large model's crop share, saved on persons sent
    large when the router's crop serves the large model (`shared_crop`)."""

    small: float
    large: float
    router: float
    batch: int = 8
    large_crop: float = 0.0
    shared_crop: bool = False


class Policy(ABC):
    """One routing family. `decide` is pure: the same signals give the same routing."""

    reads: ClassVar[frozenset[Signal]] = frozenset()

    @property
    def needs_router(self) -> bool:
        return Signal.ROUTER in self.reads

    @property
    def cascades(self) -> bool:
        """The small model runs on every person first (its confidence is the signal)."""
        return Signal.CONFIDENCE in self.reads

    @abstractmethod
    def decide(self, signals: Signals) -> Routing:
        """Route N persons by their signals (those this family `reads` must be given)."""

    @abstractmethod
    def to_string(self) -> str:
        """The string `parse_policy` reads back into this policy."""

    def __str__(self) -> str:
        return self.to_string()

    def fixed_share(self) -> float | None:
        """The share of persons sent to the large model when it is known without data (None: it depends on them)."""
        return None

    def toward_large(self, step: float) -> Policy:
        """The policy one `step` towards the large model (see the module doc); itself where it cannot move (a fixed
        policy, a bound reached)."""
        _check_step(step)
        return self

    def toward_small(self, step: float) -> Policy:
        """The policy one `step` towards the small model; itself where it cannot move."""
        _check_step(step)
        return self

    def cost(self, costs: ModelCosts, share: float) -> float:
        """Expected ms per person when `share` of them end on the large model, run one after another: the device
        time a person takes (two pose models at once on a CPU can beat it; the benchmark measures that)."""
        f = float(share)
        if self.cascades:  # every person on the small model, the escalated ones on the large one too
            return costs.small + f * costs.large
        cost = (1.0 - f) * costs.small + f * costs.large
        if self.needs_router:
            cost += costs.router - (f * costs.large_crop if costs.shared_crop else 0.0)
        return cost

    def confidence(self, keypoints: np.ndarray) -> np.ndarray:
        """(n,) the confidence a cascading policy reads from the small model's keypoints (n,K,3): the mean keypoint
        score unless the family says otherwise; NaN where a score is NaN (a broken answer, which escalates)."""
        return np.mean(np.asarray(keypoints, dtype=np.float64)[:, :, 2], axis=1)

    def _require(self, values: np.ndarray | None, n: int, what: str) -> np.ndarray:
        if values is None:
            raise DynPoseError(f"routing policy {self}: needs {what}, none were given")
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(v) != n:
            raise DynPoseError(f"routing policy {self}: {len(v)} {what} for {n} persons")
        return v


def _finite_mask(v: np.ndarray) -> np.ndarray:
    return np.isfinite(v)


def _check_step(step: float) -> float:
    if not (math.isfinite(step) and 0.0 < step <= 1.0):
        raise DynPoseError(f"policy step {step}: must be a number in (0, 1]")
    return float(step)


def _down(v: float, step: float) -> float:
    """`v` one step lower, not below 0 (unchanged when it is at or below 0 already)."""
    step = _check_step(step)
    return v if v <= 0.0 else round(max(0.0, v - step), 6)


def _up(v: float, step: float) -> float:
    """`v` one step higher, not above 1 (unchanged when it is at or above 1 already)."""
    step = _check_step(step)
    return v if v >= 1.0 else round(min(1.0, v + step), 6)


def _area_down(a: float, step: float) -> float:
    # 0.1 px² steps keep the route's string short and exact (it names the policy in logs and in /v1/stats)
    return round(a / (1.0 + AREA_STEP * _check_step(step)), 1)


def _area_up(a: float, step: float) -> float:
    return round(a * (1.0 + AREA_STEP * _check_step(step)), 1)


@dataclass(frozen=True)
class AllSmall(Policy):
    def decide(self, signals: Signals) -> Routing:
        return Routing(np.zeros(len(signals), dtype=bool))

    def to_string(self) -> str:
        return "all-small"

    def fixed_share(self) -> float | None:
        return 0.0


@dataclass(frozen=True)
class AllLarge(Policy):
    def decide(self, signals: Signals) -> Routing:
        return Routing(np.ones(len(signals), dtype=bool))

    def to_string(self) -> str:
        return "all-large"

    def fixed_share(self) -> float | None:
        return 1.0


@dataclass(frozen=True)
class BoxArea(Policy):
    area: float

    def decide(self, signals: Signals) -> Routing:
        return Routing(np.asarray(signals.areas, dtype=np.float64) >= self.area)

    def to_string(self) -> str:
        return f"box:{_num(self.area)}"

    def toward_large(self, step: float) -> Policy:
        return BoxArea(_area_down(self.area, step))

    def toward_small(self, step: float) -> Policy:
        return BoxArea(_area_up(self.area, step))


@dataclass(frozen=True)
class BoxBelow(Policy):
    area: float

    def decide(self, signals: Signals) -> Routing:
        return Routing(np.asarray(signals.areas, dtype=np.float64) < self.area)

    def to_string(self) -> str:
        return f"box-below:{_num(self.area)}"

    def toward_large(self, step: float) -> Policy:
        return BoxBelow(_area_up(self.area, step))  # the bar rises: more boxes fall below it

    def toward_small(self, step: float) -> Policy:
        return BoxBelow(_area_down(self.area, step))


class _RouterPolicy(Policy):
    """A family that reads router score[1]; NaN scores go large."""

    reads = frozenset({Signal.ROUTER})

    def decide(self, signals: Signals) -> Routing:
        s = self._require(signals.router, len(signals), "router scores")
        ok = _finite_mask(s)
        with np.errstate(invalid="ignore"):
            large = self._large(np.where(ok, s, np.nan), signals)
        nan_large = ~ok & self._nan_goes_large(signals)
        return Routing(large | nan_large, int((~ok).sum()))

    @abstractmethod
    def _large(self, scores: np.ndarray, signals: Signals) -> np.ndarray: ...

    def _nan_goes_large(self, signals: Signals) -> np.ndarray:
        return np.ones(len(signals), dtype=bool)


@dataclass(frozen=True)
class Band(_RouterPolicy):
    lo: float
    hi: float

    def _large(self, scores: np.ndarray, signals: Signals) -> np.ndarray:
        return (scores >= self.lo) & (scores <= self.hi)

    def to_string(self) -> str:
        return f"band:{_num(self.lo)},{_num(self.hi)}"

    def toward_large(self, step: float) -> Policy:
        return Band(_down(self.lo, step), _up(self.hi, step))  # a wider band: more scores fall in it

    def toward_small(self, step: float) -> Policy:
        lo, hi = _up(self.lo, step), _down(self.hi, step)
        if lo > hi:  # the band closes at its middle, never turns inside out
            lo = hi = round((self.lo + self.hi) / 2.0, 6)
        return Band(lo, hi)


@dataclass(frozen=True)
class Threshold(_RouterPolicy):
    threshold: float

    def _large(self, scores: np.ndarray, signals: Signals) -> np.ndarray:
        return scores >= self.threshold

    def to_string(self) -> str:
        return f"threshold:{_num(self.threshold)}"

    def toward_large(self, step: float) -> Policy:
        return Threshold(_down(self.threshold, step))

    def toward_small(self, step: float) -> Policy:
        return Threshold(_up(self.threshold, step))


@dataclass(frozen=True)
class Fraction(_RouterPolicy):
    fraction: float

    def _large(self, scores: np.ndarray, signals: Signals) -> np.ndarray:
        n = len(scores)
        k = int(round(self.fraction * n))
        large = np.zeros(n, dtype=bool)
        if k > 0:
            # NaN first (they go large anyway); a stable sort on -score keeps input order on ties, so a batch's
            # routing is reproducible
            order = np.argsort(-np.where(np.isnan(scores), np.inf, scores), kind="stable")
            large[order[:k]] = True
        return large

    def to_string(self) -> str:
        return f"fraction:{_num(self.fraction)}"

    def toward_large(self, step: float) -> Policy:
        return Fraction(_up(self.fraction, step))

    def toward_small(self, step: float) -> Policy:
        return Fraction(_down(self.fraction, step))

    def fixed_share(self) -> float | None:
        return self.fraction


@dataclass(frozen=True)
class BoxThreshold(_RouterPolicy):
    area: float
    threshold: float

    def _large(self, scores: np.ndarray, signals: Signals) -> np.ndarray:
        return self._big(signals) & (scores >= self.threshold)

    def _nan_goes_large(self, signals: Signals) -> np.ndarray:
        return self._big(signals)  # a small box goes small whatever its score: only big ones fall back to large

    def _big(self, signals: Signals) -> np.ndarray:
        return np.asarray(signals.areas, dtype=np.float64) >= self.area

    def to_string(self) -> str:
        return f"box-threshold:{_num(self.area)},{_num(self.threshold)}"

    def toward_large(self, step: float) -> Policy:
        return BoxThreshold(_area_down(self.area, step), _down(self.threshold, step))

    def toward_small(self, step: float) -> Policy:
        return BoxThreshold(_area_up(self.area, step), _up(self.threshold, step))


@dataclass(frozen=True)
class Cascade(Policy):
    """The small model first; persons whose confidence is below `threshold` are run again on the large model. The
    confidence is the mean keypoint score, or with `visible` = S the mean score of the joints scoring above S."""

    threshold: float
    visible: float | None = None
    reads: ClassVar[frozenset[Signal]] = frozenset({Signal.CONFIDENCE})

    def confidence(self, keypoints: np.ndarray) -> np.ndarray:
        if self.visible is None:
            return super().confidence(keypoints)
        s = np.asarray(keypoints, dtype=np.float64)[:, :, 2]
        seen = s > self.visible
        count = seen.sum(axis=1)
        conf = np.where(seen, s, 0.0).sum(axis=1) / np.maximum(count, 1)
        return np.where(np.isnan(s).any(axis=1), np.nan, conf)

    def decide(self, signals: Signals) -> Routing:
        c = self._require(signals.confidence, len(signals), "small-model confidences")
        ok = _finite_mask(c)
        with np.errstate(invalid="ignore"):
            large = ~ok | (c < self.threshold)
        return Routing(large, int((~ok).sum()))

    def to_string(self) -> str:
        if self.visible is None:
            return f"cascade:{_num(self.threshold)}"
        return f"cascade-visible:{_num(self.threshold)},{_num(self.visible)}"

    def toward_large(self, step: float) -> Policy:
        return Cascade(_up(self.threshold, step), self.visible)  # a higher bar for the small model's confidence

    def toward_small(self, step: float) -> Policy:
        return Cascade(_down(self.threshold, step), self.visible)


# -- parsing ---------------------------------------------------------------------------------------------------------
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


def _in_range(text: str, name: str, v: float, lo: float, hi: float) -> float:
    if not lo <= v <= hi:
        raise DynPoseError(f"routing policy {text!r}: {name} must be in [{lo:g}, {hi:g}], got {v:g}; {USAGE}")
    return v


def _area(text: str, v: float) -> float:
    if v < 0:
        raise DynPoseError(f"routing policy {text!r}: AREA must be >= 0 px²; {USAGE}")
    return v


def _band(text: str, arg: str) -> Policy:
    lo, hi = _floats(text, arg, 2)
    if lo > hi:
        raise DynPoseError(f"routing policy {text!r}: LO must be <= HI; {USAGE}")
    return Band(lo, hi)


def _cascade_visible(text: str, arg: str) -> Policy:
    t, v = _floats(text, arg, 2)
    return Cascade(_in_range(text, "the confidence threshold", t, 0.0, 1.0), _in_range(text, "the score S", v, 0.0, 1.0))


def _box_threshold(text: str, arg: str) -> Policy:
    a, t = _floats(text, arg, 2)
    return BoxThreshold(_area(text, a), t)


# kind -> how its argument is read (the whole table of families; kinds without an argument take none)
_PARSERS: dict[str, Callable[[str, str], Policy]] = {
    "all-small": lambda text, arg: AllSmall(),
    "all-large": lambda text, arg: AllLarge(),
    "box": lambda text, arg: BoxArea(_area(text, _floats(text, arg, 1)[0])),
    "box-below": lambda text, arg: BoxBelow(_area(text, _floats(text, arg, 1)[0])),
    "band": _band,
    "threshold": lambda text, arg: Threshold(_floats(text, arg, 1)[0]),
    "fraction": lambda text, arg: Fraction(_in_range(text, "the fraction", _floats(text, arg, 1)[0], 0.0, 1.0)),
    "box-threshold": _box_threshold,
    "cascade": lambda text, arg: Cascade(_in_range(text, "the confidence threshold", _floats(text, arg, 1)[0], 0.0, 1.0)),
    "cascade-visible": _cascade_visible,
}
KINDS = tuple(_PARSERS)


def parse_policy(text: str | Policy) -> Policy:
    """'band:0.59,0.69' -> Band(0.59, 0.69); a policy passes through; a bad string is a one-line error."""
    if isinstance(text, Policy):
        return text
    if not isinstance(text, str) or not text.strip():
        raise DynPoseError(f"routing policy {text!r}: empty; {USAGE}")
    raw = text.strip()
    kind, _, arg = raw.partition(":")
    kind = kind.strip().lower()
    parser = _PARSERS.get(kind)
    if parser is None:
        raise DynPoseError(f"routing policy {raw!r}: unknown kind {kind!r}; {USAGE}")
    if kind in ("all-small", "all-large") and arg.strip():
        raise DynPoseError(f"routing policy {raw!r}: {kind} takes no value; {USAGE}")
    return parser(raw, arg)
