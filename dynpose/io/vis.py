"""Drawing persons (box, skeleton, which model ran) and writing annotated images and videos atomically."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from dynpose.errors import DynPoseError
from dynpose.fileio import make_temp_beside, replace_into, write_bytes_atomic
from dynpose.keypoints import KeypointSet, get_keypoint_set
from dynpose.roles import Role

# BGR. The two DynPose roles get fixed, easily told apart colours; any other model name gets a stable colour.
MODEL_COLORS: dict[str, tuple[int, int, int]] = {
    Role.SMALL.value: (80, 200, 60),  # green
    Role.LARGE.value: (40, 110, 250),  # orange
}
_PALETTE = ((230, 160, 40), (200, 60, 200), (60, 220, 220), (255, 90, 90), (150, 150, 255), (120, 200, 160))


def model_color(model: str) -> tuple[int, int, int]:
    """Colour for a model name: fixed for small/large, else picked from a palette by a stable hash of the name."""
    key = str(model).lower()
    for role, color in MODEL_COLORS.items():
        if key == role or key.startswith(role + ":"):
            return color
    return _PALETTE[zlib.crc32(key.encode()) % len(_PALETTE)]


def _pt(x: float, y: float) -> tuple[int, int]:
    return (int(round(x)), int(round(y)))


def _overlaps(r: tuple[int, int, int, int], placed: Sequence[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = r
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in placed)


def place_labels(
    anchors: Sequence[tuple[int, int]], sizes: Sequence[tuple[int, int]], shape: tuple[int, ...]
) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) for each label (width, height) anchored at a box's top-left corner: just above the box
    when that space is free, else the nearest free slot one label height further down or up, so the labels of
    persons standing close together (a crowd, a tracked group) never cover each other."""
    h, w = shape[:2]
    placed: list[tuple[int, int, int, int]] = []
    for (ax, ay), (lw, lh) in zip(anchors, sizes, strict=True):
        x0 = int(min(max(ax, 0), max(w - lw, 0)))
        base_y = int(min(max(ay - lh, 0), max(h - lh, 0)))
        rect = (x0, base_y, x0 + lw, base_y + lh)
        for k in range(1, 2 * len(anchors) + 2):
            if not _overlaps(rect, placed):
                break
            step = (k + 1) // 2 * (lh + 1) * (1 if k % 2 else -1)  # down 1, up 1, down 2, ...
            y0 = base_y + step
            if 0 <= y0 <= h - lh:
                rect = (x0, y0, x0 + lw, y0 + lh)
        placed.append(rect)
    return placed


def draw_persons(
    image_bgr: np.ndarray, persons: Sequence[Any], keypoint_set: KeypointSet | str, kpt_thr: float = 0.3
) -> np.ndarray:
    """A copy of the image with each person's box, score, model name and skeleton drawn in the model's colour.

    `persons`: objects with `.box` (x,y,w,h), `.score`, `.keypoints` (K,3) and `.model`, and optionally `.track_id`
    (a tracked person's label starts with `#id`). Keypoints scoring below `kpt_thr`, or not finite, are not drawn;
    neither are limbs touching them. Labels are drawn last, each in a free slot (`place_labels`).
    """
    ks = get_keypoint_set(keypoint_set) if isinstance(keypoint_set, str) else keypoint_set
    img = np.ascontiguousarray(image_bgr).copy()
    if img.ndim != 3 or img.shape[2] != 3:
        raise DynPoseError(f"draw_persons: expected an H x W x 3 BGR image, got shape {img.shape}")
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    h, w = img.shape[:2]
    thick = max(1, round(max(h, w) / 500))
    labels: list[tuple[str, tuple[int, int], tuple[int, int, int]]] = []  # text, anchor (box top-left), colour
    for p in persons:
        color = model_color(getattr(p, "model", ""))
        box = np.asarray(p.box, dtype=np.float64).reshape(-1)[:4]
        if np.isfinite(box).all() and box[2] > 0 and box[3] > 0 and (np.abs(box) < 1e6).all():
            x, y, bw, bh = box
            cv2.rectangle(img, _pt(x, y), _pt(x + bw, y + bh), color, thick, cv2.LINE_AA)
            track_id = getattr(p, "track_id", None)
            label = f"{getattr(p, 'model', '')} {float(getattr(p, 'score', 0.0)):.2f}".strip()
            labels.append((f"#{track_id} {label}" if track_id is not None else label, _pt(x, y), color))
        _draw_skeleton(img, p, ks, color, thick, kpt_thr)
    _draw_labels(img, labels, thick)
    return img


def _draw_skeleton(
    img: np.ndarray, p: Any, ks: KeypointSet, color: tuple[int, int, int], thick: int, kpt_thr: float
) -> None:
    kp = np.asarray(p.keypoints, dtype=np.float64).reshape(-1, 3)
    if len(kp) != ks.num:
        raise DynPoseError(f"draw_persons: {len(kp)} keypoints but keypoint set {ks.name} has {ks.num}")
    ok = np.isfinite(kp).all(axis=1) & (kp[:, 2] >= kpt_thr) & (np.abs(kp[:, :2]) < 1e6).all(axis=1)
    for a, b in ks.skeleton:
        if ok[a] and ok[b]:
            cv2.line(img, _pt(*kp[a, :2]), _pt(*kp[b, :2]), color, thick + 1, cv2.LINE_AA)
    for i in np.flatnonzero(ok):
        cv2.circle(img, _pt(*kp[i, :2]), thick + 2, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(img, _pt(*kp[i, :2]), thick + 2, color, 1, cv2.LINE_AA)


def _draw_labels(img: np.ndarray, labels: Sequence[tuple[str, tuple[int, int], tuple[int, int, int]]], thick: int) -> None:
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick
    sizes, bases = [], []
    for text, _, _ in labels:
        (tw, th), base = cv2.getTextSize(text, font, scale, thick)
        sizes.append((tw, th + base))
        bases.append(base)
    rects = place_labels([anchor for _, anchor, _ in labels], sizes, img.shape)
    for (text, _, color), (x0, y0, x1, y1), base in zip(labels, rects, bases, strict=True):
        cv2.rectangle(img, (x0, y0), (x1, y1), color, -1)
        cv2.putText(img, text, (x0, y1 - base), font, scale, (255, 255, 255), thick, cv2.LINE_AA)


def write_image(path: str | os.PathLike, image_bgr: np.ndarray) -> None:
    """Encode by the file's suffix (.jpg, .png, ...) and write atomically."""
    path = Path(path)
    try:
        ok, buf = cv2.imencode(path.suffix or ".jpg", image_bgr)
    except cv2.error:
        ok = False
    if not ok:
        raise DynPoseError(f"image {path}: OpenCV cannot encode {path.suffix!r}; use .jpg or .png")
    write_bytes_atomic(path, buf.tobytes())


def _count_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    try:
        n = 0
        while cap.isOpened() and cap.grab():
            n += 1
        return n
    finally:
        cap.release()


class VideoWriter:
    """mp4 writer for annotated videos. Frames go to a temp file beside `path`, renamed onto it by `close()`, so a
    crash never leaves a half-written video under the final name. The frame size is taken from the first frame;
    later frames of another size are resized to it. Use as a context manager: an exception discards the file."""

    def __init__(self, path: str | os.PathLike, fps: float = 25.0, fourcc: str = "mp4v") -> None:
        self.path = Path(path)
        self.fps = float(fps) if fps and fps > 0 else 25.0
        self.fourcc = fourcc
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        # the container is chosen from the suffix, so the temp name must end with it
        tmp, self._target = make_temp_beside(self.path, suffix=f".tmp{self.path.suffix}")
        self._tmp: Path | None = tmp

    def write(self, image_bgr: np.ndarray) -> None:
        if self._tmp is None:
            raise DynPoseError(f"video {self.path}: writer already closed")
        img = np.asarray(image_bgr)
        if img.ndim != 3 or img.shape[2] != 3:
            raise DynPoseError(f"video {self.path}: frames must be H x W x 3 BGR, got shape {img.shape}")
        if self._writer is None:
            self._size = (img.shape[1], img.shape[0])
            self._writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter.fourcc(*self.fourcc), self.fps, self._size)
            if not self._writer.isOpened():
                self.abort()
                raise DynPoseError(
                    f"video {self.path}: OpenCV cannot write {self.fourcc!r} into {self.path.suffix!r}; use .mp4"
                )
        if (img.shape[1], img.shape[0]) != self._size:
            img = cv2.resize(img, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(np.ascontiguousarray(img, dtype=np.uint8))
        self.frames += 1

    def close(self) -> None:
        """Finish the file and move it into place (a writer that got no frame leaves no file). The finished file is
        read back first: OpenCV's writer reports no error when the disk fills, so an unplayable file is refused here
        rather than renamed into place."""
        if self._tmp is None:
            return
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        tmp, self._tmp = self._tmp, None
        try:
            if self.frames:
                readable = _count_frames(tmp)
                if readable < self.frames:
                    raise DynPoseError(
                        f"video {self.path}: only {readable} of {self.frames} frames could be read back from the "
                        "written file (disk full, or the codec failed); nothing was written"
                    )
                replace_into(tmp, self._target, self.path)
        finally:
            tmp.unlink(missing_ok=True)  # gone after a rename; removed when there was nothing to keep or it failed

    def abort(self) -> None:
        """Drop the partial file."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
