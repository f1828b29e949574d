"""`run`: the one loop that takes frame sources through a Pipeline into result sinks, for images, folders, videos,
webcams and many of them at once — what `dynpose-run` does, as a library call.

    with Pipeline.from_engine_dir("engines/") as pipe, open_source("walk.mp4") as src:
        report = run(pipe, [src], [[JsonLinesSink("walk.jsonl")]])

    # several videos at once, tracked, the detector every 3rd frame
    report = run(pipe, [src_a, src_b], [sinks_a, sinks_b], options=LoopOptions(video=VideoOptions(track=True, det_every=3)))

Every source is read on its own thread (`ReadAhead`) and each step takes one frame of every open source. A frame's
boxes come from its stream (`StreamTracker`: its box source, the detector, or, when tracking, its tracks). Frames
are batched into one plan until the batch holds `max_batch` boxes or the oldest frame has waited `max_latency_ms`;
a tracked stream's frame is planned at once, since its next frame's boxes come from this one's keypoints. Batches
go through `Pipeline.run_frames`, which keeps two in flight for the cascade (the small model runs the next batch
while the large one escalates) when no stream is tracked.

Every sink sees every frame of its source in order, and is closed at the end (made final) or aborted on an error
(no partial file; drawings of images already written stay). Two endings keep what was done: Ctrl-C (and SIGTERM under
`dynpose.cli.common.sigterm_as_interrupt`), and a source that fails mid-stream: its sinks are closed with the frames
before the failure, the other sources go on, and a `StreamError` naming it is raised at the end. A video that ends
before the frame count its header declares (a truncated file) is noted in the report.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dynpose.errors import DynPoseError
from dynpose.io.box_sources import BoxSource
from dynpose.io.sinks import ResultSink
from dynpose.io.sources import Frame, FrameSource, ReadAhead, source_stems
from dynpose.runtime.pipeline import Pipeline
from dynpose.runtime.plan import FrameInput
from dynpose.runtime.policy import Fraction
from dynpose.video.tracking import Step, StreamStats, StreamTracker, VideoOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopOptions:
    """How `run` batches and what it does per stream."""

    max_batch: int = 64  # boxes per plan (and frames, for frames with nobody in them)
    max_latency_ms: float | None = None  # plan once the oldest waiting frame is this old (None: no cap)
    video: VideoOptions = field(default_factory=VideoOptions)  # tracking, key frames, temporal routing, smoothing
    progress: bool = True
    queue_size: int = 4  # frames read ahead per source


class StreamError(DynPoseError):
    """A source failed mid-stream. Every sink was closed with the frames before the failure; `report` says what
    the run did."""

    def __init__(self, message: str, report: RunReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class StreamReport:
    """What one source of a run did."""

    source: str
    name: str  # the per-source stem
    frames: int = 0
    skipped: int = 0  # unreadable or oversized images the source skipped
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
class RunReport:
    """What a run did, per source and in total (the Pipeline's crop counts are in `pipe.stats`)."""

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


@dataclass
class _Stream:
    """One source in a run: its reader, its tracker, its sinks, its report and progress bar."""

    src: FrameSource
    reader: ReadAhead
    tracker: StreamTracker
    sinks: Sequence[ResultSink]
    report: StreamReport
    bar: Any = None
    reading: bool = True
    done: bool = False  # sinks closed or aborted

    def next_frame(self) -> Frame | None:
        """The next frame, None at the end (or after a read error, which the report keeps)."""
        try:
            frame = self.reader.get()
        except DynPoseError as e:
            self.report.error = str(e)
            log.warning("%s; going on with the other sources", e)
            frame = None
        if frame is None:
            self.reading = False
            self.report.skipped = self.src.skipped
            self.report.note = self.reader.early_end
            if self.report.note:
                log.warning("%s", self.report.note)
        return frame

    def write(self, step: Step, persons: list[Any]) -> None:
        out = self.tracker.finish(step, persons)
        for sink in self.sinks:
            sink.write(step.frame, out)
        self.report.frames += 1
        if self.bar is not None:
            self.bar.update(1)

    def finish(self) -> None:
        """Make the outputs final once every frame read was written (a source with no readable image leaves
        nothing behind)."""
        if self.done:
            return
        if self.report.frames == 0 and self.src.skipped:
            self.abort()
            return
        self.done = True
        _close_all(self.sinks)

    def abort(self) -> None:
        if not self.done:
            self.done = True
            for sink in self.sinks:
                sink.abort()


def _close_all(sinks: Sequence[ResultSink]) -> None:
    """Close every sink; if one fails, abort the ones not closed yet and re-raise."""
    for i, sink in enumerate(sinks):
        try:
            sink.close()
        except BaseException:
            for rest in sinks[i + 1 :]:
                rest.abort()
            raise


class _Batches:
    """Pulls frames from the streams and cuts them into batches (see the module doc); `steps` holds each batch's
    (stream, step) pairs in the order the batches were handed out."""

    def __init__(self, streams: list[_Stream], options: LoopOptions) -> None:
        self.streams, self.options = streams, options
        self.steps: deque[list[tuple[_Stream, Step]]] = deque()

    def __iter__(self) -> Iterator[list[FrameInput]]:
        pending: list[tuple[_Stream, Step]] = []
        boxes, t_first = 0, 0.0
        while any(s.reading for s in self.streams):
            for s in self.streams:
                frame = s.next_frame() if s.reading else None
                if frame is None:
                    continue
                step = s.tracker.prepare(frame)
                if not pending:
                    t_first = time.perf_counter()
                pending.append((s, step))
                boxes += len(step.input.boxes)
            if pending and self._due(pending, boxes, t_first):
                yield self._hand_out(pending)
                pending, boxes = [], 0
        if pending:
            yield self._hand_out(pending)

    def _due(self, pending: list[tuple[_Stream, Step]], boxes: int, t_first: float) -> bool:
        waited_ms = (time.perf_counter() - t_first) * 1e3
        cap = self.options.max_latency_ms
        tracked = any(s.tracker.tracked for s, _ in pending)
        # frames count too: a scene with nobody in it would otherwise hold every decoded frame until the end
        full = boxes >= self.options.max_batch or len(pending) >= self.options.max_batch
        return tracked or full or (cap is not None and waited_ms >= cap)

    def _hand_out(self, pending: list[tuple[_Stream, Step]]) -> list[FrameInput]:
        self.steps.append(pending)
        return [step.input for _, step in pending]


def _open_streams(
    pipe: Pipeline,
    sources: Sequence[FrameSource],
    sinks: Sequence[Sequence[ResultSink]],
    boxes: Sequence[BoxSource | None],
    options: LoopOptions,
    stack: contextlib.ExitStack,
) -> list[_Stream]:
    from tqdm import tqdm

    names = source_stems([s.source for s in sources])
    streams = []
    for i, (src, name, sk, bx) in enumerate(zip(sources, names, sinks, boxes, strict=True)):
        reader = ReadAhead(src, options.queue_size)
        stack.callback(reader.close)
        tracker = StreamTracker(options.video, pipe, bx, src.fps)
        # a video's count comes from the reader, read before its thread started (the capture is that thread's now)
        total = reader.declared if src.kind == "video" else src.total
        bar = stack.enter_context(
            tqdm(total=total, unit="frame", desc=name, position=i, disable=None if options.progress else True, leave=False)
        )
        streams.append(_Stream(src, reader, tracker, sk, StreamReport(src.source, name), bar))
    return streams


def run(
    pipe: Pipeline,
    sources: Sequence[FrameSource],
    sinks: Sequence[Sequence[ResultSink]],
    boxes: Sequence[BoxSource | None] | None = None,
    options: LoopOptions | None = None,
) -> RunReport:
    """Run every frame of `sources` through `pipe` into each source's `sinks[i]` (see the module doc).

    boxes: per source a BoxSource for its (key) frames (None: the Pipeline's detector)."""
    o = options or LoopOptions()
    o.video.validate()
    if o.max_batch < 1:
        raise DynPoseError(f"max_batch must be >= 1, got {o.max_batch}")
    if len(sinks) != len(sources):
        raise DynPoseError(f"run: {len(sources)} sources but {len(sinks)} sink lists")
    box_sources = list(boxes) if boxes is not None else [None] * len(sources)
    if len(box_sources) != len(sources):
        raise DynPoseError(f"run: {len(sources)} sources but {len(box_sources)} box sources")
    if len(sources) > 1 and isinstance(pipe.policy, Fraction):
        log.info("route %s ranks the persons of each batch: batched sources sway each other's routing", pipe.policy)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        streams = _open_streams(pipe, sources, sinks, box_sources, o, stack)
        report = RunReport([s.report for s in streams])
        batches = _Batches(streams, o)
        depth = 1 if o.video.track else None  # a tracked frame's boxes need the previous frame's answer
        try:
            for persons in pipe.run_frames(batches, depth=depth):
                for (stream, step), found in zip(batches.steps.popleft(), persons, strict=True):
                    stream.write(step, found)
            for s in streams:
                s.finish()
        except KeyboardInterrupt:
            report.interrupted = True  # webcams end with Ctrl-C: keep what was done
            try:
                for s in streams:
                    s.finish()
            except BaseException:
                for s in streams:  # the streams not finished yet leave no temp file behind
                    s.abort()
                raise
        except BaseException:
            for s in streams:
                s.abort()
            raise
    report.seconds = time.perf_counter() - t0
    for s in streams:
        s.report.stats = s.tracker.stats
    _raise_on_failures(report, streams)
    return report


def _raise_on_failures(report: RunReport, streams: list[_Stream]) -> None:
    if report.errors:
        raise StreamError("; ".join(report.errors) + " (the frames before each failure were processed and written)", report)
    empty = [s for s in streams if s.report.frames == 0 and s.src.skipped]
    if empty and not report.interrupted:
        s = empty[0]
        raise StreamError(
            f"source {s.src.source}: no readable image ({s.src.skipped} file(s) could not be decoded); check the files "
            "are images OpenCV reads (.jpg, .png, ...)",
            report,
        )
