"""COCO keypoint AP of the TinyPose pair on the COCO sample: large-only, small-only and DynPose at several routing
fractions, in FP32, FP16 and INT8, as one markdown table (printed; written into benchmarks/README.md when asked).

    python benchmarks/accuracy_table.py                      # all three precisions, printed
    python benchmarks/accuracy_table.py --write-readme       # and the committed table replaced

What runs: the real TinyPose models from ../shared/models (128x96 as the small model, 256x192 as the large one) are
registered into one engine dir per precision with `dynpose.export.api.register_onnx` (fp16: its fp16 conversion,
int8: its INT8 quantization, calibrated on the MPII / CrowdPose / ExLPose sample images and gated on the COCO
images), plus the DynPose router (random weights, seed 0: no trained router checkpoint is available here, so the
DynPose rows show what routing a given share of crops costs, not what a trained router saves). The annotated persons
of the COCO sample (>= 1 labelled keypoint) are cropped from their GT boxes, run as one plan per configuration
(`runtime.plan.make_plan`, policy all-large, all-small, fraction:F) on the local executor (`runtime.execute`: a
worker per model), scored as MMPose does (box score 1 x mean keypoint
score above 0.2) and evaluated with `dynpose.eval.coco.evaluate_results` (pycocotools). The sample has 4 images and
12 persons, so AP moves in coarse steps: this table checks that precision and routing behave, it is not a benchmark
of the models.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- accuracy-table:start -->", "<!-- accuracy-table:end -->"
CARDS = REPO / "examples" / "cards"


def tinypose_card(width: int, height: int) -> Any:
    """The shipped example card of a TinyPose fixture."""
    from dynpose.models.card import ModelCard

    return ModelCard.from_json_file(CARDS / f"tinypose_{height}x{width}.json")


def calib_spec(shared: Path) -> Any:
    from dynpose.export.calibration.crops import CalibSpec, Source

    data = shared / "data"
    sources = [
        Source("mpii", data / "mpii" / "test_mpii.json", data / "mpii"),
        Source("coco", data / "crowdpose" / "test_crowdpose.json", data / "crowdpose"),
        Source("coco", data / "exlpose" / "test_exlpose.json", data / "exlpose"),
    ]
    return CalibSpec(sources=sources, gate_ann=data / "coco" / "test_coco.json")


def build_engine_dir(engine_dir: Path, precision: str, shared: Path) -> None:
    """small + large TinyPose in `precision`, router fp32 with random weights (seed 0)."""
    import torch

    from dynpose.export.api import export_model, register_onnx
    from dynpose.roles import Role

    models = shared / "models"
    calib = calib_spec(shared) if precision == "int8" else None
    pair = ((Role.SMALL, "tinypose_128x96.onnx", (96, 128)), (Role.LARGE, "tinypose_256x192.onnx", (192, 256)))
    for role, name, (w, h) in pair:
        # The export's default accuracy gate (mean OKS >= 0.95 vs fp32 on the COCO persons) is on: the INT8
        # column shows what `dynpose-export --precision int8` actually ships (sensitive layers kept in fp32).
        register_onnx(
            models / name,
            tinypose_card(w, h),
            engine_dir,
            role=role,
            precision=precision,
            calib=calib,
            min_oks=0.95,
            progress=False,
        )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model("router", engine_dir, weights="random", progress=False)


def lowering_notes(engine_dir: Path, precision: str) -> list[str]:
    """What the export recorded about the fp16/int8 models (agreement with fp32 on held-out crops)."""
    from dynpose.engines.manifest import Manifest
    from dynpose.roles import POSE_ROLES

    out = []
    for e in Manifest.load(engine_dir, verify=False).entries:
        c = e.checks
        if e.role in POSE_ROLES and e.format == "onnx" and f"{precision}_oks" in c:
            extra = ""
            if precision == "int8":
                extra = f", {c.get('int8_quantized_layers', '?')} layers quantized, {c.get('int8_method', '?')} calibration"
            out.append(
                f"{precision.upper()} {e.role} ({e.model}): mean OKS vs FP32 {c[f'{precision}_oks']:.3f} on "
                f"held-out crops{extra}"
            )
    return out


def evaluate_engine_dir(engine_dir: Path, precision: str, fractions: list[float], shared: Path) -> dict[str, float]:
    """config name -> COCO AP on the sample's GT boxes."""
    from dynpose.data import gt_boxes, load_coco, resolve_image
    from dynpose.eval.coco import evaluate_results
    from dynpose.io.sources import decode_image
    from dynpose.roles import Role
    from dynpose.runtime.boxes import Boxes
    from dynpose.runtime.engine_set import EngineSet, LoadOptions
    from dynpose.runtime.execute import LocalExecutor, execute
    from dynpose.runtime.model import CropModel
    from dynpose.runtime.plan import FrameInput, make_plan
    from dynpose.runtime.policy import parse_policy
    from dynpose.runtime.postprocess import rescore

    gt = shared / "data" / "coco" / "test_coco.json"
    ds = load_coco(gt)
    persons = gt_boxes(ds, min_keypoints=1)
    ids = sorted({iid for iid, _, _ in persons})
    images = [decode_image(resolve_image(gt.parent, ds.images[i].file_name)) for i in ids]
    boxes = [np.asarray([b for iid, b, _ in persons if iid == i]) for i in ids]
    frames = [FrameInput(im, Boxes.of(b, im.shape)) for im, b in zip(images, boxes, strict=True)]
    policies = {"large only": "all-large", "small only": "all-small"}
    policies.update({f"DynPose {f:.0%} large": f"fraction:{f:g}" for f in fractions})
    out: dict[str, float] = {}
    with EngineSet.load(engine_dir, LoadOptions(backend="ort", device="cpu")) as engines:
        got = {e.precision for role, e in engines.entries.items() if role != Role.ROUTER}
        assert got == {precision}, f"{engine_dir} holds {got} pose models, expected {precision}"
        small, large = engines.pose_models
        models: dict[Role, CropModel] = {Role.SMALL: small, Role.LARGE: large}
        if engines.router is not None:
            models[Role.ROUTER] = engines.router
        cards = {r: m.card for r, m in models.items()}
        with LocalExecutor(models) as ex:
            for name, pol in policies.items():
                r = execute(make_plan(frames, parse_policy(pol), cards), ex)
                scores = rescore(r.keypoints, np.ones(len(r.keypoints)))
                frame_ids = np.asarray(ids)[r.frame_index]
                results = [
                    {
                        "image_id": int(frame_ids[i]),
                        "category_id": 1,
                        "score": float(scores[i]),
                        "keypoints": r.keypoints[i].astype(float).ravel().tolist(),
                    }
                    for i in range(len(scores))
                ]
                out[name] = evaluate_results(results, gt)["AP"]
    return out


def markdown(table: dict[str, dict[str, float | str]], precisions: list[str]) -> str:
    lines = [
        "| configuration | " + " | ".join(p.upper() for p in precisions) + " |",
        "| --- | " + " | ".join("---:" for _ in precisions) + " |",
    ]
    rows = next(iter(t for t in table.values() if isinstance(t, dict) and t), {})
    for name in rows:
        cells = []
        for p in precisions:
            v = table[p].get(name) if isinstance(table[p], dict) else None
            cells.append(f"{v:.3f}" if isinstance(v, float) else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(section: str, readme: Path = README) -> None:
    """Replace the section between the markers, or append it (the file may hold other helpers' sections)."""
    from dynpose.fileio import write_bytes_atomic

    text = readme.read_text() if readme.is_file() else "# Benchmarks\n"
    block = f"{START}\n{section}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_bytes_atomic(readme, text.encode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", default="fp32,fp16,int8")
    ap.add_argument("--fractions", default="0.25,0.5,0.75")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep the engine dirs here (default: a temp dir)")
    ap.add_argument(
        "--write-readme",
        action="store_true",
        help="replace the committed table in benchmarks/README.md (only when every precision was measured)",
    )
    args = ap.parse_args(argv)
    from dynpose.errors import DynPoseError

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    table: dict[str, dict[str, float | str]] = {}
    notes = []
    with tempfile.TemporaryDirectory(prefix="dynpose-acc-") as tmp:
        work = args.work_dir or Path(tmp)
        for p in precisions:
            d = work / p
            try:
                build_engine_dir(d, p, SHARED)
                table[p] = dict(evaluate_engine_dir(d, p, fractions, SHARED))
                notes += lowering_notes(d, p)
            except (DynPoseError, ImportError) as e:
                # e.g. no OpenVINO or calibration data here: keep the other columns, and the committed table
                table[p] = {}
                notes.append(f"{p.upper()}: not measured ({type(e).__name__}: {str(e).splitlines()[0]})")
            print(f"{p}: {table[p] or notes[-1]}", file=sys.stderr)
    md = markdown(table, precisions)
    section = "\n".join(
        [
            "## Accuracy: TinyPose pair on the COCO sample (`python benchmarks/accuracy_table.py --write-readme`)",
            "",
            "COCO keypoint AP (pycocotools) of the 12 annotated persons of the 4-image COCO sample, GT boxes, small =",
            "TinyPose 128x96, large = TinyPose 256x192, router with random weights (so DynPose rows route a share of",
            "crops, not the crops a trained router would pick). ORT CPU. INT8 is exported with the default accuracy",
            "gate (mean keypoint OKS >= 0.95 vs FP32 on these persons): the sensitivity search keeps the layers that",
            "break it in FP32 (the notes give each model's OKS vs FP32 and how many layers stayed FP32).",
            "",
            md,
            *([""] + [f"- {n}" for n in notes] if notes else []),
        ]
    )
    print(section)
    if args.write_readme and any(not table[p] for p in precisions):
        print(f"not written to {README}: a precision was not measured (see the notes)", file=sys.stderr)
    elif args.write_readme:
        write_readme(section)
        print(f"wrote {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
