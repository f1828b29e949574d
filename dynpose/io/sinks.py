"""Result sinks: where a run's persons go, behind one small protocol.

    write(frame, persons)   once per frame, in input order
    close()                 the run ended (or was interrupted): make what was written final
    abort()                 the run failed: leave nothing partial behind

- `CocoJsonSink`: COCO keypoint results (`--out x.json`), one record per person of frames with a COCO image id;
- `JsonLinesSink`: one JSON line per frame (`--out x.jsonl`), streamed so a long video never sits in memory; tracked
  persons carry their `track_id`;
- `PoseTrackSink`: PoseTrack-style JSON of tracked persons (`--out x.json --format posetrack`);
- `DrawingSink`: drawn skeletons (`--vis DIR`): images keep their names, a video or webcam gives an .mp4; the model
  that ran sets the colour and tracked persons show their id.

`Outputs` makes a run's sinks for one source (per-source file names when a run has several sources).

Every file sink (and the drawn video) writes into a temporary file beside its destination and renames it into place
on `close`, so an interrupted or failed run leaves the old file or the new one, never half of one. Drawings of
images are written one by one as the frames come (each atomically): an interrupted run leaves the ones made so far.
Where a sink will write is checked when it is made, before any model runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from dynpose.errors import DynPoseError
from dynpose.fileio import OutputGuard, make_temp_beside, replace_into, write_json_atomic
from dynpose.io.sources import Frame, FrameSource
from dynpose.keypoints import KeypointSet
from dynpose.runtime.person import Person


class ResultSink(Protocol):
    def write(self, frame: Frame, persons: Sequence[Person]) -> None: ...

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

    def write(self, frame: Frame, persons: Sequence[Person]) -> None:
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
        # as every atomic writer: a FIFO or device is refused, a symlink keeps pointing at the new file
        self._tmp, self._target = make_temp_beside(self.path)
        self._file: IO[str] | None = open(self._tmp, "w")  # noqa: SIM115 (closed in close/abort)
        self.count = 0

    def write(self, frame: Frame, persons: Sequence[Person]) -> None:
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
            replace_into(self._tmp, self._target, self.path)
        except DynPoseError:
            self.abort()
            raise
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


# image formats OpenCV writes a 3-channel drawing in (the grey-only and JPEG 2000 ones are drawn as .png)
COLOUR_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".ppm"})


class DrawingSink:
    """Drawn persons (box, skeleton, which model ran) scoring at least `min_score`: one image per input image (named
    as the input; .png where the input's format holds no colour drawing, e.g. .pgm), or one mp4 for a video or webcam
    source."""

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

    def write(self, frame: Frame, persons: Sequence[Person]) -> None:
        from dynpose.io.vis import VideoWriter, draw_persons, write_image

        img = draw_persons(frame.image_bgr, [p for p in persons if p.score >= self.min_score], self.keypoint_set)
        if self.video_name is None:
            name = Path(frame.name)
            write_image(self.folder / (name if name.suffix.lower() in COLOUR_SUFFIXES else name.with_suffix(".png")), img)
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


class PoseTrackSink:
    """PoseTrack-style JSON for one video (the PoseTrack 2018 layout): `images` (one per frame, with `vid_id`,
    `frame_id`, `file_name`), `annotations` (one per tracked person: `track_id`, `keypoints` as flat x,y,score,
    `scores`, `score`, `bbox` x,y,w,h) and the keypoint names and skeleton in `categories`. Persons whose track is
    not confirmed yet have no id and are left out. Written on close."""

    def __init__(self, path: str | os.PathLike, keypoint_set: KeypointSet, video_name: str, vid_id: int = 1) -> None:
        self.path = check_writable_file(path, "--out")
        self.keypoint_set = keypoint_set
        self.video_name = video_name
        self.vid_id = int(vid_id)
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.untracked = 0  # persons left out (no confirmed track yet)

    def write(self, frame: Frame, persons: Sequence[Person]) -> None:
        image_id = frame.index
        self.images.append(
            {
                "id": image_id,
                "frame_id": frame.index,
                "vid_id": self.vid_id,
                "file_name": frame.name,
                "video": self.video_name,
            }
        )
        for p in persons:
            track_id = p.track_id
            if track_id is None:
                self.untracked += 1
                continue
            d = p.to_dict()
            flat = [0.0 if v is None else v for kp in d["keypoints"] for v in kp]
            self.annotations.append(
                {
                    "id": len(self.annotations),
                    "image_id": image_id,
                    "track_id": int(track_id),
                    "category_id": 1,
                    "keypoints": flat,
                    "scores": flat[2::3],
                    "score": d["score"] if d["score"] is not None else 0.0,
                    "bbox": [0.0 if v is None else v for v in d["box"]],
                }
            )

    def close(self) -> None:
        ks = self.keypoint_set
        category = {
            "supercategory": "person",
            "id": 1,
            "name": "person",
            "keypoints": list(ks.names),
            "skeleton": [[a + 1, b + 1] for a, b in ks.skeleton],  # 1-based, as COCO and PoseTrack write them
        }
        write_json_atomic(self.path, {"images": self.images, "annotations": self.annotations, "categories": [category]})

    def abort(self) -> None:
        self.images, self.annotations = [], []

    def summary(self) -> str:
        tracks = len({a["track_id"] for a in self.annotations})
        return f"wrote {self.path} ({len(self.images)} frames, {tracks} tracks, {len(self.annotations)} poses)"


FORMATS = ("jsonl", "coco", "posetrack")


def out_format(out: str | os.PathLike | None, fmt: str | None = None) -> str | None:
    """The results format: `fmt` when given, else by the file suffix (.jsonl: JSON lines, .json: COCO results)."""
    if out is None:
        return None
    if fmt is not None:
        if fmt not in FORMATS:
            raise DynPoseError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
        return fmt
    return "jsonl" if Path(out).suffix.lower() == ".jsonl" else "coco"


def per_source(path: str | os.PathLike, stem: str | None) -> Path:
    """`x.jsonl` -> `x_<stem>.jsonl` (one results file per source of a many-source run); unchanged without stem."""
    p = Path(path)
    return p if stem is None else p.with_name(f"{p.stem}_{stem}{p.suffix}")


@dataclass(frozen=True)
class Outputs:
    """Where a run's results go: `out` (a file, format by `fmt` or suffix), `vis` (a folder of drawings),
    `collect` (keep COCO results in memory, for --eval)."""

    out: str | None = None
    fmt: str | None = None
    vis: str | None = None
    vis_score: float = 0.3
    collect: bool = False
    guard: OutputGuard = OutputGuard()  # what the run reads, which its outputs may not replace

    def sinks(
        self, src: FrameSource, keypoint_set: KeypointSet, stem: str | None = None, vid_id: int = 1
    ) -> list[ResultSink]:
        """The sinks of one source. `stem` (runs with several sources) names the per-source files:
        `out` x.jsonl -> x_<stem>.jsonl, and the drawings `vis`/<stem>.mp4 (videos) or `vis`/<stem>/ (images)."""
        self.guard.check_file(per_source(self.out, stem) if self.out is not None else None, "--out")
        sinks: list[ResultSink] = []
        try:
            self._add(sinks, src, keypoint_set, stem, vid_id)
        except BaseException:
            for s in sinks:  # a refused --vis must not leave the --out sink's temp file behind
                s.abort()
            raise
        return sinks

    def _add(
        self, sinks: list[ResultSink], src: FrameSource, keypoint_set: KeypointSet, stem: str | None, vid_id: int
    ) -> None:
        fmt = out_format(self.out, self.fmt)
        out = per_source(self.out, stem) if self.out is not None else None
        name = stem or (f"webcam{src.source}" if src.kind == "webcam" else Path(src.source).stem)
        if fmt == "jsonl":
            sinks.append(JsonLinesSink(out))  # type: ignore[arg-type]
        elif fmt == "posetrack":
            sinks.append(PoseTrackSink(out, keypoint_set, name, vid_id))  # type: ignore[arg-type]
        if fmt == "coco" or self.collect:
            sinks.append(CocoJsonSink(out if fmt == "coco" else None))
        if self.vis is not None:
            live = src.kind in ("video", "webcam")
            folder = Path(self.vis) if live or stem is None else Path(self.vis) / stem
            self.guard.check_folder(folder, "--vis")
            sinks.append(
                DrawingSink(folder, keypoint_set, video_name=name if live else None, fps=src.fps, min_score=self.vis_score)
            )
