"""Routing calibration: choose the policy parameters on held-out data and store them in the manifest.

The engine dir's router and both pose models run on every ground-truth crop of the given annotations (the pose
outputs come from the same cache as training), or, with `--detections`, on every box of a detections file, scored
as the Pipeline scores them (rescoring, OKS-NMS per image). Then:

- `--target-fraction F`: a `threshold:T` policy with T between the k-th and (k+1)-th highest score[1], k =
  round(F * N), so exactly k crops (F of them) go to the large model, unless scores tie at the cut.
- `--target-ap-drop D`: the cheapest policy whose COCO keypoint AP (pycocotools) is at most D below large-only,
  among `threshold:T` (top-k crops by score[1]), `box:AREA` (top-k by box area: no router runs) and
  `box-threshold:AREA,T` (boxes above an area cut, then top-k of those by score[1]), k on a grid from 0 to N, plus
  all-small / all-large. Cheapest by the per-crop costs measured on this machine and backend (the manifest's
  `notes.costs`, measured now when missing; `Policy.cost`): a router-free policy saves the
  router on every crop, so at equal AP it can be the cheaper one even when it sends more crops to the large model.

Why a threshold and not a band: score[1] is trained to predict the relative error reduction of the large model, so
it ranks crops by what the large model would gain; sending the top F by that ranking is the one policy a fraction
pins down, whereas a band `LO,HI` has two parameters for one constraint (DynPose's release band 0.59-0.69 reflects
where its own router's scores of the crops that gain fall, not a rule that transfers to a retrained router). A
threshold, unlike `fraction:F`, decides each crop on its own, so the routing of a crop does not depend on which
other crops share its batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dynpose.engines.manifest import Manifest, RouteCalibration, updating_manifest
from dynpose.errors import DynPoseError
from dynpose.roles import MODEL_ROLES, Role
from dynpose.router.collect import CropOutputs, Crops, DetOutputs, collect_det_outputs, collect_outputs, router_crops
from dynpose.router.targets import AREA_FROM_BOX, TEACHER_VIS_THR, teacher_oks
from dynpose.runtime.policy import Cascade, ModelCosts, Policy, Signals, parse_policy

AP_GRID = 40  # fraction grid of each policy family in the AP-drop scan
AREA_CUTS = 8  # area cuts tried for box-threshold (each with the threshold grid among the boxes above it)
FAMILIES = ("threshold", "box", "box-below", "box-threshold", "cascade", "cascade-visible")
VISIBLE_SCORE = TEACHER_VIS_THR  # cascade-visible's S: the score at which the reference counts a joint as seen
ABOVE = 0.9  # a person "agrees" with the large model at OKS >= 0.9


@dataclass
class Calibration:
    """The chosen policy and what it achieves on the calibration crops."""

    policy: str
    fraction: float  # share of crops the policy sends to the large model
    num_crops: int
    ap: float  # COCO AP of the routed predictions
    ap_small: float  # all-small
    ap_large: float  # all-large
    target: str  # e.g. "fraction 0.3" or "AP drop <= 0.01"
    boxes: str = "ground-truth boxes"  # or "detection boxes"
    cost_ms: float | None = None  # expected per-crop cost of the policy by the measured costs
    large_ms: float | None = None  # large-only per crop
    candidates: int = 0  # policies whose AP was computed
    # the cheapest passing policy of each family (threshold, box, box-threshold): what each signal alone achieves
    per_family: dict[str, dict[str, Any]] = field(default_factory=dict)
    agreement: float | None = None  # mean OKS of the routed keypoints against the large model's (`agreement`)
    agreement_above: float | None = None  # share of persons at OKS >= ABOVE against the large model

    @property
    def speedup(self) -> float | None:
        return self.large_ms / self.cost_ms if self.cost_ms and self.large_ms else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup_by_costs": self.speedup}


def check_fraction(f: float) -> float:
    if not (isinstance(f, (int, float)) and np.isfinite(f) and 0.0 <= f <= 1.0):
        raise DynPoseError(f"--target-fraction must be a number in [0, 1], got {f!r}")
    return float(f)


def check_ap_drop(d: float) -> float:
    if not (isinstance(d, (int, float)) and np.isfinite(d) and 0.0 <= d <= 1.0):
        raise DynPoseError(f"--target-ap-drop must be an AP difference in [0, 1] (e.g. 0.01 for one AP point), got {d!r}")
    return float(d)


def threshold_at(s1: np.ndarray, k: int) -> float:
    """A threshold T with `score[1] >= T` true for the k highest scores (more only when scores tie at the cut)."""
    s = np.sort(np.asarray(s1, dtype=np.float64))[::-1]
    n = len(s)
    if k <= 0:
        return float(np.nextafter(s[0], np.inf)) if n else 1.0
    if k >= n:
        return float(s[-1])
    return float((s[k - 1] + s[k]) / 2.0) if s[k - 1] > s[k] else float(s[k - 1])


def policy_string(threshold: float, s1: np.ndarray) -> str:
    """`threshold:T` with as few digits as keep the decisions on these scores unchanged (the manifest stays
    readable, and a rounded T never moves a crop across the cut)."""
    s = np.asarray(s1, dtype=np.float64)
    want = s >= threshold
    for digits in (3, 4, 6, 9, 12, 17):
        text = f"threshold:{threshold:.{digits}g}"
        if np.array_equal(s >= float(text.partition(":")[2]), want):
            return text
    return f"threshold:{threshold!r}"


def policy_for_fraction(s1: np.ndarray, fraction: float) -> tuple[str, float]:
    """(policy string, achieved fraction) sending `fraction` of these crops to the large model."""
    s = np.asarray(s1, dtype=np.float64)
    k = int(round(check_fraction(fraction) * len(s)))
    text = policy_string(threshold_at(s, k), s)
    large = parse_policy(text).decide(Signals(np.zeros(len(s)), router=s)).large
    return text, float(large.mean())


def coco_results(out: CropOutputs, large: np.ndarray) -> list[dict[str, Any]]:
    """COCO keypoint results of the routed predictions (large[i]: crop i from the large model), scored as the
    official evaluation does (mean of keypoint scores above 0.2; box score 1 for ground-truth boxes)."""
    from dynpose.runtime.postprocess import rescore

    kp = np.where(np.asarray(large)[:, None, None], out.kpts_large, out.kpts_small)
    scores = rescore(kp, np.ones(len(kp)))
    return [
        {
            "image_id": int(out.image_ids[i]),
            "category_id": 1,
            "keypoints": kp[i].reshape(-1).round(3).tolist(),
            "score": float(scores[i]),
        }
        for i in range(len(kp))
    ]


def routed_ap(out: CropOutputs, large: np.ndarray, ann_path: str | os.PathLike) -> float:
    from dynpose.eval.coco import evaluate_results, quiet

    with quiet():  # e.g. the annotation-id-0 note, once per scan step
        return float(evaluate_results(coco_results(out, large), ann_path)["AP"])


def router_scores(
    engine_dir: str | os.PathLike, crops: Crops, *, backend: str = "ort", device: str = "cpu", chunk: int = 64
) -> np.ndarray:
    """(N,3) scores of the engine dir's router on the crops (chunked so memory stays flat)."""
    from dynpose.runtime.engine_set import EngineSet, LoadOptions

    with EngineSet.load(engine_dir, LoadOptions(backend, device, with_detector=False), roles=[Role.ROUTER]) as engines:
        router = engines.router
        assert router is not None
        images = router_crops(crops, router.card)
        parts = [router.run(images[np.arange(a, min(a + chunk, len(images)))]) for a in range(0, len(images), chunk)]
    return np.concatenate(parts, axis=0)


def round_cut(value: float, arr: np.ndarray) -> str:
    """`value` with as few digits as keep `arr >= value` unchanged."""
    want = arr >= value
    if abs(value) >= 100 and np.array_equal(arr >= float(round(value)), want):
        return str(int(round(value)))  # areas: whole px² read best
    for digits in (3, 4, 6, 9, 12, 17):
        text = f"{value:.{digits}g}"
        if np.array_equal(arr >= float(text), want):
            return text
    return repr(float(value))


def small_large_oks(
    kpts_small: np.ndarray, kpts_large: np.ndarray, boxes: np.ndarray, sigmas: Sequence[float]
) -> np.ndarray:
    """(N,) OKS of the small model's keypoints against the large model's (the label-free reference: over the joints
    the large model scores above 0.3, scale box w*h x 0.53); NaN where the large model sees no joint."""
    b = np.asarray(boxes, dtype=np.float64)
    return teacher_oks(kpts_small, kpts_large, np.maximum(b[:, 2] * b[:, 3] * AREA_FROM_BOX, 1.0), sigmas)


def agreement(oks_sl: np.ndarray, large: np.ndarray) -> np.ndarray:
    """Per person with a reference (finite `oks_sl`): the OKS of the routed keypoints against the large model's, 1
    where the large model answers, the small model's OKS to it where the small one does."""
    ok = np.isfinite(oks_sl)
    return np.where(np.asarray(large, bool)[ok], 1.0, oks_sl[ok])


@dataclass
class CalibData:
    """What the policy search needs: per-crop router score[1], box and the small model's keypoints, the small model's
    OKS against the large one, and the AP of any small/large split."""

    s1: np.ndarray
    boxes: np.ndarray  # (N,4) x,y,w,h
    ap: Callable[[np.ndarray], float]
    kind: str  # "ground-truth boxes" | "detection boxes"
    kpts_small: np.ndarray  # (N,K,3): the cascade's confidence
    oks_sl: np.ndarray  # (N,) `small_large_oks`

    def __len__(self) -> int:
        return len(self.s1)

    @property
    def areas(self) -> np.ndarray:
        return self.boxes[:, 2] * self.boxes[:, 3]

    def agreement(self, large: np.ndarray) -> tuple[float | None, float | None]:
        """(mean agreement with the large model, share at OKS >= ABOVE) of a split; None without a reference."""
        a = agreement(self.oks_sl, large)
        return (float(a.mean()), float((a >= ABOVE).mean())) if len(a) else (None, None)


def det_routed_ap(out: DetOutputs, large: np.ndarray, ann_path: str | os.PathLike) -> float:
    """COCO AP of routed keypoints on detection boxes, scored as the Pipeline does: rescoring with the box score,
    OKS-NMS per image (the crop scale's area), pycocotools."""

    from dynpose.eval.coco import evaluate_results
    from dynpose.keypoints import COCO17
    from dynpose.runtime.pipeline import OKS_NMS_THR, RESCORE_THR
    from dynpose.runtime.postprocess import oks_nms, rescore

    kp = np.where(np.asarray(large)[:, None, None], out.kpts_large, out.kpts_small)
    scores = rescore(kp, out.scores, thr=RESCORE_THR)
    results = []
    for iid in np.unique(out.image_ids):
        i = np.flatnonzero(out.image_ids == iid)
        for k in oks_nms(kp[i], scores[i], out.nms_areas[i], OKS_NMS_THR, COCO17.sigmas if kp.shape[1] == 17 else None):
            j = i[k]
            results.append(
                {
                    "image_id": int(iid),
                    "category_id": 1,
                    "keypoints": kp[j].reshape(-1).round(3).tolist(),
                    "score": float(scores[j]),
                }
            )
    from dynpose.eval.coco import quiet

    with quiet():
        return float(evaluate_results(results, ann_path)["AP"])


def calib_data(
    engine_dir: str | os.PathLike, ann_path: str | os.PathLike, images_dir: str | os.PathLike, opts: CalibOptions
) -> CalibData:
    """Router scores and the AP function on the ground-truth persons, or on `opts.detections`."""
    if opts.detections is None:
        out, crops = collect_outputs(
            engine_dir,
            ann_path,
            images_dir,
            backend=opts.backend,
            device=opts.device,
            cache_dir=opts.cache_dir,
            use_cache=opts.use_cache,
            progress=opts.progress,
        )

        def ap(large: np.ndarray) -> float:
            return routed_ap(out, large, ann_path)

        kind = "ground-truth boxes"
        kp_s, kp_l = out.kpts_small, out.kpts_large
    else:
        det, crops = collect_det_outputs(
            engine_dir,
            opts.detections,
            images_dir,
            ann_path,
            backend=opts.backend,
            device=opts.device,
            cache_dir=opts.cache_dir,
            use_cache=opts.use_cache,
            progress=opts.progress,
        )

        def ap(large: np.ndarray) -> float:
            return det_routed_ap(det, large, ann_path)

        kind = "detection boxes"
        kp_s, kp_l = det.kpts_small, det.kpts_large

    s1 = np.full(len(crops), np.nan)
    if Manifest.load(engine_dir, verify=False).get(Role.ROUTER) is not None:
        s1 = router_scores(engine_dir, crops, backend=opts.backend, device=opts.device)[:, 1].astype(np.float64)
        if not np.isfinite(s1).all():
            raise DynPoseError(
                f"engine dir {engine_dir}: the router gave non-finite scores on {int((~np.isfinite(s1)).sum())} "
                "crops; re-export or retrain it"
            )
    sigmas = Manifest.load(engine_dir, verify=False).require(Role.LARGE, engine_dir=engine_dir).card.keypoint_set.sigmas
    boxes = crops.boxes[:, :4]
    return CalibData(s1, boxes, ap, kind, kp_s, small_large_oks(kp_s, kp_l, boxes, sigmas))


@dataclass(frozen=True)
class Candidate:
    policy: Policy
    large: np.ndarray

    @property
    def fraction(self) -> float:
        return float(self.large.mean()) if self.large.size else 0.0


def _top_k_cuts(values: np.ndarray, n_grid: int) -> list[float]:
    """Cut values sending the top-k of `values` for k on a grid from 1 to N - 1."""
    n = len(values)
    ks = np.unique(np.round(np.linspace(0, n, min(n, n_grid) + 1)).astype(int))
    return [threshold_at(values, int(k)) for k in ks if 0 < k < n]


def candidates(data: CalibData, families: Sequence[str]) -> list[Candidate]:
    """Every policy tried: all-small, all-large, and each family's grid (module doc)."""
    n, s1, area = len(data), data.s1, data.areas
    out = [Candidate(parse_policy("all-small"), np.zeros(n, bool)), Candidate(parse_policy("all-large"), np.ones(n, bool))]
    has_router = bool(np.isfinite(s1).all()) and n > 0
    if "box" in families:
        for a in _top_k_cuts(area, AP_GRID):
            out.append(Candidate(parse_policy(f"box:{round_cut(a, area)}"), area >= float(round_cut(a, area))))
    if "box-below" in families:
        for a in _top_k_cuts(-area, AP_GRID):  # the k smallest boxes: area < -a (a between two distinct areas)
            text = round_cut(-a, area)
            out.append(Candidate(parse_policy(f"box-below:{text}"), area < float(text)))
    if has_router and "threshold" in families:
        for t in _top_k_cuts(s1, AP_GRID):
            text = round_cut(t, s1)
            out.append(Candidate(parse_policy(f"threshold:{text}"), s1 >= float(text)))
    if has_router and "box-threshold" in families:
        for a in _top_k_cuts(area, AREA_CUTS):
            a_text = round_cut(a, area)
            big = area >= float(a_text)
            for t in _top_k_cuts(s1[big], AP_GRID) if big.sum() > 1 else []:
                text = round_cut(t, s1[big])
                out.append(Candidate(parse_policy(f"box-threshold:{a_text},{text}"), big & (s1 >= float(text))))
    for fam, stat in (("cascade", Cascade(0.0)), ("cascade-visible", Cascade(0.0, VISIBLE_SCORE))):
        if fam in families and n:
            conf = stat.confidence(data.kpts_small)
            for t in _top_k_cuts(-conf, AP_GRID):  # the k least confident: -conf >= t, i.e. conf < -t (no ties)
                text = round_cut(min(1.0, max(0.0, -t)), conf)
                p = Cascade(float(text), stat.visible)
                out.append(Candidate(p, conf < float(text)))
    return out


def measured_costs(
    engine_dir: str | os.PathLike, backend: str, device: str, batch: int = 8, threads: int | None = None
) -> ModelCosts:
    """The manifest's measured costs for this backend/device at `batch`; measured and stored now when missing or
    stale (any pose model or router re-exported since)."""
    from dynpose.bench.costs import measure_costs_dir, model_costs, store_costs

    m = Manifest.load(engine_dir, verify=False)
    stored = m.costs(backend, device)
    roles = {Role(e.role) for e in m.entries if e.role in MODEL_ROLES}
    if stored is None or set(stored.roles) != roles:
        stored = measure_costs_dir(engine_dir, backend, device, threads=threads)
        store_costs(engine_dir, stored)
    costs = model_costs(stored, batch)
    if costs is None:
        raise DynPoseError(f"engine dir {engine_dir}: no small/large costs could be measured for {backend}/{device}")
    return costs


def family(policy: Policy) -> str:
    """The policy's family name (one of FAMILIES), or fixed (all-small, all-large)."""
    kind = str(policy).partition(":")[0]
    return kind if kind in FAMILIES else "fixed"


class _Search:
    """AP of candidate splits, computed once per split, in order of measured cost."""

    def __init__(self, data: CalibData, costs: ModelCosts, max_drop: float) -> None:
        self.data, self.costs, self.max_drop = data, costs, max_drop
        self.ap_large = data.ap(np.ones(len(data), bool))
        self.seen: dict[bytes, float] = {}

    def cost(self, c: Candidate) -> float:
        return c.policy.cost(self.costs, c.fraction)

    def ap(self, c: Candidate) -> float:
        key = np.packbits(c.large).tobytes()
        if key not in self.seen:
            self.seen[key] = self.ap_large if c.large.all() else self.data.ap(c.large)
        return self.seen[key]

    def cheapest(self, cands: list[Candidate]) -> tuple[Candidate, float] | None:
        """The cheapest candidate whose AP is at most `max_drop` below large-only (first passing in cost order)."""
        for c in sorted(cands, key=lambda c: (self.cost(c), c.fraction)):
            ap = self.ap(c)
            if self.ap_large - ap <= self.max_drop + 1e-12:
                return c, ap
        return None


def cheapest_within(
    data: CalibData, cands: list[Candidate], costs: ModelCosts, max_drop: float
) -> tuple[Candidate, float, float, int, dict[str, dict[str, Any]]]:
    """(candidate, its AP, large-only AP, APs computed, per-family winners): the cheapest candidate whose AP is at
    most `max_drop` below large-only, and the cheapest passing one of each family."""
    s = _Search(data, costs, max_drop)
    best = s.cheapest(cands)
    assert best is not None  # all-large always passes
    per: dict[str, dict[str, Any]] = {}
    for fam in sorted({family(c.policy) for c in cands} - {"fixed"}):
        won = s.cheapest([c for c in cands if family(c.policy) == fam])
        if won is not None:
            c, ap = won
            per[fam] = {
                "policy": str(c.policy),
                "fraction": c.fraction,
                "ap": ap,
                "agreement": data.agreement(c.large)[0],
                "cost_ms": s.cost(c),
                "speedup": costs.large / s.cost(c),
            }
    return best[0], best[1], s.ap_large, len(s.seen), per


@dataclass
class CalibOptions:
    """Where calibration runs and what it may choose (besides the target)."""

    backend: str = "ort"
    device: str = "cpu"
    cache_dir: str | os.PathLike | None = None
    use_cache: bool = True  # False: neither read nor write the cached model outputs
    save: bool = True
    progress: bool = True
    detections: str | os.PathLike | None = None  # calibrate on these boxes (the Pipeline's view) instead of GT boxes
    families: tuple[str, ...] = FAMILIES
    cost_batch: int = 8
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def calibrate(
    engine_dir: str | os.PathLike,
    ann_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    *,
    target_fraction: float | None = None,
    target_ap_drop: float | None = None,
    **options: Any,
) -> Calibration:
    """Choose the routing policy (module doc) and, with `save`, store it as the manifest's `route`. `options`:
    `CalibOptions` fields."""
    opts = CalibOptions(**options)
    if (target_fraction is None) == (target_ap_drop is None):
        raise DynPoseError("calibration needs exactly one of --target-fraction F or --target-ap-drop D")
    unknown = sorted(set(opts.families) - set(FAMILIES))
    if unknown or not opts.families:
        raise DynPoseError(f"--policies {','.join(opts.families)}: choose from {', '.join(FAMILIES)}")
    data = calib_data(engine_dir, ann_path, images_dir, opts)
    n = len(data)
    if target_fraction is not None:
        check_fraction(target_fraction)
        if not np.isfinite(data.s1).all():
            raise DynPoseError(f"engine dir {engine_dir}: --target-fraction picks a router threshold, but it has no router")
        policy, achieved = policy_for_fraction(data.s1, target_fraction)
        large = parse_policy(policy).decide(Signals(data.areas, router=data.s1)).large
        result = Calibration(
            policy,
            achieved,
            n,
            data.ap(large),
            data.ap(np.zeros(n, bool)),
            data.ap(np.ones(n, bool)),
            f"fraction {target_fraction:g}",
            data.kind,
        )
    else:
        d = check_ap_drop(target_ap_drop)  # type: ignore[arg-type]
        costs = measured_costs(engine_dir, opts.backend, opts.device, opts.cost_batch, opts.threads)
        cand, ap, ap_large, evaluated, per = cheapest_within(data, candidates(data, opts.families), costs, d)
        result = Calibration(
            str(cand.policy), cand.fraction, n, ap, data.ap(np.zeros(n, bool)), ap_large, f"AP drop <= {d:g}", data.kind,
            cost_ms=cand.policy.cost(costs, cand.fraction), large_ms=costs.large, candidates=evaluated,
            per_family=per,
        )  # fmt: skip
        large = cand.large
    result.agreement, result.agreement_above = data.agreement(large)
    if opts.save:
        _store(engine_dir, result, ann_path, opts)
    return result


def _store(engine_dir: str | os.PathLike, result: Calibration, ann_path: str | os.PathLike, opts: CalibOptions) -> None:
    from dynpose.bench.agreement import model_stamps, stamps_to_dict
    from dynpose.runtime.backends import BACKEND_FORMAT

    manifest = Manifest.load(engine_dir)
    policy = parse_policy(result.policy)
    roles = (Role.SMALL, Role.LARGE, *((Role.ROUTER,) if policy.needs_router else ()))
    figures = {
        **{k: v for k, v in result.to_dict().items() if k not in ("policy", "fraction")},
        "models": stamps_to_dict(model_stamps(manifest, roles, BACKEND_FORMAT.get(opts.backend, "onnx"))),
        "annotations": str(ann_path),
        "detections": None if opts.detections is None else str(opts.detections),
        "backend": opts.backend,
        "device": opts.device,
        "cost_batch": opts.cost_batch,
        "families": list(opts.families),
    }
    with updating_manifest(engine_dir, "store the calibrated route", verify=True) as manifest:
        manifest.set_calibration(RouteCalibration(result.policy, result.fraction, figures))
