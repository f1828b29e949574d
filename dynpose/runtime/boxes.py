"""`Boxes`: a frame's person boxes, validated once where they enter (a detections file, the detector, a request body,
the tracker), so nothing downstream cleans or coerces them again.

    boxes = Boxes.of(dets, image.shape)      # (M,4|5) x,y,w,h[,score] -> the usable ones, each knowing its input row
    boxes.xywh, boxes.scores, boxes.rows, boxes.scored, boxes.dropped

Dropped on entry: non-finite coordinates or NaN scores, zero or negative width/height, boxes entirely outside the
image, and boxes reaching more than `MAX_BOX_FACTOR` image sizes beyond it (1e15-pixel boxes would decode to
keypoints no float32 holds); boxes partly outside are kept (the crop pads with black, as the official code does).
Each kept box remembers its row in the array it came from (`rows`), which every person result carries on as its
`index`: a caller finds its own box again by that row, never by comparing floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError

# Boxes may reach past the image (the crop pads), but not by more than this many image sizes.
MAX_BOX_FACTOR = 4.0
# Person boxes of one image: a crowded COCO or CrowdPose image has a few hundred detections; far more is a broken
# detections file or an attack, and would tie the pose models up for minutes.
MAX_BOXES = 5000


@dataclass(frozen=True)
class Boxes:
    """Usable person boxes of one frame: x,y,w,h (M,4), a score each (1 where none was given), each box's row in
    the input it came from, and whether the input had scores (detections: OKS-NMS applies; ground truth: not)."""

    xywh: np.ndarray  # (M,4) float64
    scores: np.ndarray  # (M,) float64
    rows: np.ndarray  # (M,) int64
    scored: bool = True
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.xywh)

    @property
    def areas(self) -> np.ndarray:
        return self.xywh[:, 2] * self.xywh[:, 3]

    @classmethod
    def empty(cls, scored: bool = True) -> Boxes:
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), scored)

    @classmethod
    def of(cls, boxes: Any, image_shape: Sequence[int], max_boxes: int = MAX_BOXES, where: str = "boxes") -> Boxes:
        """(M,4|5) or one (4|5,) x,y,w,h[,score] -> the usable boxes (see the module doc). `where` names the input
        in the one-line errors (a file, a request, the detector)."""
        if isinstance(boxes, Boxes):
            return boxes
        b = _as_array(boxes, where)
        if len(b) > max_boxes:
            raise DynPoseError(
                f"{where}: {len(b)} boxes for one image, more than the {max_boxes} allowed; keep the likely persons "
                "(raise the detection score threshold, e.g. --det-score 0.3)"
            )
        scored = b.shape[1] == 5
        if not scored:
            b = np.concatenate([b, np.ones((len(b), 1))], axis=1)
        ok = _usable(b, image_shape)
        rows = np.flatnonzero(ok).astype(np.int64)
        return cls(b[ok, :4].copy(), b[ok, 4].copy(), rows, scored, int((~ok).sum()))

    def as_array(self) -> np.ndarray:
        """(M,5) x,y,w,h,score (the form files and the service write)."""
        return np.concatenate([self.xywh, self.scores[:, None]], axis=1)


def _as_array(boxes: Any, where: str) -> np.ndarray:
    """Anything box-like -> (M,4|5) float64, or a one-line error."""
    if boxes is None:
        return np.zeros((0, 5))
    try:
        b = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise DynPoseError(
            f"{where}: boxes must be numbers in an (M,4) or (M,5) array of x,y,w,h[,score] (every row the same length)"
        ) from None
    if b.size == 0:
        return np.zeros((0, 5 if b.ndim == 2 and b.shape[-1] == 5 else 4))
    if b.ndim == 1 and b.shape[0] in (4, 5):
        b = b[None]
    if b.ndim != 2 or b.shape[1] not in (4, 5):
        raise DynPoseError(f"{where}: boxes must be an (M,4) or (M,5) array of x,y,w,h[,score], got shape {b.shape}")
    return b


def _usable(b: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    h_img, w_img = image_shape[:2]
    x, y, w, h = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    lim_w, lim_h = MAX_BOX_FACTOR * w_img, MAX_BOX_FACTOR * h_img
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.isfinite(b).all(axis=1) & (w > 0) & (h > 0)
        ok &= (x + w > 0) & (y + h > 0) & (x < w_img) & (y < h_img)
        ok &= (x > -lim_w) & (y > -lim_h) & (x + w < w_img + lim_w) & (y + h < h_img + lim_h)
    return ok
