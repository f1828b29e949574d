"""`dynpose-run`: pose estimation on images, folders, videos or a webcam with an engine dir."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dynpose.cli.common import check_finite, check_threads, setup_logging, sigterm_as_interrupt, user_errors, version_option
from dynpose.errors import DynPoseError

if TYPE_CHECKING:
    from dynpose.fileio import OutputGuard
    from dynpose.io.box_sources import BoxSource
    from dynpose.io.sinks import ResultSink
    from dynpose.io.sources import FrameSource
    from dynpose.runtime.audit import AuditOptions
    from dynpose.runtime.pipeline import Pipeline
    from dynpose.runtime.policy import Policy
    from dynpose.video import LoopOptions, RunReport

EPILOG = """\b
Examples:
  # the demo: shipped models on shipped COCO samples (prints AP) and a sample video, results in ./dynpose-demo/
  dynpose-run --demo
  # the demo models on your own photo, folder, video or webcam
  dynpose-run --demo --source photo.jpg
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
  # live audit: 5% of the small model's answers also on the large model; the route steps toward the large model
  # while the agreement's 95% interval is below 0.95 (figures in the summary and walk.audit.json)
  dynpose-run --engine-dir engines/ --source walk.mp4 --detector det.onnx --audit 0.05 --audit-target 0.95 \\
      --out walk.jsonl

\b
Routing policies (--route): band:LO,HI (DynPose release rule, large iff LO <= router score <= HI),
threshold:T, fraction:F (top F of each batch by router score go large), all-small, all-large,
box:AREA (boxes under AREA px² go small), box-below:AREA (boxes under AREA px² go large),
box-threshold:AREA,T (large iff w*h >= AREA and router score >= T), cascade:T (every person on the
small model first; those whose mean keypoint score is under T run again on the large model, whose
answer replaces it), cascade-visible:T,S (the same on the mean of the joints scoring above S).
Default: the engine dir manifest's policy.
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
    keyframes: bool = False
    demo: bool = False
    out_dir: str | None = None
    audit: float | None = None
    audit_target: float | None = None

    def audit_options(self) -> AuditOptions | None:
        """The live audit asked for (None: none), checked: a share in [0, 1], a target in (0, 1] that needs a share."""
        from dynpose.runtime.audit import AuditOptions

        if self.audit is None and self.audit_target is None:
            return None
        return AuditOptions.of(AuditOptions(0.0 if self.audit is None else self.audit, self.audit_target))

    def loop(self) -> LoopOptions:
        """The run loop's options (batching, tracking, key frames, temporal routing, smoothing), validated."""
        from dynpose.video import LoopOptions, TrackerConfig, VideoOptions, parse_smoothing
        from dynpose.video.keyframes import KeyframeConfig

        # --keyframes: the planner decides, with --det-every (or 10 frames) as the longest gap between detections
        keyframes = KeyframeConfig(max_interval=self.det_every if self.det_every > 1 else 10) if self.keyframes else None
        v = VideoOptions(
            track=self.track,
            det_every=self.det_every,
            reroute_every=self.reroute_every,
            smooth=parse_smoothing(self.smooth),
            tracker=TrackerConfig(confirm=self.track_confirm, max_missed=self.track_max_missed),
            keyframes=keyframes,
        )
        v.validate()
        return LoopOptions(self.max_batch, self.max_latency_ms, v, progress=not self.quiet)


def _check(o: RunOptions) -> Policy | None:
    """Everything that can be refused before a file is opened or a model loaded; returns the asked policy (parsed
    here, once: the run uses this object)."""
    from dynpose.io.sinks import out_format
    from dynpose.runtime.policy import parse_policy

    if not o.engine_dir:
        raise DynPoseError("--engine-dir is missing: give the engine dir dynpose-export made (or try dynpose-run --demo)")
    if sum(x is not None for x in (o.detections, o.detector, o.gt_boxes)) > 1:
        raise DynPoseError("give one box source: --detections, --detector or --gt-boxes")
    if o.ann and not o.detections:
        raise DynPoseError("--ann maps detection image ids to files; it needs --detections")
    if not o.source:
        raise DynPoseError("--source is missing; give an image, a folder of images, a video file or a webcam index")
    if any(not s.strip() for s in o.source):
        raise DynPoseError("--source is empty; give an image, a folder of images, a video file or a webcam index")
    if len(o.source) > 1 and (o.detections or o.gt_boxes or o.eval_gt):
        raise DynPoseError("--detections, --gt-boxes and --eval name the images of one source; give one --source")
    if (o.det_every > 1 or o.keyframes) and (o.detections or o.gt_boxes):
        flag = "--keyframes" if o.keyframes else "--det-every"
        raise DynPoseError(f"{flag} saves detector calls; --detections / --gt-boxes give every frame's boxes already")
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
    o.loop()  # bad tracking flags fail here
    o.audit_options()  # and bad audit flags
    return parse_policy(o.route) if o.route is not None else None  # a bad policy fails before any model loads


def _box_source(o: RunOptions) -> BoxSource:
    from dynpose.io.box_sources import DetectorBoxes, FileBoxes

    if o.detections:
        return FileBoxes.detections(o.detections, o.source[0], 0.0 if o.det_score is None else o.det_score, o.ann)
    if o.gt_boxes:
        return FileBoxes.ground_truth(o.gt_boxes, o.source[0])
    return DetectorBoxes()


def _check_source(o: RunOptions, src: FrameSource, boxes: BoxSource) -> None:
    from dynpose.io.box_sources import FileBoxes
    from dynpose.io.sinks import out_format

    live = src.kind in ("video", "webcam")
    if isinstance(boxes, FileBoxes) and live:
        raise DynPoseError("--detections / --gt-boxes name images by COCO image id; for a video or webcam use --detector")
    if live and out_format(o.out, o.out_format) == "coco":
        raise DynPoseError(
            f"--out {o.out}: video frames have no COCO image ids; write JSON lines with --out NAME.jsonl "
            "(or PoseTrack JSON with --track --format posetrack)"
        )


def _output_guard(o: RunOptions) -> OutputGuard:
    """What this run reads, which --out and --vis may not replace (`dynpose.fileio.OutputGuard`)."""
    from dynpose.fileio import OutputGuard

    sources = [s for s in o.source if not (s.strip().isdigit() and not Path(s).exists())]  # a webcam is no file
    inputs = {"--detections": o.detections, "--gt-boxes": o.gt_boxes, "--ann": o.ann, "--eval": o.eval_gt}
    return OutputGuard.of({**inputs, "--detector": o.detector}, {"--engine-dir": o.engine_dir}, {"--source": sources})


def _sinks(o: RunOptions, srcs: list[FrameSource], pipe: Pipeline) -> list[list[ResultSink]]:
    """Each source's sinks (per-source file names when there are several); none left half-made on an error."""
    from dynpose.io.sinks import Outputs
    from dynpose.io.sources import source_stems

    outputs = Outputs(o.out, o.out_format, o.vis, o.vis_score, collect=o.eval_gt is not None, guard=_output_guard(o))
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
@version_option
@click.option(
    "--demo",
    is_flag=True,
    help="Run the demo: models and samples shipped with dynpose (no --engine-dir; the engine dir is built once into "
    "$DYNPOSE_HOME, default ~/.cache/dynpose). Alone: COCO samples (AP) and a sample video; with --source: yours.",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=str),
    default=None,
    help="With --demo: the folder for its results and drawings (default ./dynpose-demo).",
)
@click.option("--engine-dir", default="", type=click.Path(path_type=str), help="Engine dir with manifest.json.")
@click.option(
    "--source",
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
    "--keyframes",
    is_flag=True,
    help="With --track: detect when the tracks do not explain the frame (someone walks in, the camera shows new "
    "ground, a cut, a lost pose) rather than on a fixed schedule; --det-every is then the longest gap (default 10).",
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
@click.option(
    "--audit",
    type=float,
    default=None,
    help="Live audit: this share (0-1) of the persons the route left on the small model also run on the large model, "
    "off the hot path; the agreement (mean OKS against the large model, 95% interval) is printed and written beside "
    "--out as NAME.audit.json.",
)
@click.option(
    "--audit-target",
    type=float,
    default=None,
    help="With --audit: while the agreement's interval lies below this (0-1], step the route toward the large model; "
    "step back once it is clearly above (docs/router.md, Audit).",
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
    o = RunOptions(**{**flags, "source": tuple(flags["source"])})
    setup_logging(o.quiet)
    if o.out_dir is not None and not o.demo:
        raise DynPoseError("--out-dir is the demo's output folder; without --demo use --out and --vis")
    if o.demo:
        _demo(o)
    else:
        _run(o)


def _demo(o: RunOptions) -> None:
    """--demo: the demo module says which ordinary runs to make (engine dir, sources, outputs, annotations)."""
    from dynpose.demo import DemoRequest, prepare_demo

    box_files = [f for f, v in (("--detections", o.detections), ("--gt-boxes", o.gt_boxes), ("--ann", o.ann)) if v]
    request = DemoRequest(
        sources=o.source,
        out_dir=o.out_dir,
        out=o.out,
        vis=o.vis,
        eval_gt=o.eval_gt,
        engine_dir=o.engine_dir or None,
        box_files=tuple(box_files),
    )
    plan = prepare_demo(request)
    for line in plan.intro():
        click.echo(line)
    for i, job in enumerate(plan.jobs, 1):
        click.echo(f"== demo {i}/{len(plan.jobs)}: {job.title}")
        run = replace(o, engine_dir=str(plan.engine.path), source=job.sources, out=job.out, vis=job.vis, eval_gt=job.eval_gt)
        if job.track is not None:  # the shipped samples write the formats their file names say
            run = replace(run, out_format=None)
        if job.track:
            run = replace(run, track=True)
        elif job.track is not None:  # the sample images: the tracking flags are for the video
            run = replace(run, track=False, det_every=1, reroute_every=1, smooth=None, keyframes=False)
        _run(run)
    for line in plan.outro():
        click.echo(line)


def _run(o: RunOptions) -> None:
    """One run: sources -> boxes -> routed pose models -> sinks (and COCO AP with --eval)."""
    policy = _check(o)
    threads = check_threads(o.threads)
    boxes = _box_source(o)
    with contextlib.ExitStack() as stack:
        srcs = _open_sources(o, boxes, stack)
        pipe = stack.enter_context(_pipeline(o, policy, threads))
        sinks = _sinks(o, srcs, pipe)
        if not any(sinks):
            click.echo("note: no --out or --vis: results are not written (the summary below is all you get)", err=True)
        report = _loop(o, pipe, srcs, boxes, sinks)
    _summary(o, pipe, boxes, sinks, report)  # the pipeline is closed: every audit sample is in
    if o.eval_gt:
        _evaluate(next(s.results for s in sinks[0] if hasattr(s, "results")), o.eval_gt)


def _open_sources(o: RunOptions, boxes: BoxSource, stack: contextlib.ExitStack) -> list[FrameSource]:
    from dynpose.io.sources import open_source

    srcs = [stack.enter_context(open_source(s, max_pixels=o.max_pixels or None)) for s in o.source]
    for src in srcs:
        _check_source(o, src, boxes)
    return srcs


def _pipeline(o: RunOptions, policy: Policy | None, threads: int | None) -> Pipeline:
    """The engine dir's models for this run, and one line on whether the route can pay by the measured costs."""
    from dynpose.bench.costs import log_route_costs
    from dynpose.runtime.pipeline import Pipeline

    det_score = 0.5 if o.det_score is None else o.det_score
    pipe = Pipeline.from_engine_dir(
        o.engine_dir,
        route=policy,
        flip=o.flip,
        backend=o.backend,
        device=o.device,
        threads=threads,
        detector=o.detector,
        det_score=det_score,
        audit=o.audit_options(),
    )
    try:
        if o.detections is None and o.gt_boxes is None and pipe.detector is None:
            raise DynPoseError(
                "no person boxes: pass --detections DETS.json, --gt-boxes GT.json or --detector "
                "FILE.onnx (or export a detector into the engine dir)"
            )
        if pipe.engines is not None:
            log_route_costs(pipe.engines.manifest, pipe.policy, o.backend, o.device, where=f"engine dir {o.engine_dir}")
    except BaseException:
        pipe.close()
        raise
    return pipe


def _loop(
    o: RunOptions, pipe: Pipeline, srcs: list[FrameSource], boxes: BoxSource, sinks: list[list[ResultSink]]
) -> RunReport:
    from dynpose.video import StreamError, run

    try:
        with sigterm_as_interrupt():
            return run(pipe, srcs, sinks, boxes=[boxes] * len(srcs), options=o.loop())
    except StreamError as e:
        _summary(o, pipe, boxes, sinks, e.report)
        raise


def _warnings(o: RunOptions, boxes: BoxSource, sinks: list[list[ResultSink]], report: RunReport) -> None:
    from dynpose.io.box_sources import FileBoxes

    # the box file and the COCO sink may both miss the same image: count names once
    no_id = sorted(set(getattr(boxes, "no_id", [])) | {n for s in sinks[0] for n in getattr(s, "no_id", [])})
    if no_id and (o.out is not None or o.eval_gt):
        click.echo(
            f"warning: {len(no_id)} image(s) have no COCO image id (e.g. {no_id[0]}); they get no COCO "
            "results (name files by numeric id or pass --ann)",
            err=True,
        )
    if isinstance(boxes, FileBoxes) and report.frames and not boxes.matched:
        click.echo(
            f"warning: no image of {o.source[0]} has boxes in {o.detections or o.gt_boxes}; check the file "
            "names / ids (or pass --ann)",
            err=True,
        )
    for s in report.streams:
        if s.skipped:
            click.echo(f"warning: {s.name}: {s.skipped} unreadable image(s) skipped", err=True)
        if s.note:
            click.echo(f"warning: {s.note}", err=True)


def _summary(o: RunOptions, pipe: Pipeline, boxes: BoxSource, sinks: list[list[ResultSink]], report: RunReport) -> None:
    """What the run did: models, per-stream lines when tracking or several sources, the totals, the outputs."""
    from dynpose.roles import Role

    _warnings(o, boxes, sinks, report)
    st, total = pipe.stats, report.stats
    click.echo("models: " + "; ".join(f"{role} {what}" for role, what in pipe.info.get("models", {}).items()))
    if len(report.streams) > 1 or total.tracks:
        for s in report.streams:
            click.echo(s.line(report.seconds))
    video = f", detector calls {total.detector_calls}" if o.track else ""
    router = f", router crops {st.crops[Role.ROUTER]}" + (f" (saved {total.router_saved})" if total.router_saved else "")
    audit = f" (+{st.audit_crops} audit)" if pipe.auditor is not None else ""
    click.echo(
        f"{'interrupted; ' if report.interrupted else ''}frames {report.frames}, persons {st.persons}, crops small "
        f"{st.crops[Role.SMALL]} / large {st.crops[Role.LARGE]}{audit}{router if pipe.policy.needs_router else ''}"
        f"{video}, dropped boxes {st.dropped_boxes}, NaN signals {st.nan_signals}, {report.fps:.1f} FPS "
        f"({report.seconds:.2f} s, route {pipe.policy}){f', escalated {st.escalated}' if pipe.policy.cascades else ''}"
    )
    for sink in (k for per_source in sinks for k in per_source):
        if getattr(sink, "path", True) is not None:  # the --eval collector has nothing to report
            click.echo(sink.summary())  # type: ignore[attr-defined]
    if pipe.auditor is not None:
        for line in pipe.auditor.summary():
            click.echo(line)
        _write_audit(o, pipe)


def _write_audit(o: RunOptions, pipe: Pipeline) -> None:
    """The audit's figures beside --out: NAME.audit.json (one for the run, whatever the number of sources)."""
    from dynpose.fileio import write_json_atomic

    if o.out is None or pipe.auditor is None:
        return
    path = Path(o.out).with_suffix(".audit.json")
    write_json_atomic(path, {**pipe.auditor.snapshot(), "run": pipe.stats.as_dict()})
    click.echo(f"wrote {path}")


def _evaluate(results: list[dict[str, Any]], gt: str) -> None:
    from dynpose.eval.coco import evaluate_results

    figures = evaluate_results(results, gt)
    click.echo(figures.get("summary") or json.dumps({k: figures[k] for k in figures.get("names", [])}))


if __name__ == "__main__":
    main()
