"""Key frames that do not miss people walking in (`dynpose.video.keyframes`): mean keypoint OKS against detection on
every frame, and frames/s, against plain `--det-every N` and detection on every frame.

    python benchmarks/keyframe_bench.py --engine-dir engines/ --video ../shared/data/video/street.mp4 \\
        --video walk.mp4 --route all-large --min-rounds 5 --max-rounds 30 --json keyframes.json

Settings, each a pass of a fresh `StreamTracker` (tracking on, the run loop's own stream state) over the video's
frames, decoded into memory first, a plan per frame:
- `every frame`: the detector on every frame (`VideoOptions(det_every=1)`), the reference;
- `every N`: plain key frames (`VideoOptions(det_every=N)`, `dynpose-run --det-every N`);
- `keyframes <= M`: `VideoOptions(keyframes=KeyframeConfig(max_interval=M))` (`dynpose-run --keyframes
  --det-every M`): the planner detects on camera-motion-compensated frame differences outside the tracked boxes,
  camera-revealed area, cuts and lost poses, at most M frames apart; for M = `--det-every` and each
  `--max-interval`.

Mean OKS: `dynpose.video.pose_agreement` (per frame, Hungarian matching by OKS against the every-frame run's
persons; an unmatched reference person counts 0), from the first pass; also the share of reference persons matched
with OKS >= 0.75 and the detector calls. frames/s: each setting once per round, interleaved (the order rotates),
rounds until every ratio's 95% bootstrap interval is within +-5% or `--max-rounds` / `--time-limit`
(`dynpose.bench.timing.timed_rounds`); the speed of each setting as the median ratio to `every frame` with its
interval. Results are printed; `--json` writes them too (only there).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def load_frames(video: Path, limit: int | None) -> list[Any]:
    from dynpose.io.sources import Frame, open_source

    with open_source(video) as src:
        images = [f.image_bgr for f in src]
    images = images[:limit] if limit else images
    return [Frame(i, f"{video.stem}_{i:06d}", im) for i, im in enumerate(images)]


def run_stream(pipe: Any, frames: list[Any], options: Any) -> tuple[list[Any], int, dict[str, int]]:
    """One pass of a fresh stream: (persons per frame, detector calls, why the key frames were taken)."""
    from dynpose.video import StreamTracker

    stream = StreamTracker(options, pipe, fps=30.0)
    out = []
    for f in frames:
        step = stream.prepare(f)
        out.append(stream.finish(step, next(pipe.run_frames([[step.input]]))[0]))
    reasons = dict(stream.keyframes.stats) if stream.keyframes is not None else {}
    return out, stream.stats.detector_calls, reasons


def make_settings(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """name -> a function running one fresh pass over frames."""
    from dynpose.video import VideoOptions
    from dynpose.video.keyframes import KeyframeConfig

    def setting(options: Any) -> Any:
        return lambda frames: run_stream(pipe, frames, options)

    n = args.det_every
    settings = {
        "every frame": setting(VideoOptions(track=True)),
        f"every {n}": setting(VideoOptions(track=True, det_every=n, tracker=_tracker(n))),
    }
    for m in dict.fromkeys([n, *args.max_interval]):
        keyframes = KeyframeConfig(max_interval=m)
        settings[f"keyframes <= {m}"] = setting(
            VideoOptions(track=True, det_every=m, keyframes=keyframes, tracker=_tracker(m))
        )
    return settings


def _tracker(det_every: int) -> Any:
    from dynpose.video import TrackerConfig

    return TrackerConfig(max_missed=max(30, det_every))


def agreement(ref: list[Any], out: list[Any], sigmas: Any) -> tuple[float, float]:
    """Mean OKS against the reference (pose_agreement) and the share of reference persons at OKS >= 0.75."""
    from dynpose.video import pose_agreement

    mean = pose_agreement(ref, out, sigmas)
    hits, total = 0, 0
    for r, o in zip(ref, out, strict=True):
        for p in r:
            if not (np.nan_to_num(p.keypoints[:, 2], nan=0.0) >= 0.3).any():
                continue
            total += 1
            hits += pose_agreement([[p]], [o], sigmas) >= 0.75 if o else 0
    return mean, hits / total if total else float("nan")


def bench_video(pipe: Any, video: Path, args: argparse.Namespace) -> dict[str, Any]:
    from dynpose.bench.timing import RoundSpec, timed_rounds

    frames = load_frames(video, args.frames)
    settings = make_settings(pipe, args)
    first: dict[str, tuple[list[Any], int, dict[str, int]]] = {}
    for name, run in settings.items():  # the accuracy pass (also the warm-up)
        first[name] = run(frames)
    ref = first["every frame"][0]
    sigmas = pipe.keypoint_set.sigmas
    rows: dict[str, dict[str, Any]] = {}
    for name, (out, calls, reasons) in first.items():
        mean, share = agreement(ref, out, sigmas)
        rows[name] = {"mean_oks": mean, "share_oks_075": share, "detector_calls": calls, "reasons": reasons}
    if args.max_rounds > 0:
        spec = RoundSpec(args.min_rounds, args.max_rounds, args.time_limit, warmup=0)
        timed = timed_rounds({n: partial(r, frames) for n, r in settings.items()}, "every frame", spec)
        for name in settings:
            ci = timed.ci(name, "every frame")
            rows[name]["fps_median"] = len(frames) / float(np.median(timed.samples[name]))
            rows[name]["speed_vs_every_frame"] = ci.to_dict() | {"text": ci.text()}
        rows["every frame"]["rounds_stopped"] = timed.stopped
    persons = float(np.mean([len(p) for p in ref])) if ref else 0.0
    return {"video": str(video), "frames": len(frames), "persons_per_frame": persons, "rows": rows}


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{Path(res['video']).name}: {res['frames']} frames, {res['persons_per_frame']:.1f} persons per frame")
    print("| setting | mean OKS vs every frame | persons at OKS >= 0.75 | detector calls | speed vs every frame | why |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, r in res["rows"].items():
        speed = r.get("speed_vs_every_frame", {}).get("text", "-")
        why = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items()))
        print(f"| {name} | {r['mean_oks']:.3f} | {r['share_oks_075']:.1%} | {r['detector_calls']} | {speed} | {why} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", type=Path, default=REPO / "engines")
    ap.add_argument("--video", type=Path, action="append", help="a video (repeat for several); default street.mp4")
    ap.add_argument("--detector", type=Path, default=SHARED / "models" / "picodet_s_320_pedestrian.onnx")
    ap.add_argument("--det-score", type=float, default=0.5, help="the detector's score threshold")
    ap.add_argument("--det-every", type=int, default=3)
    ap.add_argument("--max-interval", type=int, nargs="*", default=[6], help="planner settings beyond --det-every")
    ap.add_argument("--frames", type=int, default=None, help="only the first N frames of each video")
    ap.add_argument("--route", default=None, help="routing policy (default: the manifest's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-rounds", type=int, default=5)
    ap.add_argument("--max-rounds", type=int, default=30, help="0: accuracy only, no timing")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds of timing per video")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from dynpose.bench.timing import cpu_model
    from dynpose.runtime.engine_set import EngineSet, LoadOptions
    from dynpose.runtime.pipeline import Pipeline

    videos = args.video or [SHARED / "data" / "video" / "street.mp4"]
    t0 = time.perf_counter()
    with (
        EngineSet.load(
            args.engine_dir, LoadOptions(detector=args.detector, det_score=args.det_score, threads=args.threads)
        ) as engines,
        Pipeline.from_engine_set(engines, route=args.route) as pipe,
    ):
        route = pipe.info["route"]
        results = [bench_video(pipe, v, args) for v in videos]
    print(f"route {route}, {cpu_model()}, whole run {time.perf_counter() - t0:.0f} s")
    for res in results:
        print_table(res)
    if args.json is not None:
        meta = {"route": route, "cpu": cpu_model(), "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"meta": meta, "videos": results}, indent=1))


if __name__ == "__main__":
    main()
