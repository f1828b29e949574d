"""Key frames that do not miss people walking in: when a video frame needs the full person detector.

Between key frames a tracker follows the persons it knows by boxes made from their last poses, so somebody who walks
in between two detections is missed until the next one. `KeyframePlanner` looks at every frame for what the tracks
do not explain, and asks for a full detection only then, or when the regular interval is up:

- **unexplained motion**: the frame and the previous one are shrunk to a grey thumbnail (`KeyframeConfig.width`
  pixels wide), the camera's own motion between them is estimated (a similarity transform from sparse optical
  flow, `cv2.estimateAffinePartial2D`) and undone, and the pixels that still changed by `diff_thr` grey levels are
  motion. Motion inside the tracked boxes (this frame's expected ones and the previous frame's, each grown by
  `box_margin`) is the tracked persons'; a blob left over that is
  at least `min_blob` of the frame and person-like (at least `min_aspect` times as high as wide) is somebody the
  tracks do not know: a full detection now (`reason="motion"`).
  An optional cheap `scout` detector (e.g. PicoDet 192 instead of 320) looks at such a blob's region first, and a
  blob where it finds nobody new, like a blob the full detector found nobody in (`detected`), is remembered as
  clutter (walkers too small to detect, moving shadows, screens, waving trees): motion around it, within its own
  size, calls nothing for `clutter_frames` frames, instead of the full detector every frame.
- **camera motion**: what the camera brings into view since the last full detection (the accumulated transform's
  uncovered share of the frame) reaching `reveal` calls one (`reason="view"`); a frame the transform cannot be
  estimated for (a cut, a flash, a whip pan) too (`reason="scene"`).
- **tracks**: no tracked box, a tracked pose whose confidence fell under `lost_conf` (`reason="lost"`), the first
  frame (`"first"`), and at most `max_interval` frames without a full detection (`"interval"`).

Measured (`benchmarks/keyframe_bench.py`, figures in benchmarks/README.md): on a 5-frame broadcast clip where a
player runs in, mean OKS against detection on every frame 0.973 (plain `--det-every 3`: 0.753); on a 341-frame
static-camera plaza video 0.901 at most 3 frames apart (`--det-every 3`: 0.885), with 16 % more detections.

Interface (numpy and OpenCV only; nothing here runs a pose model or a tracker):

    planner = KeyframePlanner(KeyframeConfig(), scout=cheap_detector)  # scout optional: BGR image -> (M,5) boxes
    for image in frames:
        boxes = track_boxes_for(image)              # (N,4|5) x,y,w,h[,score]: where the tracked persons are expected
        d = planner.decide(image, boxes, confidences)   # confidences: (N,) mean keypoint scores, or None
        if d.full:
            detections = full_detector(image)
            planner.detected(detections)            # what the full detector found (clutter bookkeeping)
            ...                                     # pose the detections, as on any key frame
        else:
            ...                                     # pose `boxes` (and d.entrants, if you take the scout's boxes)

`decide` must see every frame of the stream in order (it keeps the previous thumbnail); `reset()` starts over (a
new stream). `KeyframeDecision.entrants` are the scout's boxes of persons no tracked box covers (empty without a
scout or with `full`); a run loop may pose those instead of asking for a full detection (`KeyframeConfig.
scout_boxes_only`). `KeyframePlanner.stats` counts the decisions by reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.postprocess import iou_matrix

Detector = Callable[[np.ndarray], np.ndarray]
REASONS = ("first", "interval", "lost", "empty", "scene", "view", "motion", "entrant")


@dataclass(frozen=True)
class KeyframeConfig:
    """When a frame gets a full detection (fractions are of the frame's area or size)."""

    max_interval: int = 10  # frames: a full detection at least this often
    width: int = 192  # the grey thumbnail motion is measured on, pixels wide
    diff_thr: float = 24.0  # grey levels of change, after undoing the camera's motion, that count as motion
    min_blob: float = 0.002  # area of an unexplained motion blob that calls a detection (0.2 % of the frame)
    min_aspect: float = 0.8  # a blob's height / width at least this: person-like (object edges seen moving by
    # parallax, a bench, a banner, the top of a wall, are wide and flat)
    box_margin: float = 0.25  # tracked boxes grow by this share of their size on each side before explaining motion
    reveal: float = 0.08  # share of the frame brought into view by the camera since the last full detection
    min_inliers: int = 12  # tracked corners the camera motion needs; fewer: a scene change
    lost_conf: float = 0.2  # a tracked pose under this mean keypoint score is lost
    clutter_frames: int = 15  # frames a blob the scout found nobody in is ignored
    scout_boxes_only: bool = False  # with a scout: return its entrant boxes instead of asking for a full detection

    def validate(self) -> None:
        if self.max_interval < 1:
            raise DynPoseError(f"key frames: max_interval must be >= 1 frame, got {self.max_interval}")
        if self.width < 32:
            raise DynPoseError(f"key frames: width must be >= 32 pixels, got {self.width}")
        for name in ("min_blob", "reveal", "lost_conf"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise DynPoseError(f"key frames: {name} must be in [0, 1], got {v}")
        if not 0.0 < self.diff_thr < 255.0 or self.box_margin < 0.0 or self.min_inliers < 3 or self.clutter_frames < 0:
            raise DynPoseError("key frames: diff_thr in (0, 255), box_margin >= 0, min_inliers >= 3, clutter_frames >= 0")


@dataclass(frozen=True)
class KeyframeDecision:
    """One frame's answer: run the full detector (`full`, with the first `reason` that called it) or not; the
    scout's boxes of entrants (M,5) when it ran and found some."""

    full: bool
    reason: str = ""
    entrants: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))


@dataclass
class _Clutter:
    box: np.ndarray  # x,y,w,h in thumbnail pixels
    until: int  # last frame it is ignored in


class KeyframePlanner:
    """Per-stream key-frame decisions (see the module docstring)."""

    def __init__(self, config: KeyframeConfig | None = None, scout: Detector | None = None) -> None:
        self.config = config or KeyframeConfig()
        self.config.validate()
        self.scout = scout
        self.stats: Counter[str] = Counter()
        self.reset()

    def reset(self) -> None:
        self._prev: np.ndarray | None = None  # previous thumbnail (grey, uint8)
        self._scale = 1.0  # thumbnail pixels per image pixel
        self._frame = -1
        self._last_full = -(10**9)
        self._since = np.eye(3)  # camera motion accumulated since the last full detection (thumbnail pixels)
        self._clutter: list[_Clutter] = []
        self._blobs = np.zeros((0, 4))  # this frame's unexplained blobs (thumbnail pixels), for `detected`
        self._last_boxes = np.zeros((0, 4))  # the previous frame's tracked boxes or detections (image pixels)

    # -- the decision ------------------------------------------------------------------------------------------------
    def decide(
        self, image_bgr: np.ndarray, tracked: np.ndarray | None = None, confidences: np.ndarray | None = None
    ) -> KeyframeDecision:
        """Whether `image_bgr` (the stream's next frame) needs a full detection. `tracked`: (N,4|5) x,y,w,h boxes
        where the tracked persons are expected in this frame (image pixels); `confidences`: their poses' mean
        keypoint scores (N,), or None."""
        img = np.asarray(image_bgr)
        if img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
            raise DynPoseError(f"key frames: expected an H x W x 3 BGR image, got shape {img.shape}")
        boxes = _as_boxes(tracked, "tracked")
        self._frame += 1
        small = self._thumbnail(img)
        prev, self._prev = self._prev, small
        self._blobs = np.zeros((0, 4))
        reason = self._schedule_reason(prev, boxes, confidences)
        entrants = np.zeros((0, 5))
        if reason is None and prev is not None:
            # a tracked person's motion spans where it was and where it is expected
            reason, entrants = self._motion_reason(prev, small, np.concatenate([boxes, self._last_boxes]), img)
        self._last_boxes = boxes
        if reason is None:
            return KeyframeDecision(False, "", entrants)
        if reason == "entrant" and self.config.scout_boxes_only:
            self.stats["entrant_boxes"] += 1
            return KeyframeDecision(False, reason, entrants)
        self.stats[reason] += 1
        self._last_full = self._frame
        self._since = np.eye(3)
        return KeyframeDecision(True, reason, entrants)

    def detected(self, detections: np.ndarray) -> None:
        """The full detector's boxes (M,4|5, image pixels) on the frame `decide` asked for: the blobs it found
        nobody in are clutter, ignored for `clutter_frames` frames."""
        det = _as_boxes(detections, "detections")
        self._last_boxes = det
        for blob in self._blobs:
            if not self._overlaps(blob, det * self._scale).any():
                self._add_clutter(blob)

    # -- pieces ------------------------------------------------------------------------------------------------------
    def _thumbnail(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        self._scale = min(1.0, self.config.width / w)
        size = (max(1, round(w * self._scale)), max(1, round(h * self._scale)))
        grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        small = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        return cv2.GaussianBlur(small, (3, 3), 0)

    def _schedule_reason(self, prev: np.ndarray | None, boxes: np.ndarray, conf: np.ndarray | None) -> str | None:
        if prev is None:
            return "first"
        if self._frame - self._last_full >= self.config.max_interval:
            return "interval"
        if not len(boxes):
            return "empty"
        c = np.nan_to_num(np.asarray(conf, dtype=np.float64).reshape(-1), nan=0.0) if conf is not None else None
        if c is not None and len(c) and (c < self.config.lost_conf).any():
            return "lost"
        return None

    def _motion_reason(
        self, prev: np.ndarray, cur: np.ndarray, boxes: np.ndarray, img: np.ndarray
    ) -> tuple[str | None, np.ndarray]:
        warp = self._camera_motion(prev, cur)
        if warp is None:
            return "scene", np.zeros((0, 5))
        self._since = np.vstack([warp, [0, 0, 1]]) @ self._since
        if self._revealed(cur.shape) >= self.config.reveal:
            return "view", np.zeros((0, 5))
        blobs = self._unexplained(prev, cur, warp, boxes)
        blobs = [b for b in blobs if not self._is_clutter(b)]
        if not blobs:
            return None, np.zeros((0, 5))
        self._blobs = np.asarray(blobs)
        if self.scout is None:
            return "motion", np.zeros((0, 5))
        entrants = self._scout(img, boxes)
        if len(entrants):
            return "entrant", entrants
        for b in blobs:  # the scout saw nobody new there: do not ask again for a while
            self._add_clutter(b)
        return None, np.zeros((0, 5))

    def _camera_motion(self, prev: np.ndarray, cur: np.ndarray) -> np.ndarray | None:
        """2x3 similarity mapping `prev` thumbnail pixels onto `cur`'s, or None when it cannot be estimated."""
        pts = cv2.goodFeaturesToTrack(prev, maxCorners=200, qualityLevel=0.01, minDistance=4)
        if pts is None or len(pts) < self.config.min_inliers:
            # a flat image (a wall, darkness): no texture to move, so no camera motion to undo
            return np.eye(2, 3) if float(prev.std()) < 4.0 and float(cur.std()) < 4.0 else None
        nxt, ok, _ = cv2.calcOpticalFlowPyrLK(prev, cur, pts, None, winSize=(15, 15), maxLevel=3)
        good = ok.reshape(-1) == 1
        if good.sum() < self.config.min_inliers:
            return None
        m, inliers = cv2.estimateAffinePartial2D(
            pts[good], nxt[good], method=cv2.RANSAC, ransacReprojThreshold=1.5, maxIters=200, refineIters=5
        )
        if m is None or inliers is None or int(inliers.sum()) < self.config.min_inliers:
            return None
        return m

    def _revealed(self, shape: tuple[int, ...]) -> float:
        """Share of the current thumbnail the last full detection's view does not cover."""
        h, w = shape[:2]
        inv = np.linalg.inv(self._since)[:2]
        corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
        mapped = corners @ inv[:, :2].T + inv[:, 2]  # current corners in the key frame's pixels
        x0, y0 = mapped.min(axis=0)
        x1, y1 = mapped.max(axis=0)
        inside = max(0.0, min(x1, w) - max(x0, 0.0)) * max(0.0, min(y1, h) - max(y0, 0.0))
        return 1.0 - inside / max((x1 - x0) * (y1 - y0), 1e-9)

    def _unexplained(self, prev: np.ndarray, cur: np.ndarray, warp: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
        """Motion blobs (x,y,w,h thumbnail pixels) no tracked box explains and at least `min_blob` of the frame."""
        h, w = cur.shape
        moved = cv2.warpAffine(prev, warp, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        seen = cv2.warpAffine(np.full_like(prev, 255), warp, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
        diff = cv2.absdiff(cur, moved)
        motion = ((diff >= self.config.diff_thr) & (seen > 0)).astype(np.uint8)
        mask = np.asarray(cv2.morphologyEx(motion, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)))
        for x, y, bw, bh in boxes * self._scale:
            m = self.config.box_margin
            x0, y0 = int(np.floor(x - m * bw)), int(np.floor(y - m * bh))
            x1, y1 = int(np.ceil(x + (1 + m) * bw)), int(np.ceil(y + (1 + m) * bh))
            mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = 0
        n, _, cc, _ = cv2.connectedComponentsWithStats(cv2.dilate(mask, np.ones((3, 3), np.uint8)), connectivity=8)
        min_px = self.config.min_blob * h * w
        return [
            cc[i, :4].astype(np.float64)
            for i in range(1, n)
            if cc[i, cv2.CC_STAT_AREA] >= min_px
            and cc[i, cv2.CC_STAT_HEIGHT] >= self.config.min_aspect * cc[i, cv2.CC_STAT_WIDTH]
        ]

    def _scout(self, img: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """The scout's boxes (M,5 image pixels) of persons no tracked box covers, looked for in the region around the
        unexplained blobs (grown by half on each side, at least a third of the frame's short side), so a small
        entrant gets more of the scout's input pixels than in the whole frame."""
        assert self.scout is not None
        h, w = img.shape[:2]
        b = self._blobs / self._scale
        x0, y0 = b[:, 0].min(), b[:, 1].min()
        x1, y1 = (b[:, 0] + b[:, 2]).max(), (b[:, 1] + b[:, 3]).max()
        side = min(h, w) / 3.0
        grow_x, grow_y = max(0.5 * (x1 - x0), (side - (x1 - x0)) / 2), max(0.5 * (y1 - y0), (side - (y1 - y0)) / 2)
        cx0, cy0 = int(max(0, np.floor(x0 - grow_x))), int(max(0, np.floor(y0 - grow_y)))
        cx1, cy1 = int(min(w, np.ceil(x1 + grow_x))), int(min(h, np.ceil(y1 + grow_y)))
        found = np.asarray(self.scout(np.ascontiguousarray(img[cy0:cy1, cx0:cx1])), dtype=np.float64).reshape(-1, 5)
        found[:, 0] += cx0
        found[:, 1] += cy0
        new = iou_matrix(found[:, :4], boxes).max(axis=1, initial=0.0) < 0.3
        return found[new]

    def _add_clutter(self, blob: np.ndarray) -> None:
        """Ignore motion around `blob` for `clutter_frames` frames: grown by its longer side on every side, so the
        same thing moving on (a walker too small to detect, a sign swinging) stays inside."""
        g = float(max(blob[2], blob[3]))
        grown = np.array([blob[0] - g, blob[1] - g, blob[2] + 2 * g, blob[3] + 2 * g])
        self._clutter.append(_Clutter(grown, self._frame + self.config.clutter_frames))

    def _is_clutter(self, blob: np.ndarray) -> bool:
        self._clutter = [c for c in self._clutter if c.until >= self._frame]
        return any(self._overlaps(blob, c.box[None]).any() for c in self._clutter)

    @staticmethod
    def _overlaps(box: np.ndarray, others: np.ndarray) -> np.ndarray:
        """Whether x,y,w,h `box` intersects each of `others` (M,4)."""
        o = np.asarray(others, dtype=np.float64).reshape(-1, 4)
        x, y, w, h = box[:4]
        return (o[:, 0] < x + w) & (x < o[:, 0] + o[:, 2]) & (o[:, 1] < y + h) & (y < o[:, 1] + o[:, 3])


def _as_boxes(boxes: np.ndarray | None, what: str) -> np.ndarray:
    """(N,4|5) x,y,w,h[,score] -> (N,4) float64; None or empty -> (0,4)."""
    if boxes is None:
        return np.zeros((0, 4))
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4))
    if b.ndim != 2 or b.shape[1] not in (4, 5):
        raise DynPoseError(f"key frames: {what} must be N x 4 or N x 5 x,y,w,h[,score] boxes, got shape {b.shape}")
    return b[:, :4]
