"""Frame sources: an image, a folder of images (recursive, sorted), a video file or a webcam index.

`open_source` checks the source up front (empty or missing path, unreadable video -> DynPoseError) and returns an
iterator of `Frame`s. Unreadable images inside a folder are skipped with a warning and counted in `skipped`, so one
bad file does not stop a long run.

Image size is checked from the file's header before decoding, for every format OpenCV decodes
(`dynpose.io.imagesize`): a 629-byte JPEG can claim 65000 x 65000 pixels, a 35-byte GIF 24000 x 24000, and
decoding even a 20000 x 20000 claim allocates 1.2 GB for a blank frame. Images over `max_pixels` (default
`MAX_PIXELS`, 50 MP) are skipped with a warning naming the file and the limit.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np

from dynpose.data import IMAGE_SUFFIXES
from dynpose.errors import DynPoseError
from dynpose.io.imagesize import check_pixels

log = logging.getLogger(__name__)

# Largest image decoded by default (width x height): 50 MP holds any camera photo (a 48 MP phone sensor, 8K video
# frames are 33 MP) and bounds a decoded frame at 150 MB.
MAX_PIXELS = 50_000_000


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


def decode_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """BGR uint8 image, or a one-line DynPoseError saying why not (unreadable, not an image, over `max_pixels` by
    its header, which is checked before any decoding; None: no limit). Reads bytes first so non-ASCII paths work."""
    try:
        if max_pixels is not None:
            with open(path, "rb") as f:  # the header alone, before the whole file is read
                check_pixels(f, f"image {path}", max_pixels)
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise DynPoseError(f"image {path}: cannot be read ({e.strerror or e})") from None
    return decode_image_bytes(data, f"image {path}", max_pixels, checked=max_pixels is not None)


def decode_image_bytes(
    data: bytes | np.ndarray, what: str = "image", max_pixels: int | None = MAX_PIXELS, checked: bool = False
) -> np.ndarray:
    """An encoded image (file bytes: JPEG, PNG, ...) -> BGR uint8, with `decode_image`'s checks; `what` names the
    image in errors (a file, an HTTP request's upload). Over `max_pixels` by its header: `ImageTooLarge`
    (`checked`: the caller has checked the header already)."""
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if buf.size == 0:
        raise DynPoseError(f"{what}: empty file")
    if max_pixels is not None and not checked:
        check_pixels(data if isinstance(data, bytes) else buf.tobytes(), what, max_pixels)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as e:  # e.g. a header beyond OpenCV's own pixel limit
        why = (str(e).strip().splitlines() or ["cv2.error"])[-1].rpartition(" error: ")[2].strip()
        raise DynPoseError(f"{what}: not a readable image (OpenCV: {why})") from None
    if img is None or img.size == 0:
        raise DynPoseError(f"{what}: not a readable image")
    return img


def read_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> np.ndarray | None:
    """BGR uint8 image, or None when the file cannot be decoded or is over `max_pixels` (logged as a warning with
    the reason)."""
    try:
        return decode_image(path, max_pixels)
    except DynPoseError as e:
        log.warning("%s", e)
        return None


def _check_max_pixels(max_pixels: object) -> int | None:
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise DynPoseError(f"max_pixels {max_pixels!r}: must be a positive integer (width x height), or None for no limit")
    return max_pixels


class FrameSource(Iterator[Frame]):
    """Iterator of frames with what a caller needs around it: `kind` (image|folder|video|webcam), `fps` (videos),
    `skipped` (unreadable images so far) and `close()` (releases a capture; also a context manager)."""

    def __init__(self, source: str, max_pixels: int | None = MAX_PIXELS) -> None:
        self.source = str(source)
        if not self.source.strip():
            raise DynPoseError(
                "source is empty; give an image, a folder of images, a video, or a webcam index such as 0 "
                "(use '.' for the current folder)"
            )
        self.max_pixels = _check_max_pixels(max_pixels)
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
                if path.stat().st_size == 0:
                    raise DynPoseError(f"video {path}: empty file (0 bytes); nothing to read")
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
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if self.max_pixels is not None and w * h > self.max_pixels:  # before the first frame is decoded
            cap.release()
            raise DynPoseError(f"{what}: {w} x {h} pixel frames, over the limit of {self.max_pixels:,} (max_pixels)")
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
            try:
                img = decode_image(p, self.max_pixels)
            except DynPoseError as e:
                self.skipped += 1
                log.warning("skipping %s (%d skipped so far)", e, self.skipped)
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


def open_source(source: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> FrameSource:
    """An image file, a folder of images (sorted, sub-folders too), a video file, or a webcam index ("0").
    Images over `max_pixels` (by their header) are skipped with a warning; None: no limit."""
    return FrameSource(str(source), max_pixels)


def early_end(what: str, frames: int, declared: int | None) -> str | None:
    """A note when a video gave fewer frames than its header declares (a truncated or damaged file), else None."""
    if declared is None or frames >= declared:
        return None
    return (
        f"{what}: ended after {frames} of the {declared} frames its header declares (a truncated or damaged file); "
        f"the {frames} frame(s) read were processed and written"
    )


class _End:
    pass


_END = _End()


class ReadAhead:
    """A FrameSource read on its own thread into a small bounded queue, so several sources decode in parallel
    with each other and with the models. `get()` gives the next Frame, None at the end, and raises a DynPoseError
    naming the source and the frame when reading failed mid-stream (the frames before it were all given)."""

    def __init__(self, src: FrameSource, size: int = 4) -> None:
        if size < 1:
            raise DynPoseError(f"read-ahead queue size must be >= 1, got {size}")
        self.src = src
        self.declared = src.total if src.kind == "video" else None  # frames the header claims
        self.frames = 0  # frames handed out by get()
        self.error: str | None = None
        self.ended = False
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"dynpose-read-{Path(src.source).name}", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            for frame in self.src:
                if not self._put(frame):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 (handed to the consumer, which raises it as a DynPoseError)
            self._put(e)

    def get(self) -> Frame | None:
        if self.ended:
            return None
        item = self._queue.get()
        if isinstance(item, Frame):
            self.frames += 1
            return item
        self.ended = True
        if isinstance(item, BaseException):
            why = str(item).strip() or type(item).__name__
            self.error = f"source {self.src.source}: reading failed after {self.frames} frame(s) ({why})"
            raise DynPoseError(self.error) from item
        return None

    @property
    def early_end(self) -> str | None:
        """The truncation note (see `early_end`) once the source has ended without an error."""
        if not self.ended or self.error is not None:
            return None
        return early_end(f"video {self.src.source}", self.frames, self.declared)

    def close(self, timeout: float = 5.0) -> None:
        """Stop reading and release the source (waits for a read in progress, up to `timeout` seconds)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
            timeout -= 0.1
            if timeout <= 0:
                log.warning("source %s: the reader thread did not stop; leaving it", self.src.source)
                return
        self.src.close()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def source_stems(sources: Sequence[str]) -> list[str]:
    """A short distinct name per source for per-source output files: a file's stem, a folder's name, webcam<N>;
    repeats get -2, -3, ..."""
    stems: list[str] = []
    for s in sources:
        p = Path(str(s))
        stem = f"webcam{str(s).strip()}" if str(s).strip().isdigit() and not p.exists() else (p.stem or p.resolve().name)
        base, n = stem, 2
        while stem in stems:
            stem, n = f"{base}-{n}", n + 1
        stems.append(stem)
    return stems
