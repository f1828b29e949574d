"""How good is a router? Figures on held-out labelled persons (`dynpose-train-router ... --eval-ann A --eval-images D`).

On the ground-truth boxes of the annotations, both pose models and the engine dir's router run (pose outputs from
the training cache). Per fraction F (k = round(F N) crops to the large model):

- AP of the router's choice (the k crops with the highest score[1]),
- AP of a random choice of k crops (mean and 5-95% range over seeded draws): what any router must beat,
- AP of the oracle (the k crops whose true OKS gain of the large model is largest): what no router can beat,
- large-only and small-only AP;

and the rank correlation (Spearman, `scipy.stats.spearmanr`) between score[1] and the true OKS gain
OKS_large - OKS_small against the ground truth, and the same for the label-free target computed on these crops
(how well the teacher's signal itself tracks the true gain: a ceiling for a router trained on it).

With `detections` (the run-time view: every box of a detections file, most of them no annotated person) the same
two correlations over the detection boxes: a box's true gain is the OKS gain against the annotated person it
overlaps best (box IoU >= 0.5), and 0 for a box that matches nobody (its keypoints cannot change AP's matches).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dynpose.roles import Role
from dynpose.router.calibrate import routed_ap, router_scores
from dynpose.router.collect import CropOutputs, collect_outputs

RANDOM_DRAWS = 100


@dataclass
class FractionEval:
    fraction: float
    k: int
    ap_router: float
    ap_random: float  # mean over draws
    ap_random_lo: float  # 5th percentile
    ap_random_hi: float  # 95th percentile
    ap_oracle: float


@dataclass
class RouterEval:
    num_crops: int
    ap_small: float
    ap_large: float
    spearman: float  # router score[1] vs true OKS gain
    spearman_p: float
    spearman_teacher: float  # label-free target vs true OKS gain
    rows: list[FractionEval] = field(default_factory=list)
    det_boxes: int = 0  # detection boxes of the detections view (0: not run)
    det_matched: int = 0
    det_spearman: float | None = None
    det_spearman_teacher: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [
            f"held-out persons: {self.num_crops}; AP large-only {self.ap_large:.4f}, small-only {self.ap_small:.4f}",
            f"Spearman(router score[1], true OKS gain) = {self.spearman:+.3f} (p {self.spearman_p:.3g}); label-free "
            f"target vs true gain {self.spearman_teacher:+.3f}",
        ]
        if self.det_boxes:
            out.append(
                f"on {self.det_boxes} detection boxes ({self.det_matched} on an annotated person): Spearman(router, true "
                f"gain) = {self.det_spearman:+.3f}; label-free target {self.det_spearman_teacher:+.3f}"
            )
        for r in self.rows:
            out.append(
                f"  {r.fraction:.0%} large ({r.k} crops): router AP {r.ap_router:.4f} | random {r.ap_random:.4f} "
                f"[{r.ap_random_lo:.4f}, {r.ap_random_hi:.4f}] | oracle {r.ap_oracle:.4f} | large-only {self.ap_large:.4f}"
            )
        return out


def _top(values: np.ndarray, k: int) -> np.ndarray:
    m = np.zeros(len(values), bool)
    m[np.argsort(-values, kind="stable")[:k]] = True
    return m


def teacher_signal(out: CropOutputs, sigmas: Any) -> np.ndarray:
    """The label-free target t1 on these crops (box score 1: ground-truth boxes)."""
    from dynpose.router.targets import teacher_targets

    boxes = np.concatenate([out.boxes[:, :4], np.ones((len(out), 1))], axis=1)
    return teacher_targets(out.kpts_small, out.kpts_large, boxes, out.crop_wh, sigmas)[0].t1


def fraction_eval(
    out: CropOutputs, s1: np.ndarray, f: float, ann: str | os.PathLike, rng: np.random.Generator
) -> FractionEval:
    n = len(out)
    k = int(round(f * n))
    gain = out.oks_large - out.oks_small
    rand = []
    for _ in range(RANDOM_DRAWS):
        m = np.zeros(n, bool)
        m[rng.choice(n, size=k, replace=False)] = True
        rand.append(routed_ap(out, m, ann))
    lo, hi = np.percentile(rand, [5, 95])
    return FractionEval(
        f,
        k,
        routed_ap(out, _top(s1, k), ann),
        float(np.mean(rand)),
        float(lo),
        float(hi),
        routed_ap(out, _top(gain, k), ann),
    )


def evaluate_router(
    engine_dir: str | os.PathLike,
    ann_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    fractions: tuple[float, ...] = (0.25, 0.5),
    seed: int = 0,
    **options: Any,
) -> RouterEval:
    """The figures of the module doc. `options`: backend, device, cache_dir, use_cache, progress (as
    `collect_outputs`), and detections (a detections file of the same images: the run-time view)."""
    from scipy.stats import spearmanr

    from dynpose.engines.manifest import Manifest

    backend, device = options.get("backend", "ort"), options.get("device", "cpu")
    out, crops = collect_outputs(
        engine_dir, ann_path, images_dir, backend=backend, device=device, cache_dir=options.get("cache_dir"),
        use_cache=options.get("use_cache", True), progress=options.get("progress", True),
    )  # fmt: skip
    s1 = router_scores(engine_dir, crops, backend=backend, device=device)[:, 1].astype(np.float64)
    gain = out.oks_large - out.oks_small
    rho = spearmanr(s1, gain)
    sigmas = Manifest.load(engine_dir, verify=False).require(Role.LARGE).card.keypoint_set.sigmas
    rho_t = spearmanr(teacher_signal(out, sigmas), gain)
    n = len(out)
    rng = np.random.default_rng(seed)
    ev = RouterEval(
        num_crops=n,
        ap_small=routed_ap(out, np.zeros(n, bool), ann_path),
        ap_large=routed_ap(out, np.ones(n, bool), ann_path),
        spearman=float(rho.statistic),
        spearman_p=float(rho.pvalue),
        spearman_teacher=float(rho_t.statistic),
        rows=[fraction_eval(out, s1, f, ann_path, rng) for f in fractions],
    )
    dets = options.get("detections")
    if dets is None:
        return ev
    opts = {k: options[k] for k in ("backend", "device", "cache_dir", "use_cache", "progress") if k in options}
    return detection_eval(ev, engine_dir, ann_path, images_dir, dets, **opts)


def detection_gain(det: Any, gt: Any, sigmas: Any) -> tuple[np.ndarray, np.ndarray]:
    """(true OKS gain per detection box, matched?) against the annotated persons (`Crops` of the ground truth)."""
    from dynpose.runtime.postprocess import iou_matrix, oks

    gain = np.zeros(len(det))
    matched = np.zeros(len(det), bool)
    for iid in np.unique(det.image_ids):
        d, g = np.flatnonzero(det.image_ids == iid), np.flatnonzero(gt.image_ids == iid)
        if not len(g):
            continue
        iou = iou_matrix(det.boxes[d, :4], gt.boxes[g, :4])
        for row, j in enumerate(d):
            k = int(np.argmax(iou[row]))
            if iou[row, k] >= 0.5:
                p = g[k]
                o_l = oks(det.kpts_large[j, :, :2], gt.gt[p], gt.areas[p], sigmas)
                o_s = oks(det.kpts_small[j, :, :2], gt.gt[p], gt.areas[p], sigmas)
                gain[j], matched[j] = o_l - o_s, True
    return gain, matched


def detection_eval(
    ev: RouterEval, engine_dir: str | os.PathLike, ann_path: str | os.PathLike, images_dir: str | os.PathLike,
    detections: str | os.PathLike, **options: Any,
) -> RouterEval:  # fmt: skip
    """Fill the detections view of `ev` (module doc)."""
    from scipy.stats import spearmanr

    from dynpose.data import load_coco
    from dynpose.engines.manifest import Manifest
    from dynpose.router.collect import collect_det_outputs, gt_crops
    from dynpose.router.targets import teacher_targets

    det, crops = collect_det_outputs(engine_dir, detections, images_dir, ann_path, **options)
    gt = gt_crops(load_coco(ann_path), images_dir)
    sigmas = Manifest.load(engine_dir, verify=False).require(Role.LARGE).card.keypoint_set.sigmas
    gain, matched = detection_gain(det, gt, sigmas)
    s1 = router_scores(engine_dir, crops, backend=options.get("backend", "ort"), device=options.get("device", "cpu"))[:, 1]
    boxes = np.concatenate([det.boxes[:, :4], det.scores[:, None]], axis=1)
    t1 = teacher_targets(det.kpts_small, det.kpts_large, boxes, det.crop_wh, sigmas)[0].t1
    ev.det_boxes, ev.det_matched = len(det), int(matched.sum())
    ev.det_spearman = float(spearmanr(s1, gain).statistic)
    ev.det_spearman_teacher = float(spearmanr(t1, gain).statistic)
    return ev
