"""`dynpose-run`: pose estimation on images, folders, videos or a webcam with an engine dir."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dynpose.cli.common import check_finite, check_threads, setup_logging, sigterm_as_interrupt, user_errors
from dynpose.errors import DynPoseError

if TYPE_CHECKING:
    from dynpose.runtime.boxes import BoxSource
    from dynpose.runtime.pipeline import Pipeline
    from dynpose.runtime.process import VideoReport
    from dynpose.runtime.sinks import ResultSink
    from dynpose.runtime.sources import FrameSource
    from dynpose.runtime.tracking import VideoOptions

EPILOG = """\b
Examples:
  # COCO val images with the person detections file the HRNet / MMPose results use, then COCO AP
  dynpose-run --engine-dir engines/ --source coco/val2017 \\
      --detections COCO_val2017_detections_AP_H_56_person.json --ann person_keypoints_val2017.json \\
      --out results.json --eval person_keypoints_val2017.json
  # a video with an ONNX person detector; JSON lines per frame and an annotated mp4
  dynpose-run --engine-dir engines/ --source walk.mp4 --detector picodet_s_320_pedestrian.onnx \\
      --out walk.jsonl --vis out/ --max-batch 32 --max-latency-ms 50
  # webcam 0, large model only, flip test, on the GPU with TensorRT plans
  dynpose-run --engine-dir engines/ --source 0 --detector det.onnx --route all-large --flip \\
      --backend tensorrt --device cuda --vis out/
  # tracked: ids per person, the detector every 3rd frame, a person's routing kept for 10 frames, smoothed
  dynpose-run --engine-dir engines/ --source street.mp4 --detector picodet_s_320_pedestrian.onnx \\
      --track --det-every 3 --reroute-every 10 --smooth one-euro --out tracks.jsonl --vis out/
  # two cameras at once (one batch per frame pair): tracks_cam1.jsonl, tracks_cam2.jsonl, out/cam1.mp4, ...
  dynpose-run --engine-dir engines/ --source cam1.mp4 --source cam2.mp4 --detector det.onnx --track \\
      --out tracks.json --format posetrack --vis out/

\b
Routing policies (--route): band:LO,HI (DynPose release rule, large iff LO <= router score <= HI),
threshold:T, fraction:F (top F of each batch by router score go large), all-small, all-large,
box:AREA (boxes under AREA px² go small). Default: the engine dir manifest's policy.
"""


@dataclass(frozen=True)
class RunOptions:
    """dynpose-run's flags, as click parses them."""

    engine_dir: str
    source: tuple[str, ...]
    detections: str | None
    ann: str | None
    det_score: float | None
    detector: str | None
    gt_boxes: str | None
    backend: str
    device: str
    route: str | None
    flip: bool
    max_batch: int
    max_latency_ms: float | None
    threads: int | None
    out: str | None
    vis: str | None
    vis_score: float
    eval_gt: str | None
    quiet: bool
    max_pixels: int = 50_000_000
    track: bool = False
    det_every: int = 1
    reroute_every: int = 1
    smooth: str | None = None
    out_format: str | None = None
    track_confirm: int = 2
    track_max_missed: int = 30

    def video(self) -> VideoOptions | None:
        """The video run's options, or None for a plain run (one source, no tracking: today's per-frame path)."""
        from dynpose.runtime.tracking import TrackerConfig, VideoOptions, parse_smoothing

        v = VideoOptions(
            track=self.track,
            det_every=self.det_every,
            reroute_every=self.reroute_every,
            smooth=parse_smoothing(self.smooth),
            tracker=TrackerConfig(confirm=self.track_confirm, max_missed=self.track_max_missed),
        )
        v.validate()
        return v if self.track or len(self.source) > 1 else None


def _check(o: RunOptions) -> None:
    """Everything that can be refused before a file is opened or a model loaded."""
    from dynpose.runtime.policy import parse_policy
    from dynpose.runtime.sinks import out_format

    if sum(x is not None for x in (o.detections, o.detector, o.gt_boxes)) > 1:
        raise DynPoseError("give one box source: --detections, --detector or --gt-boxes")
    if o.ann and not o.detections:
        raise DynPoseError("--ann maps detection image ids to files; it needs --detections")
    if not o.source or any(not s.strip() for s in o.source):
        raise DynPoseError("--source is empty; give an image, a folder of images, a video file or a webcam index")
    if len(o.source) > 1 and (o.detections or o.gt_boxes or o.eval_gt):
        raise DynPoseError("--detections, --gt-boxes and --eval name the images of one source; give one --source")
    if o.det_every > 1 and (o.detections or o.gt_boxes):
        raise DynPoseError("--det-every saves detector calls; --detections / --gt-boxes give every frame's boxes already")
    if o.max_pixels < 0:
        raise DynPoseError(f"--max-pixels {o.max_pixels}: must be >= 0 (0: no limit)")
    if o.max_batch < 1:
        raise DynPoseError(f"--max-batch must be >= 1, got {o.max_batch}")
    check_finite("--max-latency-ms", o.max_latency_ms, lo=0.0)
    check_finite("--det-score", o.det_score, lo=0.0, hi=1.0)
    check_finite("--vis-score", o.vis_score, lo=0.0)
    if o.out is not None and Path(o.out).suffix.lower() not in (".json", ".jsonl"):
        raise DynPoseError(f"--out {o.out}: use a .json (COCO results) or .jsonl (JSON lines) file name")
    fmt = out_format(o.out, o.out_format)
    if fmt is not None and (fmt == "jsonl") != (Path(o.out).suffix.lower() == ".jsonl"):  # type: ignore[arg-type]
        raise DynPoseError(f"--out {o.out} --format {fmt}: JSON lines go to a .jsonl file, COCO and PoseTrack to .json")
    if fmt == "posetrack" and not o.track:
        raise DynPoseError("--format posetrack writes track ids; add --track")
    if o.out is None and o.out_format is not None:
        raise DynPoseError(f"--format {o.out_format}: it is the format of --out; give --out too")
    if o.route is not None:
        parse_policy(o.route)  # a bad policy fails before any model loads
    o.video()  # bad tracking flags fail here too


def _box_source(o: RunOptions) -> BoxSource:
    from dynpose.runtime.boxes import DetectorBoxes, FileBoxes

    if o.detections:
        return FileBoxes.detections(o.detections, o.source[0], 0.0 if o.det_score is None else o.det_score, o.ann)
    if o.gt_boxes:
        return FileBoxes.ground_truth(o.gt_boxes, o.source[0])
    return DetectorBoxes()


def _check_source(o: RunOptions, src: FrameSource, boxes: BoxSource) -> None:
    from dynpose.runtime.boxes import FileBoxes
    from dynpose.runtime.sinks import out_format

    live = src.kind in ("video", "webcam")
    if isinstance(boxes, FileBoxes) and live:
        raise DynPoseError("--detections / --gt-boxes name images by COCO image id; for a video or webcam use --detector")
    if live and out_format(o.out, o.out_format) == "coco":
        raise DynPoseError(
            f"--out {o.out}: video frames have no COCO image ids; write JSON lines with --out NAME.jsonl "
            "(or PoseTrack JSON with --track --format posetrack)"
        )


def _sinks(o: RunOptions, srcs: list[FrameSource], pipe: Pipeline) -> list[list[ResultSink]]:
    """Each source's sinks (per-source file names when there are several); none left half-made on an error."""
    from dynpose.runtime.sinks import Outputs
    from dynpose.runtime.sources import source_stems

    outputs = Outputs(o.out, o.out_format, o.vis, o.vis_score, collect=o.eval_gt is not None)
    stems: list[str | None] = list(source_stems(o.source)) if len(srcs) > 1 else [None]
    made: list[list[ResultSink]] = []
    try:
        for i, (src, stem) in enumerate(zip(srcs, stems, strict=True)):
            made.append(outputs.sinks(src, pipe.keypoint_set, stem=stem, vid_id=i + 1))
    except BaseException:
        for sink in (s for sinks in made for s in sinks):
            sink.abort()
        raise
    return made


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120}, epilog=EPILOG)
@click.option("--engine-dir", required=True, type=click.Path(path_type=str), help="Engine dir with manifest.json.")
@click.option(
    "--source",
    required=True,
    multiple=True,
    help="An image, a folder of images, a video file, or a webcam index (0). Repeat it to run several sources at "
    "once (one batch per frame of each; per-source outputs named by source).",
)
@click.option(
    "--detections",
    type=click.Path(path_type=str),
    default=None,
    help="COCO-format person detections JSON (boxes named by image id).",
)
@click.option(
    "--ann",
    type=click.Path(path_type=str),
    default=None,
    help="COCO annotation file mapping image ids to file names (else numeric file stems are the ids).",
)
@click.option(
    "--det-score",
    type=float,
    default=None,
    help="Minimum box score: for --detections (default 0.0) or the detector (default 0.5).",
)
@click.option("--detector", type=click.Path(path_type=str), default=None, help="ONNX person detector (e.g. PicoDet).")
@click.option(
    "--gt-boxes",
    type=click.Path(path_type=str),
    default=None,
    help="COCO annotation file: crop its annotated person boxes instead of detections (isolates pose "
    "accuracy from the detector; also maps image ids to files).",
)
@click.option("--backend", type=click.Choice(["ort", "tensorrt", "torch", "openvino"]), default="ort", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--route", default=None, help="Routing policy (see below); default: the manifest's.")
@click.option("--flip", is_flag=True, help="Flip test: average with the mirrored crop (twice the pose work).")
@click.option(
    "--max-batch",
    type=int,
    default=64,
    show_default=True,
    help="Micro-batch: collect frames until this many crops, then dispatch them together.",
)
@click.option(
    "--max-latency-ms",
    type=float,
    default=None,
    help="Micro-batch time cap: dispatch once the oldest waiting frame is this old (use for live video).",
)
@click.option("--threads", type=int, default=None, help="CPU cores to use (default: all); the two pose models share them.")
@click.option(
    "--out",
    type=click.Path(path_type=str),
    default=None,
    help="Results: .json (COCO keypoint results) or .jsonl (one JSON line per frame).",
)
@click.option(
    "--vis",
    type=click.Path(path_type=str),
    default=None,
    help="Folder for drawn skeletons (images keep their names; a video or webcam gives an .mp4).",
)
@click.option(
    "--vis-score",
    type=float,
    default=0.3,
    show_default=True,
    help="Draw only persons scoring at least this (results files keep every person, as COCO eval needs).",
)
@click.option(
    "--eval",
    "eval_gt",
    type=click.Path(path_type=str),
    default=None,
    help="COCO annotation file: print keypoint AP of the results against it.",
)
@click.option("--track", is_flag=True, help="Track persons across frames: a track_id per person in the outputs.")
@click.option(
    "--det-every",
    type=int,
    default=1,
    show_default=True,
    help="With --track: run the detector every N frames (and right after a track is lost); in between each "
    "person's box comes from its last keypoints.",
)
@click.option(
    "--reroute-every",
    type=int,
    default=1,
    show_default=True,
    help="With --track: keep a person's small/large decision for up to K frames (unless its keypoint "
    "confidence drops), so the router runs only for new and re-routed persons. 1: route every frame.",
)
@click.option(
    "--smooth",
    default=None,
    help="With --track: one-euro smoothing of the written keypoints, one-euro[:MIN_CUTOFF,BETA] (default 1.0,0.05; "
    "off by default).",
)
@click.option(
    "--format",
    "out_format",
    type=click.Choice(["jsonl", "coco", "posetrack"]),
    default=None,
    help="Format of --out (default by suffix: .jsonl JSON lines, .json COCO results); posetrack: PoseTrack-style "
    "JSON with track ids (.json, needs --track).",
)
@click.option(
    "--track-confirm", type=int, default=2, show_default=True, help="Frames a new track is seen in before it gets an id."
)
@click.option(
    "--track-max-missed",
    type=int,
    default=30,
    show_default=True,
    help="Frames a track may go unseen before it ends (at least --det-every).",
)
@click.option("--quiet", is_flag=True, help="No progress bar or progress notes.")
@click.option(
    "--max-pixels",
    type=int,
    default=50_000_000,
    show_default=True,
    help="Skip images whose header claims more pixels than this (checked before decoding; 0: no limit).",
)
@user_errors
def main(**flags: Any) -> None:
    """Estimate human poses with the DynPose router + small/large models of an engine dir."""
    from dynpose.runtime.pipeline import Pipeline
    from dynpose.runtime.process import process
    from dynpose.runtime.sources import open_source

    o = RunOptions(**{**flags, "source": tuple(flags["source"])})
    setup_logging(o.quiet)
    _check(o)
    threads = check_threads(o.threads)
    boxes = _box_source(o)
    with contextlib.ExitStack() as stack:
        srcs = [stack.enter_context(open_source(s, max_pixels=o.max_pixels or None)) for s in o.source]
        for src in srcs:
            _check_source(o, src, boxes)
        det_score = 0.5 if o.det_score is None else o.det_score
        pipe = stack.enter_context(
            Pipeline.from_engine_dir(
                o.engine_dir,
                route=o.route,
                flip=o.flip,
                max_batch=o.max_batch,
                backend=o.backend,
                device=o.device,
                threads=threads,
                detector=o.detector,
                det_score=det_score,
            )
        )
        if o.detections is None and o.gt_boxes is None and pipe.detector is None:
            raise DynPoseError(
                "no person boxes: pass --detections DETS.json, --gt-boxes GT.json or --detector "
                "FILE.onnx (or export a detector into the engine dir)"
            )
        sinks = _sinks(o, srcs, pipe)
        if not any(sinks):
            click.echo("note: no --out or --vis: results are not written (the summary below is all you get)", err=True)
        video = o.video()
        if video is None:
            with sigterm_as_interrupt():
                report = process(pipe, srcs[0], boxes, sinks[0], o.max_batch, o.max_latency_ms, progress=not o.quiet)
            _summary(o, pipe, boxes, sinks[0], report)
        else:
            _run_video(o, pipe, srcs, boxes, sinks, video)
    if o.eval_gt:
        _evaluate(next(s.results for s in sinks[0] if hasattr(s, "results")), o.eval_gt)


def _run_video(
    o: RunOptions, pipe: Pipeline, srcs: list[FrameSource], boxes: BoxSource, sinks: list[list[ResultSink]], video: Any
) -> None:
    from dynpose.runtime.process import StreamError, process_video

    try:
        with sigterm_as_interrupt():
            report = process_video(pipe, srcs, sinks, video, boxes=[boxes] * len(srcs), progress=not o.quiet)
    except StreamError as e:
        _video_summary(pipe, e.report, sinks)
        raise
    _video_summary(pipe, report, sinks)


def _summary(o: RunOptions, pipe: Pipeline, boxes: BoxSource, sinks: list[ResultSink], report: Any) -> None:
    from dynpose.runtime.boxes import FileBoxes

    no_id = list(getattr(boxes, "no_id", [])) + [n for s in sinks for n in getattr(s, "no_id", [])]
    if no_id and (o.out is not None or o.eval_gt):
        click.echo(
            f"warning: {len(no_id)} image(s) have no COCO image id (e.g. {no_id[0]}); they get no COCO "
            "results (name files by numeric id or pass --ann)",
            err=True,
        )
    if isinstance(boxes, FileBoxes) and report.frames and not boxes.matched:
        click.echo(
            f"warning: no image of {o.source} has boxes in {o.detections or o.gt_boxes}; check the file "
            "names / ids (or pass --ann)",
            err=True,
        )
    if report.skipped:
        click.echo(f"warning: {report.skipped} unreadable image(s) skipped", err=True)
    if report.note:
        click.echo(f"warning: {report.note}", err=True)
    st = pipe.stats
    click.echo("models: " + "; ".join(f"{role} {what}" for role, what in pipe.info["models"].items()))
    click.echo(
        f"{'interrupted; ' if report.interrupted else ''}frames {st.frames}, persons {st.persons}, crops small "
        f"{st.crops['small']} / large {st.crops['large']}, dropped boxes {st.dropped_boxes}, "
        f"NaN router scores {st.nan_router_scores}, {report.fps:.1f} FPS ({report.seconds:.2f} s, route "
        f"{pipe.info['route']})"
    )
    for s in sinks:
        if getattr(s, "path", True) is not None:  # the --eval collector has nothing to report
            click.echo(s.summary())  # type: ignore[attr-defined]


def _video_summary(pipe: Pipeline, report: VideoReport, sinks: list[list[ResultSink]]) -> None:
    st, total = pipe.stats, report.stats
    click.echo("models: " + "; ".join(f"{role} {what}" for role, what in pipe.info["models"].items()))
    if len(report.streams) > 1 or total.tracks:
        for s in report.streams:
            click.echo(s.line(report.seconds))
    for s in report.streams:
        if s.note:
            click.echo(f"warning: {s.note}", err=True)
    router = f"router crops {total.router_crops}" + (f" (saved {total.router_saved})" if total.router_saved else "")
    click.echo(
        f"{'interrupted; ' if report.interrupted else ''}frames {report.frames}, persons {total.persons}, crops small "
        f"{st.crops['small']} / large {st.crops['large']}, detector calls {total.detector_calls}, {router}, "
        f"NaN router scores {st.nan_router_scores}, {report.fps:.1f} FPS ({report.seconds:.2f} s, route "
        f"{pipe.info['route']})"
    )
    for sink in (k for per_source in sinks for k in per_source):
        if getattr(sink, "path", True) is not None:
            click.echo(sink.summary())  # type: ignore[attr-defined]


def _evaluate(results: list[dict[str, Any]], gt: str) -> None:
    from dynpose.eval.coco import evaluate_results

    figures = evaluate_results(results, gt)
    click.echo(figures.get("summary") or json.dumps({k: figures[k] for k in figures.get("names", [])}))


if __name__ == "__main__":
    main()
