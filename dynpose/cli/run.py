"""`dynpose-run`: pose estimation on images, folders, videos or a webcam with an engine dir."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

from dynpose.cli.common import user_errors
from dynpose.errors import DynPoseError

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


def _frame_ids(source: str, ann: str | None) -> dict[Path, int] | None:
    """Resolved image path -> COCO image id from the annotation file (None: use numeric file stems)."""
    if ann is None:
        return None
    from dynpose.data import image_id_map, load_coco

    root = Path(source) if Path(source).is_dir() else Path(source).parent
    return {p.resolve(): iid for iid, p in image_id_map(root, load_coco(ann)).items()}


def _frame_path(source: str, name: str) -> Path:
    p = Path(source)
    return (p / name if p.is_dir() else p).resolve()


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
@click.option("--threads", type=int, default=None, help="CPU cores shared by the two pose models (default: all).")
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
@user_errors
def main(
    engine_dir: str,
    source: str,
    detections: str | None,
    ann: str | None,
    det_score: float | None,
    detector: str | None,
    gt_boxes: str | None,
    backend: str,
    device: str,
    route: str | None,
    flip: bool,
    max_batch: int,
    max_latency_ms: float | None,
    threads: int | None,
    out: str | None,
    vis: str | None,
    vis_score: float,
    eval_gt: str | None,
) -> None:
    """Estimate human poses with the DynPose router + small/large models of an engine dir."""
    from dynpose.data import load_detections
    from dynpose.runtime.pipeline import Pipeline
    from dynpose.runtime.policy import parse_policy
    from dynpose.runtime.sources import open_source

    if sum(x is not None for x in (detections, detector, gt_boxes)) > 1:
        raise DynPoseError("give one box source: --detections, --detector or --gt-boxes")
    if ann and not detections:
        raise DynPoseError("--ann maps detection image ids to files; it needs --detections")
    if max_batch < 1:
        raise DynPoseError(f"--max-batch must be >= 1, got {max_batch}")
    if max_latency_ms is not None and max_latency_ms < 0:
        raise DynPoseError(f"--max-latency-ms must be >= 0, got {max_latency_ms}")
    if out is not None and Path(out).suffix.lower() not in (".json", ".jsonl"):
        raise DynPoseError(f"--out {out}: use a .json (COCO results) or .jsonl (JSON lines) file name")
    if route is not None:
        parse_policy(route)  # a bad policy fails before any model loads

    dets: dict[int, np.ndarray] | None = None
    if detections:
        dets = load_detections(detections, score_thr=0.0 if det_score is None else det_score)
        if not dets:
            raise DynPoseError(f"detections file {detections}: no person boxes (at --det-score {det_score or 0.0})")
    ids = _frame_ids(source, ann) if detections else None
    if gt_boxes:
        # As the official HRNet / MMPose GT-box test: every non-crowd person with a labelled keypoint, box score 1.
        # (M,4) boxes carry no score, so the Pipeline skips OKS-NMS for them, as those codes do.
        from dynpose.data import gt_boxes as annotated_boxes
        from dynpose.data import load_coco

        dets = {}
        for iid, box, _ in annotated_boxes(load_coco(gt_boxes)):
            dets.setdefault(iid, []).append(box)
        dets = {iid: np.asarray(b, dtype=np.float64) for iid, b in dets.items()}
        if not dets:
            raise DynPoseError(f"--gt-boxes {gt_boxes}: no annotated person with a labelled keypoint")
        ids = _frame_ids(source, gt_boxes)

    src = open_source(source)
    if dets is not None and src.kind in ("video", "webcam"):
        src.close()
        raise DynPoseError("--detections / --gt-boxes name images by COCO image id; for a video or webcam use --detector")
    if src.kind in ("video", "webcam") and out is not None and Path(out).suffix.lower() == ".json":
        src.close()
        raise DynPoseError(f"--out {out}: video frames have no COCO image ids; write JSON lines with --out NAME.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = Pipeline.from_engine_dir(
            engine_dir,
            backend=backend,
            device=device,
            route=route,
            flip=flip,
            max_batch=max_batch,
            detector=detector,
            det_score=0.5 if det_score is None else det_score,
            threads=threads,
        )
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    if dets is None and pipe.detector is None:
        pipe.close()
        raise DynPoseError(
            "no person boxes: pass --detections DETS.json, --gt-boxes GT.json or --detector FILE.onnx "
            "(or export a detector into the engine dir)"
        )

    no_id: list[str] = []
    matched = [0]  # frames whose image id has detections

    def items() -> Iterator[tuple[Any, np.ndarray, np.ndarray | None]]:
        for frame in src:
            iid = frame.image_id
            if ids is not None:
                iid = ids.get(_frame_path(source, frame.name))
                frame.image_id = iid
            if dets is not None:
                if iid is None:
                    no_id.append(frame.name)
                    yield frame, frame.image_bgr, np.zeros((0, 5))
                else:
                    matched[0] += iid in dets
                    yield frame, frame.image_bgr, dets.get(iid, np.zeros((0, 5)))
            else:
                yield frame, frame.image_bgr, None

    results: list[dict[str, Any]] = []
    jsonl = out is not None and Path(out).suffix.lower() == ".jsonl"
    video = src.kind in ("video", "webcam")
    writer = None
    num_lines = 0
    t0 = time.perf_counter()
    interrupted = False
    from tqdm import tqdm

    from dynpose.fileio import atomic_path, write_json_atomic

    with contextlib.ExitStack() as stack:
        stack.callback(pipe.close)
        stack.callback(src.close)
        lines_file = None
        if jsonl:
            # streamed (a long video's lines never sit in memory) into a temp file renamed onto --out at the end
            lines_file = stack.enter_context(open(stack.enter_context(atomic_path(out)), "w"))
        try:
            bar = stack.enter_context(tqdm(total=src.total, unit="frame", desc="dynpose-run", disable=None, leave=False))
            for frame, persons in pipe.run_many(items(), max_batch=max_batch, max_latency_ms=max_latency_ms):
                bar.update(1)
                if frame.image_id is not None:
                    results.extend(p.to_coco(frame.image_id) for p in persons)
                elif not video and dets is None:
                    no_id.append(frame.name)
                if lines_file is not None:
                    lines_file.write(
                        json.dumps(
                            {
                                "frame": frame.index,
                                "name": frame.name,
                                "image_id": frame.image_id,
                                "persons": [p.to_dict() for p in persons],
                            }
                        )
                        + "\n"
                    )
                    num_lines += 1
                if vis is not None:
                    shown = [p for p in persons if p.score >= vis_score]
                    writer = _draw(vis, source, src, frame, shown, pipe.keypoint_set, writer)
        except KeyboardInterrupt:
            interrupted = True  # a webcam run ends with Ctrl-C: keep what was done
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.close()
        if pipe.stats.frames == 0 and src.skipped:
            raise DynPoseError(
                f"source {source}: no readable image ({src.skipped} file(s) could not be decoded); "
                "check the files are images OpenCV reads (.jpg, .png, ...)"
            )
    wall = time.perf_counter() - t0
    st = pipe.stats
    if out is not None and not jsonl:
        write_json_atomic(out, results)
    if no_id and (out is not None and not jsonl or eval_gt):
        click.echo(
            f"warning: {len(no_id)} image(s) have no COCO image id (e.g. {no_id[0]}); they get no COCO "
            "results (name files by numeric id or pass --ann)",
            err=True,
        )
    if dets is not None and st.frames and not matched[0]:
        click.echo(
            f"warning: no image of {source} has boxes in {detections or gt_boxes}; check the file names / ids "
            "(or pass --ann)",
            err=True,
        )
    if src.skipped:
        click.echo(f"warning: {src.skipped} unreadable image(s) skipped", err=True)
    fps = st.frames / wall if wall > 0 else 0.0
    click.echo("models: " + "; ".join(f"{role} {what}" for role, what in pipe.info["models"].items()))
    click.echo(
        f"{'interrupted; ' if interrupted else ''}frames {st.frames}, persons {st.persons}, crops small "
        f"{st.crops['small']} / large {st.crops['large']}, dropped boxes {st.dropped_boxes}, "
        f"NaN router scores {st.nan_router_scores}, {fps:.1f} FPS ({wall:.2f} s, route {pipe.info['route']})"
    )
    if out is not None:
        click.echo(f"wrote {out} ({num_lines if jsonl else len(results)} {'frames' if jsonl else 'results'})")
    if eval_gt:
        _evaluate(results, eval_gt)


def _draw(vis: str, source: str, src: Any, frame: Any, persons: list, keypoint_set: Any, writer: Any) -> Any:
    from dynpose.runtime.vis import VideoWriter, draw_persons, write_image

    img = draw_persons(frame.image_bgr, persons, keypoint_set)
    if src.kind in ("video", "webcam"):
        if writer is None:
            stem = Path(source).stem if src.kind == "video" else f"webcam{source}"
            writer = VideoWriter(Path(vis) / f"{stem}.mp4", fps=src.fps or 25.0)
        writer.write(img)
        return writer
    write_image(Path(vis) / frame.name, img)
    return writer


def _evaluate(results: list[dict[str, Any]], gt: str) -> None:
    try:
        from dynpose.eval.coco import evaluate_results
    except ImportError:
        click.echo("warning: --eval needs dynpose.eval.coco (not installed in this build); skipped", err=True)
        return
    figures = evaluate_results(results, gt)
    click.echo(figures.get("summary") or json.dumps({k: figures[k] for k in figures.get("names", [])}))


if __name__ == "__main__":
    main()
