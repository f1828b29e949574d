"""The live audit: how closely the routed answers agree with the large model's, measured while a run goes on.

    pipe = Pipeline.from_engine_dir("engines/", audit=AuditOptions(0.1, target=0.95))
    ...
    print(pipe.auditor.figures().agreement)          # 0.962 [0.955, 0.969]

A random share F of the persons the policy left on the small model also run on the large model, off the hot path
(`execute.Audit`: the answer never waits for them). Each such person gives the OKS of the small model's keypoints
against the large model's, the large model as the reference: its joints scoring at least `KPT_THR` (0.3) are the
labelled joints and the box area (w * h) is the scale, as pycocotools scores a prediction against ground truth
(`postprocess.oks`). A person whose large-model pose has no joint that confident has no defined OKS (COCO ignores
such ground truth) and is counted apart (`undefined`); a NaN small-model joint counts as a miss.

Figures (`AuditFigures`), each an `Estimate` with a 95% interval:
- `small_agreement`: mean OKS of the small model's answers (the audited persons);
- `agreement`: mean OKS of the *routed* answers against the large model, the figure `dynpose-train-router
  --calibrate --target-agreement` calibrates and `--audit-target` steers: persons the large model answered agree
  with it by definition (OKS 1), so with p the share of persons the small model answered,
  `agreement = 1 - p * (1 - small_agreement)`;
- `good` / `small_good`: the share of persons at OKS >= 0.9, routed and small-only.

The interval is the normal (CLT) interval of a mean, with the variance clustered by frame (the ratio estimator's
cluster-robust variance; with one person per frame it is the textbook `s / sqrt(n)`). Why normal, not a bootstrap:
OKS lies in [0, 1], so a mean over the >= 30 persons the interval needs is close to normal; the figures are read
after every sample (the steering, the service's `/v1/stats`), and running sums give the interval in constant time
under a lock, where a bootstrap would keep every value and resample it on each read. Why clustered by frame: the
persons of one image share its light, blur and crowding, so they are not independent; treating them as such would
make the interval too narrow in crowds. Consecutive frames of a video are correlated too, which this does not
capture: on a video the interval is narrower than the truth, and the steering's wait of `every` persons between
moves is what keeps it from reacting to noise. No interval is given under `MIN_PERSONS` persons or `MIN_FRAMES`
frames.

Steering (`AuditOptions.target`, `--audit-target A`): the samples planned under the current policy since its last
change are its evidence. Once it holds at least `every` persons with a defined OKS:
- the interval's upper bound below A: the policy moves one step toward the large model (`Policy.toward_large`);
- the lower bound above A + `margin`, and the policy was moved toward the large model before: one step back, to
  the very policy it came from; it never moves past the policy it started with toward the small model.
Each move starts a new epoch (samples of plans made under the old policy no longer count) and is logged with the
evidence. A fixed policy (`all-small`, `all-large`) or one at its bound cannot move: that is logged once per epoch.

Drift: when the engine dir's route was calibrated (`Manifest.calibration`, written by `dynpose-train-router
--calibrate`), its figures `agreement` (a number, or the label-free calibration's interval {value, lo, hi}) and
`agreement_ci` ([lo, hi]) are the held-out agreement of the calibrated policy. While that policy runs, a live interval
that does not overlap the calibrated one (or excludes the calibrated value, when no interval was stored) is logged as
a warning, once, and again when it comes back.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dynpose.engines.manifest import RouteCalibration
from dynpose.errors import DynPoseError
from dynpose.roles import Role
from dynpose.runtime.execute import MAX_PENDING_AUDIT, Audit
from dynpose.runtime.plan import AuditSample
from dynpose.runtime.policy import Policy, parse_policy
from dynpose.runtime.postprocess import oks

log = logging.getLogger(__name__)

KPT_THR = 0.3  # a large-model joint scoring this much is a labelled joint of the reference
GOOD_OKS = 0.9  # "agrees": OKS at least this
MIN_PERSONS = 30  # no interval below this many persons with a defined OKS ...
MIN_FRAMES = 5  # ... or this many frames they come from
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def person_oks(
    small: np.ndarray, large: np.ndarray, areas: np.ndarray, sigmas: Sequence[float], kpt_thr: float = KPT_THR
) -> np.ndarray:
    """(n,) OKS of each small-model pose (n,K,3) against the large model's (n,K,3), the reference: its joints scoring
    at least `kpt_thr` labelled, `areas` (n,) (box w*h) the scale. NaN where the reference has no such joint; a NaN
    small-model joint is a miss."""
    s = np.nan_to_num(np.asarray(small, dtype=np.float64), nan=1e9)
    ref = np.asarray(large, dtype=np.float64).copy()
    if s.shape != ref.shape or s.ndim != 3 or s.shape[2] != 3 or len(areas) != len(s):
        raise DynPoseError(f"audit: keypoints {s.shape} and {ref.shape} with {len(areas)} areas do not match")
    ok = np.isfinite(ref).all(axis=2) & (np.nan_to_num(ref[..., 2], nan=0.0) >= kpt_thr)
    ref[..., 2] = ok
    ref[..., :2] = np.where(ok[..., None], ref[..., :2], 0.0)
    return np.array([oks(s[i], ref[i], float(areas[i]), sigmas) for i in range(len(s))], dtype=np.float64)


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval (`lo`/`hi` None: too few persons or frames for one to mean anything)."""

    mean: float
    lo: float | None = None
    hi: float | None = None
    persons: int = 0

    @property
    def ci(self) -> tuple[float, float] | None:
        return None if self.lo is None or self.hi is None else (self.lo, self.hi)

    def affine(self, scale: float, offset: float) -> Estimate:
        """`offset + scale * x` of this estimate (its interval maps along; `scale` >= 0)."""
        ci = self.ci
        lo, hi = (None, None) if ci is None else (offset + scale * ci[0], offset + scale * ci[1])
        return Estimate(offset + scale * self.mean, lo, hi, self.persons)

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "n/a"
        ci = self.ci
        return f"{self.mean:.3f}" + (
            f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " [too few persons or frames for an interval]"
        )


@dataclass
class _ClusterMean:
    """Running sums of a mean over persons grouped in clusters (frames): the ratio estimator sum(y) / sum(n) and its
    cluster-robust variance, in constant time per cluster."""

    clusters: int = 0
    n: float = 0.0
    y: float = 0.0
    yy: float = 0.0
    yn: float = 0.0
    nn: float = 0.0

    def add(self, y: np.ndarray, n: np.ndarray) -> None:
        """Per cluster: the sum of its values `y` and its person count `n`."""
        self.clusters += len(n)
        self.n += float(n.sum())
        self.y += float(y.sum())
        self.yy += float((y * y).sum())
        self.yn += float((y * n).sum())
        self.nn += float((n * n).sum())

    def estimate(self) -> Estimate:
        if self.n <= 0:
            return Estimate(float("nan"))
        m = self.y / self.n
        if self.n < MIN_PERSONS or self.clusters < MIN_FRAMES:
            return Estimate(m, persons=int(self.n))
        c = self.clusters
        spread = max(0.0, self.yy - 2.0 * m * self.yn + m * m * self.nn)  # sum over clusters of (y_c - m n_c)^2
        half = Z95 * math.sqrt(c / (c - 1) * spread) / self.n
        return Estimate(m, max(0.0, m - half), min(1.0, m + half), int(self.n))


@dataclass(frozen=True)
class AuditFigures:
    """What the audit measured over some samples (see the module doc)."""

    persons: int  # persons of the audited plans
    answered_small: int  # of them, answered by the small model
    audited: int  # audited persons (large-model crops spent)
    undefined: int  # audited persons whose large-model pose has no joint scoring `KPT_THR`
    frames: int  # frames the persons with a defined OKS come from
    agreement: Estimate  # routed answers vs the large model: mean OKS
    good: Estimate  # routed answers: share at OKS >= GOOD_OKS
    small_agreement: Estimate  # the small model's answers alone
    small_good: Estimate

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "persons": self.persons,
            "answered_small": self.answered_small,
            "audited": self.audited,
            "undefined": self.undefined,
            "frames": self.frames,
        }
        for name, e in (
            ("agreement", self.agreement),
            (f"share_oks_{GOOD_OKS:g}", self.good),
            ("small_agreement", self.small_agreement),
            (f"small_share_oks_{GOOD_OKS:g}", self.small_good),
        ):
            out[name] = None if math.isnan(e.mean) else round(e.mean, 5)
            out[f"{name}_ci"] = None if e.ci is None else [round(e.ci[0], 5), round(e.ci[1], 5)]
        return out


@dataclass
class _Tally:
    """Running totals of audit samples (under the auditor's lock)."""

    persons: int = 0
    answered_small: int = 0
    audited: int = 0
    undefined: int = 0
    oks: _ClusterMean = field(default_factory=_ClusterMean)
    good: _ClusterMean = field(default_factory=_ClusterMean)

    def add(self, sample: AuditSample, values: np.ndarray) -> None:
        self.persons += sample.persons
        self.answered_small += sample.answered_small
        self.audited += len(values)
        defined = np.isfinite(values)
        self.undefined += int((~defined).sum())
        if defined.any():
            frames = np.zeros(len(values), np.int64) if sample.frame_index is None else sample.frame_index
            _, cluster = np.unique(frames[defined], return_inverse=True)
            n = np.bincount(cluster).astype(np.float64)
            self.oks.add(np.bincount(cluster, weights=values[defined]), n)
            self.good.add(np.bincount(cluster, weights=(values[defined] >= GOOD_OKS).astype(np.float64)), n)

    def figures(self) -> AuditFigures:
        small, small_good = self.oks.estimate(), self.good.estimate()
        p = self.answered_small / self.persons if self.persons else float("nan")
        if p == 0.0:  # every answer is the large model's own: agreement 1 exactly
            agreement = good = Estimate(1.0, 1.0, 1.0, 0)
        else:
            agreement, good = small.affine(p, 1.0 - p), small_good.affine(p, 1.0 - p)
        return AuditFigures(
            self.persons,
            self.answered_small,
            self.audited,
            self.undefined,
            self.oks.clusters,
            agreement,
            good,
            small,
            small_good,
        )


@dataclass(frozen=True)
class Calibrated:
    """The calibrated policy's held-out agreement, from the manifest (`figures.agreement`, `figures.agreement_ci`)."""

    policy: str
    agreement: float
    ci: tuple[float, float] | None = None

    @classmethod
    def of(cls, cal: RouteCalibration | None) -> Calibrated | None:
        """None when there is no calibration or it stored no agreement (e.g. one calibrated on AP alone)."""
        if cal is None or "agreement" not in cal.figures:
            return None
        a, ci = cal.figures.get("agreement"), cal.figures.get("agreement_ci")
        if isinstance(a, dict) and ci is None and "lo" in a and "hi" in a:  # the label-free record: an interval
            ci = [a["lo"], a["hi"]]
        if isinstance(a, dict):
            a = a.get("value")
        try:
            policy = str(parse_policy(cal.policy))
            value = float(a)  # type: ignore[arg-type]
            bounds = None if ci is None else (float(ci[0]), float(ci[1]))
        except (DynPoseError, TypeError, ValueError, IndexError, KeyError):
            log.warning("manifest calibration: agreement %r / agreement_ci %r are not figures; no drift check", a, ci)
            return None
        if not 0.0 <= value <= 1.0 or (bounds is not None and not 0.0 <= bounds[0] <= bounds[1] <= 1.0):
            log.warning("manifest calibration: agreement %r / agreement_ci %r out of [0, 1]; no drift check", a, ci)
            return None
        return cls(policy, value, bounds)

    def __str__(self) -> str:
        return f"{self.agreement:.3f}" + (f" [{self.ci[0]:.3f}, {self.ci[1]:.3f}]" if self.ci else "")


@dataclass(frozen=True)
class AuditOptions:
    """A live audit: `share` of the small model's answers re-run on the large model; with `target`, the steering
    (see the module doc: `every`, `step`, `margin`); `seed` for the sampling; `calibrated`: the figures to warn
    against (`Pipeline.from_engine_dir` takes them from the manifest when None)."""

    share: float
    target: float | None = None
    margin: float = 0.02
    every: int = 100
    step: float = 0.05
    seed: int | None = None
    max_pending: int = MAX_PENDING_AUDIT
    calibrated: Calibrated | None = None

    @classmethod
    def of(cls, audit: float | AuditOptions | None) -> AuditOptions | None:
        """A share or options -> checked options; None or a share of 0 -> no audit (a target then is refused)."""
        if audit is None:
            return None
        opts = audit if isinstance(audit, AuditOptions) else cls(audit)
        opts.check()
        return opts if opts.share > 0 else None

    def check(self) -> None:
        """One-line errors for what cannot be an audit."""
        s = self.share
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:
            raise DynPoseError(
                f"--audit {s}: the audit share must be a number in [0, 1] (e.g. 0.05: 5% of the small model's answers)"
            )
        t = self.target
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0):
            raise DynPoseError(f"--audit-target {t}: must be an agreement (mean OKS) in (0, 1], e.g. 0.95")
        if t is not None and s == 0:
            raise DynPoseError("--audit-target steers by the audit's figures; give --audit F with F > 0 (e.g. --audit 0.05)")
        if not (0.0 <= self.margin < 1.0 and 0.0 < self.step <= 1.0 and self.every >= 1 and self.max_pending >= 1):
            raise DynPoseError(
                f"audit options: margin {self.margin} must be in [0, 1), step {self.step} in (0, 1], every "
                f"{self.every} and max_pending {self.max_pending} >= 1"
            )


@dataclass(frozen=True)
class Move:
    """One policy change of the steering, with its evidence."""

    old: str
    new: str
    toward: Role  # Role.LARGE | Role.SMALL
    evidence: AuditFigures  # the old policy's figures since its last change
    target: float

    def line(self) -> str:
        a = self.evidence.agreement
        why = f"below the target {self.target:g}" if self.toward is Role.LARGE else "back above the target + margin"
        return (
            f"audit: agreement {a} over {a.persons} audited persons under {self.old} is {why}: route {self.old} -> "
            f"{self.new} (toward the {self.toward.value} model)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "old": self.old,
            "new": self.new,
            "toward": self.toward.value,
            "target": self.target,
            "evidence": self.evidence.to_dict(),
        }


class Auditor:
    """Keeps the live audit's figures, steers the policy and watches for drift (see the module doc). Thread-safe:
    samples arrive on the large model's worker thread (or the service's event loop) while others read the figures.

    `sampler` is the `execute.Audit` to hand to the executors; its samples come back to `add`. `on_move(policy)` is
    called, under the auditor's lock, with each new policy (the Pipeline swaps its policy there);
    `on_sample(sample)` after each sample is counted."""

    def __init__(
        self,
        options: AuditOptions,
        sigmas: Sequence[float],
        policy: Policy,
        on_move: Callable[[Policy], None] | None = None,
        on_sample: Callable[[AuditSample], None] | None = None,
    ) -> None:
        options.check()
        self.options = options
        self.sigmas = list(sigmas)
        self.started_with = policy
        self.policy = policy
        self.moves: list[Move] = []
        self.drift: str | None = None  # the warning while the live agreement departs from the calibrated one
        self._on_move, self._on_sample = on_move, on_sample
        self._total = _Tally()
        self._by_policy: dict[str, _Tally] = {}
        self._epoch = _Tally()  # the current policy's samples since it was set
        self._back: list[Policy] = []  # the policies left by each step toward the large model, the last on top
        self._stuck = False  # a move was due but the policy could not move (logged once per epoch)
        self._lock = threading.Lock()
        self.sampler = Audit(options.share, self.add, options.seed, options.max_pending)

    def add(self, sample: AuditSample) -> None:
        """One plan's audit (the sampler's sink)."""
        values = person_oks(sample.small, sample.large, sample.areas, self.sigmas)
        key = str(sample.policy) if sample.policy is not None else None
        with self._lock:
            self._total.add(sample, values)
            if key is not None:
                self._by_policy.setdefault(key, _Tally()).add(sample, values)
                if key == str(self.policy):
                    self._epoch.add(sample, values)
                    if self.options.target is not None:
                        self._steer()
                self._watch_drift()
        if self._on_sample is not None:
            self._on_sample(sample)

    # -- steering --------------------------------------------------------------------------------------------------
    def _steer(self) -> None:
        fig = self._epoch.figures()
        a, target = fig.agreement, self.options.target
        assert target is not None
        if a.persons < self.options.every or a.ci is None:
            return
        if a.ci[1] < target:
            toward, new = Role.LARGE, self.policy.toward_large(self.options.step)
        elif self._back and a.ci[0] > target + self.options.margin:
            toward, new = Role.SMALL, self._back[-1]  # retrace exactly: steps rounded one way do not undo evenly
        else:
            return
        if str(new) == str(self.policy):
            if not self._stuck and toward is Role.LARGE:
                self._stuck = True
                log.warning(
                    "audit: agreement %s under %s is below the target %g, but the route cannot move toward the large "
                    "model (a fixed policy, or at its bound); pick another route or lower --audit-target",
                    a,
                    self.policy,
                    target,
                )
            return
        move = Move(str(self.policy), str(new), toward, fig, target)
        if self._on_move is not None:
            self._on_move(new)  # first: whoever sees the move recorded finds the new policy in use
        self.moves.append(move)
        if toward is Role.LARGE:
            self._back.append(self.policy)
        else:
            self._back.pop()
        self.policy, self._epoch, self._stuck = new, _Tally(), False
        log.warning("%s", move.line())

    # -- drift -----------------------------------------------------------------------------------------------------
    def _watch_drift(self) -> None:
        cal = self.options.calibrated
        tally = self._by_policy.get(cal.policy) if cal is not None else None
        if cal is None or tally is None:
            return
        live = tally.figures().agreement
        if live.ci is None:
            return
        lo, hi = cal.ci or (cal.agreement, cal.agreement)
        departs = live.ci[1] < lo or live.ci[0] > hi
        if departs and self.drift is None:
            self.drift = (
                f"audit: the live agreement {live} under {cal.policy} departs from the calibrated {cal} "
                "(dynpose-train-router --calibrate): this footage is not like the calibration's; calibrate on it, or "
                "let --audit-target steer the route"
            )
            log.warning("%s", self.drift)
        elif not departs and self.drift is not None:
            self.drift = None
            log.warning("audit: the live agreement %s under %s is back within the calibrated %s", live, cal.policy, cal)

    # -- reading ---------------------------------------------------------------------------------------------------
    def figures(self, policy: str | Policy | None = None) -> AuditFigures:
        """The figures of every sample so far, or of those planned under `policy`."""
        with self._lock:
            if policy is None:
                return self._total.figures()
            return self._by_policy.get(str(parse_policy(policy)), _Tally()).figures()

    def snapshot(self) -> dict[str, Any]:
        """Everything the audit knows, as JSON: the run summary's sidecar and the service's `/v1/stats`."""
        o = self.options
        with self._lock:
            by_policy = {k: t.figures().to_dict() for k, t in self._by_policy.items()}
            total = self._total.figures().to_dict()
            moves = [m.to_dict() for m in self.moves]
            policy, drift = str(self.policy), self.drift
        s = self.sampler
        return {
            "share": o.share,
            "target": o.target,
            "route": policy,
            "started_with": str(self.started_with),
            **total,
            "large_crops": total["audited"],
            "skipped": s.skipped,
            "failed": s.failed,
            "pending": s.pending,
            "by_route": by_policy,
            "moves": moves,
            "calibrated": None
            if o.calibrated is None
            else {"route": o.calibrated.policy, "agreement": o.calibrated.agreement, "agreement_ci": o.calibrated.ci},
            "drift": drift,
            "reference": {"kpt_thr": KPT_THR, "good_oks": GOOD_OKS, "interval": "95% normal, clustered by frame"},
        }

    def summary(self) -> list[str]:
        """The run summary's audit lines."""
        f = self.figures()
        s = self.sampler
        share = f"{f.audited / f.answered_small:.0%} of them" if f.answered_small else "none"
        lines = [
            f"audit: {f.audited} of the small model's {f.answered_small} answers re-run on the large model ({share}; "
            f"{f.audited} large crops{f', {s.skipped} skipped while the large model was busy' if s.skipped else ''}"
            f"{f', {s.failed} failed' if s.failed else ''}); agreement with the large model {f.agreement} (mean OKS), "
            f"{_percent(f.good)} of persons at OKS >= {GOOD_OKS:g}; the small model's answers alone {f.small_agreement}"
        ]
        if self.moves:
            path = " -> ".join([self.moves[0].old] + [m.new for m in self.moves])
            lines.append(f"audit: route moved {len(self.moves)} time(s) by --audit-target {self.options.target:g}: {path}")
        if self.drift:
            lines.append(self.drift)
        return lines


def _percent(e: Estimate) -> str:
    if math.isnan(e.mean):
        return "n/a"
    ci = e.ci
    return f"{e.mean:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")


def with_calibration(options: AuditOptions, cal: RouteCalibration | None) -> AuditOptions:
    """`options` with the manifest's calibrated agreement to warn against, unless they carry their own."""
    return options if options.calibrated is not None else replace(options, calibrated=Calibrated.of(cal))
