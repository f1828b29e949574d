"""Keypoint sets: names, flip pairs, OKS sigmas and skeleton edges (data, not code)."""

from __future__ import annotations

from dataclasses import dataclass

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


def get_keypoint_set(name: str) -> KeypointSet:
    try:
        return KEYPOINT_SETS[name]
    except KeyError:
        raise DynPoseError(f"unknown keypoint set {name!r}; known: {', '.join(sorted(KEYPOINT_SETS))}") from None
