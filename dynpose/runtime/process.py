"""`process`: a frame source through a Pipeline into result sinks — what `dynpose-run` does, as a library call.

    with Pipeline.from_engine_dir("engines/") as pipe, open_source("walk.mp4") as src:
        report = process(pipe, src, DetectorBoxes(), [JsonLinesSink("walk.jsonl")])

Frames are micro-batched (`Pipeline.run_many`), every sink sees every frame in input order, and the sinks are
closed at the end (made final) or aborted on an error (nothing partial left). Ctrl-C (and SIGTERM under
`dynpose.cli.common.sigterm_as_interrupt`) ends the run early and keeps what was done.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.boxes import BoxSource
from dynpose.runtime.pipeline import Pipeline
from dynpose.runtime.sinks import ResultSink
from dynpose.runtime.sources import Frame, FrameSource


@dataclass
class RunReport:
    """What a `process` run did (the Pipeline's own totals are in `pipe.stats`)."""

    frames: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    skipped: int = 0  # unreadable images the source skipped

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def _items(src: FrameSource, boxes: BoxSource) -> Iterator[tuple[Frame, np.ndarray, np.ndarray | None]]:
    for frame in src:
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
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        bar: Any = stack.enter_context(
            tqdm(total=src.total, unit="frame", desc="dynpose-run", disable=None if progress else True, leave=False)
        )
        try:
            for frame, persons in pipe.run_many(_items(src, boxes), max_batch=max_batch, max_latency_ms=max_latency_ms):
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
