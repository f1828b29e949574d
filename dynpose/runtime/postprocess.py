"""Instance rescoring, OKS and OKS-NMS (official HRNet / MMPose / pycocotools formulas), box IoU."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.keypoints import COCO17, get_keypoint_set


def _sigmas_for(k: int, sigmas: Sequence[float] | None) -> np.ndarray:
    if sigmas is None:
        for name in ("coco17", "crowdpose14"):
            ks = get_keypoint_set(name)
            if ks.num == k:
                return np.asarray(ks.sigmas, dtype=np.float64)
        raise DynPoseError(f"no default OKS sigmas for {k} keypoints; pass sigmas (COCO-17 has {COCO17.num})")
    s = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if len(s) != k:
        raise DynPoseError(f"OKS: {len(s)} sigmas for {k} keypoints")
    return s


def oks(pred_xy: np.ndarray, gt: np.ndarray, area: float, sigmas: Sequence[float]) -> float:
    """COCO object keypoint similarity of one prediction (K,2|3) against one ground truth (K,3) with visibility.

    pycocotools' formula over the labelled (v > 0) ground-truth keypoints: mean of exp(-d^2 / (2 s^2 k^2)) with
    s^2 = area and k = 2 sigma. Returns nan when the ground truth has no labelled keypoint (OKS is undefined).
    """
    g = np.asarray(gt, dtype=np.float64).reshape(-1, 3)
    p = np.asarray(pred_xy, dtype=np.float64)
    p = p.reshape(len(g), -1)[:, :2]
    var = (2.0 * _sigmas_for(len(g), sigmas)) ** 2
    vis = g[:, 2] > 0
    if not vis.any():
        return float("nan")
    d2 = ((p - g[:, :2]) ** 2).sum(axis=1)
    e = d2 / var / (float(area) + np.spacing(1)) / 2.0
    return float(np.exp(-e[vis]).mean())


def oks_matrix(
    preds_xy: np.ndarray, gts: np.ndarray, areas: np.ndarray, sigmas: Sequence[float] | None = None
) -> np.ndarray:
    """OKS of every prediction (N,K,2|3) against every ground truth (M,K,3) with areas (M,) -> (N,M).

    Entries for a ground truth without labelled keypoints are nan.
    """
    p = np.asarray(preds_xy, dtype=np.float64)
    g = np.asarray(gts, dtype=np.float64)
    if p.ndim != 3 or g.ndim != 3 or g.shape[2] != 3 or p.shape[1] != g.shape[1]:
        raise DynPoseError(f"oks_matrix: need preds (N,K,2|3) and gts (M,K,3), got {p.shape} and {g.shape}")
    var = (2.0 * _sigmas_for(g.shape[1], sigmas)) ** 2
    a = np.asarray(areas, dtype=np.float64).reshape(-1)
    d2 = ((p[:, None, :, :2] - g[None, :, :, :2]) ** 2).sum(axis=-1)  # N,M,K
    e = d2 / var / (a[None, :, None] + np.spacing(1)) / 2.0
    vis = (g[:, :, 2] > 0)[None]
    n_vis = vis.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_vis > 0, (np.exp(-e) * vis).sum(axis=-1) / n_vis, np.nan)


def rescore(keypoints: np.ndarray, box_scores: np.ndarray, thr: float = 0.2) -> np.ndarray:
    """Instance scores as the official HRNet / MMPose evaluation: box score x mean score of the keypoints scoring
    above `thr` (0 when none does). keypoints (N,K,3), box_scores (N,) -> (N,)."""
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim != 3 or kp.shape[-1] != 3:
        raise DynPoseError(f"rescore: keypoints must be N x K x 3, got shape {kp.shape}")
    bs = np.asarray(box_scores, dtype=np.float64).reshape(-1)
    if len(bs) != len(kp):
        raise DynPoseError(f"rescore: {len(kp)} instances but {len(bs)} box scores")
    s = np.nan_to_num(kp[..., 2], nan=0.0)
    mask = s > thr
    n = mask.sum(axis=1)
    kpt = np.where(n > 0, (s * mask).sum(axis=1) / np.maximum(n, 1), 0.0)
    return kpt * np.nan_to_num(bs, nan=0.0)


def oks_nms(
    keypoints: np.ndarray,
    scores: np.ndarray,
    areas: np.ndarray,
    thr: float = 0.9,
    sigmas: Sequence[float] | None = None,
) -> list[int]:
    """Official HRNet / MMPose `oks_nms`: greedy by score, drop instances whose OKS with a kept one exceeds `thr`.

    keypoints (N,K,2|3), scores (N,), areas (N,) (box w*h); returns kept indices, highest score first. The OKS
    here uses the mean of both areas and all keypoints, as the official code does.

    Ties: of equal scores the later index goes first, i.e. the references' `scores.argsort()[::-1]` with a stable
    sort (two identical candidates scored [0.5, 0.5] keep [1], as theirs). Their own tie order is numpy's: its
    default argsort is not stable (on AVX-512 CPUs even five scores can come back out of input order), so the
    references have no fixed rule there; this one does not depend on the machine.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.size == 0 or len(kp) == 0:
        return []
    sc = np.nan_to_num(np.asarray(scores, dtype=np.float64).reshape(-1), nan=-np.inf)
    ar = np.asarray(areas, dtype=np.float64).reshape(-1)
    if kp.ndim != 3 or len(sc) != len(kp) or len(ar) != len(kp):
        raise DynPoseError(f"oks_nms: keypoints {kp.shape}, {len(sc)} scores and {len(ar)} areas do not match")
    var = (2.0 * _sigmas_for(kp.shape[1], sigmas)) ** 2
    xy = kp[..., :2]
    order = np.argsort(sc, kind="stable")[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        d2 = ((xy[rest] - xy[i]) ** 2).sum(axis=-1)
        e = d2 / var / ((ar[i] + ar[rest])[:, None] / 2.0 + np.spacing(1)) / 2.0
        ovr = np.exp(-e).mean(axis=1)
        order = rest[~(ovr > thr)]  # NaN overlap (bad keypoints) keeps the instance rather than dropping it
    return keep


def _as_xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    return b.reshape(len(b), -1)[:, :4] if b.size else np.zeros((0, 4))


def iou_matrix(a_xywh: np.ndarray, b_xywh: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` (N,>=4) with every box of `b` (M,>=4), both x,y,w,h -> (N,M)."""
    a, b = _as_xywh(a_xywh), _as_xywh(b_xywh)
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return np.nan_to_num(iou, nan=0.0)
