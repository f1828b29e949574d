"""The README's DynPose figures from one command: TinyPose pair, a router trained without labels, calibrated by
measured cost, benchmarked with 95% intervals, and scored on the COCO sample.

    python benchmarks/dynpose_figures.py                    # everything, into .bench/dynpose (about 30-45 min, 2 cores)
    python benchmarks/dynpose_figures.py --skip-train       # re-calibrate, re-time and re-score the trained engine dir

Steps (each printed with its exact command or call):
1. engine dir: `register_onnx` TinyPose 128x96 (small) and 256x192 (large) with the example cards, `register_detector`
   PP-PicoDet-S 320 (the boxes of the label-free training);
2. `dynpose-train-router --unlabelled` on every shared image folder and the street video (no labels, no boxes files:
   the detector finds the persons), pooled router input, seeded; then `--evaluate`, its held-out report on the COCO
   sample's labelled persons (AP routed vs random choice vs oracle vs large-only, Spearman with the true OKS gain,
   on the ground-truth boxes and on the sample's detection boxes);
3. `dynpose-bench --store-costs` (each model's per-crop cost here, into the manifest), then
   `dynpose-train-router --calibrate --target-ap-drop D` on the COCO sample's detections (the cheapest policy by
   those costs, stored as the route; the cheapest of each policy family is timed too);
4. `dynpose-bench` on the COCO sample's real detection boxes: large-only, small-only, DynPose at fractions and the
   calibrated route, with 95% intervals (and the load warning if other processes used the CPU);
5. COCO-sample AP of the full Pipeline (detections -> routing -> rescoring -> OKS-NMS) per route.

Seeds: the augmentation, the router's initial weights and training (`--seed`), the benchmark's synthetic inputs and
bootstrap. The timings are this machine's: on a shared machine the intervals show how far to trust them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
COCO = DATA / "coco"
DETS = COCO / "test_coco_det_AP_H_56.json"
GT = COCO / "test_coco.json"
UNLABELLED = [DATA / "coco", DATA / "crowdpose", DATA / "exlpose", DATA / "mpii", DATA / "video" / "street.mp4"]


def run(cmd: list[str], log: Path) -> str:
    """Run a dynpose command, echo it and its output, keep the output in `log`."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout
    print(out, end="", flush=True)
    with log.open("a") as f:
        f.write(f"$ {shlex.join(cmd)}\n{out}{proc.stderr if proc.returncode else ''}\n")
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}")
    print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def build_engine_dir(eng: Path) -> None:
    from dynpose.export.api import register_detector, register_onnx
    from dynpose.models.card import ModelCard
    from dynpose.roles import Role

    cards = REPO / "examples" / "cards"
    for role, size in ((Role.SMALL, "128x96"), (Role.LARGE, "256x192")):
        card = ModelCard.from_json_file(cards / f"tinypose_{size}.json")
        register_onnx(SHARED / "models" / f"tinypose_{size}.onnx", card, eng, role=role, progress=False)
        print(f"register_onnx(tinypose_{size}.onnx, role={role.value!r})")
    register_detector(SHARED / "models" / "picodet_s_320_pedestrian.onnx", eng, progress=False)
    print("register_detector(picodet_s_320_pedestrian.onnx)")


def micro_batches(
    pipe: Any, images: dict[int, np.ndarray], dets: dict[int, np.ndarray], max_batch: int
) -> Iterator[list[Any]]:
    """The images' frames in order (`Pipeline.prepare`: their detections, or the detector's boxes where the file has
    none), cut into batches of at least `max_batch` boxes (the last one smaller), as the run loop batches an image
    folder."""
    pending: list[Any] = []
    boxes = 0
    for iid, img in images.items():
        frame = pipe.prepare(img, dets.get(iid))
        pending.append(frame)
        boxes += len(frame.boxes)
        if boxes >= max_batch:
            yield pending
            pending, boxes = [], 0
    if pending:
        yield pending


def pipeline_ap(eng: Path, routes: list[str]) -> list[dict]:
    """COCO AP of the full Pipeline over the sample's detections, per route (as dynpose-run --eval scores it)."""
    from dynpose import Pipeline
    from dynpose.data import image_id_map, load_coco, load_detections
    from dynpose.eval.coco import evaluate_results
    from dynpose.io.sources import decode_image
    from dynpose.roles import Role

    dets = load_detections(DETS)
    images = {iid: decode_image(p) for iid, p in image_id_map(COCO, load_coco(GT)).items()}
    rows = []
    for route in routes:
        with Pipeline.from_engine_dir(eng, route=route) as pipe:
            found = [p for batch in pipe.run_frames(micro_batches(pipe, images, dets, 64)) for p in batch]
            results = [p.to_coco(iid) for iid, persons in zip(images, found, strict=True) for p in persons]
            st = pipe.stats
        f = evaluate_results(results, GT)
        crops = st.crops[Role.SMALL] + st.crops[Role.LARGE]
        rows.append({"route": route, "AP": f["AP"], "AP50": f["AP50"], "large_share": st.crops[Role.LARGE] / max(1, crops)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / ".bench" / "dynpose")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--det-score", type=float, default=0.1)
    ap.add_argument("--ap-drop", type=float, default=0.02)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds of timing per batch size")
    ap.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="cores for the teacher pass and PyTorch training (1 is fastest on a busy box)",
    )
    ap.add_argument("--skip-train", action="store_true", help="reuse the trained engine dir in --work")
    args = ap.parse_args()

    eng = args.work / "engines"
    log = args.work / "figures.log"
    args.work.mkdir(parents=True, exist_ok=True)
    # only the training gets a thread cap: costs and timings are measured with every core, as a deployment runs
    threads = ["--threads", str(args.train_threads)] if args.train_threads else []
    if not args.skip_train:
        if eng.exists():
            import shutil

            shutil.rmtree(eng)
        log.write_text("")
        build_engine_dir(eng)
        cmd = [tool("dynpose-train-router"), "--engine-dir", str(eng)]
        for src in UNLABELLED:
            cmd += ["--unlabelled", str(src)]
        cmd += ["--det-score", str(args.det_score), "--copies", str(args.copies), "--router-input", "pooled"]
        cmd += ["--epochs", str(args.epochs), "--batch", "32", "--lr", str(args.lr), "--seed", str(args.seed)]
        cmd += ["--cache-dir", str(args.work / "cache")]  # the teacher pass survives a rebuilt engine dir
        cmd += ["--out", str(args.work / "router.pth"), "--quiet", *threads]
        run(cmd, log)
    report = [tool("dynpose-train-router"), "--evaluate", "--engine-dir", str(eng), "--eval-ann", str(GT)]
    report += ["--eval-images", str(COCO), "--eval-dets", str(DETS), "--eval-fractions", "0.25,0.5,0.75", "--quiet"]
    run(report, log)
    costs = [tool("dynpose-bench"), "--engine-dir", str(eng), "--store-costs", "--fractions", "", "--batch", "1,8"]
    costs += ["--repeats", "7", "--no-save"]  # per-crop costs of this machine into the manifest (what --calibrate reads)
    run(costs, log)
    cal = [tool("dynpose-train-router"), "--calibrate", "--engine-dir", str(eng), "--ann", str(GT), "--images", str(COCO)]
    cal += ["--detections", str(DETS), "--target-ap-drop", str(args.ap_drop), "--quiet"]
    run(cal, log)
    bench = [tool("dynpose-bench"), "--engine-dir", str(eng), "--images", str(COCO), "--detections", str(DETS)]
    notes = json.loads((eng / "manifest.json").read_text())["notes"]["router_calibration"]
    winners = [w["policy"] for w in notes.get("per_family", {}).values()]  # the cheapest of each family, timed too
    bench += ["--batch", "8", "--fractions", "0,0.3,1", "--policies", ",".join(["calibrated", *winners])]
    bench += ["--seed", str(args.seed), "--time-limit", str(args.time_limit), "--json", str(args.work / "bench.json")]
    bench += ["--plot", str(args.work / "bench.png")]
    run(bench, log)
    route = json.loads((eng / "manifest.json").read_text())["route"]
    print(f"\n$ python: Pipeline AP on the COCO sample ({DETS.name}) per route")
    rows = pipeline_ap(eng, list(dict.fromkeys(["all-large", "all-small", route, *winners])))
    print("| route | AP | AP50 | crops to large |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['route']} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['large_share']:.0%} |")
    (args.work / "pipeline_ap.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
