"""Router targets and losses: what the three router scores are trained to predict.

The router emits three sigmoid scores per crop. The formulas follow DynPose's public training head
(`Aritoria/DynPose`, `mmpose/models/heads/heatmap_heads/twohead.py`, `TwoHead.loss`), where `net1` is the small
model (ResNet-50) and `net2` the large one (HRNet-W32), with the changes listed under "Deviations".

Per crop, with e_s, e_l the crop error of the small and the large model (`crop_error`) and OKS_s, OKS_l their OKS:

    t1 = clip((e_s - e_l) / e_s, 0, 1)             relative error reduction of the large model      -> score[1]
    t0 = e_s / (e_s + e_l)                         the small model's share of the pair's error       -> score[0]
    t2 = min(1, 2 * (1 - OKS_s))                   difficulty (how badly the small model does)       -> score[2]

    L1 = mean over kept crops with e_s > eps of (score[1] - t1)^2
    L0 = mean over kept crops of (score[0] - t0)^2
    L2 = mean over all crops of (score[2] - t2)^2
    L  = w0 * L0 + w1 * L1 + w2 * L2                (w = 1, 1, 1 by default)

Kept crops: 0.05 < |OKS_l - OKS_s| < 0.3, DynPose's rule. Below 0.05 the two models agree, so the pair says nothing
about which one to use and e_s - e_l is mostly noise; above 0.3 one model failed outright (a wrong person, a
swapped left/right), which the error ratio would turn into an extreme, misleading target. The difficulty term is
trained on every crop, as in DynPose. When the rule would keep fewer than `MIN_KEPT` crops (tiny sets), all crops are
kept and a warning says so: a handful of crops cannot train the two comparison scores anyway, and silently training
only the difficulty score would make the loss curve lie about what was learnt.

Crop error (DynPose `pose_dist` + the sigma weighting): per labelled joint j, d_j = the distance between the
predicted and the true keypoint, normalised per axis by the crop size (the padded box the model saw, which is what
DynPose's heatmap-normalised distance measures); e = 100 * mean_j( w_j * d_j / (2 sigma_j)^2 ), with sigma_j the
COCO OKS sigmas and w_j DynPose's joint weights (1 for the face, 1.2 shoulders/hips, 1.5 elbows/knees, 2
wrists/ankles; 1 for other keypoint sets).

Deviations from the public code, and why:
- DynPose's score[0] loss is (1 - s0) * (e_s - delta/2) + s0 * (e_l + delta/2) with delta = e_s - e_l; both brackets
  equal (e_s + e_l)/2, so the term is a constant with zero gradient and score[0] is never trained. We give score[0]
  a real target, the small model's share of the error (0.5 when the models are equally good, towards 1 when only the
  large model gets the pose right) — an expected-cost signal the policies can use.
- DynPose regresses score[1] onto the unclipped ratio (negative when the large model is worse) and score[2] onto
  2 * (1 - OKS_s) (up to 2); a sigmoid cannot reach either, so we clip the targets to [0, 1], which gives the same
  optimum and lets a perfect fit reach loss 0.
- DynPose sums the weighted distances over all joints, with unlabelled joints contributing -1 each; we average over
  labelled joints only, so people with few labelled joints are comparable. The ratios t0, t1 do not depend on this.
- DynPose's sigma list is ten times COCO's (0.26 for the nose) and its OKS is computed in the 256x192 input frame;
  we use the COCO sigmas and `dynpose.runtime.postprocess.oks` in image pixels with the annotation's area (the
  COCO evaluation's OKS). The constant factor in e cancels in t0 and t1; the e_s > 1e-3 cut only guards the ratio
  against a division by ~0.
- DynPose trains with batch size 1 (per-crop losses); we average per batch, the same objective in expectation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dynpose.keypoints import COCO17

if TYPE_CHECKING:
    import torch

# DynPose's per-joint weights for COCO-17 (`sigma1` in TwoHead.loss): limbs' ends count more than the face.
DYNPOSE_JOINT_WEIGHTS_COCO17 = (1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5, 2.0, 2.0, 1.2, 1.2, 1.5, 1.5, 2.0, 2.0)
SKIP_BAND = (0.05, 0.3)
MIN_KEPT = 4
DIFFICULTY_GAIN = 2.0  # DynPose's sig3
MIN_SMALL_ERROR = 1e-3  # DynPose skips the ratio target when the small model's error is below this
LOSS_WEIGHTS = (1.0, 1.0, 1.0)

log = logging.getLogger(__name__)


def joint_weights(num_keypoints: int) -> np.ndarray:
    """DynPose's joint weights for COCO-17; uniform for any other keypoint set."""
    if num_keypoints == COCO17.num:
        return np.asarray(DYNPOSE_JOINT_WEIGHTS_COCO17)
    return np.ones(num_keypoints)


def joint_distances(pred_xy: np.ndarray, gt: np.ndarray, crop_wh: np.ndarray) -> np.ndarray:
    """(N,K,>=2) predictions, (N,K,3) ground truth x,y,v and (N,2) crop sizes in pixels -> (N,K) distances
    normalised per axis by the crop size; NaN where the joint is not labelled (v == 0)."""
    pred = np.asarray(pred_xy, dtype=np.float64)[..., :2]
    g = np.asarray(gt, dtype=np.float64)
    wh = np.asarray(crop_wh, dtype=np.float64).reshape(-1, 1, 2)
    d = np.linalg.norm((pred - g[..., :2]) / wh, axis=-1)
    return np.where(g[..., 2] > 0, d, np.nan)


def crop_error(distances: np.ndarray, sigmas: Sequence[float], weights: np.ndarray | None = None) -> np.ndarray:
    """(N,K) normalised distances (NaN = unlabelled) -> (N,) e = 100 * mean_j(w_j * d_j / (2 sigma_j)^2).

    A crop with no labelled joint gets NaN (it is dropped before training)."""
    d = np.asarray(distances, dtype=np.float64)
    var = (2.0 * np.asarray(sigmas, dtype=np.float64)) ** 2
    w = joint_weights(d.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    terms = w * d / var
    labelled = np.isfinite(terms)
    n = labelled.sum(axis=1)
    total = np.where(labelled, terms, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, 100.0 * total / np.maximum(n, 1), np.nan)


@dataclass
class Targets:
    """Per-crop training targets (all (N,) float32) and masks (bool): see the module docstring for the formulas."""

    t0: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    keep: np.ndarray  # crop is used for the score[0] and score[1] terms
    ratio_ok: np.ndarray  # keep and e_s > MIN_SMALL_ERROR: used for the score[1] term
    kept_all: bool = False  # the skip rule was overridden because it kept too few crops

    def __len__(self) -> int:
        return len(self.t0)

    def as_array(self) -> np.ndarray:
        """(N,5) float32: t0, t1, t2, keep, ratio_ok (the form the training loop batches)."""
        return np.stack([self.t0, self.t1, self.t2, self.keep, self.ratio_ok], axis=1).astype(np.float32)

    def summary(self) -> str:
        n, k = len(self), int(self.keep.sum())
        note = " (skip rule overridden: too few crops)" if self.kept_all else ""
        return (
            f"{n} crops, {k} kept for the comparison terms{note}, mean t0 {self.t0[self.keep].mean():.3f}, "
            f"mean t1 {self.t1[self.ratio_ok].mean() if self.ratio_ok.any() else float('nan'):.3f}, "
            f"mean t2 {self.t2.mean():.3f}"
        )


def make_targets(
    err_small: np.ndarray,
    err_large: np.ndarray,
    oks_small: np.ndarray,
    oks_large: np.ndarray,
    skip_band: tuple[float, float] = SKIP_BAND,
    min_kept: int = MIN_KEPT,
    difficulty_gain: float = DIFFICULTY_GAIN,
) -> Targets:
    """Targets from per-crop errors and OKS of both models (formulas and the skip rule: module docstring)."""
    e_s = np.asarray(err_small, dtype=np.float64)
    e_l = np.asarray(err_large, dtype=np.float64)
    o_s = np.asarray(oks_small, dtype=np.float64)
    o_l = np.asarray(oks_large, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        t1 = np.clip(np.where(e_s > 0, (e_s - e_l) / e_s, 0.0), 0.0, 1.0)
        t0 = np.where(e_s + e_l > 0, e_s / (e_s + e_l), 0.5)
    t2 = np.clip(difficulty_gain * (1.0 - o_s), 0.0, 1.0)
    gap = np.abs(o_l - o_s)
    keep = (gap > skip_band[0]) & (gap < skip_band[1])
    kept_all = False
    if keep.sum() < min_kept:
        log.warning(
            "router targets: only %d of %d crops have %s < |OKS_large - OKS_small| < %s; using all %d crops for the "
            "comparison terms (train on more data for a useful router)",
            int(keep.sum()),
            len(keep),
            skip_band[0],
            skip_band[1],
            len(keep),
        )
        keep = np.ones_like(keep)
        kept_all = True
    ratio_ok = keep & (e_s > MIN_SMALL_ERROR)
    f32 = np.float32
    return Targets(t0.astype(f32), t1.astype(f32), t2.astype(f32), keep, ratio_ok, kept_all)


def router_loss(
    scores: torch.Tensor, targets: torch.Tensor, weights: Sequence[float] = LOSS_WEIGHTS
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Weighted loss of a batch: `scores` (B,3) sigmoid outputs, `targets` (B,5) rows of `Targets.as_array()`.

    Returns (total, (L0, L1, L2)) as torch scalars; see the module docstring for the formulas. A term with no
    eligible crop in the batch is 0 (it contributes no gradient rather than NaN)."""
    t0, t1, t2, keep, ratio_ok = targets.unbind(dim=1)

    def masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (x * m).sum() / m.sum().clamp_min(1.0)

    l0 = masked_mean((scores[:, 0] - t0) ** 2, keep)
    l1 = masked_mean((scores[:, 1] - t1) ** 2, ratio_ok)
    l2 = ((scores[:, 2] - t2) ** 2).mean()
    total = weights[0] * l0 + weights[1] * l1 + weights[2] * l2
    return total, (l0, l1, l2)


# -- label-free targets: the large model as the teacher (`dynpose-train-router --unlabelled`) ---------------------------
TEACHER_VIS_THR = 0.3  # a joint counts when the large model scores it above this (the teacher's "labelled" joints)
AREA_FROM_BOX = 0.53  # OKS scale without a segmentation area: box w*h x 0.53 (crowdposetools' convention)


def teacher_oks(
    kp_small: np.ndarray, kp_large: np.ndarray, areas: np.ndarray, sigmas: Sequence[float], vis_thr: float = TEACHER_VIS_THR
) -> np.ndarray:
    """(N,) OKS of the small model's keypoints with the large model's as the ground truth, over the joints the
    large model scores above `vis_thr`; NaN where it scores none."""
    from dynpose.runtime.postprocess import oks

    gt = np.asarray(kp_large, dtype=np.float64).copy()
    gt[..., 2] = (gt[..., 2] > vis_thr).astype(np.float64)
    xy = np.asarray(kp_small, dtype=np.float64)[..., :2]
    return np.array([oks(xy[i], gt[i], float(areas[i]), sigmas) for i in range(len(gt))], dtype=np.float64)


@dataclass
class TeacherStats:
    """What the label-free targets are made of, per crop (for reports and tests)."""

    oks_sl: np.ndarray  # OKS(small vs large), NaN where the teacher sees no joint
    quality: np.ndarray  # the large model's instance score (box score x mean confident keypoint score)
    error_sl: np.ndarray  # DynPose crop error of the small keypoints against the large ones
    gain: np.ndarray  # d * q before squashing


def _squash(x: np.ndarray) -> np.ndarray:
    """x / (x + median of the positive x): order kept, the median at 0.5, 0 stays 0."""
    med = float(np.median(x[x > 0])) if (x > 0).any() else 1.0
    return x / (x + med)


def teacher_targets(
    kp_small: np.ndarray,
    kp_large: np.ndarray,
    boxes: np.ndarray,
    crop_wh: np.ndarray,
    sigmas: Sequence[float],
    vis_thr: float = TEACHER_VIS_THR,
) -> tuple[Targets, TeacherStats]:
    """Targets without ground truth (the large model is the teacher); formulas and why in `docs/router.md`:

        d  = 1 - OKS(small | large)                 the small model's keypoints scored against the large model's
        q  = box score x mean keypoint score > 0.2  the large model's instance score, as the COCO evaluation ranks it
        g  = d * q                                  expected AP-weighted gain of the large model
        t1 = g / (g + median(g))                    g squashed to (0, 1), median at 0.5               -> score[1]
        t0 = e / (e + median(e))                    per-joint distance error e of small vs large      -> score[0]
        t2 = min(1, 2 d)                            difficulty for the small model                    -> score[2]

    The squashing keeps the order of g (a policy reads only the order of score[1]: thresholds) and spreads the
    targets over the sigmoid's range; g itself is small and skewed (most persons gain a few OKS points), which left
    the score[1] term a hundredth of the others and its score nearly constant.

    `boxes` (N,5) x,y,w,h,score (the OKS scale is w*h*0.53; the score enters q), `crop_wh` (N,2) the large model's
    crop size (distance normalisation). Every crop is kept: there is no ratio to protect from division by ~0, and
    crops where the two models agree are exactly the "small is enough" examples."""
    from dynpose.runtime.postprocess import rescore

    b = np.asarray(boxes, dtype=np.float64)
    areas = np.maximum(b[:, 2] * b[:, 3] * AREA_FROM_BOX, 1.0)
    o = teacher_oks(kp_small, kp_large, areas, sigmas, vis_thr)
    d = np.where(np.isfinite(o), 1.0 - o, 0.0)  # no confident teacher joint: nothing to gain
    score = b[:, 4] if b.shape[1] > 4 else np.ones(len(b))
    q = rescore(np.asarray(kp_large, dtype=np.float64), score)
    ref = np.asarray(kp_large, dtype=np.float64).copy()
    ref[..., 2] = (ref[..., 2] > vis_thr).astype(np.float64)
    e = crop_error(joint_distances(kp_small, ref, crop_wh), sigmas)
    e = np.where(np.isfinite(e), e, 0.0)
    g = d * q
    f32 = np.float32
    ones = np.ones(len(b), dtype=bool)
    t = Targets(
        t0=_squash(e).astype(f32),
        t1=_squash(g).astype(f32),
        t2=np.clip(DIFFICULTY_GAIN * d, 0.0, 1.0).astype(f32),
        keep=ones,
        ratio_ok=ones.copy(),
    )
    return t, TeacherStats(o, q, e, g)
