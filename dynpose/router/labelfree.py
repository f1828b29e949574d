"""Label-free routing calibration (`dynpose-train-router --calibrate --unlabelled SRC`): the cheapest policy whose
keypoints agree with the large model's on the user's own footage, checked on footage it was not chosen on.

The reference is the large model itself: the accuracy a user wants to keep is "as good as the large model", and the
large model can be run on any footage. Per person (`footage.footage_data`: both models on every person), the
agreement of a routing is the OKS of the routed keypoints against the large model's (`targets.teacher_oks`: over
the joints the large model scores above 0.3, scale box area x 0.53): 1 where the person goes to the large model,
the small model's OKS to the large one where it stays small. A person the large model sees no joint of has no
reference: it is routed and counted in the share, not in the agreement.

1. Split: the frames (images, video frames) are shuffled (`seed`) and taken into the held-out part until it holds
   `holdout` of the persons; a frame's persons stay together, so the policy is never checked on a crop of a person
   it was chosen on in the same frame. Neighbouring video frames do show the same persons: space them with
   `--frame-step` for a stricter check.
2. Search, on the fit part: for each family, the cheapest policy (by `Policy.cost` with the costs measured on this
   machine, `calibrate.measured_costs`) whose mean agreement reaches `target`. One-parameter families sweep every cut
   between two distinct signal values at once (the agreement of escalating the first k persons in the family's
   order is a running sum): `box:AREA` (largest boxes first), `box-below:AREA` (smallest boxes first: which end
   the small model gets wrong depends on the footage), `threshold:T` (highest router score first),
   `cascade:T` (lowest mean keypoint score first), `cascade-visible:T,0.3` (lowest visible-joint mean first);
   `box-threshold:AREA,T` sweeps T above each of a few area cuts. all-small and all-large take part too (all-large
   always reaches the target). The cheapest family winner is the policy.
3. Check, on the held-out part: the policy's agreement with a 95% interval from a bootstrap over held-out frames
   (`bench.stats.clustered_mean_ci`), and the share of persons at OKS >= 0.9. The footage is refused as too small
   when either part has fewer than `MIN_PERSONS` persons with a reference or `MIN_FRAMES` frames: with fewer
   clusters a frame bootstrap has too few distinct resamples for its 2.5/97.5% quantiles to mean anything, and
   with fewer persons the interval is wider than the differences between policies.
4. Store: the policy becomes the manifest's route, with `bench.agreement.LabelFreeFigures` (target, interval,
   persons and frames counted, the footage hash and stamps, the model files' sha256, costs, each family's
   winner), written atomically once everything is known.

Why 0.95 by default: the large model does not agree with itself perfectly either. On the shared footage its
keypoints on the mirrored crop, on the box shifted by 2% or scaled by 5% (what another detector gives) agree with
its own at mean OKS 0.966-0.969 (`benchmarks/route_agreement.py --self`). A routing at 0.95 therefore moves the
keypoints little more than a different box for the same person would; 0.93 is a looser choice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynpose.bench.agreement import Counts, FamilyFigures, LabelFreeFigures
from dynpose.bench.stats import Interval, clustered_mean_ci
from dynpose.engines.manifest import Manifest, RouteCalibration, updating_manifest
from dynpose.errors import DynPoseError
from dynpose.roles import Role
from dynpose.router.calibrate import (
    ABOVE,
    AREA_CUTS,
    VISIBLE_SCORE,
    agreement,
    measured_costs,
    round_cut,
    small_large_oks,
    threshold_at,
)
from dynpose.router.footage import FootageData, FootageOptions, footage_data
from dynpose.router.unlabelled import UnlabelledSpec
from dynpose.runtime.policy import (
    AllLarge,
    AllSmall,
    BoxArea,
    BoxBelow,
    BoxThreshold,
    Cascade,
    ModelCosts,
    Policy,
    Signals,
    Threshold,
)

DEFAULT_TARGET = 0.95
DEFAULT_HOLDOUT = 0.5
MIN_PERSONS = 30  # per side of the split, with a reference
MIN_FRAMES = 5  # per side of the split
FAMILIES = ("box", "box-below", "threshold", "box-threshold", "cascade", "cascade-visible")
ROUTER_FAMILIES = ("threshold", "box-threshold")


def check_target(t: float) -> float:
    if not (isinstance(t, (int, float)) and math.isfinite(t) and 0.0 < t <= 1.0):
        raise DynPoseError(
            f"--target-agreement must be in (0, 1] (mean OKS of the routed keypoints against the large model's, "
            f"e.g. {DEFAULT_TARGET}), got {t!r}"
        )
    return float(t)


def check_holdout(h: float) -> float:
    if not (isinstance(h, (int, float)) and math.isfinite(h) and 0.0 < h < 1.0):
        raise DynPoseError(f"--holdout must be a share in (0, 1) of the footage's persons to check on, got {h!r}")
    return float(h)


@dataclass(frozen=True)
class PersonSet:
    """What the search reads per person: frame, box area, router score[1] (NaN: none), the small model's keypoints,
    and OKS(small | large) (NaN: no reference)."""

    frame: np.ndarray
    areas: np.ndarray
    router: np.ndarray
    kpts_small: np.ndarray
    oks: np.ndarray

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def has_ref(self) -> np.ndarray:
        return np.isfinite(self.oks)

    def subset(self, idx: np.ndarray) -> PersonSet:
        return PersonSet(self.frame[idx], self.areas[idx], self.router[idx], self.kpts_small[idx], self.oks[idx])

    def route(self, policy: Policy) -> np.ndarray:
        """(N,) True where `policy` sends the person to the large model."""
        conf = policy.confidence(self.kpts_small) if policy.cascades else None
        return policy.decide(Signals(self.areas, self.router if policy.needs_router else None, conf)).large

    def agreement(self, large: np.ndarray) -> np.ndarray:
        """Per person with a reference: OKS of the routed keypoints against the large model's."""
        return agreement(self.oks, large)


def person_set(data: FootageData, sigmas: Sequence[float]) -> PersonSet:
    out = data.outputs
    oks = small_large_oks(out.kpts_small, out.kpts_large, out.boxes, sigmas)
    return PersonSet(out.frame, out.areas, out.router, out.kpts_small, oks)


# -- the split -------------------------------------------------------------------------------------------------------
def split(ps: PersonSet, holdout: float, seed: int) -> np.ndarray:
    """(N,) True for the held-out persons: whole frames, shuffled, until `holdout` of the persons with a reference."""
    frames = np.unique(ps.frame)
    order = np.random.default_rng(seed).permutation(frames)
    per = {int(f): int(n) for f, n in zip(*np.unique(ps.frame[ps.has_ref], return_counts=True), strict=True)}
    want, held, taken = holdout * int(ps.has_ref.sum()), 0, list[int]()
    for f in order:
        if held >= want and taken:
            break
        taken.append(int(f))
        held += per.get(int(f), 0)
    return np.isin(ps.frame, taken)


def check_size(fit: PersonSet, held: PersonSet) -> None:
    def size(p: PersonSet) -> tuple[int, int]:
        return int(p.has_ref.sum()), len(np.unique(p.frame[p.has_ref]))

    (nf, ff), (nh, fh) = size(fit), size(held)
    if min(nf, nh) < MIN_PERSONS or min(ff, fh) < MIN_FRAMES:
        raise DynPoseError(
            f"footage too small for a held-out check: {nf + nh} persons with a large-model reference in {ff + fh} "
            f"frames ({nh} in {fh} held out); each side needs at least {MIN_PERSONS} persons in {MIN_FRAMES} frames "
            "for its interval to mean anything: add footage (more images or videos, a larger --max-frames)"
        )


# -- the search ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sweep:
    """A family's one-parameter sweep on the fit set: escalating the persons of `order` (indices) in turn; `make(k)`
    is the family's policy that escalates exactly the first k on the fit set (k only at cuts between distinct
    values, `ok[k]`)."""

    order: np.ndarray
    ok: np.ndarray  # (len(order)+1,) bool
    make: Callable[[int], Policy]


def _cuts_ok(sorted_values: np.ndarray) -> np.ndarray:
    v = sorted_values
    return np.r_[True, v[1:] != v[:-1], True] if len(v) else np.array([True])


def _descending(values: np.ndarray, idx: np.ndarray, make: Callable[[str], Policy]) -> Sweep:
    """Persons `idx` by `values` high to low, policies `signal >= cut`."""
    order = idx[np.argsort(-values[idx], kind="stable")]
    v = values[order]

    def policy(k: int) -> Policy:
        return make(round_cut(threshold_at(v, k), v))

    return Sweep(order, _cuts_ok(v), policy)


def _ascending(values: np.ndarray, make: Callable[[str], Policy], score: bool = False) -> Sweep:
    """Every person by `values` low to high, policies `signal < cut` (box-below, the cascades: `score`, whose cut
    is a score in [0, 1])."""
    order = np.argsort(values, kind="stable")
    v = values[order]

    def policy(k: int) -> Policy:
        cut = float(v[0] if k == 0 else (v[k - 1] + v[k]) / 2.0)
        return make(round_cut(min(1.0, max(0.0, cut)) if score else cut, v))

    ok = _cuts_ok(v)
    ok[-1] = False  # everyone large: all-large does it cheaper
    return Sweep(order, ok, policy)


def sweeps(fit: PersonSet, family: str) -> list[Sweep]:
    """The family's sweeps on the fit set ([] when it cannot run: a router family without a router)."""
    n, everyone = len(fit), np.arange(len(fit))
    has_router = bool(np.isfinite(fit.router).all()) and n > 0
    if family == "box":
        return [_descending(fit.areas, everyone, lambda c: BoxArea(float(c)))]
    if family == "box-below":
        return [_ascending(fit.areas, lambda c: BoxBelow(float(c)))]
    if family == "threshold":
        return [_descending(fit.router, everyone, lambda c: Threshold(float(c)))] if has_router else []
    if family == "box-threshold":
        if not has_router:
            return []
        out = []
        for a in sorted({round_cut(threshold_at(fit.areas, int(k)), fit.areas) for k in _area_ks(n)}):
            big = np.flatnonzero(fit.areas >= float(a))
            if len(big):
                out.append(_descending(fit.router, big, _box_threshold(float(a))))
        return out
    if family == "cascade":
        return [_ascending(Cascade(0.0).confidence(fit.kpts_small), lambda c: Cascade(float(c)), score=True)]
    if family == "cascade-visible":
        stat = Cascade(0.0, VISIBLE_SCORE).confidence(fit.kpts_small)
        return [_ascending(stat, lambda c: Cascade(float(c), VISIBLE_SCORE), score=True)]
    raise DynPoseError(f"--policies: unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def _box_threshold(area: float) -> Callable[[str], Policy]:
    return lambda cut: BoxThreshold(area, float(cut))


def _area_ks(n: int) -> list[int]:
    return [k for k in np.unique(np.round(np.linspace(0, n, min(n, AREA_CUTS) + 1)).astype(int)) if 0 < k < n]


@dataclass(frozen=True)
class Pick:
    """A policy and what it does on the fit set."""

    policy: Policy
    share: float
    agreement: float
    cost: float


def _pick(fit: PersonSet, policy: Policy, costs: ModelCosts) -> Pick:
    large = fit.route(policy)
    share = float(large.mean()) if len(large) else 0.0
    return Pick(policy, share, float(fit.agreement(large).mean()), policy.cost(costs, share))


def cheapest_in(fit: PersonSet, sweep: Sweep, target: float, costs: ModelCosts) -> Pick | None:
    """The sweep's first k whose agreement reaches `target` (agreement only grows with k), as a policy."""
    gain = np.where(fit.has_ref, 1.0 - np.nan_to_num(fit.oks, nan=1.0), 0.0)[sweep.order]
    n_ref = int(fit.has_ref.sum())
    base = float(np.nansum(fit.oks))
    agreement = (base + np.r_[0.0, np.cumsum(gain)]) / max(n_ref, 1)
    passing = np.flatnonzero(sweep.ok & (agreement >= target - 1e-12))
    if not len(passing):
        return None
    pick = _pick(fit, sweep.make(int(passing[0])), costs)
    return pick if pick.agreement >= target - 1e-12 else None  # a rounded cut that moved a person: never claim it


def family_winners(fit: PersonSet, families: Sequence[str], target: float, costs: ModelCosts) -> dict[str, Pick]:
    """family -> its cheapest policy reaching `target` on the fit set (families with none left out), plus the fixed
    policies under "fixed" (all-small when it passes, else all-large)."""
    out = {}
    for fam in families:
        picks = [p for s in sweeps(fit, fam) if (p := cheapest_in(fit, s, target, costs)) is not None]
        if picks:
            out[fam] = min(picks, key=lambda p: (p.cost, p.share))
    small = _pick(fit, AllSmall(), costs)
    out["fixed"] = small if small.agreement >= target - 1e-12 else _pick(fit, AllLarge(), costs)
    return out


# -- the whole calibration -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelFreeOptions:
    """What a label-free calibration aims at and where it runs."""

    target: float = DEFAULT_TARGET
    holdout: float = DEFAULT_HOLDOUT
    seed: int = 0
    families: tuple[str, ...] = FAMILIES
    cost_batch: int = 8
    save: bool = True
    run: FootageOptions = field(default_factory=FootageOptions)


@dataclass(frozen=True)
class LabelFreeCalibration:
    """The chosen policy, the share it sends to the large model over all the footage, and the stored figures."""

    policy: str
    fraction: float
    figures: LabelFreeFigures
    skipped: tuple[str, ...] = ()  # families that could not run (no router)


def _held_out(held: PersonSet, pick: Pick, seed: int) -> tuple[Interval, Interval, float]:
    large = held.route(pick.policy)
    a = held.agreement(large)
    frames = held.frame[held.has_ref]
    return (
        clustered_mean_ci(a, frames, seed=seed),
        clustered_mean_ci((a >= ABOVE).astype(np.float64), frames, seed=seed),
        float(large.mean()),
    )


def calibrate_label_free(
    engine_dir: str | os.PathLike, spec: UnlabelledSpec, opts: LabelFreeOptions | None = None
) -> LabelFreeCalibration:
    """Run both models on the footage, choose the policy on the fit part, check it on the held-out part (module doc)
    and, with `opts.save`, store it as the engine dir's route."""
    o = opts or LabelFreeOptions()
    target, holdout = check_target(o.target), check_holdout(o.holdout)
    unknown = sorted(set(o.families) - set(FAMILIES))
    if unknown or not o.families:
        raise DynPoseError(f"--policies {','.join(o.families)}: choose from {', '.join(FAMILIES)}")
    large_card = Manifest.load(engine_dir, verify=False).require(Role.LARGE, engine_dir=engine_dir).card
    data = footage_data(engine_dir, spec, o.run)
    ps = person_set(data, large_card.keypoint_set.sigmas)
    is_held = split(ps, holdout, o.seed)
    fit, held = ps.subset(np.flatnonzero(~is_held)), ps.subset(np.flatnonzero(is_held))
    check_size(fit, held)
    costs = measured_costs(engine_dir, o.run.backend, o.run.device, o.cost_batch, o.run.threads)
    winners = family_winners(fit, o.families, target, costs)
    best = min(winners.values(), key=lambda p: (p.cost, p.share))
    per_family = {}
    for fam, p in winners.items():
        agreement, _, share = _held_out(held, p, o.seed)
        per_family[fam] = FamilyFigures(str(p.policy), share, p.agreement, agreement, p.cost, costs.large / p.cost)
    agreement, above, share = _held_out(held, best, o.seed)
    has_router = bool(np.isfinite(ps.router).all())
    figures = LabelFreeFigures(
        target=target, agreement=agreement, above=above, share=share, fit_agreement=best.agreement,
        persons=Counts(int(ps.has_ref.sum()), int(fit.has_ref.sum()), int(held.has_ref.sum())),
        frames=Counts(len(np.unique(ps.frame)), len(np.unique(fit.frame)), len(np.unique(held.frame))),
        no_reference=int((~ps.has_ref).sum()), footage=data.record,
        models={r: s for r, s in data.models.items() if r != Role.ROUTER or best.policy.needs_router},
        cost_ms=best.cost, large_ms=costs.large, per_family=per_family,
        settings=_settings(o, costs),
    )  # fmt: skip
    result = LabelFreeCalibration(
        str(best.policy),
        float(ps.route(best.policy).mean()),
        figures,
        tuple(f for f in o.families if f in ROUTER_FAMILIES and not has_router),
    )
    if o.save:
        store(engine_dir, result)
    return result


def _settings(o: LabelFreeOptions, costs: ModelCosts) -> dict[str, Any]:
    return {
        "holdout": o.holdout,
        "seed": o.seed,
        "families": list(o.families),
        "backend": o.run.backend,
        "device": o.run.device,
        "cost_batch": costs.batch,
        "costs_ms": {Role.SMALL.value: costs.small, Role.LARGE.value: costs.large, Role.ROUTER.value: costs.router},
        "min_persons": MIN_PERSONS,
        "min_frames": MIN_FRAMES,
    }


def store(engine_dir: str | os.PathLike, result: LabelFreeCalibration) -> None:
    """The policy as the manifest's route, its figures under notes.router_calibration (one atomic write)."""
    with updating_manifest(engine_dir, "store the label-free route", verify=True) as manifest:
        manifest.set_calibration(RouteCalibration(result.policy, result.fraction, result.figures.to_dict()))


def report_lines(res: LabelFreeCalibration) -> list[str]:
    """What the CLI prints."""
    f = res.figures
    lines = [
        f"label-free calibration: {f.persons.total} persons in {f.frames.total} frames (footage "
        f"{f.footage.sha256[:12]}; {f.no_reference} more without a confident large-model joint, routed but not "
        f"scored); fit on {f.persons.fit} persons in {f.frames.fit} frames, checked on {f.persons.heldout} in "
        f"{f.frames.heldout}",
        f"policy {res.policy} (agreement >= {f.target:g} with the large model on the fit part: {f.fit_agreement:.3f}): "
        f"{f.share:.0%} of the held-out persons to the large model",
        f"held-out agreement {f.agreement.text()} (mean OKS to the large model's keypoints, 95% frame bootstrap); "
        f"{f.above.value:.0%} [{f.above.lo:.0%}, {f.above.hi:.0%}] of persons at OKS >= {ABOVE:g}",
        f"cost {f.cost_ms:.2f} ms per person by the measured costs (large-only {f.large_ms:.2f}): "
        f"{f.large_ms / f.cost_ms:.2f}x",
    ]
    for fam, w in sorted(f.per_family.items(), key=lambda kv: kv[1].cost_ms):
        lines.append(
            f"  cheapest {fam:<15} {w.policy}: {w.share:.0%} large, agreement fit {w.fit_agreement:.3f} / held out "
            f"{w.agreement.text()}, {w.cost_ms:.2f} ms ({w.speedup:.2f}x)"
        )
    if res.skipped:
        lines.append(f"  not tried: {', '.join(res.skipped)} (the engine dir has no router)")
    if not f.holds:
        lines.append(
            f"warning: the held-out interval lies below the target {f.target:g}: the policy does not reach it on "
            "footage it was not chosen on; give more footage or aim higher (--target-agreement)"
        )
    return lines
