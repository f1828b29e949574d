"""Keypoint sets: names, flip pairs, OKS sigmas and skeleton edges (data, not code), and the COCO-17 -> CrowdPose-14
/ MPII-16 joint mappings that let a COCO model be scored on those sets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dynpose.errors import DynPoseError


@dataclass(frozen=True)
class KeypointSet:
    name: str
    names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    sigmas: tuple[float, ...]
    skeleton: tuple[tuple[int, int], ...]

    @property
    def num(self) -> int:
        return len(self.names)

    def flip_index(self) -> list[int]:
        """Index map that swaps left and right joints (used by the flip test)."""
        idx = list(range(self.num))
        for a, b in self.flip_pairs:
            idx[a], idx[b] = b, a
        return idx


COCO17 = KeypointSet(
    name="coco17",
    names=(
        "nose",
        "left_eye",
        "right_eye",
        "left_ear",
        "right_ear",
        "left_shoulder",
        "right_shoulder",
        "left_elbow",
        "right_elbow",
        "left_wrist",
        "right_wrist",
        "left_hip",
        "right_hip",
        "left_knee",
        "right_knee",
        "left_ankle",
        "right_ankle",
    ),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    # pycocotools' COCOeval kpt_oks_sigmas
    sigmas=(
        0.026,
        0.025,
        0.025,
        0.035,
        0.035,
        0.079,
        0.079,
        0.072,
        0.072,
        0.062,
        0.062,
        0.107,
        0.107,
        0.087,
        0.087,
        0.089,
        0.089,
    ),
    skeleton=(
        (15, 13),
        (13, 11),
        (16, 14),
        (14, 12),
        (11, 12),
        (5, 11),
        (6, 12),
        (5, 6),
        (5, 7),
        (6, 8),
        (7, 9),
        (8, 10),
        (1, 2),
        (0, 1),
        (0, 2),
        (1, 3),
        (2, 4),
        (3, 5),
        (4, 6),
    ),
)

CROWDPOSE14 = KeypointSet(
    name="crowdpose14",
    names=(
        "left_shoulder",
        "right_shoulder",
        "left_elbow",
        "right_elbow",
        "left_wrist",
        "right_wrist",
        "left_hip",
        "right_hip",
        "left_knee",
        "right_knee",
        "left_ankle",
        "right_ankle",
        "head",
        "neck",
    ),
    flip_pairs=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)),
    # crowdposetools' sigmas
    sigmas=(0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089, 0.079, 0.079),
    skeleton=(
        (12, 13),
        (13, 0),
        (13, 1),
        (0, 2),
        (2, 4),
        (1, 3),
        (3, 5),
        (0, 6),
        (1, 7),
        (6, 7),
        (6, 8),
        (8, 10),
        (7, 9),
        (9, 11),
    ),
)

KEYPOINT_SETS = {k.name: k for k in (COCO17, CROWDPOSE14)}

# MPII's 16 joints in annotation order (MPII is scored by PCKh, not OKS, so it is not a KeypointSet).
MPII16_NAMES = (
    "right_ankle",
    "right_knee",
    "right_hip",
    "left_hip",
    "left_knee",
    "left_ankle",
    "pelvis",
    "thorax",
    "upper_neck",
    "head_top",
    "right_wrist",
    "right_elbow",
    "right_shoulder",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
)

# The COCO-17 joint that gives each joint of another set, in that set's order; None where COCO has no such joint.
# The twelve limb joints (shoulders, elbows, wrists, hips, knees, ankles) are the same points in all three sets.
# CrowdPose's head (top of the head) and neck, and MPII's pelvis, thorax, upper neck and head top have no COCO
# joint. They are not guessed (a neck from the shoulders or a head top from the face would be scored as if the
# model had predicted them): evaluation leaves them out, so the figures are over the twelve limb joints and say so.
COCO17_TO_CROWDPOSE14: tuple[int | None, ...] = (5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, None, None)
COCO17_TO_MPII16: tuple[int | None, ...] = (16, 14, 12, 11, 13, 15, None, None, None, None, 10, 8, 6, 5, 7, 9)


def map_keypoints(kp: np.ndarray, mapping: Sequence[int | None], fill: float = np.nan) -> np.ndarray:
    """(..., 17, C) COCO-17 keypoints -> (..., len(mapping), C) in the target set's order (`COCO17_TO_CROWDPOSE14`,
    `COCO17_TO_MPII16`); joints COCO does not have get `fill` in every channel."""
    kp = np.asarray(kp, dtype=np.float64)
    if kp.ndim < 2 or kp.shape[-2] != COCO17.num:
        raise DynPoseError(f"map_keypoints: expected (..., {COCO17.num}, C) COCO-17 keypoints, got shape {kp.shape}")
    out = np.full((*kp.shape[:-2], len(mapping), kp.shape[-1]), fill, dtype=np.float64)
    for j, src in enumerate(mapping):
        if src is not None:
            out[..., j, :] = kp[..., src, :]
    return out


def get_keypoint_set(name: str) -> KeypointSet:
    try:
        return KEYPOINT_SETS[name]
    except KeyError:
        raise DynPoseError(f"unknown keypoint set {name!r}; known: {', '.join(sorted(KEYPOINT_SETS))}") from None
