"""RTMPose and ViTPose on this CPU: per model parameters and GMACs against the published figures, crops/s at batch 1
and 8 on ONNX Runtime CPU in fp32 and INT8, and DynPose pairs at routing fraction 0.3 against their large model
alone, all timings in ONE interleaved run.

    python benchmarks/zoo_families.py [--work benchmarks/out/families] [--models rtmpose_t,...] [--pairs S/L,...]
                                      [--batches 1,8] [--pair-batch 20] [--fraction 0.3] [--repeats 20]
                                      [--warmup 1] [--no-int8] [--json FILE] [--report FILE]

Models (default: RTMPose-t/s/m/l at 256x192, RTMPose-m/l at 384x288, ViTPose-S/B; ViTPose-L/H only when named,
their fp32 files are 1.2 / 2.5 GB) are exported with random weights (seed 0) by the public export API, fp32 and INT8
(`min_oks=0`: random weights make the OKS gate meaningless, so every layer stays INT8; calibrated on ../shared/data
with the COCO test images held out), into `--work` (reused on later runs). Parameters and GMACs are counted on the
meta device (`dynpose.models.flops.count_flops`: multiply-adds of convolutions and matrix products) and set beside
MMPose's RTMPose table and the ViTPose paper.

Pairs (default RTMPose-s/RTMPose-l, RTMPose-t/HRNet-W32, RTMPose-s/ViTPose-B, LPN-50/HRNet-W32) are engine dirs of
`export_all(models={Role.SMALL: S, Role.LARGE: L})` with the random-weight router. A pair runs as the runtime runs
it (`EngineSet.load`: router on every core, small and large on half each, concurrently; one plan of `--pair-batch`
person boxes on one frame run on the local executor, `make_plan` + `execute` on a `LocalExecutor`, `fraction:F`: the
round(F x batch) highest-scored crops to the large model); the baseline is the large model alone on every core
(`EngineSet.solo_model`, no router).

Timing is `dynpose.bench.timing.timed_rounds` with a fixed number of rounds: every configuration once per round, the
order rotated each round, so load changes hit all alike. crops/s = crops / median time with the p25-p75 of the
rounds; every speed ratio (INT8 vs fp32 of the same model and batch; a pair vs its large model alone) is the median
of the per-round ratios with its 95% bootstrap interval (`dynpose.bench.stats.paired_ratio_ci`). The 1-minute load
average before and after is printed and stored. Figures are written only to `--json` when given; `--report FILE`
re-prints a saved run from its samples.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynpose.bench.crops import Config
from dynpose.bench.stats import paired_ratio_ci
from dynpose.bench.timing import RoundSpec, boxes_for_batch, machine_info, parse_batches, synthetic_frame, timed_rounds
from dynpose.bench.timing import versions as tool_versions
from dynpose.engines.manifest import Manifest
from dynpose.export.api import export_all, export_model
from dynpose.export.calibration.crops import CalibSpec
from dynpose.models import create_model, get_card
from dynpose.models.flops import count_flops
from dynpose.onnx_utils import open_session
from dynpose.roles import Role
from dynpose.runtime.engine_set import EngineSet
from dynpose.runtime.model import CropModel, PoseModel
from dynpose.runtime.policy import AllLarge, Fraction

REPO = Path(__file__).resolve().parents[1]
MODELS = ["rtmpose_t", "rtmpose_s", "rtmpose_m", "rtmpose_l", "rtmpose_m_384x288", "rtmpose_l_384x288"]
MODELS += ["vitpose_s", "vitpose_b"]
PAIRS = ["rtmpose_s/rtmpose_l", "rtmpose_t/hrnet_w32", "rtmpose_s/vitpose_b", "lpn_50/hrnet_w32"]
# (M parameters, GFLOPs) as published: MMPose's RTMPose README (projects/rtmpose, COCO table); the ViTPose papers'
# rounded parameter counts (about the backbone alone; ViTPose-S from ViTPose++) and ViTPose-B's 17.1 GFLOPs.
PUBLISHED = {
    "rtmpose_t": (3.34, 0.36),
    "rtmpose_s": (5.47, 0.68),
    "rtmpose_m": (13.59, 1.93),
    "rtmpose_l": (27.66, 4.16),
    "rtmpose_m_384x288": (13.72, 4.33),
    "rtmpose_l_384x288": (27.79, 9.35),
    "vitpose_s": (24.0, None),
    "vitpose_b": (86.0, 17.1),
    "vitpose_l": (307.0, None),
    "vitpose_h": (632.0, None),
}
PAIR_GOAL = 2.5  # the goal: a pair at >= 2.5x its large model alone in fp32


def cost(name: str) -> dict[str, Any]:
    """Counted parameters and GMACs at the card's input size (meta device: no memory, no compute)."""
    with torch.device("meta"):
        m = create_model(name)
    card = get_card(name)
    params = sum(p.numel() for p in m.parameters())
    pub_params, pub_gflops = PUBLISHED.get(name, (None, None))
    return {
        "model": name,
        "input": list(card.input_size),
        "params_m": params / 1e6,
        "gmacs": count_flops(m, card.input_size) / 2e9,
        "published_params_m": pub_params,
        "published_gflops": pub_gflops,
    }


def calib_spec(shared: Path) -> CalibSpec:
    return CalibSpec.from_root(shared / "data", gate_ann=shared / "data" / "coco" / "test_coco.json", jitter=1, max_crops=64)


def _complete(eng: Path, roles: dict[str, str], precision: str) -> bool:
    try:
        man = Manifest.load(eng)
    except Exception:  # noqa: BLE001 - no dir yet, or a half-made one: export it (again)
        return False
    entries = {r: man.get(r, "onnx") for r in roles}
    return all(e is not None and e.model == roles[r] and e.precision == precision for r, e in entries.items())


def model_file(work: Path, name: str, precision: str, shared: Path) -> Path:
    """The model's ONNX at `precision` (exported by the export API on first use, reused after)."""
    eng = work / "models" / f"{name}.{precision}"
    if not _complete(eng, {Role.SMALL: name}, precision):
        t0 = time.perf_counter()
        calib = calib_spec(shared) if precision == "int8" else None
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_model(name, eng, role=Role.SMALL, precision=precision, calib=calib, min_oks=0.0, progress=False)
        print(f"exported {name} {precision} in {time.perf_counter() - t0:.0f}s", flush=True)
    entry = Manifest.load(eng).get(Role.SMALL, "onnx")
    assert entry is not None
    return eng / entry.file


def pair_dir(work: Path, pair: str, precision: str, shared: Path) -> Path:
    small, large = pair.split("/")
    eng = work / "pairs" / f"{small}+{large}.{precision}"
    if not _complete(eng, {Role.SMALL: small, Role.LARGE: large}, precision):
        t0 = time.perf_counter()
        calib = calib_spec(shared) if precision == "int8" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_all(
                eng,
                models={Role.SMALL: small, Role.LARGE: large},
                precision=precision,
                calib=calib,
                min_oks=0.0,
                progress=False,
            )
        print(f"exported {eng.name} in {time.perf_counter() - t0:.0f}s", flush=True)
    return eng


class Configs:
    """The timed calls (name -> one call), what each one is, and what to close afterwards."""

    def __init__(self) -> None:
        self.calls: dict[str, Callable[[], Any]] = {}
        self.meta: dict[str, dict[str, Any]] = {}
        self.closing: list[Any] = []

    def close(self) -> None:
        for c in reversed(self.closing):
            c.close() if hasattr(c, "close") else c.deactivate()


def add_models(cfg: Configs, files: dict[tuple[str, str], Path], batches: list[int]) -> None:
    """One ORT session per file (every core), one call per batch size: a batch of random crops."""
    for (name, precision), path in files.items():
        sess = open_session(path)
        card = get_card(name)
        for b in batches:
            x = np.random.default_rng(b).standard_normal((b, 3, card.input_height, card.input_width)).astype(np.float32)
            feed = {sess.get_inputs()[0].name: x}
            cfg.calls[f"{name} {precision} b{b}"] = partial(sess.run, None, feed)
            cfg.meta[f"{name} {precision} b{b}"] = {"kind": "model", "model": name, "precision": precision, "batch": b}


def add_pairs(cfg: Configs, dirs: dict[tuple[str, str], Path], batch: int, fraction: float) -> None:
    """Each pair at `fraction` as the runtime runs it, and each large model alone on every core (once per large
    model and precision)."""
    frame = synthetic_frame()
    boxes = boxes_for_batch(batch, frame.shape[:2], seed=batch)
    for (pair, precision), eng in dirs.items():
        es = EngineSet.load(eng)
        cfg.closing.append(es)
        small, large = es.pose_models
        alone_name = f"{pair.split('/')[1]} alone {precision}"
        if alone_name not in cfg.calls:
            solo = es.solo_model(Role.LARGE)
            if solo is not large:
                cfg.closing.append(solo)
            assert isinstance(solo, PoseModel)
            alone = Config(AllLarge(), {Role.SMALL: solo, Role.LARGE: solo})
            cfg.closing.append(alone)
            cfg.calls[alone_name] = partial(alone.run, [([frame], [boxes])])
            cfg.meta[alone_name] = {"kind": "alone", "model": pair.split("/")[1], "precision": precision, "batch": batch}
            if precision != "fp32":
                cfg.meta[alone_name]["baseline"] = f"{pair.split('/')[1]} alone fp32"
        models: dict[Role, CropModel] = {Role.SMALL: small, Role.LARGE: large, Role.ROUTER: es.require(Role.ROUTER)}
        routed = Config(Fraction(fraction), models)
        cfg.closing.append(routed)
        name = f"{pair} {precision} @{fraction:g}"
        cfg.calls[name] = partial(routed.run, [([frame], [boxes])])
        # the goal compares every pair with its large model alone in fp32 (the fp32 alone is added first)
        baseline = f"{pair.split('/')[1]} alone fp32"
        cfg.meta[name] = {"kind": "pair", "pair": pair, "precision": precision, "batch": batch, "baseline": baseline}


def rows(samples: dict[str, list[float]], meta: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """crops/s (median, p25-p75) per configuration; INT8 against fp32 of the same model and batch, a pair against
    its large model alone (median of per-round ratios, 95% bootstrap interval)."""
    out = []
    for name, s in samples.items():
        m = meta[name]
        q25, q50, q75 = np.percentile(np.asarray(s), [25, 50, 75])
        row = {
            "config": name,
            **m,
            "crops_per_s": m["batch"] / q50,
            "crops_per_s_p25_p75": [m["batch"] / q75, m["batch"] / q25],
        }
        ref = m.get("baseline")
        if m["kind"] == "model" and m["precision"] == "int8":
            ref = f"{m['model']} fp32 b{m['batch']}"
        if ref in samples:
            ci = paired_ratio_ci(samples[ref], s)
            row["ratio_vs"], row["ratio"], row["ci95"] = ref, ci.ratio, [ci.lo, ci.hi]
        out.append({**row, "samples_s": [float(x) for x in s]})
    return out


def print_tables(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(
        f"\n{m['cpu']}, {m['cores_usable']} cores; ONNX Runtime CPU; {result['repeats']} interleaved rounds; load "
        f"average (1 min) {result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after\n"
    )
    print("| model | input (w x h) | parameters (M) | published (M) | GMACs | published GFLOPs |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for c in result["costs"]:
        pub = [f"{v:g}" if v is not None else "-" for v in (c["published_params_m"], c["published_gflops"])]
        size = f"{c['input'][0]} x {c['input'][1]}"
        print(f"| {c['model']} | {size} | {c['params_m']:.2f} | {pub[0]} | {c['gmacs']:.2f} | {pub[1]} |")
    print("\n| configuration | crops/s | p25-p75 | speed ratio (95% CI) | against |")
    print("| --- | ---: | --- | ---: | --- |")
    for r in result["rows"]:
        p25, p75 = r["crops_per_s_p25_p75"]
        ratio = f"{r['ratio']:.2f}x ({r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})" if "ratio" in r else ""
        goal = " (goal met)" if r["kind"] == "pair" and r.get("ci95") and r["ci95"][0] >= PAIR_GOAL else ""
        print(f"| {r['config']} | {r['crops_per_s']:.2f} | {p25:.2f}-{p75:.2f} | {ratio}{goal} | {r.get('ratio_vs', '')} |")


def report(path: Path) -> None:
    """Re-print a saved run's tables from its samples: the intervals again, nothing re-measured."""
    result = json.loads(path.read_text())
    samples = {r["config"]: r["samples_s"] for r in result["rows"]}
    drop = ("config", "crops_per_s", "crops_per_s_p25_p75", "samples_s", "ratio_vs", "ratio", "ci95")
    meta = {r["config"]: {k: v for k, v in r.items() if k not in drop} for r in result["rows"]}
    result["rows"] = rows(samples, meta)
    print_tables(result)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "families")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names ('' for none)")
    ap.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated SMALL/LARGE ('' for none)")
    ap.add_argument("--batches", type=parse_batches, default=parse_batches("1,8"))
    ap.add_argument("--pair-batch", type=int, default=20, help="person boxes per pair call")
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=20, help="interleaved rounds (fixed)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-int8", action="store_true", help="fp32 only")
    ap.add_argument(
        "--pair-precisions",
        default="fp32",
        help="comma-separated precisions of the pair dirs (fp32, int8); each pair "
        "and large model alone is compared with the large model alone in fp32",
    )
    ap.add_argument("--json", type=Path, help="write the figures (with every round's samples) here")
    ap.add_argument("--report", type=Path, help="re-print a saved --json run, measure nothing")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.report:
        report(args.report)
        return
    models = [m for m in args.models.split(",") if m]
    pairs = [p for p in args.pairs.split(",") if p]
    precisions = ["fp32"] if args.no_int8 else ["fp32", "int8"]
    costs = [cost(m) for m in models]
    files = {(m, p): model_file(args.work, m, p, args.shared) for m in models for p in precisions}
    wanted = {p for p in args.pair_precisions.split(",") if p}
    if not wanted <= {"fp32", "int8"}:
        raise SystemExit(f"--pair-precisions {args.pair_precisions!r}: use fp32 and/or int8")
    pair_precisions = ["fp32"] + (["int8"] if "int8" in wanted else [])
    if ("int8" in precisions or "int8" in pair_precisions) and not (args.shared / "data").is_dir():
        raise SystemExit(f"INT8 is calibrated on {args.shared / 'data'}, which is not here: pass --shared or --no-int8")
    dirs = {(pr, p): pair_dir(args.work, pr, p, args.shared) for p in pair_precisions for pr in pairs}
    cfg = Configs()
    try:
        add_models(cfg, files, args.batches)
        add_pairs(cfg, dirs, args.pair_batch, args.fraction)
        load_before = os.getloadavg()
        spec = RoundSpec(min_rounds=args.repeats, max_rounds=args.repeats, warmup=args.warmup)
        timed = timed_rounds(cfg.calls, next(iter(cfg.calls)), spec, progress=lambda m: print(m, flush=True))
        load_after = os.getloadavg()
    finally:
        cfg.close()
    result = {
        "machine": machine_info("cpu"),
        "versions": tool_versions(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "fraction": args.fraction,
        "wall_s": timed.elapsed_s,
        "load_before": list(load_before),
        "load_after": list(load_after),
        "others_cores_per_round": timed.others_cores,
        "costs": costs,
        "rows": rows(timed.samples, cfg.meta),
    }
    print_tables(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
