"""How closely one run's poses agree with another's, frame by frame (mean OKS after Hungarian matching).

Used to judge what key-frame detection and temporal routing cost: the reference is the run that detects every
frame and routes every crop; each reference person is matched to at most one person of the other run by OKS (the
reference pose as ground truth: its keypoints scoring at least `kpt_thr` labelled, its box area as the scale), and
a reference person left unmatched counts as OKS 0. Reference persons without a keypoint scoring `kpt_thr` have no
defined OKS (COCO ignores such ground truth) and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.postprocess import oks_matrix


def pose_agreement(
    reference: Sequence[Sequence[Any]],
    other: Sequence[Sequence[Any]],
    sigmas: Sequence[float] | None = None,
    min_score: float = 0.0,
    kpt_thr: float = 0.3,
) -> float:
    """Mean OKS of `other`'s persons against `reference`'s, over the reference persons scoring at least `min_score`
    in every frame (both: per frame, objects with `.box`, `.keypoints`, `.score`). NaN when there is none."""
    from scipy.optimize import linear_sum_assignment

    if len(reference) != len(other):
        raise DynPoseError(f"pose_agreement: {len(reference)} reference frames but {len(other)} others")
    values: list[float] = []
    for ref, got in zip(reference, other, strict=True):
        ref = [p for p in ref if p.score >= min_score and (np.nan_to_num(p.keypoints[:, 2], nan=0.0) >= kpt_thr).any()]
        if not ref:
            continue
        if not got:
            values.extend([0.0] * len(ref))
            continue
        gt = np.stack([np.asarray(p.keypoints, dtype=np.float64) for p in ref])
        gt[..., 2] = (np.nan_to_num(gt[..., 2], nan=0.0) >= kpt_thr).astype(np.float64)
        areas = np.array([float(p.box[2]) * float(p.box[3]) for p in ref])
        pred = np.nan_to_num(np.stack([np.asarray(p.keypoints, dtype=np.float64) for p in got]), nan=1e9)
        sim = np.nan_to_num(oks_matrix(pred, gt, areas, sigmas), nan=0.0)  # (got, ref)
        rows, cols = linear_sum_assignment(-sim)
        per_ref = np.zeros(len(ref))
        per_ref[cols] = sim[rows, cols]
        values.extend(per_ref.tolist())
    return float(np.mean(values)) if values else float("nan")
