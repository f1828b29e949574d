"""Video streams through a Pipeline: key-frame detection, tracking, temporal routing and smoothing, many at once.

    with Pipeline.from_engine_dir("engines/", detector="det.onnx") as pipe:
        video = VideoTracker(pipe, VideoOptions(track=True, det_every=3, reroute_every=10), streams=2)
        for frame_a, frame_b in zip(source_a, source_b):
            persons_a, persons_b = video.step([frame_a, frame_b])   # one dispatch for both frames' persons

Per stream, per frame (`StreamTracker`):

- a key frame (every `det_every` frames, the first one, and the frame after a track's keypoint confidence
  collapsed) takes its boxes from the detector (or a `BoxSource`); the others take one box per track observed in the
  previous frame, made from its keypoints (`box_from_keypoints`);
- with temporal routing (`reroute_every` > 1) a track's box carries its kept small/large decision to the
  Dispatcher (the `decisions` hook of `Pipeline.run_batch`), so the router only runs for new tracks, tracks whose
  decision is `reroute_every` frames old, and tracks whose keypoint confidence fell by `reroute_drop` since;
- the frames of every stream are dispatched as one `Pipeline.run_batch` (one router batch, one batch per pose
  model), then each stream's tracker associates its persons (`Tracker`), and the one-euro filter smooths what is
  written when asked.

A key frame's persons are exactly what `Pipeline` gives for that frame's boxes (rescored, OKS-NMSed); on the other
frames a person's score is its mean keypoint score times its track's last detection score, and a track whose pose
collapsed (mean keypoint score under `lost_conf`) or duplicates another's (OKS over the NMS threshold) is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.boxes import BoxSource
from dynpose.runtime.pipeline import OKS_NMS_THR, PersonPose, Pipeline, clean_boxes
from dynpose.runtime.postprocess import oks_nms
from dynpose.runtime.sources import Frame
from dynpose.runtime.tracking.smoothing import OneEuroConfig, OneEuroFilter
from dynpose.runtime.tracking.tracker import Track, Tracker, TrackerConfig, box_from_keypoints

DEFAULT_FPS = 30.0  # time base of the smoother when a source has no frame rate (images, some webcams)


@dataclass(frozen=True)
class VideoOptions:
    """What a video run does beyond per-frame pose estimation (all off by default: every frame detected, no ids)."""

    track: bool = False  # give persons track ids (needed by everything below)
    det_every: int = 1  # run the detector every N frames (and when a track is lost)
    reroute_every: int = 1  # keep a track's small/large decision for up to K frames (1: route every frame)
    reroute_drop: float = 0.1  # route again when a track's mean keypoint score fell this much since its decision
    lost_conf: float = 0.2  # a pose whose mean keypoint score is under this is lost: detect on the next frame
    smooth: OneEuroConfig | None = None  # one-euro smoothing of the written keypoints
    tracker: TrackerConfig = field(default_factory=TrackerConfig)

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
        if self.track and self.tracker.max_missed < self.det_every:
            raise DynPoseError(
                f"--track-max-missed {self.tracker.max_missed} is under --det-every {self.det_every}: a person the "
                "detector missed once would end before the next detection; raise it"
            )
        for name in ("reroute_drop", "lost_conf"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DynPoseError(f"video options: {name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class TrackedPose(PersonPose):
    """A PersonPose with the id of its track (None while the track is not confirmed yet)."""

    track_id: int | None = None

    def to_dict(self, exact: bool = False) -> dict[str, Any]:
        d = super().to_dict(exact)
        d["track_id"] = self.track_id
        return d


@dataclass
class StreamStats:
    """What one stream did: frames, detections, router work saved by temporal routing."""

    frames: int = 0
    persons: int = 0
    key_frames: int = 0
    detector_calls: int = 0
    redetections: int = 0  # key frames brought forward by a lost track
    router_crops: int = 0  # crops the router scored
    router_saved: int = 0  # crops that kept their track's decision instead
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
class _Plan:
    """One frame's work: the boxes to dispatch and, per box, its forced decision and (known) track."""

    frame: Frame
    key: bool
    boxes: np.ndarray  # (M,4|5) what goes to Pipeline.run_batch (usable boxes only)
    box_scores: np.ndarray  # (M,)
    decisions: np.ndarray | None  # (M,) -1 | 0 | 1, None: route them all
    tracks: list[Track | None]  # non-key frames: the track each box was made from


@dataclass
class _Obs:
    """A shown person that is an observation for the tracker."""

    row: int  # index into the frame's shown persons
    box_score: float  # detection score of its box (a track carries it over frames without detection)
    forced: int  # the decision its box was dispatched with (-1: routed afresh)
    track: Track | None  # the track its box was made from (propagated frames)


class StreamTracker:
    """The state of one stream: its tracker, its key-frame schedule, its counters."""

    def __init__(
        self,
        options: VideoOptions,
        pipe: Pipeline,
        boxes: BoxSource | None = None,
        fps: float | None = None,
    ) -> None:
        self.options = options
        self.box_source = boxes
        self.detector: Callable[[np.ndarray], np.ndarray] | None = pipe.detector
        self.needs_router = pipe.dispatcher.policy.needs_router
        self.padding = pipe.dispatcher.models["large"].card.padding
        self.sigmas = pipe.keypoint_set.sigmas
        self.num_keypoints = pipe.keypoint_set.num
        self.fps = fps if fps and fps > 0 else DEFAULT_FPS
        self.tracker = Tracker(options.tracker, self.sigmas) if options.track else None
        self.stats = StreamStats()
        self._last_key = -(10**9)
        self._lost = False  # a track was lost in the last frame: detect now

    # -- before the dispatch ---------------------------------------------------------------------------------------
    def plan(self, frame: Frame) -> _Plan:
        idx = self.stats.frames
        due = idx - self._last_key >= self.options.det_every
        if self.tracker is None or due or self._lost:
            return self._key_plan(frame, idx, redetect=self._lost and not due)
        tracks = self.tracker.observed(idx - 1)
        kept: list[Track] = []
        boxes = []
        for t in tracks:
            box = box_from_keypoints(t.keypoints, self.options.tracker.kpt_thr, self.padding)
            if box is not None:
                box[:2] += t.velocity
            if box is not None and clean_boxes(box[None], frame.image_bgr.shape)[1] == 0:
                kept.append(t)
                boxes.append(box)
        arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.array([t.box_score for t in kept], dtype=np.float64)
        return _Plan(frame, False, arr, scores, self._decisions(kept, idx), list(kept))

    def _key_plan(self, frame: Frame, idx: int, redetect: bool) -> _Plan:
        raw = self.box_source.boxes(frame) if self.box_source is not None else None
        if raw is None:
            if self.detector is None:
                raise DynPoseError(
                    "no person boxes: pass a detector (--detector FILE.onnx) or export one into the engine dir"
                )
            raw = self.detector(frame.image_bgr)
            self.stats.detector_calls += 1
        raw = np.asarray(raw, dtype=np.float64)
        kept, _ = clean_boxes(raw, frame.image_bgr.shape)
        # boxes without scores (ground truth) stay without, so the Pipeline skips OKS-NMS for them as it always does
        boxes = kept if raw.ndim == 2 and raw.shape[1] == 5 else kept[:, :4]
        self._last_key = idx
        self._lost = False
        self.stats.key_frames += 1
        self.stats.redetections += redetect
        matched: list[Track | None] = self.tracker.match_boxes(kept) if self.tracker is not None else [None] * len(kept)
        return _Plan(frame, True, boxes, kept[:, 4].copy(), self._decisions(matched, idx), matched)

    def _decisions(self, tracks: Sequence[Track | None], idx: int) -> np.ndarray | None:
        """Each box's kept decision (0 small, 1 large) or -1 (route it), and the router counts."""
        if not self.needs_router:
            return None
        if self.options.reroute_every <= 1:
            self.stats.router_crops += len(tracks)
            return None
        d = np.array([self._kept(t, idx) for t in tracks], dtype=np.int8)
        self.stats.router_crops += int((d < 0).sum())
        self.stats.router_saved += int((d >= 0).sum())
        return d

    def _kept(self, t: Track | None, idx: int) -> int:
        o = self.options
        if t is None or t.large is None or idx - t.routed_at >= o.reroute_every:
            return -1
        if t.confidence < t.routed_conf - o.reroute_drop:
            return -1
        return int(t.large)

    # -- after the dispatch ----------------------------------------------------------------------------------------
    def finish(self, plan: _Plan, persons: list[PersonPose]) -> list[PersonPose]:
        """This frame's persons, tracked (TrackedPose) when the stream tracks."""
        idx = self.stats.frames
        self.stats.frames += 1
        if self.tracker is None:
            self.stats.persons += len(persons)
            return persons
        shown, obs = self._key_observations(plan, persons) if plan.key else self._propagated(plan, persons)
        rows = [o.row for o in obs]
        boxes = np.array([shown[r].box for r in rows], dtype=np.float64).reshape(-1, 4)
        kps = np.array([shown[r].keypoints for r in rows], dtype=np.float32).reshape(len(rows), self.num_keypoints, 3)
        box_scores = np.array([o.box_score for o in obs], dtype=np.float64)
        known = None if plan.key else [o.track for o in obs]
        owners = self.tracker.update(idx, boxes, kps, box_scores, known=known, births=plan.key)
        track_of: dict[int, Track] = {}
        for o, t in zip(obs, owners, strict=True):
            if t is None:
                continue
            track_of[o.row] = t
            if o.forced < 0:  # a fresh decision: keep it for the frames to come
                t.large, t.routed_at, t.routed_conf = shown[o.row].model == "large", idx, t.confidence
        out: list[PersonPose] = [self._output(p, track_of.get(i), idx) for i, p in enumerate(shown)]
        self.stats.persons += len(out)
        self.stats.tracks = self.tracker.ids_given
        return out

    def _usable_pose(self, p: PersonPose) -> bool:
        """A pose a track can follow: mean keypoint score at least `lost_conf`, and a box to be made from it."""
        conf = float(np.nan_to_num(p.keypoints[:, 2], nan=0.0).mean())
        kpt_thr = self.options.tracker.kpt_thr
        return conf >= self.options.lost_conf and box_from_keypoints(p.keypoints, kpt_thr, self.padding) is not None

    def _key_observations(self, plan: _Plan, persons: list[PersonPose]) -> tuple[list[PersonPose], list[_Obs]]:
        """A key frame's persons, all shown as the Pipeline gave them (after its NMS); the ones with a usable pose
        are observations, with their box's detection score and forced decision."""
        index = {tuple(b): i for i, b in enumerate(np.asarray(plan.boxes)[:, :4].tolist())}
        obs = []
        for i, p in enumerate(persons):
            if not self._usable_pose(p):
                continue  # shown, but followed by no track (the detector's false alarms end here)
            r = index.get(tuple(float(v) for v in p.box[:4]), -1)
            forced = int(plan.decisions[r]) if plan.decisions is not None and r >= 0 else -1
            obs.append(_Obs(i, float(plan.box_scores[r]) if r >= 0 else 1.0, forced, None))
        return persons, obs

    def _propagated(self, plan: _Plan, persons: list[PersonPose]) -> tuple[list[PersonPose], list[_Obs]]:
        """A propagated frame's persons (one per track box, in box order): lost poses (which bring detection
        forward) and duplicates of another track's pose are left out."""
        if len(persons) != len(plan.tracks):
            raise DynPoseError(f"tracking: {len(plan.tracks)} boxes dispatched but {len(persons)} poses came back")
        good = [i for i, p in enumerate(persons) if self._usable_pose(p)]
        self._lost = len(good) < len(persons)
        # the person score as on a key frame: mean keypoint score x the track's last detection score
        scores = np.array([persons[i].score * plan.box_scores[i] for i in good], dtype=np.float64)
        if len(good) > 1:  # two tracks on one person: keep the better (the other misses, and ends if it stays so)
            kps = np.stack([persons[i].keypoints for i in good])
            areas = np.array([persons[i].box[2] * persons[i].box[3] for i in good])
            keep = sorted(oks_nms(kps, scores, areas, thr=OKS_NMS_THR, sigmas=self.sigmas))
            good, scores = [good[k] for k in keep], scores[keep]
        shown = [persons[i] for i in good]
        for p, sc in zip(shown, scores, strict=True):
            p.score = float(sc)
        obs = [
            _Obs(j, float(plan.box_scores[i]), int(plan.decisions[i]) if plan.decisions is not None else -1, plan.tracks[i])
            for j, i in enumerate(good)
        ]
        return shown, obs

    def _output(self, p: PersonPose, t: Track | None, idx: int) -> TrackedPose:
        kps = p.keypoints.copy()
        if t is not None and self.options.smooth is not None:
            f = t.state.get("smoother")
            if f is None:
                f = t.state["smoother"] = OneEuroFilter(self.options.smooth)
            kps[:, :2] = f(idx / self.fps, kps[:, :2]).astype(kps.dtype)
        return TrackedPose(
            box=p.box,
            score=p.score,
            keypoints=kps,
            model=p.model,
            router_score=p.router_score,
            track_id=t.track_id if t is not None else None,
        )


class VideoTracker:
    """Many streams over one Pipeline: each `step` takes one frame per stream (None for a stream with none now)
    and dispatches every stream's boxes as one batch. Streams keep their own trackers, schedules and counters."""

    def __init__(
        self,
        pipe: Pipeline,
        options: VideoOptions | None = None,
        streams: int = 1,
        fps: Sequence[float | None] | None = None,
        boxes: Sequence[BoxSource | None] | None = None,
    ) -> None:
        self.options = options or VideoOptions()
        self.options.validate()
        if streams < 1:
            raise DynPoseError(f"VideoTracker: streams must be >= 1, got {streams}")
        fps = list(fps) if fps is not None else [None] * streams
        box_sources = list(boxes) if boxes is not None else [None] * streams
        if len(fps) != streams or len(box_sources) != streams:
            raise DynPoseError(f"VideoTracker: {streams} streams but {len(fps)} fps and {len(box_sources)} box sources")
        self.pipe = pipe
        self.streams = [StreamTracker(self.options, pipe, b, f) for b, f in zip(box_sources, fps, strict=True)]

    def step(self, frames: Sequence[Frame | None]) -> list[list[PersonPose] | None]:
        """Persons of each stream's frame (None where a stream had no frame), all dispatched together."""
        if len(frames) != len(self.streams):
            raise DynPoseError(f"VideoTracker: {len(self.streams)} streams but {len(frames)} frames")
        live = [i for i, f in enumerate(frames) if f is not None]
        plans = {i: self.streams[i].plan(frames[i]) for i in live}  # type: ignore[arg-type]
        forced = [plans[i].decisions for i in live]
        results = self.pipe.run_batch(
            [plans[i].frame.image_bgr for i in live],
            [plans[i].boxes for i in live],
            decisions=forced if any(d is not None for d in forced) else None,
        )
        out: list[list[PersonPose] | None] = [None] * len(frames)
        for i, persons in zip(live, results, strict=True):
            out[i] = self.streams[i].finish(plans[i], persons)
        return out

    @property
    def stats(self) -> StreamStats:
        """Every stream's counters summed."""
        return StreamStats.sum(s.stats for s in self.streams)
