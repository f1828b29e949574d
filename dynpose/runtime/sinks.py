"""Result sinks: where a run's persons go, behind one small protocol.

    write(frame, persons)   once per frame, in input order
    close()                 the run ended (or was interrupted): make what was written final
    abort()                 the run failed: leave nothing partial behind

- `CocoJsonSink`: COCO keypoint results (`--out x.json`), one record per person of frames with a COCO image id;
- `JsonLinesSink`: one JSON line per frame (`--out x.jsonl`), streamed so a long video never sits in memory;
- `DrawingSink`: drawn skeletons (`--vis DIR`): images keep their names, a video or webcam gives an .mp4.

Every sink writes into a temporary file beside its destination and renames it into place on `close`, so an
interrupted or failed run leaves the old file or the new one, never half of one; where it will write is checked
when the sink is made, before any model runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from dynpose.errors import DynPoseError
from dynpose.fileio import write_json_atomic
from dynpose.keypoints import KeypointSet
from dynpose.runtime.sources import Frame


class ResultSink(Protocol):
    def write(self, frame: Frame, persons: Sequence[Any]) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def check_writable_file(path: str | os.PathLike, flag: str) -> Path:
    """`flag`'s file can be written: its folder exists (made if missing) and is writable, and it is not a folder."""
    p = Path(path)
    if p.is_dir():
        raise DynPoseError(f"{flag} {p}: is a directory; give a file name")
    check_writable_dir(p.parent if str(p.parent) else Path("."), flag, what=f"the folder of {p}")
    return p


def check_writable_dir(path: str | os.PathLike, flag: str, what: str = "") -> Path:
    """`flag`'s folder exists (made if missing) and is writable; an existing file there is refused."""
    p = Path(path)
    where = what or str(p)
    if p.exists() and not p.is_dir():
        raise DynPoseError(f"{flag} {p}: exists and is not a folder; give a folder for the drawings")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DynPoseError(f"{flag} {p}: cannot create {where} ({e.strerror}); pick a writable folder") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise DynPoseError(f"{flag} {p}: {where} is not writable; pick a writable folder")
    return p


class CocoJsonSink:
    """COCO keypoint results of every frame that has a COCO image id, written on close (kept in `results` only
    when `path` is None, e.g. to evaluate them)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = check_writable_file(path, "--out") if path is not None else None
        self.results: list[dict[str, Any]] = []
        self.no_id: list[str] = []  # frames without an image id (they get no COCO results)
        self.count = 0

    def write(self, frame: Frame, persons: Sequence[Any]) -> None:
        if frame.image_id is None:
            self.no_id.append(frame.name)
            return
        self.results.extend(p.to_coco(frame.image_id) for p in persons)

    def close(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.results)
        self.count = len(self.results)

    def abort(self) -> None:
        self.results = []

    def summary(self) -> str:
        n = f"{self.count} result{'s' if self.count != 1 else ''}"
        return f"wrote {self.path} ({n})" if self.path is not None else f"{n} kept for --eval"


class JsonLinesSink:
    """One JSON line per frame, streamed into a temporary file renamed onto the destination on close."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = check_writable_file(path, "--out")
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._file: IO[str] | None = open(self._tmp, "w")  # noqa: SIM115 (closed in close/abort)
        self.count = 0

    def write(self, frame: Frame, persons: Sequence[Any]) -> None:
        assert self._file is not None
        line = {
            "frame": frame.index,
            "name": frame.name,
            "image_id": frame.image_id,
            "persons": [p.to_dict() for p in persons],
        }
        try:
            self._file.write(json.dumps(line, allow_nan=False) + "\n")
        except OSError as e:
            self.abort()
            raise DynPoseError(f"--out {self.path}: cannot write ({e.strerror}); nothing was written") from None
        self.count += 1

    def close(self) -> None:
        if self._file is None:
            return
        try:
            self._file.close()
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.abort()
            raise DynPoseError(f"--out {self.path}: cannot write ({e.strerror}); nothing was written") from None
        self._file = None

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def summary(self) -> str:
        return f"wrote {self.path} ({self.count} frame{'s' if self.count != 1 else ''})"


class DrawingSink:
    """Drawn persons (box, skeleton, which model ran) scoring at least `min_score`: one image per input image, or
    one mp4 for a video or webcam source."""

    def __init__(
        self,
        folder: str | os.PathLike,
        keypoint_set: KeypointSet,
        video_name: str | None = None,
        fps: float | None = None,
        min_score: float = 0.3,
    ) -> None:
        self.folder = check_writable_dir(folder, "--vis")
        self.keypoint_set = keypoint_set
        self.video_name = video_name
        self.fps = fps or 25.0
        self.min_score = min_score
        self._writer: Any = None
        self.count = 0

    def write(self, frame: Frame, persons: Sequence[Any]) -> None:
        from dynpose.runtime.vis import VideoWriter, draw_persons, write_image

        img = draw_persons(frame.image_bgr, [p for p in persons if p.score >= self.min_score], self.keypoint_set)
        if self.video_name is None:
            write_image(self.folder / frame.name, img)
        else:
            if self._writer is None:
                self._writer = VideoWriter(self.folder / f"{self.video_name}.mp4", fps=self.fps)
            self._writer.write(img)
        self.count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def summary(self) -> str:
        what = f"{self.video_name}.mp4" if self.video_name else f"{self.count} image(s)"
        return f"drew {what} into {self.folder}"
