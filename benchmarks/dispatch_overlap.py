"""Concurrent vs serial small/large sub-batches: what the Dispatcher's one-worker-per-model design buys on this host.

    python benchmarks/dispatch_overlap.py                  # TinyPose pair on CPU, 48 crops, fraction:0.5
    python benchmarks/dispatch_overlap.py --crops 64 --route fraction:0.3 --repeats 7

Both ways use the same crops, the same routing decision and runners built alike (each pose model gets half the
cores as the Pipeline gives them). "serial" runs small then large on the calling thread; "dispatcher" is
`Dispatcher.run` (the two workers at once). Each configuration is warmed up once, then they take turns; medians
are printed with the measured overlap of the two workers' spans.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crops", type=int, default=48)
    ap.add_argument(
        "--route",
        default="fraction:0.5",
        help="all-small/all-large/box:AREA/fraction:F (router-free "
        "fraction: the routing is fixed up front so both ways run the same sub-batches)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import cv2
    from dynpose.runtime.dispatcher import Dispatcher

    from dynpose.data import gt_boxes, load_coco
    from dynpose.models.card import ModelCard
    from dynpose.runtime.backends.ort import OrtRunner
    from dynpose.runtime.model import PoseModel

    cards, runners = {}, {}
    for role, (w, h) in (("small", (96, 128)), ("large", (192, 256))):
        cards[role] = ModelCard.from_json_file(REPO / "examples" / "cards" / f"tinypose_{h}x{w}.json")
        runner = OrtRunner(
            SHARED / "models" / f"tinypose_{h}x{w}.onnx", intra_op_threads=max(1, args.threads // 2), name=role
        )
        runners[role] = PoseModel(runner.activate(), cards[role])
    coco = SHARED / "data" / "coco"
    ds = load_coco(coco / "test_coco.json")
    iid, _, _ = gt_boxes(ds)[0]
    boxes = np.asarray([b for i, b, _ in gt_boxes(ds) if i == iid])
    boxes = np.concatenate([boxes] * (args.crops // len(boxes) + 1))[: args.crops]
    boxes[:, 2:] *= 1 + 1e-3 * np.arange(len(boxes))[:, None]  # distinct areas, so box:AREA can cut at any share
    image = cv2.imread(str(ds.image_path(coco, iid)))
    # Route by position so no router is needed: the first share F of the crops go large.
    frac = float(args.route.split(":")[1]) if args.route.startswith("fraction:") else None
    areas = boxes[:, 2] * boxes[:, 3]
    if frac is not None:
        k = round(frac * len(boxes))
        cut = np.sort(areas)[::-1][k - 1] if k else np.inf
        route = f"box:{cut}"
    else:
        route = args.route
    disp = Dispatcher(runners["small"], runners["large"], policy=route)
    large = disp.policy.decide(None, boxes).large

    def serial() -> float:
        t0 = time.perf_counter()
        for m, idx in (("small", np.flatnonzero(~large)), ("large", np.flatnonzero(large))):
            if idx.size:
                runners[m](image, boxes[idx])
        return time.perf_counter() - t0

    overlaps: list[float] = []

    def concurrent() -> float:
        t0 = time.perf_counter()
        res = disp.run([image], [boxes])
        dt = time.perf_counter() - t0
        sp = {s.model: s for s in res.spans}
        if "small" in sp and "large" in sp:
            overlaps.append(min(sp["small"].end, sp["large"].end) - max(sp["small"].start, sp["large"].start))
        return dt

    serial(), concurrent()
    times: dict[str, list[float]] = {"serial": [], "dispatcher": []}
    for _ in range(args.repeats):
        times["serial"].append(serial())
        times["dispatcher"].append(concurrent())
    print(
        f"{args.crops} crops ({int((~large).sum())} small 128x96, {int(large.sum())} large 256x192), "
        f"{args.threads} threads ({max(1, args.threads // 2)} per model), {args.repeats} rounds"
    )
    for name, ts in times.items():
        print(f"  {name:10s} median {1e3 * statistics.median(ts):7.1f} ms   min {1e3 * min(ts):7.1f} ms")
    if overlaps:
        print(f"  worker overlap (median) {1e3 * statistics.median(overlaps):.1f} ms")
    disp.close()
    for r in runners.values():
        r.close()


if __name__ == "__main__":
    main()
