"""INT8 (Q/DQ) vs FP32 crops/s on ONNX Runtime CPU for TinyPose-256, ResNet-50 and HRNet-W32, measured interleaved.

    python benchmarks/int8_speed.py --data ../shared/data [--work benchmarks/out/int8] [--batch 8] [--repeats 10]

Each model is exported with dynpose's own export path (fp32 + INT8 into one engine dir per model, reused on later
runs): TinyPose-256 is the real model with the OKS gate (>= 0.95 on the 12 COCO persons held out of calibration),
ResNet-50 and HRNet-W32 carry random weights (`--min-oks 0`: with no trained weights every layer stays INT8, so the
figure is the best case the backend offers). Timing: one warm-up per session, then for each repeat every model's
fp32 and int8 session run one batch of real crops back to back, so load changes on a shared machine hit both
precisions alike; crops/s is batch / median time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from dynpose.engines.manifest import Manifest
from dynpose.export.api import export_model, register_onnx
from dynpose.export.calibration.crops import CalibSpec, coco_person_crops
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import open_session
from dynpose.roles import Role

TINYPOSE_CARD = {
    "name": "tinypose_256x192",
    "input_width": 192,
    "input_height": 256,
    "color_order": "rgb",
    "mean": [123.675, 116.28, 103.53],
    "std": [58.395, 57.12, 57.375],
    "keypoints": "coco17",
    "decoder": "msra",
}


def _engine(work: Path, name: str, data: Path, models: Path) -> Path:
    """fp32 and int8 ONNX of one model in `work/name`, exported once."""
    eng = work / name
    spec = CalibSpec.from_root(data, gate_ann=data / "coco" / "test_coco.json")
    if not (eng / "fp32" / "manifest.json").is_file():
        if name == "tinypose_256":
            register_onnx(
                models / "tinypose_256x192.onnx",
                ModelCard.from_dict(dict(TINYPOSE_CARD)),
                eng / "fp32",
                role=Role.SMALL,
                progress=False,
            )
        else:
            export_model(name, eng / "fp32", weights="random", progress=False)
    if not (eng / "int8" / "manifest.json").is_file():
        if name == "tinypose_256":
            register_onnx(
                models / "tinypose_256x192.onnx",
                ModelCard.from_dict(dict(TINYPOSE_CARD)),
                eng / "int8",
                role=Role.SMALL,
                precision="int8",
                calib=spec,
                min_oks=0.95,
            )
        else:
            export_model(name, eng / "int8", weights="random", precision="int8", calib=spec, min_oks=0.0)
    return eng


def _onnx_entry(d: Path):
    m = Manifest.load(d)
    (e,) = [e for e in m.entries if e.format == "onnx"]
    return d / e.file, e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--models", type=Path, default=None, help="folder with tinypose_256x192.onnx (default: data/../models)")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out" / "int8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's choice)")
    ap.add_argument("--only", nargs="*", default=["tinypose_256", "resnet_50", "hrnet_w32"])
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    models = args.models or args.data.parent / "models"

    runs = []
    for name in args.only:
        t0 = time.perf_counter()
        eng = _engine(args.work, name, args.data, models)
        f32, _ = _onnx_entry(eng / "fp32")
        i8, e8 = _onnx_entry(eng / "int8")
        crops = coco_person_crops(args.data / "coco", e8.card)
        if crops is None:
            raise SystemExit(f"int8_speed: no annotated COCO persons under {args.data / 'coco'} to time on")
        x = np.ascontiguousarray(crops.x[np.arange(args.batch) % len(crops.x)], np.float32)
        sa, sb = open_session(f32, threads=args.threads), open_session(i8, threads=args.threads)
        feed = {sa.get_inputs()[0].name: x}
        sa.run(None, feed)
        sb.run(None, feed)
        runs.append({"name": name, "fp32": sa, "int8": sb, "feed": feed, "ta": [], "tb": [], "entry": e8})
        print(
            f"{name}: engines ready in {time.perf_counter() - t0:.0f}s ({i8.name}: "
            f"{len(e8.checks.get('int8_fp32_layers', []))} layers kept fp32)",
            flush=True,
        )

    for _ in range(args.repeats):
        for r in runs:
            for sess, acc in ((r["fp32"], r["ta"]), (r["int8"], r["tb"])):
                t = time.perf_counter()
                sess.run(None, r["feed"])
                acc.append(time.perf_counter() - t)

    print(
        f"\nONNX Runtime CPU ({os.cpu_count()} cores visible), batch {args.batch}, {args.repeats} interleaved repeats, "
        "median"
    )
    print(f"{'model':<14}{'fp32 crops/s':>14}{'int8 crops/s':>14}{'speed-up':>10}{'int8 OKS vs fp32':>18}")
    out = []
    for r in runs:
        a, b = float(np.median(r["ta"])), float(np.median(r["tb"]))
        oks = r["entry"].checks.get("int8_oks")
        row = {
            "model": r["name"],
            "fp32_crops_s": args.batch / a,
            "int8_crops_s": args.batch / b,
            "speedup": a / b,
            "int8_oks": oks,
            "min_oks": r["entry"].checks.get("int8_min_oks"),
        }
        out.append(row)
        gate = f"{oks:.3f}" + (" (gate off)" if row["min_oks"] == 0 else "")
        print(f"{r['name']:<14}{row['fp32_crops_s']:>14.1f}{row['int8_crops_s']:>14.1f}{row['speedup']:>9.2f}x{gate:>18}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
