"""Every zoo model on ONNX Runtime CPU: parameters, counted GMACs, and fp32 crops/s, measured interleaved.

    python benchmarks/zoo_speed.py [--work benchmarks/out/zoo] [--batch 8] [--repeats 10] [--threads 0]
                                   [--only NAME ...] [--json FILE]

Each model is built with random weights (seed 0) and exported to fp32 ONNX once through the export API's step
(`dynpose.export.steps.to_onnx`: opset 17, dynamic batch, onnxslim, every output, SimDR's two included), which
checks ONNX Runtime against PyTorch at batch 1 and 5 on random and real COCO crops; a failed check stops the
script, and the figures are kept beside the file (`<name>.check.json`) and in the table. This is the export proof of
the heavy models (hourglass, DPN) that the test suite leaves out for time. Parameters and GMACs (multiply-adds =
counted FLOPs / 2) come from `dynpose.models.flops.model_cost` at the card's input size, batch 1. Timing: one
warm-up per session, then for each repeat every model runs one batch of random crops in turn, so load changes on a
shared machine hit all models alike; crops/s is batch / median time, with the 25th-75th percentile range of the
repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynpose.export.steps import to_onnx
from dynpose.export.verify import gate_crops
from dynpose.models import create_model, get_card, list_models
from dynpose.models.flops import model_cost
from dynpose.onnx_utils import open_session


def _prepare(name: str, work: Path) -> tuple[Path, dict[str, Any]]:
    """The model's checked fp32 ONNX (exported on first use) and its counted cost."""
    torch.manual_seed(0)
    model = create_model(name)
    cost = model_cost(name, model)
    path, check_file = work / f"{name}.onnx", work / f"{name}.check.json"
    if not (path.is_file() and check_file.is_file()):
        work.mkdir(parents=True, exist_ok=True)
        card = get_card(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, check = to_onnx(model, path, card, gate_crops(card, None)[0])
        check.require()  # the export proof: a graph that does not reproduce the model stops here
        check_file.write_text(json.dumps(check.figures, indent=2))
    figures = json.loads(check_file.read_text())
    row = {"model": name, "params": cost.params, "gmacs": cost.gmacs, "input": list(cost.input_size)}
    row["fp32_rel_l2"] = figures.get("fp32_rel_l2")
    return path, row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out" / "zoo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's choice)")
    ap.add_argument("--only", nargs="*", default=list_models())
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.threads or (os.cpu_count() or 1)))

    runs = []
    for name in args.only:
        t0 = time.perf_counter()
        path, row = _prepare(name, args.work)
        sess = open_session(path, threads=args.threads)
        card = get_card(name)
        x = np.random.default_rng(0).standard_normal((args.batch, 3, card.input_height, card.input_width))
        feed = {sess.get_inputs()[0].name: x.astype(np.float32)}
        sess.run(None, feed)
        runs.append({"row": row, "sess": sess, "feed": feed, "times": []})
        print(f"{name}: ready in {time.perf_counter() - t0:.0f}s", flush=True)

    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for r in runs:
            start = time.perf_counter()
            r["sess"].run(None, r["feed"])
            r["times"].append(time.perf_counter() - start)
    load_after = os.getloadavg()

    print(
        f"\nONNX Runtime CPU fp32 ({os.cpu_count()} cores visible, {args.threads or 'default'} threads), batch "
        f"{args.batch}, {args.repeats} interleaved repeats; crops/s = batch / median (p25-p75 of the repeats); "
        f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after the timing\n"
    )
    print("| model | input (w x h) | parameters (M) | GMACs | crops/s | p25-p75 | ONNX vs PyTorch rel. L2 |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    out = []
    for r in runs:
        row, t = r["row"], np.asarray(r["times"])
        q25, q50, q75 = np.percentile(t, [25, 50, 75])
        row.update(crops_s=args.batch / q50, crops_s_p25_p75=[args.batch / q75, args.batch / q25])
        out.append(row)
        w, h = row["input"]
        print(
            f"| {row['model']} | {w} x {h} | {row['params'] / 1e6:.2f} | {row['gmacs']:.2f} | {row['crops_s']:.1f} | "
            f"{row['crops_s_p25_p75'][0]:.1f}-{row['crops_s_p25_p75'][1]:.1f} | {row['fp32_rel_l2']:.1e} |"
        )
    if args.json:
        meta = {"load_before": list(load_before), "load_after": list(load_after), "batch": args.batch}
        args.json.write_text(json.dumps({**meta, "repeats": args.repeats, "models": out}, indent=2))


if __name__ == "__main__":
    main()
