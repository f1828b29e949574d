"""One stream's tracking: key-frame detection, boxes from tracks between key frames, temporal routing, smoothing.

Per frame (`StreamTracker.prepare` before the plan, `StreamTracker.finish` after it):

- a key frame (every `det_every` frames, the first one, and the frame after a track's keypoint confidence
  collapsed) takes its boxes from its box source (a detections file, ground truth, or the detector); the others
  take one box per track observed in the previous frame, made from its keypoints (`box_from_keypoints`);
- with temporal routing (`reroute_every` > 1) a track's box carries its kept small/large decision into the plan
  (`FrameInput.keep`), so the router only runs for new tracks, tracks whose decision is `reroute_every` frames old,
  and tracks whose keypoint confidence fell by `reroute_drop` since;
- after the plan each person is found again by the row of the box it came from (`Person.index`), associated with
  its track (`Tracker`), and, when asked, its written keypoints are smoothed by the track's one-euro filter.

A key frame's persons are exactly what `Pipeline` gives for that frame's boxes (rescored, OKS-NMSed); on the other
frames a person's score is its mean keypoint score times its track's last detection score, and a track whose pose
collapsed (mean keypoint score under `lost_conf`) or duplicates another's (OKS over the NMS threshold) is left out.
What the stream remembers per track (its kept decision, its smoother) lives here, keyed by the track's uid; the
tracker's `Track` holds only what matching needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.io.box_sources import BoxSource
from dynpose.io.sources import Frame
from dynpose.roles import Role
from dynpose.runtime.boxes import Boxes
from dynpose.runtime.person import Decision, Person
from dynpose.runtime.pipeline import OKS_NMS_THR, Pipeline
from dynpose.runtime.plan import FrameInput
from dynpose.runtime.postprocess import oks_nms
from dynpose.video.keyframes import KeyframeConfig, KeyframePlanner
from dynpose.video.smoothing import OneEuroConfig, OneEuroFilter
from dynpose.video.tracker import Track, Tracker, TrackerConfig, box_from_keypoints

DEFAULT_FPS = 30.0  # time base of the smoother when a source has no frame rate (images, some webcams)


@dataclass(frozen=True)
class VideoOptions:
    """What a run does beyond per-frame pose estimation (all off by default: every frame detected, no ids)."""

    track: bool = False  # give persons track ids (needed by everything below)
    det_every: int = 1  # run the detector every N frames (and when a track is lost)
    reroute_every: int = 1  # keep a track's small/large decision for up to K frames (1: route every frame)
    reroute_drop: float = 0.1  # route again when a track's mean keypoint score fell this much since its decision
    lost_conf: float = 0.2  # a pose whose mean keypoint score is under this is lost: detect on the next frame
    smooth: OneEuroConfig | None = None  # one-euro smoothing of the written keypoints
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    # key frames chosen by what the tracks do not explain (`keyframes.KeyframePlanner`: people walking in, camera
    # motion, a cut) instead of every `det_every` frames; `det_every` is then the longest gap between detections
    keyframes: KeyframeConfig | None = None

    def validate(self) -> None:
        if self.det_every < 1:
            raise DynPoseError(f"--det-every must be >= 1, got {self.det_every}")
        if self.reroute_every < 1:
            raise DynPoseError(f"--reroute-every must be >= 1, got {self.reroute_every}")
        if not self.track:
            asked = [
                f
                for f, on in (
                    (f"--det-every {self.det_every}", self.det_every > 1),
                    (f"--reroute-every {self.reroute_every}", self.reroute_every > 1),
                    ("--smooth", self.smooth is not None),
                )
                if on
            ]
            if asked:
                raise DynPoseError(f"{', '.join(asked)} follow(s) people from frame to frame; add --track")
        self.tracker.validate()
        if self.keyframes is not None:
            if not self.track:
                raise DynPoseError("--keyframes chooses when to detect while following people; add --track")
            self.keyframes.validate()
        if self.track and self.tracker.max_missed < self.det_every:
            raise DynPoseError(
                f"--track-max-missed {self.tracker.max_missed} is under --det-every {self.det_every}: a person the "
                "detector missed once would end before the next detection; raise it"
            )
        for name in ("reroute_drop", "lost_conf"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DynPoseError(f"video options: {name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class StreamStats:
    """What one stream did: frames, detections, router work saved by temporal routing."""

    frames: int = 0
    persons: int = 0
    key_frames: int = 0
    detector_calls: int = 0
    redetections: int = 0  # key frames brought forward by a lost track
    router_crops: int = 0  # persons the router scored
    router_saved: int = 0  # persons that kept their track's decision instead
    tracks: int = 0  # track ids given

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    @classmethod
    def sum(cls, stats: Iterable[StreamStats]) -> StreamStats:
        """Several streams' counters added up."""
        total = cls()
        for s in stats:
            for k, v in s.as_dict().items():
                setattr(total, k, getattr(total, k) + v)
        return total


@dataclass
class _Kept:
    """What the stream remembers of one track: its kept routing decision and its smoother."""

    large: bool | None = None
    routed_at: int = -1  # frame of that decision
    routed_conf: float = 0.0  # keypoint confidence when it was made
    smoother: OneEuroFilter | None = None


@dataclass
class Step:
    """One frame's part of the stream: the frame as the plan takes it, whether it is a key frame, and the track
    each box (by row) was matched to or made from."""

    frame: Frame
    input: FrameInput
    key: bool
    tracks: list[Track | None]  # by box row (the `Person.index` of what comes back)


class StreamTracker:
    """The state of one stream: box source, tracker, key-frame schedule, counters. Untracked streams take every
    frame's boxes from their box source and hand the persons back as they are."""

    def __init__(self, options: VideoOptions, pipe: Pipeline, boxes: BoxSource | None = None, fps: float | None = None):
        self.options = options
        self.pipe = pipe
        self.box_source = boxes
        self.detector: Callable[[np.ndarray], np.ndarray] | None = pipe.detector
        self.padding = pipe.cards[Role.LARGE].padding
        self.sigmas = pipe.keypoint_set.sigmas
        self.fps = fps if fps and fps > 0 else DEFAULT_FPS
        self.tracker = Tracker(options.tracker, self.sigmas) if options.track else None
        self.keyframes = KeyframePlanner(options.keyframes) if options.keyframes is not None else None
        self.stats = StreamStats()
        self._kept: dict[int, _Kept] = {}
        self._last_key = -(10**9)
        self._lost = False  # a track was lost in the last frame: detect now

    @property
    def tracked(self) -> bool:
        return self.tracker is not None

    # -- before the plan -------------------------------------------------------------------------------------------
    def prepare(self, frame: Frame) -> Step:
        idx = self.stats.frames
        if self.tracker is None:
            return self._key_step(frame, idx, redetect=False)
        tracks = self.tracker.observed(idx - 1)
        made = [box_from_keypoints(t.keypoints, self.options.tracker.kpt_thr, self.padding) for t in tracks]
        rows = [i for i, b in enumerate(made) if b is not None]
        arr = np.array([made[i] + np.r_[tracks[i].velocity, 0, 0] for i in rows], dtype=np.float64).reshape(-1, 4)
        kept = [tracks[i] for i in rows]
        key, redetect = self._key_frame(frame, idx, arr, kept)
        if key:
            step = self._key_step(frame, idx, redetect)
            if self.keyframes is not None:
                self.keyframes.detected(step.input.boxes.as_array())
            return step
        boxes = Boxes.of(arr, frame.image_bgr.shape, where="tracked boxes")
        # each box carries its track's last detection score, so the person's score is rescored as on a key frame
        boxes = replace(boxes, scores=np.array([kept[r].box_score for r in boxes.rows], dtype=np.float64))
        fi = self.pipe.prepare(frame.image_bgr, boxes, keep=self._keep([kept[r] for r in boxes.rows], idx), nms=False)
        return Step(frame, fi, False, list(kept))

    def _key_frame(self, frame: Frame, idx: int, boxes: np.ndarray, tracks: list[Track]) -> tuple[bool, bool]:
        """(key frame?, brought forward by a lost pose?): a key frame takes its boxes from the box source, every
        `det_every` frames and after a lost pose, or, with key frames, when the planner sees what the tracks do not
        explain (people walking in, the camera showing new ground, a cut, a lost pose)."""
        if self.keyframes is None:
            due = idx - self._last_key >= self.options.det_every
            return due or self._lost, self._lost and not due
        conf = np.array([t.confidence for t in tracks], dtype=np.float64)
        d = self.keyframes.decide(frame.image_bgr, boxes, conf)
        # a pose dropped below the usable score never reaches the planner's tracks, so its own "lost" check cannot
        # see it: the stream's flag brings the detection forward here too
        return d.full or self._lost, d.reason == "lost" or (self._lost and not d.full)

    def _key_step(self, frame: Frame, idx: int, redetect: bool) -> Step:
        raw = self.box_source.boxes(frame) if self.box_source is not None else None
        if raw is None:
            if self.detector is None:
                raise DynPoseError(
                    "no person boxes: pass a detector (--detector FILE.onnx) or export one into the engine dir"
                )
            raw = self.detector(frame.image_bgr)
            self.stats.detector_calls += 1
        boxes = Boxes.of(raw, frame.image_bgr.shape, where=getattr(self.box_source, "name", "the detector"))
        self._last_key = idx
        self._lost = False
        self.stats.key_frames += 1
        self.stats.redetections += redetect
        if self.tracker is None:
            return Step(
                frame, self.pipe.prepare(frame.image_bgr, boxes, keep=self._keep([None] * len(boxes), idx)), True, []
            )
        matched = self.tracker.match_boxes(boxes.xywh)
        tracks: list[Track | None] = [None] * (len(boxes) + boxes.dropped)
        for r, t in zip(boxes.rows, matched, strict=True):
            tracks[int(r)] = t
        return Step(frame, self.pipe.prepare(frame.image_bgr, boxes, keep=self._keep(matched, idx)), True, tracks)

    def _keep(self, tracks: Sequence[Track | None], idx: int) -> list[Role | None] | None:
        """Each box's kept decision (None: route it), and the router counts."""
        if not self.pipe.policy.needs_router:
            return None
        if self.options.reroute_every <= 1:
            self.stats.router_crops += len(tracks)
            return None
        keep = [self._kept_decision(t, idx) for t in tracks]
        self.stats.router_crops += sum(k is None for k in keep)
        self.stats.router_saved += sum(k is not None for k in keep)
        return keep

    def _kept_decision(self, t: Track | None, idx: int) -> Role | None:
        k = self._kept.get(t.uid) if t is not None else None
        if t is None or k is None or k.large is None or idx - k.routed_at >= self.options.reroute_every:
            return None
        if t.confidence < k.routed_conf - self.options.reroute_drop:
            return None
        return Role.LARGE if k.large else Role.SMALL

    # -- after the plan --------------------------------------------------------------------------------------------
    def finish(self, step: Step, persons: list[Person]) -> list[Person]:
        """This frame's persons, with track ids when the stream tracks."""
        idx = self.stats.frames
        self.stats.frames += 1
        if self.tracker is None:
            self.stats.persons += len(persons)
            return persons
        if step.key:
            shown = persons
            obs = [p for p in shown if self._usable_pose(p)]  # the detector's false alarms are shown, never followed
        else:
            good = [p for p in persons if self._usable_pose(p)]
            self._lost = len(good) < len(persons)  # a lost pose brings the next detection forward
            shown = obs = self._dedupe(good)
        owners = self.tracker.update(
            idx,
            np.array([p.box for p in obs], dtype=np.float64).reshape(-1, 4),
            np.array([p.keypoints for p in obs], dtype=np.float32).reshape(len(obs), self.pipe.keypoint_set.num, 3),
            np.array([p.box_score for p in obs], dtype=np.float64),
            known=None if step.key else [step.tracks[p.index] for p in obs],
            births=step.key,
        )
        track_of = {id(p): t for p, t in zip(obs, owners, strict=True) if t is not None}
        for p in obs:
            t = track_of.get(id(p))
            if t is not None and p.decision is not Decision.KEPT:  # a fresh decision: keep it for the frames to come
                k = self._kept.setdefault(t.uid, _Kept())
                k.large, k.routed_at, k.routed_conf = p.model is Role.LARGE, idx, t.confidence
        out = [self._output(p, track_of.get(id(p)), idx) for p in shown]
        live = {t.uid for t in self.tracker.tracks}
        self._kept = {uid: k for uid, k in self._kept.items() if uid in live}
        self.stats.persons += len(out)
        self.stats.tracks = self.tracker.ids_given
        return out

    def _usable_pose(self, p: Person) -> bool:
        """A pose a track can follow: mean keypoint score at least `lost_conf`, and a box to be made from it."""
        conf = float(np.nan_to_num(p.keypoints[:, 2], nan=0.0).mean())
        kpt_thr = self.options.tracker.kpt_thr
        return conf >= self.options.lost_conf and box_from_keypoints(p.keypoints, kpt_thr, self.padding) is not None

    def _dedupe(self, good: list[Person]) -> list[Person]:
        """Two tracks on one person: keep the better pose (the other track misses, and ends if it stays so)."""
        if len(good) < 2:
            return good
        kps = np.stack([p.keypoints for p in good])
        areas = np.array([p.box[2] * p.box[3] for p in good])
        scores = np.array([p.score for p in good], dtype=np.float64)
        return [good[k] for k in sorted(oks_nms(kps, scores, areas, thr=OKS_NMS_THR, sigmas=self.sigmas))]

    def _output(self, p: Person, t: Track | None, idx: int) -> Person:
        if t is None:
            return p
        kps = p.keypoints
        if self.options.smooth is not None:
            k = self._kept.setdefault(t.uid, _Kept())
            if k.smoother is None:
                k.smoother = OneEuroFilter(self.options.smooth)
            kps = kps.copy()
            kps[:, :2] = k.smoother(idx / self.fps, kps[:, :2]).astype(kps.dtype)
        return replace(p, keypoints=kps, track_id=t.track_id)
