"""`dynpose-run`: pose estimation on images, folders, videos or a webcam with an engine dir."""

from __future__ import annotations

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
    from dynpose.runtime.sinks import ResultSink
    from dynpose.runtime.sources import FrameSource

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

\b
Routing policies (--route): band:LO,HI (DynPose release rule, large iff LO <= router score <= HI),
threshold:T, fraction:F (top F of each batch by router score go large), all-small, all-large,
box:AREA (boxes under AREA px² go small). Default: the engine dir manifest's policy.
"""


@dataclass(frozen=True)
class RunOptions:
    """dynpose-run's flags, as click parses them."""

    engine_dir: str
    source: str
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


def _check(o: RunOptions) -> None:
    """Everything that can be refused before a file is opened or a model loaded."""
    from dynpose.runtime.policy import parse_policy

    if sum(x is not None for x in (o.detections, o.detector, o.gt_boxes)) > 1:
        raise DynPoseError("give one box source: --detections, --detector or --gt-boxes")
    if o.ann and not o.detections:
        raise DynPoseError("--ann maps detection image ids to files; it needs --detections")
    if not o.source.strip():
        raise DynPoseError("--source is empty; give an image, a folder of images, a video file or a webcam index")
    if o.max_batch < 1:
        raise DynPoseError(f"--max-batch must be >= 1, got {o.max_batch}")
    check_finite("--max-latency-ms", o.max_latency_ms, lo=0.0)
    check_finite("--det-score", o.det_score, lo=0.0, hi=1.0)
    check_finite("--vis-score", o.vis_score, lo=0.0)
    if o.out is not None and Path(o.out).suffix.lower() not in (".json", ".jsonl"):
        raise DynPoseError(f"--out {o.out}: use a .json (COCO results) or .jsonl (JSON lines) file name")
    if o.route is not None:
        parse_policy(o.route)  # a bad policy fails before any model loads


def _box_source(o: RunOptions) -> BoxSource:
    from dynpose.runtime.boxes import DetectorBoxes, FileBoxes

    if o.detections:
        return FileBoxes.detections(o.detections, o.source, 0.0 if o.det_score is None else o.det_score, o.ann)
    if o.gt_boxes:
        return FileBoxes.ground_truth(o.gt_boxes, o.source)
    return DetectorBoxes()


def _check_source(o: RunOptions, src: FrameSource, boxes: BoxSource) -> None:
    from dynpose.runtime.boxes import FileBoxes

    live = src.kind in ("video", "webcam")
    if isinstance(boxes, FileBoxes) and live:
        raise DynPoseError("--detections / --gt-boxes name images by COCO image id; for a video or webcam use --detector")
    if live and o.out is not None and Path(o.out).suffix.lower() == ".json":
        raise DynPoseError(f"--out {o.out}: video frames have no COCO image ids; write JSON lines with --out NAME.jsonl")


def _sinks(o: RunOptions, src: FrameSource, pipe: Pipeline) -> list[ResultSink]:
    from dynpose.runtime.sinks import CocoJsonSink, DrawingSink, JsonLinesSink

    sinks: list[ResultSink] = []
    jsonl = o.out is not None and Path(o.out).suffix.lower() == ".jsonl"
    if jsonl:
        sinks.append(JsonLinesSink(o.out))  # type: ignore[arg-type]
    if (o.out is not None and not jsonl) or o.eval_gt:
        sinks.append(CocoJsonSink(None if jsonl else o.out))
    if o.vis is not None:
        video = None
        if src.kind == "video":
            video = Path(o.source).stem
        elif src.kind == "webcam":
            video = f"webcam{o.source}"
        sinks.append(DrawingSink(o.vis, pipe.keypoint_set, video_name=video, fps=src.fps, min_score=o.vis_score))
    return sinks


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120}, epilog=EPILOG)
@click.option("--engine-dir", required=True, type=click.Path(path_type=str), help="Engine dir with manifest.json.")
@click.option("--source", required=True, help="An image, a folder of images, a video file, or a webcam index (0).")
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
@click.option("--backend", type=click.Choice(["ort", "tensorrt", "torch"]), default="ort", show_default=True)
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
@click.option("--quiet", is_flag=True, help="No progress bar or progress notes.")
@user_errors
def main(**flags: Any) -> None:
    """Estimate human poses with the DynPose router + small/large models of an engine dir."""
    from dynpose.runtime.pipeline import Pipeline
    from dynpose.runtime.process import process
    from dynpose.runtime.sources import open_source

    o = RunOptions(**flags)
    setup_logging(o.quiet)
    _check(o)
    threads = check_threads(o.threads)
    boxes = _box_source(o)
    with open_source(o.source) as src:
        _check_source(o, src, boxes)
        det_score = 0.5 if o.det_score is None else o.det_score
        with Pipeline.from_engine_dir(
            o.engine_dir,
            route=o.route,
            flip=o.flip,
            max_batch=o.max_batch,
            backend=o.backend,
            device=o.device,
            threads=threads,
            detector=o.detector,
            det_score=det_score,
        ) as pipe:
            if o.detections is None and o.gt_boxes is None and pipe.detector is None:
                raise DynPoseError(
                    "no person boxes: pass --detections DETS.json, --gt-boxes GT.json or --detector "
                    "FILE.onnx (or export a detector into the engine dir)"
                )
            sinks = _sinks(o, src, pipe)
            if not sinks:
                click.echo("note: no --out or --vis: results are not written (the summary below is all you get)", err=True)
            with sigterm_as_interrupt():
                report = process(pipe, src, boxes, sinks, o.max_batch, o.max_latency_ms, progress=not o.quiet)
            _summary(o, pipe, boxes, sinks, report)
    if o.eval_gt:
        _evaluate(next(s.results for s in sinks if hasattr(s, "results")), o.eval_gt)


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


def _evaluate(results: list[dict[str, Any]], gt: str) -> None:
    from dynpose.eval.coco import evaluate_results

    figures = evaluate_results(results, gt)
    click.echo(figures.get("summary") or json.dumps({k: figures[k] for k in figures.get("names", [])}))


if __name__ == "__main__":
    main()
