"""Key frames that do not miss people walking in (`dynpose.keyframes`): mean keypoint OKS against detection on every
frame, and frames/s, against plain `--det-every N` and detection on every frame.

    python benchmarks/keyframe_bench.py --engine-dir engines/ --video ../shared/data/video/street.mp4 \\
        --video walk.mp4 --route all-large --min-rounds 5 --max-rounds 30 --json keyframes.json

Settings, each a pass of a fresh `VideoTracker` (tracking on) over the video's frames, decoded into memory first:
- `every frame`: the detector on every frame (`VideoOptions(det_every=1)`), the reference;
- `every N`: plain key frames (`VideoOptions(det_every=N)`, `--det-every`);
- `keyframes <= M`: `dynpose.keyframes.KeyframePlanner` (camera-motion-compensated frame difference outside the
  tracked boxes, camera-revealed area, lost poses) with at most M frames between detections, for M = `--det-every`
  and each `--max-interval`;
- `keyframes+scout <= M` (with `--scout`): the same, a blob first looked at by a cheap detector (PicoDet 192).
The planner runs through the public API only: `VideoTracker(pipe, VideoOptions(det_every=1), boxes=[source])` with
a `BoxSource` (`KeyframeBoxes` below) that gives, per frame, either the full detector's boxes (when the planner asks)
or one box per person of the previous frame, made from its keypoints as the tracker does (`box_from_keypoints`,
moved by the person's last motion) and carrying its detection score. `fixed N` is that same source with the
planner's motion checks off (a full detection every N frames), to show what the source alone changes against the
tracker's own `every N`.

Mean OKS: `dynpose.runtime.tracking.pose_agreement` (per frame, Hungarian matching by OKS against the every-frame
run's persons; an unmatched reference person counts 0), from the first pass; also the share of reference persons
matched with OKS >= 0.75 and the detector calls. frames/s: each setting once per round, interleaved (the order
rotates), rounds until every ratio's 95% bootstrap interval is within +-5% or `--max-rounds` / `--time-limit`
(`dynpose.bench.timing.timed_rounds`); the speed of each setting as the median ratio to `every frame` with its
interval. Results are printed; `--json` writes them too.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESCORE_THR = 0.2  # the Pipeline's rescoring: box score x mean of the keypoint scores above this


def load_frames(video: Path, limit: int | None) -> list[Any]:
    from dynpose.io.sources import Frame, open_source

    with open_source(video) as src:
        images = [f.image_bgr for f in src]
    images = images[:limit] if limit else images
    return [Frame(i, f"{video.stem}_{i:06d}", im) for i, im in enumerate(images)]


class KeyframeBoxes:
    """A `BoxSource` for `VideoTracker`: the planner's full detections, or boxes made from the previous frame's
    persons (fed back with `seen` after every step)."""

    name = "keyframes"

    def __init__(self, planner: Any, detector: Any, padding: float, kpt_thr: float = 0.3) -> None:
        self.planner, self.detector, self.padding, self.kpt_thr = planner, detector, padding, kpt_thr
        self.prev: list[Any] = []
        self.centers: dict[int, np.ndarray] = {}  # track id -> last keypoint centre
        self.velocity: dict[int, np.ndarray] = {}
        self.reasons: Counter[str] = Counter()
        self.detector_calls = 0

    def boxes(self, frame: Any) -> np.ndarray:
        from dynpose.runtime.tracking import box_from_keypoints

        rows, conf = [], []
        for p in self.prev:
            box = box_from_keypoints(p.keypoints, self.kpt_thr, self.padding)
            if box is None:
                continue
            if p.track_id is not None:
                box[:2] += self.velocity.get(p.track_id, 0.0)
            s = np.nan_to_num(p.keypoints[:, 2], nan=0.0)
            kept = s[s > RESCORE_THR]
            det_score = p.score / kept.mean() if len(kept) else p.score  # undo the rescoring: the box's score
            rows.append([*box, det_score])
            conf.append(float(s.mean()))
        tracked = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
        d = self.planner.decide(frame.image_bgr, tracked, np.asarray(conf))
        if d.full:
            self.reasons[d.reason] += 1
            self.detector_calls += 1
            found = self.detector(frame.image_bgr)
            self.planner.detected(found)
            return found
        if len(d.entrants):
            self.reasons["entrant boxes"] += 1
            return np.concatenate([tracked, d.entrants])
        return tracked

    def seen(self, persons: list[Any]) -> None:
        from dynpose.runtime.tracking.tracker import keypoint_center

        for p in persons:
            c = keypoint_center(p.keypoints, self.kpt_thr) if p.track_id is not None else None
            if c is None:
                continue
            last = self.centers.get(p.track_id)
            self.velocity[p.track_id] = c - last if last is not None else np.zeros(2)
            self.centers[p.track_id] = c
        self.prev = persons


def make_settings(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """name -> a function running one fresh pass: () -> (persons per frame, detector calls, reasons)."""
    from dynpose.runtime.tracking import VideoOptions, VideoTracker

    from dynpose.keyframes import KeyframeConfig, KeyframePlanner
    from dynpose.runtime.detector import OnnxDetector

    scout = OnnxDetector(args.scout, score_thr=args.det_score, intra_op_threads=1) if args.scout else None
    padding = pipe.dispatcher.models["large"].card.padding

    def native(det_every: int) -> Any:
        def run(frames: list[Any]) -> tuple[list[Any], int, dict[str, int]]:
            video = VideoTracker(pipe, VideoOptions(track=True, det_every=det_every), fps=[30.0])
            out = [video.step([f])[0] for f in frames]
            return out, video.stats.detector_calls, {}

        return run

    def planned(config: KeyframeConfig, with_scout: bool) -> Any:
        def run(frames: list[Any]) -> tuple[list[Any], int, dict[str, int]]:
            src = KeyframeBoxes(KeyframePlanner(config, scout if with_scout else None), pipe.detector, padding)
            video = VideoTracker(pipe, VideoOptions(track=True, det_every=1), fps=[30.0], boxes=[src])
            out = []
            for f in frames:
                persons = video.step([f])[0]
                src.seen(persons)
                out.append(persons)
            return out, src.detector_calls, dict(src.reasons)

        return run

    n = args.det_every
    off = KeyframeConfig(max_interval=n, min_blob=1.0, reveal=1.0, lost_conf=0.0)
    settings = {
        "every frame": native(1),
        f"every {n}": native(n),
        f"fixed {n}": planned(off, False),
        f"keyframes <= {n}": planned(KeyframeConfig(max_interval=n), False),
    }
    for m in args.max_interval:
        settings[f"keyframes <= {m}"] = planned(KeyframeConfig(max_interval=m), False)
        if scout is not None:
            settings[f"keyframes+scout <= {m}"] = planned(KeyframeConfig(max_interval=m), True)
    return settings


def agreement(ref: list[Any], out: list[Any], sigmas: Any) -> tuple[float, float]:
    """Mean OKS against the reference (pose_agreement) and the share of reference persons at OKS >= 0.75."""
    from dynpose.runtime.tracking import pose_agreement

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
        timed = timed_rounds({n: (lambda r=r: r(frames)) for n, r in settings.items()}, "every frame", spec)
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
    ap.add_argument("--scout", type=Path, default=None, help="a cheap detector (e.g. picodet_s_192_pedestrian.onnx)")
    ap.add_argument("--det-score", type=float, default=0.5)
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
    from dynpose.runtime.engine_set import EngineSet
    from dynpose.runtime.pipeline import Pipeline

    videos = args.video or [SHARED / "data" / "video" / "street.mp4"]
    t0 = time.perf_counter()
    with (
        EngineSet.load(args.engine_dir, detector=args.detector, threads=args.threads) as engines,
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
