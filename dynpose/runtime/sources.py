"""Frame sources: an image, a folder of images (recursive, sorted), a video file or a webcam index.

`open_source` checks the source up front (missing path, unreadable video -> DynPoseError) and returns an iterator
of `Frame`s. Unreadable images inside a folder are skipped with a warning and counted in `skipped`, so one bad file
does not stop a long run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np

from dynpose.data import IMAGE_SUFFIXES
from dynpose.errors import DynPoseError

log = logging.getLogger(__name__)


@dataclass
class Frame:
    """One image to process. `name` is unique within the source (relative path, or video stem + frame number);
    `image_id` is the numeric file stem (COCO's 000000000785.jpg -> 785) when there is one."""

    index: int
    name: str
    image_bgr: np.ndarray
    image_id: int | None = None


def _image_id(path: Path) -> int | None:
    return int(path.stem) if path.stem.isdigit() else None


def read_image(path: str | os.PathLike) -> np.ndarray | None:
    """BGR uint8 image, or None when the file cannot be decoded. Reads bytes first so non-ASCII paths work."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return img if img is not None and img.size > 0 else None


class FrameSource(Iterator[Frame]):
    """Iterator of frames with what a caller needs around it: `kind` (image|folder|video|webcam), `fps` (videos),
    `skipped` (unreadable images so far) and `close()` (releases a capture; also a context manager)."""

    def __init__(self, source: str) -> None:
        self.source = str(source)
        self.skipped = 0
        self.fps: float | None = None
        self._cap: cv2.VideoCapture | None = None
        self._files: list[Path] = []
        self._root: Path | None = None
        path = Path(self.source)
        if self.source.strip().isdigit() and not path.exists():
            self.kind = "webcam"
            self._open_capture(int(self.source), f"webcam {self.source}")
            self._stem = f"cam{int(self.source)}"
        elif path.is_dir():
            self.kind = "folder"
            self._root = path
            self._files = sorted(
                (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                key=lambda p: p.relative_to(path).as_posix(),
            )
            if not self._files:
                raise DynPoseError(
                    f"source {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or its sub-folders"
                )
        elif path.is_file():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                self.kind = "image"
                self._files = [path]
            else:
                self.kind = "video"
                self._open_capture(str(path), f"video {path}")
                self._stem = path.stem
        else:
            raise DynPoseError(
                f"source {self.source}: no such file or folder; give an image, a folder of images, a video, "
                "or a webcam index such as 0"
            )
        self._it = self._frames()

    def _open_capture(self, target: int | str, what: str) -> None:
        cap = cv2.VideoCapture(target)
        cam = isinstance(target, int)
        if not cap.isOpened():
            cap.release()
            why = "no camera at that index, or no permission to open it" if cam else "unknown format or corrupt file"
            raise DynPoseError(f"{what}: cannot be opened by OpenCV ({why})")
        ok, first = cap.read()
        if not ok or first is None:
            cap.release()
            why = "the camera gave no frame" if cam else "corrupt file, or a codec OpenCV lacks"
            raise DynPoseError(f"{what}: no frame could be read ({why})")
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and fps > 0 else None
        self._cap = cap
        self._first: np.ndarray | None = first

    def _frames(self) -> Iterator[Frame]:
        if self._cap is not None:
            index = 0
            frame = self._first
            self._first = None
            while frame is not None:
                yield Frame(index, f"{self._stem}_{index:06d}", frame, None)
                index += 1
                ok, frame = self._cap.read()
                if not ok:
                    frame = None
            self.close()
            return
        index = 0
        for p in self._files:
            img = read_image(p)
            if img is None:
                self.skipped += 1
                log.warning("skipping %s: not a readable image (%d skipped so far)", p, self.skipped)
                continue
            name = p.relative_to(self._root).as_posix() if self._root is not None else p.name
            yield Frame(index, name, img, _image_id(p))
            index += 1

    def __iter__(self) -> FrameSource:
        return self

    def __next__(self) -> Frame:
        return next(self._it)

    @property
    def total(self) -> int | None:
        """Number of frames when known in advance (images: files found; video: the container's count), else None."""
        if self._cap is not None:
            n = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
            return n if n > 0 and self.kind == "video" else None
        return len(self._files)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def open_source(source: str | os.PathLike) -> FrameSource:
    """An image file, a folder of images (sorted, sub-folders too), a video file, or a webcam index ("0")."""
    return FrameSource(str(source))
