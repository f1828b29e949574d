"""COCO keypoint AP of the full Pipeline (detections file -> routing -> rescoring -> OKS-NMS) per routing policy.

    python benchmarks/route_ap.py                         # TinyPose engine dir built in a temp dir
    python benchmarks/route_ap.py --engine-dir engines/ --policies all-large fraction:0.5 band:0.59,0.69 --flip

Runs `dynpose.Pipeline` over the COCO sample (../shared/data/coco: 4 images, the person detections
`test_coco_det_AP_H_56.json`, GT `test_coco.json`; `Pipeline.run_frames`, frames batched up to 64 boxes) once per
policy and prints AP / AP50 / AR from pycocotools, the crops each model got and the wall time. Without --engine-dir
it registers the real TinyPose models (128x96 small, 256x192 large) and the DynPose router with random weights
(seed 0; no trained router checkpoint is available here, so `fraction:F` shows what sending only a share F of crops
to the large model costs, not what a trained router saves).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def build_tinypose_engine_dir(engine_dir: Path) -> Path:
    import torch

    from dynpose.export.api import export_model, register_onnx
    from dynpose.models.card import ModelCard
    from dynpose.roles import Role

    for role, (w, h) in ((Role.SMALL, (96, 128)), (Role.LARGE, (192, 256))):
        card = ModelCard(
            name=f"tinypose_{h}x{w}",
            input_width=w,
            input_height=h,
            color_order="rgb",
            mean=(123.675, 116.28, 103.53),
            std=(58.395, 57.12, 57.375),
            keypoints="coco17",
            decoder="msra",
        )
        register_onnx(SHARED / "models" / f"tinypose_{h}x{w}.onnx", card, engine_dir, role=role, progress=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model("router", engine_dir, weights="random", progress=False)
    return engine_dir


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "coco")
    ap.add_argument("--policies", nargs="+", default=["all-large", "fraction:0.5", "all-small"])
    ap.add_argument("--flip", action="store_true")
    args = ap.parse_args()

    from dynpose import Pipeline
    from dynpose.data import image_id_map, load_coco, load_detections
    from dynpose.eval.coco import evaluate_results
    from dynpose.io.sources import decode_image
    from dynpose.roles import Role

    gt = args.data / "test_coco.json"
    dets = load_detections(args.data / "test_coco_det_AP_H_56.json")
    images = {iid: decode_image(p) for iid, p in image_id_map(args.data, load_coco(gt)).items()}
    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = args.engine_dir or build_tinypose_engine_dir(Path(tmp))
        print("| policy | flip | AP | AP50 | AR | crops small / large | persons | wall s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for policy in args.policies:
            with Pipeline.from_engine_dir(engine_dir, route=policy, flip=args.flip) as pipe:
                t0 = time.perf_counter()
                found = [p for batch in pipe.run_frames(micro_batches(pipe, images, dets, 64)) for p in batch]
                results = [p.to_coco(iid) for iid, persons in zip(images, found, strict=True) for p in persons]
                wall = time.perf_counter() - t0
                st = pipe.stats
            f = evaluate_results(results, gt)
            print(
                f"| {policy} | {'yes' if args.flip else 'no'} | {f['AP']:.3f} | {f['AP50']:.3f} | {f['AR']:.3f} | "
                f"{st.crops[Role.SMALL]} / {st.crops[Role.LARGE]} | {st.persons} | {wall:.2f} |"
            )


if __name__ == "__main__":
    main()
