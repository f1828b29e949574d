"""Concurrent vs serial small/large sub-batches: what the local executor's one-worker-per-model design buys on this
host.

    python benchmarks/dispatch_overlap.py                  # TinyPose pair on CPU, 48 crops, fraction:0.5
    python benchmarks/dispatch_overlap.py --crops 64 --route fraction:0.3 --repeats 7

Both ways run the same plan (`runtime.plan.make_plan`: the same crops, the same routing decision) on models built
alike (each pose model gets half the cores as the Pipeline gives them). "serial" walks the plan on the calling
thread, small then large; "executor" is `runtime.execute.execute` on a `LocalExecutor` (a worker per model, the two
at once). Each configuration is warmed up once, then they take turns; medians are printed with the measured overlap
of the two workers' spans.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dynpose.roles import Role
from dynpose.runtime.model import CropModel, PoseModel

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def overlap_s(spans: Sequence[tuple[Role, float, float, int]], a: Role, b: Role) -> float | None:
    """How long models `a` and `b` both ran (each one's first start to last end); None unless both ran."""
    ends = {}
    for role in (a, b):
        mine = [(s, e) for r, s, e, _ in spans if r == role]
        if not mine:
            return None
        ends[role] = (min(s for s, _ in mine), max(e for _, e in mine))
    return min(ends[a][1], ends[b][1]) - max(ends[a][0], ends[b][0])


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

    from dynpose.data import gt_boxes, load_coco
    from dynpose.io.sources import decode_image
    from dynpose.models.card import ModelCard
    from dynpose.runtime.backends.ort import OrtRunner
    from dynpose.runtime.boxes import Boxes
    from dynpose.runtime.execute import LocalExecutor, SerialExecutor, execute
    from dynpose.runtime.plan import FrameInput, make_plan
    from dynpose.runtime.policy import Signals, parse_policy

    models: dict[Role, CropModel] = {}
    for role, (w, h) in ((Role.SMALL, (96, 128)), (Role.LARGE, (192, 256))):
        card = ModelCard.from_json_file(REPO / "examples" / "cards" / f"tinypose_{h}x{w}.json")
        runner = OrtRunner(
            SHARED / "models" / f"tinypose_{h}x{w}.onnx", intra_op_threads=max(1, args.threads // 2), name=role.value
        )
        models[role] = PoseModel(runner.activate(), card)
    cards = {r: m.card for r, m in models.items()}
    coco = SHARED / "data" / "coco"
    ds = load_coco(coco / "test_coco.json")
    iid, _, _ = gt_boxes(ds)[0]
    boxes = np.asarray([b for i, b, _ in gt_boxes(ds) if i == iid])
    boxes = np.concatenate([boxes] * (args.crops // len(boxes) + 1))[: args.crops]
    boxes[:, 2:] *= 1 + 1e-3 * np.arange(len(boxes))[:, None]  # distinct areas, so box:AREA can cut at any share
    image = decode_image(ds.image_path(coco, iid))
    frame = FrameInput(image, Boxes.of(boxes, image.shape))
    # Route by position so no router is needed: the first share F of the crops go large.
    frac = float(args.route.split(":")[1]) if args.route.startswith("fraction:") else None
    areas = frame.boxes.areas
    if frac is not None:
        k = round(frac * len(areas))
        cut = np.sort(areas)[::-1][k - 1] if k else np.inf
        route = f"box:{cut}"
    else:
        route = args.route
    policy = parse_policy(route)
    large = policy.decide(Signals(areas)).large
    executor = LocalExecutor(models)
    serial_ex = SerialExecutor(models)

    def serial() -> float:
        t0 = time.perf_counter()
        execute(make_plan([frame], policy, cards), serial_ex)
        return time.perf_counter() - t0

    overlaps: list[float] = []

    def concurrent() -> float:
        t0 = time.perf_counter()
        res = execute(make_plan([frame], policy, cards), executor)
        dt = time.perf_counter() - t0
        both = overlap_s(res.spans, Role.SMALL, Role.LARGE)
        if both is not None:
            overlaps.append(both)
        return dt

    serial(), concurrent()
    times: dict[str, list[float]] = {"serial": [], "executor": []}
    for _ in range(args.repeats):
        times["serial"].append(serial())
        times["executor"].append(concurrent())
    print(
        f"{args.crops} crops ({int((~large).sum())} small 128x96, {int(large.sum())} large 256x192), "
        f"{args.threads} threads ({max(1, args.threads // 2)} per model), {args.repeats} rounds"
    )
    for name, ts in times.items():
        print(f"  {name:10s} median {1e3 * statistics.median(ts):7.1f} ms   min {1e3 * min(ts):7.1f} ms")
    if overlaps:
        print(f"  worker overlap (median) {1e3 * statistics.median(overlaps):.1f} ms")
    executor.close()
    for m in models.values():
        m.deactivate()


if __name__ == "__main__":
    main()
