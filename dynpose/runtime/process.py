"""`process` / `process_video`: frame sources through a Pipeline into result sinks — what `dynpose-run` does, as
library calls.

    with Pipeline.from_engine_dir("engines/") as pipe, open_source("walk.mp4") as src:
        report = process(pipe, src, DetectorBoxes(), [JsonLinesSink("walk.jsonl")])

    # several videos at once, tracked, the detector every 3rd frame (dynpose.runtime.tracking)
    report = process_video(pipe, [src_a, src_b], [sinks_a, sinks_b], VideoOptions(track=True, det_every=3))

`process` micro-batches the frames of one source (`Pipeline.run_many`); `process_video` reads every source on its
own thread (`ReadAhead`) and dispatches one frame of each as one batch (`VideoTracker`). Every sink sees every frame
of its source in order, and is closed at the end (made final) or aborted on an error (nothing partial left). Two
endings keep what was done: Ctrl-C (and SIGTERM under `dynpose.cli.common.sigterm_as_interrupt`), and a source
that fails mid-stream: its sinks are closed with the frames before the failure, the other sources go on, and a
`StreamError` naming it is raised at the end. A video that ends before the frame count its header declares (a
truncated file) is noted in the report.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.boxes import BoxSource
from dynpose.runtime.pipeline import Pipeline
from dynpose.runtime.sinks import ResultSink
from dynpose.runtime.sources import Frame, FrameSource, ReadAhead, early_end, source_stems
from dynpose.runtime.tracking.stream import StreamStats, VideoOptions, VideoTracker

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    """What a `process` run did (the Pipeline's own totals are in `pipe.stats`)."""

    frames: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    skipped: int = 0  # unreadable images the source skipped
    error: str | None = None  # the source failed mid-stream (what was read before is written)
    note: str | None = None  # the video ended before its declared frame count

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


class StreamError(DynPoseError):
    """A source failed mid-stream. Every sink was closed with the frames before the failure; `report` says what
    the run did (a `RunReport` or a `VideoReport`)."""

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class _Reading:
    """Frames read from one source, and how reading ended."""

    src: FrameSource
    frames: int = 0
    error: str | None = None

    def frames_of(self) -> Iterator[Frame]:
        """The source's frames; a read error ends them and is kept in `error` (the caller decides what it means)."""
        it = iter(self.src)
        while True:
            try:
                frame = next(it)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 (a broken decoder or device: reported with the frame count)
                why = str(e).strip() or type(e).__name__
                self.error = f"source {self.src.source}: reading failed after {self.frames} frame(s) ({why})"
                return
            self.frames += 1
            yield frame


def _items(reading: _Reading, boxes: BoxSource) -> Iterator[tuple[Frame, np.ndarray, np.ndarray | None]]:
    for frame in reading.frames_of():
        yield frame, frame.image_bgr, boxes.boxes(frame)


def process(
    pipe: Pipeline,
    src: FrameSource,
    boxes: BoxSource,
    sinks: Sequence[ResultSink],
    max_batch: int | None = None,
    max_latency_ms: float | None = None,
    progress: bool = True,
) -> RunReport:
    """Run every frame of `src` (boxes from `boxes`) through `pipe` and hand the persons to each sink."""
    from tqdm import tqdm

    report = RunReport()
    reading = _Reading(src)
    declared = src.total if src.kind == "video" else None
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        bar: Any = stack.enter_context(
            tqdm(total=src.total, unit="frame", desc="dynpose-run", disable=None if progress else True, leave=False)
        )
        items = _items(reading, boxes)
        try:
            for frame, persons in pipe.run_many(items, max_batch=max_batch, max_latency_ms=max_latency_ms):
                for sink in sinks:
                    sink.write(frame, persons)
                report.frames += 1
                bar.update(1)
        except KeyboardInterrupt:
            report.interrupted = True  # a webcam run ends with Ctrl-C: keep what was done
        except BaseException:
            for sink in sinks:
                sink.abort()
            raise
    report.skipped = src.skipped
    if report.frames == 0 and src.skipped:
        for sink in sinks:
            sink.abort()
        raise DynPoseError(
            f"source {src.source}: no readable image ({src.skipped} file(s) could not be decoded); check the files "
            "are images OpenCV reads (.jpg, .png, ...)"
        )
    _close_all(sinks)
    report.seconds = time.perf_counter() - t0
    if reading.error is not None:
        report.error = reading.error
        raise StreamError(f"{reading.error}; the {report.frames} frame(s) before it were processed and written", report)
    if not report.interrupted:
        report.note = early_end(f"video {src.source}", reading.frames, declared)
        if report.note:
            log.warning("%s", report.note)
    return report


def _close_all(sinks: Sequence[ResultSink]) -> None:
    """Close every sink; if one fails, abort the ones not closed yet and re-raise."""
    for i, sink in enumerate(sinks):
        try:
            sink.close()
        except BaseException:
            for rest in sinks[i + 1 :]:
                rest.abort()
            raise


@dataclass
class StreamReport:
    """What one source of a `process_video` run did."""

    source: str
    name: str  # the per-source stem
    frames: int = 0
    error: str | None = None  # failed mid-stream (its frames before that are written)
    note: str | None = None  # ended before its declared frame count
    stats: StreamStats = field(default_factory=StreamStats)

    def line(self, seconds: float) -> str:
        st = self.stats
        fps = self.frames / seconds if seconds > 0 else 0.0
        router = f"router crops {st.router_crops}" + (f" (saved {st.router_saved})" if st.router_saved else "")
        return (
            f"{self.name}: frames {self.frames}, persons {st.persons}, tracks {st.tracks}, detector calls "
            f"{st.detector_calls} ({st.redetections} brought forward by lost tracks), {router}, {fps:.1f} FPS"
        )


@dataclass
class VideoReport:
    """What a `process_video` run did, per source and in total (the Pipeline's crop counts are in `pipe.stats`)."""

    streams: list[StreamReport]
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def frames(self) -> int:
        return sum(s.frames for s in self.streams)

    @property
    def fps(self) -> float:
        """Frames of all sources per second."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.streams if s.error]

    @property
    def stats(self) -> StreamStats:
        return StreamStats.sum(s.stats for s in self.streams)


class _VideoRun:
    """One `process_video` call: readers, the tracker, each source's sinks and progress bar."""

    def __init__(
        self, tracker: VideoTracker, readers: list[ReadAhead], sinks: Sequence[Sequence[ResultSink]], report: VideoReport
    ) -> None:
        self.tracker, self.readers, self.sinks, self.report = tracker, readers, sinks, report
        self.open = [True] * len(readers)
        self.bars: list[Any] = []

    def next_frames(self) -> list[Frame | None]:
        """One frame of every open source; a source that ended or failed has its sinks closed (made final)."""
        frames: list[Frame | None] = [None] * len(self.readers)
        for i, r in enumerate(self.readers):
            if not self.open[i]:
                continue
            try:
                frames[i] = r.get()
            except DynPoseError as e:
                self.report.streams[i].error = str(e)
                log.warning("%s; going on with the other sources", e)
            if frames[i] is None:
                self.finish(i)
                self.report.streams[i].note = r.early_end
                if r.early_end:
                    log.warning("%s", r.early_end)
        return frames

    def write(self, frames: list[Frame | None], results: list[Any]) -> None:
        for i, (frame, persons) in enumerate(zip(frames, results, strict=True)):
            if frame is None or persons is None:
                continue
            for sink in self.sinks[i]:
                sink.write(frame, persons)
            self.report.streams[i].frames += 1
            if self.bars:
                self.bars[i].update(1)

    def finish(self, i: int) -> None:
        if self.open[i]:
            self.open[i] = False
            _close_all(self.sinks[i])

    def abort(self) -> None:
        for i, is_open in enumerate(self.open):
            if is_open:
                self.open[i] = False
                for sink in self.sinks[i]:
                    sink.abort()


def process_video(
    pipe: Pipeline,
    sources: Sequence[FrameSource],
    sinks: Sequence[Sequence[ResultSink]],
    options: VideoOptions | None = None,
    boxes: Sequence[BoxSource | None] | None = None,
    progress: bool = True,
    queue_size: int = 4,
) -> VideoReport:
    """Run several sources (videos, webcams, image folders) at once: each read on its own thread, one frame of
    every source dispatched as one batch, each source tracked on its own (`options`) into its own `sinks[i]`.

    boxes: per source a BoxSource for its key frames (None: the Pipeline's detector). A source that fails
    mid-stream ends with its results so far written; the others go on, and a `StreamError` names it at the end."""
    from tqdm import tqdm

    if len(sinks) != len(sources):
        raise DynPoseError(f"process_video: {len(sources)} sources but {len(sinks)} sink lists")
    names = source_stems([s.source for s in sources])
    policy = pipe.dispatcher.policy
    if len(sources) > 1 and policy.kind == "fraction":
        log.info("route %s ranks the crops of each dispatch: batched sources sway each other's routing", policy)
    report = VideoReport([StreamReport(s.source, n) for s, n in zip(sources, names, strict=True)])
    tracker = VideoTracker(pipe, options, len(sources), fps=[s.fps for s in sources], boxes=boxes)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        readers = [ReadAhead(s, queue_size) for s in sources]
        for r in readers:
            stack.callback(r.close)
        run = _VideoRun(tracker, readers, sinks, report)
        run.bars = [
            stack.enter_context(
                tqdm(total=s.total, unit="frame", desc=n, position=i, disable=None if progress else True, leave=False)
            )
            for i, (s, n) in enumerate(zip(sources, names, strict=True))
        ]
        try:
            while any(run.open):
                frames = run.next_frames()
                if all(f is None for f in frames):
                    break
                run.write(frames, tracker.step(frames))
        except KeyboardInterrupt:
            report.interrupted = True  # webcams end with Ctrl-C: keep what was done
            for i in range(len(sources)):
                run.finish(i)
        except BaseException:
            run.abort()
            raise
    report.seconds = time.perf_counter() - t0
    for rep, st in zip(report.streams, tracker.streams, strict=True):
        rep.stats = st.stats
    if report.errors:
        raise StreamError("; ".join(report.errors) + " (the frames before each failure were processed and written)", report)
    return report
