"""DynPose pairs on this CPU: crops/s of HRNet-W32 alone and of LPN-50 / ResNet-50 small + HRNet-W32 large at
routing fractions, fp32 and INT8, all in ONE interleaved run.

    python benchmarks/pair_bench.py [--work benchmarks/out/pairs] [--batch 20] [--fractions 0,0.1,0.3,0.5]
                                    [--repeats 20] [--warmup 1] [--no-int8] [--no-splits]
                                    [--json FILE] [--report --json FILE]

About 7.5 minutes on a 2-core CPU at the defaults (20 rounds, fp32 and INT8, the thread splits), plus the engine
dirs' export on the first run; it says so when it starts. Figures are printed; they are written only to `--json
FILE` (the committed `benchmarks/results/cpu_ort_pair_bench.json` is rewritten only when named there).

Engine dirs are built with the public API, random weights (seeded): `export_all(models={Role.SMALL: "lpn_50"})` and
`export_all()` (ResNet-50 / HRNet-W32, the DynPose pair), each with the router; the INT8 dirs the same with
`precision="int8", min_oks=0` (random weights: the OKS gate means nothing, the layer search keeps every layer INT8),
calibrated on ../shared/data with the COCO test images held out. Dirs are reused on later runs.

Each configuration is one plan of `--batch` person boxes on one frame run on the local executor (`make_plan` +
`execute` on a `LocalExecutor`: crop, router, both models on their worker threads, decode), the way the runtime runs
a micro-batch. Pairs are opened with `EngineSet.load` (the
runtime's thread share: router all cores, small and large half each, running concurrently); at fraction F the router
sends the round(F * batch) crops with the highest scores to the large model. The baseline "HRNet-W32 alone" is the
large model on every core (`EngineSet.solo_model`, no router): what one would run without DynPose; "all-large
(runtime share)" is the same model as the runtime runs an all-large route (half the cores). Unless `--no-splits`,
the LPN-50 fp32 pair also runs with other thread splits (small on half the cores and large on all; both on all) and
"sequential": the same plan's router, small sub-batch and large sub-batch one after the other on the calling
thread, each on every core, without the executor's workers (what running the models in turn would give).

Timing is `dynpose.bench.timing.timed_rounds` with a fixed number of rounds: every configuration once per round,
the order rotated each round, so load changes on the shared machine hit all alike; other processes' CPU use is
sampled around each round. crops/s = batch / median time, with the 25th-75th percentile of the rounds; speed ratios
are `dynpose.bench.stats.paired_ratio_ci` (median of the per-round ratios, 95% bootstrap interval over rounds),
against HRNet-W32 alone in fp32 and, for INT8 configurations, in INT8. `--report` re-prints a saved run from its
samples. The 1-minute load average before and after is printed and stored: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.bench.crops import Config
from dynpose.bench.stats import paired_ratio_ci
from dynpose.bench.timing import (
    RoundSpec,
    boxes_for_batch,
    machine_info,
    parse_fractions,
    synthetic_frame,
    timed_rounds,
    versions,
)
from dynpose.engines.manifest import Manifest
from dynpose.export.api import export_all
from dynpose.export.calibration.crops import CalibSpec
from dynpose.roles import POSE_ROLES, Role
from dynpose.runtime.boxes import Boxes
from dynpose.runtime.engine_set import EngineSet
from dynpose.runtime.execute import SerialExecutor, execute
from dynpose.runtime.model import CropModel, PoseModel
from dynpose.runtime.plan import FrameInput, make_plan
from dynpose.runtime.policy import AllLarge, Fraction, Policy

REPO = Path(__file__).resolve().parents[1]
SMALLS = {"lpn_50": "LPN-50", "resnet_50": "ResNet-50"}
LARGE = "hrnet_w32"
BASELINE = "HRNet-W32 alone fp32"


def build_dir(work: Path, small: str, precision: str, shared: Path) -> Path:
    """The engine dir of `small` + HRNet-W32 + router at `precision` (exported on first use, reused after)."""
    eng = work / f"{small}+{LARGE}.{precision}"
    try:
        man = Manifest.load(eng)
        entries = {r: man.get(r, "onnx") for r in (Role.ROUTER, Role.SMALL, Role.LARGE)}
        s = entries[Role.SMALL]
        if all(entries.values()) and s is not None and s.model == small and s.precision == precision:
            return eng
    except Exception:  # noqa: BLE001 - no dir yet, or a half-made one: export it (again)
        pass
    calib = None
    if precision == "int8":
        coco = shared / "data" / "coco" / "test_coco.json"
        calib = CalibSpec.from_root(shared / "data", gate_ann=coco, jitter=1, max_crops=64)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_all(eng, models={Role.SMALL: small}, precision=precision, calib=calib, min_oks=0.0, progress=False)
    print(f"exported {eng.name} in {time.perf_counter() - t0:.0f}s", flush=True)
    return eng


def int8_speedups(eng: Path) -> dict[str, float | None]:
    """The export's own INT8/fp32 speed-up at batch 8 per role (manifest checks)."""
    man = Manifest.load(eng)
    return {r.value: man.require(r, "onnx").checks.get("int8_speedup_b8") for r in POSE_ROLES}


class Configs:
    """The timed calls (name -> one plan of the batch on the frame, run), what each is, what to close."""

    def __init__(self, batch: int) -> None:
        self.frame = synthetic_frame()
        self.boxes = boxes_for_batch(batch, self.frame.shape[:2], seed=batch)
        self.calls: dict[str, Callable[[], Any]] = {}
        self.meta: dict[str, dict[str, Any]] = {}
        self.closing: list[Any] = []

    def add(self, name: str, policy: Policy, models: dict[Role, CropModel], **info: Any) -> None:
        """`policy` over `models` on the local executor (a worker per model), as the runtime runs a micro-batch."""
        config = Config(policy, models)
        self.closing.append(config)
        self.calls[name] = lambda: config.run([([self.frame], [self.boxes])])
        self.meta[name] = info

    def close(self) -> None:
        for c in reversed(self.closing):
            c.close() if hasattr(c, "close") else c.deactivate()


def configs(dirs: dict[tuple[str, str], Path], fractions: list[float], batch: int, splits: bool) -> Configs:
    """HRNet-W32 alone (every core: `EngineSet.solo_model`) and as the runtime runs all-large (half the cores), every
    pair at every fraction (`EngineSet.load`), and with `splits` the LPN-50 fp32 pair under other thread splits."""
    cfg = Configs(batch)
    for (small, precision), eng in dirs.items():
        es = EngineSet.load(eng)
        cfg.closing.append(es)
        s, lg = es.pose_models
        if small == "lpn_50":
            solo = {r: es.solo_model(r) for r in POSE_ROLES}
            cfg.closing += [m for r, m in solo.items() if m is not es.require(r)]
            big = solo[Role.LARGE]
            assert isinstance(big, PoseModel)
            alone: dict[Role, CropModel] = {Role.SMALL: big, Role.LARGE: big}
            cfg.add(f"HRNet-W32 alone {precision}", AllLarge(), alone, precision=precision, threads="all")
            name = f"HRNet-W32 all-large {precision} (runtime share)"
            cfg.add(name, AllLarge(), {Role.SMALL: s, Role.LARGE: lg}, precision=precision, threads="runtime")
            if splits and precision == "fp32":
                _split_configs(cfg, es, solo, fractions)
        router = es.require(Role.ROUTER)
        for f in fractions:
            name = f"{SMALLS[small]}/HRNet-W32 {precision} @{f:g}"
            models = {Role.SMALL: s, Role.LARGE: lg, Role.ROUTER: router}
            cfg.add(name, Fraction(f), models, pair=small, precision=precision, fraction=f)
    return cfg


def _split_configs(cfg: Configs, es: EngineSet, solo: dict[Role, CropModel], fractions: list[float]) -> None:
    """The LPN-50 fp32 pair with the large model on every core (small on half), both on every core, and both on
    every core one after the other (`_sequential`): the runtime's fixed half/half share leaves a core idle whenever
    one side's sub-batch finishes first."""
    cores = len(os.sched_getaffinity(0))
    router = es.require(Role.ROUTER)
    half_small, _ = es.pose_models
    for small, ts in ((half_small, max(1, cores // 2)), (solo[Role.SMALL], cores)):
        for f in fractions:
            name = f"LPN-50/HRNet-W32 fp32 @{f:g} threads {ts}+{cores}"
            models = {Role.SMALL: small, Role.LARGE: solo[Role.LARGE], Role.ROUTER: router}
            cfg.add(name, Fraction(f), models, pair="lpn_50", precision="fp32", fraction=f, threads=f"{ts}+{cores}")
    for f in fractions:
        name = f"LPN-50/HRNet-W32 fp32 @{f:g} sequential, {cores}+{cores}"
        models = {Role.ROUTER: router, Role.SMALL: solo[Role.SMALL], Role.LARGE: solo[Role.LARGE]}
        cfg.calls[name] = _sequential(models, Fraction(f), cfg.frame, cfg.boxes)
        cfg.meta[name] = {"pair": "lpn_50", "precision": "fp32", "fraction": f, "threads": "sequential"}


def _sequential(models: dict[Role, CropModel], policy: Policy, frame: np.ndarray, boxes: np.ndarray) -> Callable[[], Any]:
    """The plan's router, then its small sub-batch, then its large one, each model on every core: no workers (the
    executor's run the two at once), for what running the models in turn would give."""
    executor = SerialExecutor(models)
    cards = {r: m.card for r, m in models.items()}

    def run() -> None:
        execute(make_plan([FrameInput(frame, Boxes.of(boxes, frame.shape))], policy, cards), executor)

    return run


def rows(samples: dict[str, list[float]], meta: dict[str, dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """Per configuration: crops/s (median, p25-p75) and its speed against HRNet-W32 alone in fp32 and, for an INT8
    configuration, against HRNet-W32 alone in INT8 (`bench.stats.paired_ratio_ci`: the median of the per-round
    ratios with its 95% bootstrap interval over rounds)."""
    bases = {p: samples[f"HRNet-W32 alone {p}"] for p in ("fp32", "int8") if f"HRNet-W32 alone {p}" in samples}
    out = []
    for name, s in samples.items():
        q25, q50, q75 = np.percentile(np.asarray(s), [25, 50, 75])
        row = {"config": name, **meta[name], "crops_per_s": batch / q50, "crops_per_s_p25_p75": [batch / q75, batch / q25]}
        for p, base in bases.items():
            if p == "fp32" or meta[name].get("precision") == p:
                ci = paired_ratio_ci(base, s)
                key = "ratio_vs_baseline" if p == "fp32" else "ratio_vs_int8_alone"
                row[key], row[key.replace("ratio", "ci95")] = ci.ratio, [ci.lo, ci.hi]
        out.append({**row, "samples_s": [float(x) for x in s]})
    return out


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\n{result['machine']['cpu']}, {result['machine']['cores_usable']} cores; ONNX Runtime CPU; batch "
        f"{result['batch']} boxes per call; {result['repeats']} interleaved rounds; load average (1 min) "
        f"{result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after{_others(result)}\n"
    )
    print(f"| configuration | crops/s | p25-p75 | vs {BASELINE} (95% CI) | vs HRNet-W32 alone int8 (95% CI) |")
    print("| --- | ---: | --- | ---: | ---: |")
    for r in result["rows"]:
        p25, p75 = r["crops_per_s_p25_p75"]
        cells = []
        for key in ("ratio_vs_baseline", "ratio_vs_int8_alone"):
            ci = r.get(key.replace("ratio", "ci95"))
            cells.append(f"{r[key]:.2f}x ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
        print(f"| {r['config']} | {r['crops_per_s']:.2f} | {p25:.2f}-{p75:.2f} | {cells[0]} | {cells[1]} |")
    for eng, sp in result["int8_speedups"].items():
        print(f"{eng}: export's INT8/fp32 speed-up at batch 8: {sp}")


def _others(result: dict[str, Any]) -> str:
    """'; other processes kept 0.31 cores busy (max 0.80)' from the per-round samples, when there are any."""
    busy = [c for c in result.get("others_cores_per_round") or [] if c is not None]
    return f"; other processes kept {np.mean(busy):.2f} cores busy per round (max {max(busy):.2f})" if busy else ""


def report(path: Path) -> None:
    """Print a saved run's table from its samples: the intervals again, nothing re-measured, nothing written."""
    result = json.loads(path.read_text())
    samples = {r["config"]: r["samples_s"] for r in result["rows"]}
    keep = ("config", "crops_per_s", "crops_per_s_p25_p75", "samples_s")
    meta = {
        r["config"]: {k: v for k, v in r.items() if k not in keep and not k.startswith(("ratio", "ci95"))}
        for r in result["rows"]
    }
    result["rows"] = rows(samples, meta, result["batch"])
    print_table(result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "pairs")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--fractions", type=parse_fractions, default=parse_fractions("0,0.1,0.3,0.5"))
    ap.add_argument("--repeats", type=int, default=20, help="interleaved rounds (fixed)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-int8", action="store_true", help="fp32 only (no INT8 dirs)")
    ap.add_argument("--no-splits", action="store_true", help="leave out the LPN-50 pair's other thread splits")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here (default: print only)")
    ap.add_argument("--report", action="store_true", help="re-print --json's table from its samples, measure nothing")
    args = ap.parse_args()
    if args.report:
        if args.json is None:
            ap.error("--report re-prints a saved run: name it with --json FILE")
        report(args.json)
        return
    print(
        f"pair_bench: {args.repeats} interleaved rounds of every configuration; at the defaults (20 rounds, fp32 and "
        "INT8, thread splits) this takes about 7.5 minutes on a 2-core CPU, plus the engine dirs' export on the first "
        "run (--repeats, --no-int8 and --no-splits shorten it)",
        flush=True,
    )

    precisions = ["fp32"] if args.no_int8 else ["fp32", "int8"]
    if "int8" in precisions and not (args.shared / "data").is_dir():
        ap.error(f"INT8 is calibrated on {args.shared / 'data'}, which is not here: pass --shared DIR or --no-int8")
    dirs = {(s, p): build_dir(args.work, s, p, args.shared) for p in precisions for s in SMALLS}
    cfg = configs(dirs, args.fractions, args.batch, not args.no_splits)
    try:
        load_before = os.getloadavg()
        spec = RoundSpec(min_rounds=args.repeats, max_rounds=args.repeats, warmup=args.warmup)
        timed = timed_rounds(cfg.calls, BASELINE, spec, progress=lambda m: print(m, flush=True))
        load_after = os.getloadavg()
    finally:
        cfg.close()
    result = {
        "machine": machine_info("cpu"),
        "versions": versions(),
        "batch": args.batch,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "wall_s": timed.elapsed_s,
        "load_before": list(load_before),
        "load_after": list(load_after),
        "others_cores_per_round": timed.others_cores,
        "int8_speedups": {eng.name: int8_speedups(eng) for (s, p), eng in dirs.items() if p == "int8"},
        "rows": rows(timed.samples, cfg.meta, args.batch),
    }
    print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
