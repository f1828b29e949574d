"""Person tracks across the frames of one stream.

A frame's persons are associated with the live tracks by one similarity, `w * IoU(boxes) + (1 - w) * OKS(keypoints)`
(the box a track's latest pose came from, and that pose), maximised over the whole frame with Hungarian matching
(`scipy.optimize.linear_sum_assignment`); pairs below `min_similarity` stay apart. An unmatched person starts a
tentative track, which gets its integer id once it has been seen in `confirm` frames (ids count up from 1 per stream
and never change or repeat); a tentative track missed once ends, a confirmed one after `max_missed` missed frames.

Between detections a track's next box comes from its own keypoints (`box_from_keypoints`): the visible keypoints'
extent padded around its centre by the card's padding (1.25, as the official HRNet code pads boxes and as rtmlib's
and MMDeploy's pose trackers pad keypoint boxes); the planner then pads and aspect-corrects it like any box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.postprocess import iou_matrix, oks_matrix


@dataclass(frozen=True)
class TrackerConfig:
    """How tracks are matched, born and ended (frames count in the stream's own frames)."""

    confirm: int = 2  # frames a track must be seen in before it gets an id
    max_missed: int = 30  # frames a confirmed track may go unseen before it ends
    iou_weight: float = 0.5  # similarity = w * IoU + (1 - w) * OKS
    min_similarity: float = 0.3  # pairs below this are never matched
    kpt_thr: float = 0.3  # a keypoint scoring this much is visible (OKS visibility, the box extent)

    def validate(self) -> None:
        if self.confirm < 1:
            raise DynPoseError(f"tracker: confirm must be >= 1 frame, got {self.confirm}")
        if self.max_missed < 0:
            raise DynPoseError(f"tracker: max_missed must be >= 0 frames, got {self.max_missed}")
        for name in ("iou_weight", "min_similarity", "kpt_thr"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise DynPoseError(f"tracker: {name} must be in [0, 1], got {v}")


@dataclass
class Track:
    """One person over time. `box` and `keypoints` are the latest observation (raw, never smoothed)."""

    uid: int  # internal, every track has one
    box: np.ndarray  # (4,) x,y,w,h the latest pose was estimated in
    keypoints: np.ndarray  # (K,3)
    box_score: float  # score of the last detection box (carried over frames without detection)
    first_frame: int
    last_frame: int
    hits: int = 1
    missed: int = 0
    track_id: int | None = None  # public id, set on confirmation
    center: np.ndarray | None = None  # centre of the visible keypoints' extent
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))  # of `center`, pixels per frame

    @property
    def confidence(self) -> float:
        """Mean keypoint score of the latest pose (0 when it is not finite)."""
        s = np.nan_to_num(np.asarray(self.keypoints, dtype=np.float64)[:, 2], nan=0.0)
        return float(s.mean()) if s.size else 0.0

    @property
    def confirmed(self) -> bool:
        return self.track_id is not None


def box_from_keypoints(keypoints: np.ndarray, kpt_thr: float = 0.3, padding: float = 1.25) -> np.ndarray | None:
    """(K,3) keypoints -> (4,) x,y,w,h: the extent of the keypoints scoring at least `kpt_thr`, scaled by `padding`
    about its centre; None when fewer than two keypoints are visible or they all sit on one point."""
    kp = np.asarray(keypoints, dtype=np.float64).reshape(-1, 3)
    vis = np.isfinite(kp).all(axis=1) & (kp[:, 2] >= kpt_thr)
    if vis.sum() < 2:
        return None
    xy = kp[vis, :2]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    size = (hi - lo) * padding
    if not (size > 1.0).any():
        return None
    size = np.maximum(size, 1.0)  # keypoints on a line: the planner's aspect correction widens the box
    center = (lo + hi) / 2.0
    return np.array([center[0] - size[0] / 2, center[1] - size[1] / 2, size[0], size[1]])


def keypoint_center(keypoints: np.ndarray, kpt_thr: float = 0.3) -> np.ndarray | None:
    """Centre of the extent of the keypoints scoring at least `kpt_thr`; None when none does."""
    kp = np.asarray(keypoints, dtype=np.float64).reshape(-1, 3)
    vis = np.isfinite(kp).all(axis=1) & (kp[:, 2] >= kpt_thr)
    if not vis.any():
        return None
    xy = kp[vis, :2]
    return (xy.min(axis=0) + xy.max(axis=0)) / 2.0


def match(similarity: np.ndarray, min_similarity: float) -> list[tuple[int, int]]:
    """Hungarian matching maximising total similarity (N,M); pairs under `min_similarity` are dropped."""
    from scipy.optimize import linear_sum_assignment

    sim = np.nan_to_num(np.asarray(similarity, dtype=np.float64), nan=0.0)
    if sim.size == 0:
        return []
    rows, cols = linear_sum_assignment(-sim)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if sim[r, c] >= min_similarity]


class Tracker:
    """The tracks of one stream. `update` takes a frame's observations (boxes, keypoints, box scores), optionally
    with the track each already belongs to, and returns the track of every observation."""

    def __init__(self, config: TrackerConfig | None = None, sigmas: Sequence[float] | None = None) -> None:
        self.config = config or TrackerConfig()
        self.config.validate()
        self.sigmas = sigmas
        self.tracks: list[Track] = []
        self.ended = 0  # tracks that ended (confirmed or not)
        self._next_id = 1
        self._next_uid = 0

    def similarity(self, boxes: np.ndarray, keypoints: np.ndarray, tracks: Sequence[Track]) -> np.ndarray:
        """(N,M) w * IoU + (1 - w) * OKS of N observations against `tracks` (the tracks' poses as reference, their
        visible keypoints labelled, their box areas as the object scale)."""
        n, m = len(boxes), len(tracks)
        if n == 0 or m == 0:
            return np.zeros((n, m))
        t_boxes = np.stack([t.box for t in tracks])
        iou = iou_matrix(boxes, t_boxes)
        ref = np.stack([t.keypoints for t in tracks]).astype(np.float64)
        ref[..., 2] = (np.nan_to_num(ref[..., 2], nan=0.0) >= self.config.kpt_thr).astype(np.float64)
        kp = np.nan_to_num(np.asarray(keypoints, dtype=np.float64), nan=1e9)
        oks = np.nan_to_num(oks_matrix(kp, ref, t_boxes[:, 2] * t_boxes[:, 3], self.sigmas), nan=0.0)
        w = self.config.iou_weight
        return w * iou + (1.0 - w) * oks

    def associate(self, boxes: np.ndarray, keypoints: np.ndarray) -> list[Track | None]:
        """The live track of each observation (None: no track is similar enough)."""
        sim = self.similarity(boxes, keypoints, self.tracks)
        out: list[Track | None] = [None] * len(boxes)
        for i, j in match(sim, self.config.min_similarity):
            out[i] = self.tracks[j]
        return out

    def match_boxes(self, boxes: np.ndarray, min_iou: float = 0.5) -> list[Track | None]:
        """The live track of each box by IoU alone (before any pose exists for them, e.g. to reuse a decision)."""
        out: list[Track | None] = [None] * len(boxes)
        if len(boxes) and self.tracks:
            iou = iou_matrix(boxes, np.stack([t.box for t in self.tracks]))
            for i, j in match(iou, min_iou):
                out[i] = self.tracks[j]
        return out

    def update(
        self,
        frame: int,
        boxes: np.ndarray,
        keypoints: np.ndarray,
        box_scores: np.ndarray,
        known: Sequence[Track | None] | None = None,
        births: bool = True,
    ) -> list[Track | None]:
        """Observe a frame: `known[i]` is observation i's track when the caller knows it (a box made from that
        track's keypoints), else it is matched; unmatched observations start tracks when `births`. Tracks not
        observed count a miss and end as configured. Returns each observation's track (None: not tracked)."""
        n = len(boxes)
        owners: list[Track | None] = list(known) if known is not None else [None] * n
        if len(owners) != n:
            raise DynPoseError(f"tracker: {n} observations but {len(owners)} known tracks")
        taken = {t.uid for t in owners if t is not None}
        free = [i for i in range(n) if owners[i] is None]
        if free:
            pool = [t for t in self.tracks if t.uid not in taken]
            sim = self.similarity(boxes[free], keypoints[free], pool)
            for a, b in match(sim, self.config.min_similarity):
                owners[free[a]] = pool[b]
        for i, t in enumerate(owners):
            if t is not None:
                self._observe(t, frame, boxes[i], keypoints[i], float(box_scores[i]))
            elif births:
                owners[i] = self._birth(frame, boxes[i], keypoints[i], float(box_scores[i]))
        self._age(frame)
        return owners

    def _observe(self, t: Track, frame: int, box: np.ndarray, kps: np.ndarray, box_score: float) -> None:
        center = keypoint_center(kps, self.config.kpt_thr)
        if center is not None and t.center is not None and frame > t.last_frame:
            # constant velocity, so a box made from this pose for the next frame is where the person will be
            t.velocity = (center - t.center) / (frame - t.last_frame)
        elif center is None:
            t.velocity = np.zeros(2)
        t.center = center
        t.box = np.asarray(box, dtype=np.float64)[:4].copy()
        t.keypoints = np.asarray(kps, dtype=np.float32).copy()
        t.box_score = box_score
        t.last_frame = frame
        t.hits += 1
        t.missed = 0

    def _birth(self, frame: int, box: np.ndarray, kps: np.ndarray, box_score: float) -> Track:
        t = Track(
            uid=self._next_uid,
            box=np.asarray(box, dtype=np.float64)[:4].copy(),
            keypoints=np.asarray(kps, dtype=np.float32).copy(),
            box_score=box_score,
            first_frame=frame,
            last_frame=frame,
            center=keypoint_center(kps, self.config.kpt_thr),
        )
        self._next_uid += 1
        self.tracks.append(t)
        return t

    def _age(self, frame: int) -> None:
        """Count misses, end lost tracks, give ids to tracks seen often enough."""
        alive = []
        for t in self.tracks:
            if t.last_frame != frame:
                t.missed += 1
            dead = t.missed > (self.config.max_missed if t.confirmed else 0)
            if dead:
                self.ended += 1
                continue
            if not t.confirmed and t.hits >= self.config.confirm:
                t.track_id = self._next_id
                self._next_id += 1
            alive.append(t)
        self.tracks = alive

    @property
    def ids_given(self) -> int:
        """How many track ids this tracker has given (confirmed tracks so far)."""
        return self._next_id - 1

    def observed(self, frame: int) -> list[Track]:
        """The tracks observed in `frame` (the ones whose keypoints can give the next frame's boxes)."""
        return [t for t in self.tracks if t.last_frame == frame]
