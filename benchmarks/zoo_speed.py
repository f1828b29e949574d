"""Every zoo model on ONNX Runtime CPU: parameters, counted GMACs, and fp32 crops/s, measured interleaved.

    python benchmarks/zoo_speed.py [--work benchmarks/out/zoo] [--batch 8] [--repeats 10] [--threads 0]
                                   [--only NAME ...] [--json FILE]

Each model is built with random weights (seed 0) and exported to fp32 ONNX once (opset 17, dynamic batch, the
export path's onnxslim pass; files reused on later runs): the heatmap models and the router through
`dynpose.export.onnx_export.export_torch`, SimDR with both of its outputs named here (the export API takes
single-output models until SimDR's pipeline integration). Parameters and GMACs (multiply-adds = counted FLOPs / 2)
come from `dynpose.models.flops.model_cost` at the card's input size, batch 1. Timing: one warm-up per session, then
for each repeat every model runs one batch of random crops in turn, so load changes on a shared machine hit all
models alike; crops/s is batch / median time, with the 25th-75th percentile range of the repeats.
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

from dynpose.export.onnx_export import check_onnx, export_torch, set_card, slim
from dynpose.export.verify import ort_session
from dynpose.models import create_model, get_card, list_models
from dynpose.models.flops import model_cost


def _export_two_outputs(model: torch.nn.Module, path: Path, name: str) -> None:
    import onnx

    card = get_card(name)
    tmp = path.with_suffix(".raw.onnx")
    dummy = torch.randn(2, 3, card.input_height, card.input_width)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(tmp),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["simdr_x", "simdr_y"],
            dynamic_axes={"input": {0: "batch"}, "simdr_x": {0: "batch"}, "simdr_y": {0: "batch"}},
        )
    proto = slim(onnx.load(str(tmp)))
    tmp.unlink()
    set_card(proto, card)
    check_onnx(proto, f"export of {name}")
    onnx.save(proto, str(path))


def _prepare(name: str, work: Path) -> tuple[Path, dict[str, Any]]:
    """The model's fp32 ONNX (exported on first use) and its counted cost."""
    torch.manual_seed(0)
    model = create_model(name)
    cost = model_cost(name, model)
    path = work / f"{name}.onnx"
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        if name.startswith("simdr"):
            _export_two_outputs(model, path, name)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_torch(model, path, get_card(name))
    return path, {"model": name, "params": cost.params, "gmacs": cost.gmacs, "input": list(cost.input_size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("benchmarks") / "out" / "zoo")
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
        sess = ort_session(path, args.threads)
        card = get_card(name)
        x = np.random.default_rng(0).standard_normal((args.batch, 3, card.input_height, card.input_width))
        feed = {sess.get_inputs()[0].name: x.astype(np.float32)}
        sess.run(None, feed)
        runs.append({"row": row, "sess": sess, "feed": feed, "times": []})
        print(f"{name}: ready in {time.perf_counter() - t0:.0f}s", flush=True)

    for _ in range(args.repeats):
        for r in runs:
            t = time.perf_counter()
            r["sess"].run(None, r["feed"])
            r["times"].append(time.perf_counter() - t)

    print(
        f"\nONNX Runtime CPU fp32 ({os.cpu_count()} cores visible, {args.threads or 'default'} threads), batch "
        f"{args.batch}, {args.repeats} interleaved repeats; crops/s = batch / median (p25-p75 of the repeats)\n"
    )
    print("| model | input (w x h) | parameters (M) | GMACs | crops/s | p25-p75 |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    out = []
    for r in runs:
        row, t = r["row"], np.asarray(r["times"])
        q25, q50, q75 = np.percentile(t, [25, 50, 75])
        row.update(crops_s=args.batch / q50, crops_s_p25_p75=[args.batch / q75, args.batch / q25])
        out.append(row)
        w, h = row["input"]
        print(
            f"| {row['model']} | {w} x {h} | {row['params'] / 1e6:.2f} | {row['gmacs']:.2f} | {row['crops_s']:.1f} | "
            f"{row['crops_s_p25_p75'][0]:.1f}-{row['crops_s_p25_p75'][1]:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
