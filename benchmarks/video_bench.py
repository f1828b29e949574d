"""Video: frames/s of key-frame detection and temporal routing, and what they cost in keypoint agreement.

    python benchmarks/video_bench.py --engine-dir engines/ --video ../shared/data/video/street.mp4 \\
        --detector ../shared/models/picodet_s_320_pedestrian.onnx --frames 40 --rounds 5

Six settings: the detector every frame, every 3rd, every 5th frame, each with routing every frame and with
temporal routing (`--reroute-every K`: a track keeps its small/large decision for K frames). The video is decoded
into memory first (a short clip is played forwards and backwards until it has `--frames` frames), so the timing is
the tracker, the detector and the planned pose models, not the decoder. Each frame goes through the run loop's
stream state (`dynpose.video.StreamTracker`: `prepare`, `Pipeline.run_frames`, `finish`). The settings take turns
within every round (the order rotates), each round a whole pass over the frames with a fresh tracker; frames/s is
the median over the rounds with the slowest and fastest round. Mean OKS compares each setting's poses with those of
the detector every frame and routing every frame (`dynpose.video.pose_agreement`: Hungarian matching per frame, unmatched
reference persons count 0). Counts (detector calls, router crops, pose crops per model) are per pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from dynpose.bench.timing import cpu_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def load_frames(video: Path, n: int) -> list[Any]:
    """The video's frames, played forwards then backwards (ping-pong) until there are `n`."""
    from dynpose.io.sources import Frame, open_source

    with open_source(video) as src:
        images = [f.image_bgr for f in src]
    order = list(range(len(images)))
    cycle = order + order[-2:0:-1] if len(images) > 1 else order
    picks = [cycle[i % len(cycle)] for i in range(n)]
    stem = video.stem
    return [Frame(i, f"{stem}_{i:06d}", images[j]) for i, j in enumerate(picks)]


def one_pass(pipe: Any, frames: list[Any], options: Any) -> tuple[float, list[list[Any]], dict[str, int]]:
    """One pass of a fresh tracker over the frames: seconds, persons per frame, counts."""
    from dynpose.roles import Role
    from dynpose.video import StreamTracker

    options.validate()
    stream = StreamTracker(options, pipe, fps=30.0)
    before = dict(pipe.stats.crops)
    t0 = time.perf_counter()
    outs = []
    for f in frames:
        step = stream.prepare(f)
        outs.append(stream.finish(step, next(pipe.run_frames([[step.input]]))[0]))
    seconds = time.perf_counter() - t0
    st = stream.stats
    counts = {
        "detector_calls": st.detector_calls,
        "router_crops": st.router_crops,
        "router_saved": st.router_saved,
        Role.SMALL.value: pipe.stats.crops[Role.SMALL] - before[Role.SMALL],
        Role.LARGE.value: pipe.stats.crops[Role.LARGE] - before[Role.LARGE],
        "persons": st.persons,
    }
    return seconds, outs, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", type=Path, default=REPO / "engines")
    ap.add_argument("--video", type=Path, default=SHARED / "data" / "video" / "street.mp4")
    ap.add_argument("--detector", type=Path, default=SHARED / "models" / "picodet_s_320_pedestrian.onnx")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reroute-every", type=int, default=10)
    ap.add_argument("--route", default=None, help="routing policy (default: the manifest's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()

    from dynpose.runtime.engine_set import EngineSet, LoadOptions
    from dynpose.runtime.pipeline import Pipeline
    from dynpose.video import VideoOptions, pose_agreement

    frames = load_frames(args.video, args.frames)
    settings = {
        (d, r): VideoOptions(track=True, det_every=d, reroute_every=r) for d in (1, 3, 5) for r in (1, args.reroute_every)
    }
    with (
        EngineSet.load(args.engine_dir, LoadOptions(detector=args.detector, threads=args.threads)) as engines,
        Pipeline.from_engine_set(engines, route=args.route) as pipe,
    ):
        route = pipe.info["route"]
        one_pass(pipe, frames[:3], settings[(1, 1)])  # warm-up: sessions, allocators
        times: dict[tuple[int, int], list[float]] = {k: [] for k in settings}
        outs: dict[tuple[int, int], list[list[Any]]] = {}
        counts: dict[tuple[int, int], dict[str, int]] = {}
        keys = list(settings)
        t_all = time.perf_counter()
        for r in range(args.rounds):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                seconds, out, c = one_pass(pipe, frames, settings[k])
                times[k].append(seconds)
                outs.setdefault(k, out)
                counts.setdefault(k, c)
        wall = time.perf_counter() - t_all
        sigmas = pipe.keypoint_set.sigmas
    ref = outs[(1, 1)]
    rows = []
    for k in keys:
        fps = sorted(len(frames) / s for s in times[k])
        rows.append(
            {
                "det_every": k[0],
                "reroute_every": k[1],
                "fps_median": statistics.median(fps),
                "fps_min": fps[0],
                "fps_max": fps[-1],
                "mean_oks": pose_agreement(ref, outs[k], sigmas),
                **counts[k],
            }
        )
    print(
        f"{args.video.name}: {len(frames)} frames (ping-pong), {args.rounds} rounds interleaved, route {route}, "
        f"{cpu_model()}, whole run {wall:.0f} s\n"
    )
    print(
        "| detector | routing | frames/s (min-max) | detector calls | router crops (saved) | crops small / large "
        "| mean OKS vs every frame |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        det = "every frame" if row["det_every"] == 1 else f"every {row['det_every']}"
        rr = "every frame" if row["reroute_every"] == 1 else f"kept {row['reroute_every']} frames"
        print(
            f"| {det} | {rr} | {row['fps_median']:.2f} ({row['fps_min']:.2f}-{row['fps_max']:.2f}) | "
            f"{row['detector_calls']} | {row['router_crops']} ({row['router_saved']}) | {row['small']} / {row['large']} | "
            f"{row['mean_oks']:.3f} |"
        )
    if args.json is not None:
        meta = {"video": str(args.video), "frames": len(frames), "rounds": args.rounds, "route": route, "wall_s": wall}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
