"""Routing policies: which crops go to the small model and which to the large one.

A policy is parsed from a short string (the form the CLI's `--route` and the manifest's `route` take):

| policy | a crop goes to the large model when | router? |
| --- | --- | --- |
| `band:LO,HI` | LO <= score[1] <= HI (the DynPose release rule, default 0.59,0.69) | yes |
| `threshold:T` | score[1] >= T | yes |
| `fraction:F` | it is among the round(F*N) crops with the highest score[1] of this call | yes |
| `all-small` / `all-large` | never / always | no |
| `box:AREA` | its box has w*h >= AREA px² (small boxes go to the small model) | no |
| `box-threshold:AREA,T` | w*h >= AREA and score[1] >= T (the router decides among boxes big enough to gain) | yes |

A NaN router score (a broken crop or a numeric blow-up) sends the crop to the large model, the safe choice, and is
counted so a run can report it.

Why `box-threshold`: the box area is a free signal (no model runs for it). The large model's extra input
resolution can only help where the box holds more pixels than the small model's input, so a person far away gains
little whatever the router says; the router's score then only has to rank the bigger persons.

The second half of the module is the cost model of a route (`RouteCosts`): per-crop costs measured on this machine
and backend (`dynpose-bench --store-costs`, stored in the manifest's `notes.costs`), the break-even fraction, and
the one line the Pipeline logs when an engine dir's pair cannot pay (`log_route_costs`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError

log = logging.getLogger(__name__)

KINDS = ("band", "threshold", "fraction", "all-small", "all-large", "box", "box-threshold")
USAGE = (
    "use band:LO,HI | threshold:T | fraction:F | all-small | all-large | box:AREA | box-threshold:AREA,T "
    "(e.g. band:0.59,0.69)"
)


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
        return self.kind in ("band", "threshold", "fraction", "box-threshold")

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
        to_large = isnan
        if self.kind == "band":
            lo, hi = self.params
            with np.errstate(invalid="ignore"):
                large = (s1 >= lo) & (s1 <= hi)
        elif self.kind == "threshold":
            with np.errstate(invalid="ignore"):
                large = s1 >= self.params[0]
        elif self.kind == "box-threshold":
            big = boxes[:, 2] * boxes[:, 3] >= self.params[0]
            with np.errstate(invalid="ignore"):
                large = big & (s1 >= self.params[1])
            to_large = isnan & big  # a small box goes small whatever its score: only big ones fall back to large
        else:  # fraction
            k = int(round(self.params[0] * n))
            large = np.zeros(n, dtype=bool)
            if k > 0:
                # stable sort on -score: ties keep input order, so a call's routing is reproducible
                order = np.argsort(-np.where(isnan, np.inf, s1), kind="stable")
                large[order[:k]] = True
        return Decision(large | to_large, int(isnan.sum()))


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
    if kind == "box-threshold":
        a, thr = _floats(raw, arg, 2)
        if a < 0:
            raise DynPoseError(f"routing policy {raw!r}: AREA must be >= 0 px²; {USAGE}")
        return Policy(kind, (a, thr))
    raise DynPoseError(f"routing policy {raw!r}: unknown kind {kind!r}; {USAGE}")


# -- what a route costs ------------------------------------------------------------------------------------------
COST_BATCH = 8  # the batch the cost lines quote: a busy frame's micro-batch (batch 1 is the latency view)


@dataclass(frozen=True)
class RouteCosts:
    """Measured per-crop costs in ms at one batch size on one backend/device: each pose model's whole way (crop,
    normalise, infer, decode) and the router's (crop, normalise, infer). `large_crop` is the large model's crop and
    normalise share, which the runtime saves on crops routed large when the router's crop serves the large model
    (`shared_crop`).

    The model is the sequential sum of the stages (router on every crop, then each crop on one pose model): the
    device time a crop takes. On a CPU the Dispatcher runs the two pose models at once on their own cores, which
    can beat the sum when both get work; the benchmark measures that, this predicts the serial floor."""

    small: float
    large: float
    router: float
    batch: int = COST_BATCH
    large_crop: float = 0.0
    shared_crop: bool = False

    def per_crop(self, fraction: float, router: bool = True) -> float:
        """Expected ms per crop when `fraction` of the crops go to the large model (`router`: the policy runs it)."""
        f = float(fraction)
        cost = (1.0 - f) * self.small + f * self.large
        if router:
            cost += self.router - (f * self.large_crop if self.shared_crop else 0.0)
        return cost

    def speedup(self, fraction: float, router: bool = True) -> float:
        """Crops/s against large-only at this fraction (> 1: the route pays)."""
        return self.large / self.per_crop(fraction, router)

    def break_even(self, router: bool = True) -> float | None:
        """The largest fraction of crops the route may send to the large model and still be no slower than
        large-only; None when no fraction pays (the small model plus the router cost at least the large model)."""
        at0 = self.per_crop(0.0, router)
        if at0 >= self.large:
            return None
        slope = self.per_crop(1.0, router) - at0
        return 1.0 if slope <= 0 else min(1.0, (self.large - at0) / slope)


def route_costs(record: Mapping[str, Any] | None, batch: int = COST_BATCH) -> RouteCosts | None:
    """`RouteCosts` from a stored cost record (`Manifest.costs`; written by `dynpose.bench.costs`) at `batch`
    (the nearest measured batch when that one was not measured); None without small and large figures."""
    if not record:
        return None
    roles = record.get("roles", {})

    def ms(role: str, part: str = "total") -> float | None:
        per_batch = roles.get(role, {}).get("ms", {})
        if not per_batch:
            return None
        b = min(per_batch, key=lambda k: abs(int(k) - batch))
        v = per_batch[b].get(part)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    small, large = ms("small"), ms("large")
    if small is None or large is None:
        return None
    router = ms("router")
    return RouteCosts(
        small=small,
        large=large,
        router=router if router is not None else math.inf,
        batch=batch,
        large_crop=ms("large", "crop") or 0.0,
        shared_crop=bool(record.get("shared_crop", False)),
    )


def known_fraction(policy: Policy, notes: Mapping[str, Any]) -> float | None:
    """The share of crops a policy sends to the large model when it is known without data: fixed by the policy,
    or measured by `dynpose-train-router --calibrate` for this very policy (`notes.router_calibration`)."""
    if policy.kind in ("all-small", "all-large"):
        return 0.0 if policy.kind == "all-small" else 1.0
    if policy.kind == "fraction":
        return policy.params[0]
    cal = notes.get("router_calibration")
    if isinstance(cal, Mapping) and cal.get("policy") == str(policy) and isinstance(cal.get("fraction"), (int, float)):
        return float(cal["fraction"])
    return None


def cost_line(costs: RouteCosts, policy: Policy | None, fraction: float | None, where: str = "") -> tuple[int, str]:
    """(logging level, one line) saying whether a route can pay by the measured costs, and its break-even fraction.
    `policy` None: routing with the router in general; `fraction`: the share of crops it sends large, if known."""
    router = policy is None or policy.needs_router
    name = "routing" if policy is None else f"route {policy}"
    head = f"{where}: " if where else ""
    parts = f"per crop at batch {costs.batch}: small {costs.small:.1f} ms, large {costs.large:.1f} ms"
    parts += f", router {costs.router:.1f} ms" if router else ""
    be = costs.break_even(router)
    if be is None:
        what = "the small model plus the router cost" if router else "the small model costs"
        return logging.WARNING, (
            f"{head}{name} cannot pay: {what} at least as much as the large model alone ({parts}); it is slower "
            "than all-large at any fraction"
        )
    if fraction is None:
        return logging.INFO, (
            f"{head}{name} beats large-only while it sends under {be:.0%} of the crops to the large model "
            f"(break-even; at most {costs.speedup(0.0, router):.2f}x at 0%; {parts})"
        )
    slower = fraction > be + 1e-9
    return logging.WARNING if slower else logging.INFO, (
        f"{head}{name} sends {fraction:.0%} of the crops to the large model: {costs.speedup(fraction, router):.2f}x "
        f"large-only by the measured costs, {'slower' if slower else 'faster'} than large-only (break-even "
        f"{be:.0%}; {parts})"
    )


def log_route_costs(manifest: Any, policy: Policy, backend: str, device: str, where: str = "") -> str | None:
    """Log one line on whether `policy` pays on this backend/device, when the manifest holds measured costs
    (`dynpose-bench --store-costs`); returns the line (None: no costs stored, or nothing to say for all-large)."""
    if policy.kind == "all-large":
        return None
    costs = route_costs(manifest.costs(backend, device))
    if costs is None or (policy.needs_router and not math.isfinite(costs.router)):
        return None  # nothing measured (or not the router this route needs): no claim either way
    level, line = cost_line(costs, policy, known_fraction(policy, manifest.notes), where)
    log.log(level, "%s", line)
    return line
