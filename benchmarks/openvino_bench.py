"""OpenVINO against ONNX Runtime on this CPU: every model at every precision, the DynPose pairs, and each model's
share of the machine's int8 / bf16 / fp32 peak, in interleaved runs with 95% intervals.

    python benchmarks/openvino_bench.py [--work benchmarks/out/openvino] [--models hrnet_w32,resnet_50,lpn_50,
        tinypose_256,tinypose_128,router] [--batches 1,8] [--repeats 15] [--warmup 2] [--pairs lpn,tinypose]
        [--pair-batch 20] [--pair-precision auto] [--tinypose-route box:17734] [--clock-ghz 2.6] [--boost-ghz 3.7]
        [--calib-max-crops 64] [--json OUT.json]

Part 1, models. Each model runs as five variants, each its own engine dir made with the public export API (reused
on later runs): ONNX Runtime fp32 and INT8 (our Q/DQ, `--format onnx`), OpenVINO fp32, bf16 (where the CPU has it)
and INT8 (`--format openvino --precision ...`: the faster of our Q/DQ and NNCF's, both judged in OpenVINO). Zoo
models (HRNet-W32, ResNet-50, LPN-50, the router) have seeded random weights, so their accuracy gate is off
(`--min-oks 0`); the real TinyPose models keep the gate (mean keypoint OKS >= 0.95 against fp32), and a variant that
fails it is reported as such. INT8 is calibrated on ../shared/data with the COCO test images held out. Each variant
runs alone on every core (`EngineSet.solo_model`); at each batch all five take turns in every round
(`dynpose.bench.timing.timed_rounds`, order rotated), so load changes hit them alike. crops/s = batch / median
time; the ratio to ONNX Runtime fp32 is the median of the per-round ratios with its 95% bootstrap interval
(`dynpose.bench.stats.paired_ratio_ci`). For the real TinyPose models each variant's keypoints are scored (OKS)
against ONNX Runtime fp32 on the held-out COCO persons.

Part 2, pairs. LPN-50 small / HRNet-W32 large at routing fraction 0.3 and the TinyPose pair under its calibrated
policy (`--tinypose-route`, the route `dynpose-train-router --calibrate` chose in benchmarks/results/
dynpose_figures.txt), both exported with `--format openvino --precision auto` (the fastest gated precision on this
machine, INT8 among the candidates), run as the runtime runs them (`make_plan` + the local executor: both models
concurrently, half the cores each) on `--pair-batch` boxes per call; against the large model alone on every core on
ONNX Runtime fp32 and on OpenVINO at its best precision (the pair dir's own large ONNX and IR).

Start times: each OpenVINO variant opened with an empty compiled-model cache and again with the cache it left.

Part 3, peak. Multiply-adds per crop are counted from each model's graph (convolutions, transposed and grouped ones,
matrix products); GMAC/s = MACs per crop x crops/s. The peak is instruction throughput x cores x clock. Per core and
cycle on Zen 4 (AMD EPYC 9004 / Ryzen 7000; this machine: family 25 model 17): four 256-bit vector pipes, a 512-bit
instruction takes two, and the multiply pipes fit one 512-bit VPDPBUSD (int8 VNNI: 64 u8 x s8 multiply-adds),
one 512-bit VDPBF16PS (bf16: 32) or one 512-bit FMA (fp32: 16) per cycle. Sources: AMD, "Software Optimization Guide
for the AMD Zen4 Microarchitecture" (pub. 57647, execution units and latency/throughput tables); Alexander Yee,
"Zen4's AVX512 Teardown", numberworld.org, 2022 (512-bit ops on 2 x 256-bit pipes, throughput measured); Agner Fog,
"Instruction tables", Zen 4 section. Other CPUs: pass `--macs-per-cycle int8=..,bf16=..,fp32=..`. Clock: the cores'
nominal clock from /proc/cpuinfo (under a hypervisor the TSC rate), `--clock-ghz` to override, and the peak is also
given at `--boost-ghz` (Genoa's usual maximum boost, 3.7 GHz); a share above 100% at the nominal clock means the
cores ran above it.

The machine is shared: the 1-minute load average before and after is printed and stored. Results are printed; a JSON
file is written only with `--json`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.bench.crops import Config
from dynpose.bench.stats import paired_ratio_ci
from dynpose.bench.timing import RoundSpec, boxes_for_batch, machine_info, parse_batches, synthetic_frame, timed_rounds
from dynpose.engines.manifest import Manifest
from dynpose.export.api import export_all, export_model, register_onnx
from dynpose.export.calibration.crops import CalibSpec, coco_person_crops
from dynpose.export.judges import keypoint_agreement
from dynpose.models import get_card
from dynpose.models.card import ModelCard
from dynpose.roles import Role
from dynpose.runtime.backends.openvino import convert_onnx, cpu_info
from dynpose.runtime.engine_set import EngineSet, LoadOptions
from dynpose.runtime.model import CropModel, PoseModel
from dynpose.runtime.policy import AllLarge, parse_policy

REPO = Path(__file__).resolve().parents[1]
ZOO = ("hrnet_w32", "resnet_50", "lpn_50", "router")
REAL = {"tinypose_256": ("tinypose_256x192.onnx", 192, 256), "tinypose_128": ("tinypose_128x96.onnx", 96, 128)}
# variant -> (export format, precision, backend that runs it)
VARIANTS = {
    "ORT fp32": ("onnx", "fp32", "ort"),
    "ORT int8": ("onnx", "int8", "ort"),
    "OpenVINO fp32": ("openvino", "fp32", "openvino"),
    "OpenVINO bf16": ("openvino", "bf16", "openvino"),
    "OpenVINO int8": ("openvino", "int8", "openvino"),
}
BASE = "ORT fp32"
# Zen 4 multiply-adds per core per cycle (see the module doc for the sources)
ZEN4_MACS = {"int8": 64, "bf16": 32, "fp32": 16}


@dataclass(frozen=True)
class Model:
    """One benchmarked model: its name, card, fp32 ONNX, whether its weights are real (the gate is on)."""

    name: str
    card: ModelCard
    onnx: Path
    real: bool

    @property
    def role(self) -> Role:
        return Role.ROUTER if self.card.task == "router" else Role.SMALL


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Random weights warn per model, and torch's exporter notes; the export logs what matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def base_model(name: str, work: Path, shared: Path) -> Model:
    """The model's fp32 ONNX: the shared TinyPose files, or a zoo model exported once with seeded random weights."""
    if name in REAL:
        file, w, h = REAL[name]
        return Model(
            name,
            ModelCard.from_json_file(REPO / "examples" / "cards" / f"tinypose_{h}x{w}.json"),
            shared / "models" / file,
            True,
        )
    if name not in ZOO:
        raise SystemExit(f"--models: unknown model {name!r}; use {', '.join((*ZOO, *REAL))}")
    d = work / "onnx" / name
    try:
        entry = Manifest.load(d).get(Role.ROUTER if name == "router" else Role.SMALL, "onnx")
    except Exception:  # noqa: BLE001 - not exported yet
        entry = None
    if entry is None:
        role = Role.ROUTER if name == "router" else Role.SMALL
        with quiet():
            export_model(name, d, role=role, weights="random", progress=False)
        entry = Manifest.load(d).require(role, "onnx")
    return Model(name, get_card(name), d / entry.file, False)


def variant_dir(m: Model, variant: str, work: Path, calib: CalibSpec) -> Path | str:
    """The variant's engine dir (exported on first use), or why there is none (a failed gate, no bf16 here)."""
    fmt, precision, _ = VARIANTS[variant]
    if precision == "bf16" and not cpu_info().supports("bf16"):
        return "no bf16 instructions on this CPU"
    d = work / "variants" / m.name / variant.replace(" ", "-")
    try:
        if Manifest.load(d).get(m.role, fmt) is not None:
            return d
    except Exception:  # noqa: BLE001 - not made yet (or half made): export it
        pass
    t0 = time.perf_counter()
    try:
        with quiet():
            register_onnx(
                m.onnx,
                m.card,
                d,
                role=m.role,
                precision=precision,
                fmt=fmt,
                min_oks=0.95 if m.real else 0.0,
                calib=calib if precision == "int8" else CalibSpec(gate_ann=calib.gate_ann),
                progress=False,
            )
    except Exception as e:  # noqa: BLE001 - a gate that fails is a result
        return f"not made: {str(e).splitlines()[0]}"
    print(f"exported {m.name} {variant} in {time.perf_counter() - t0:.0f}s", flush=True)
    return d


def macs_per_crop(onnx_path: Path) -> float:
    """Multiply-adds of one crop, counted on the OpenVINO graph at batch 1: convolutions (grouped and transposed
    too) and matrix products, as pose papers count GFLOPs."""
    model = convert_onnx(onnx_path)
    shape = model.inputs[0].get_partial_shape()
    model.reshape([1, *(shape[i].get_length() for i in (1, 2, 3))])
    total = 0.0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in ("Convolution", "GroupConvolution"):
            w = list(op.get_input_shape(1))
            per_out = float(np.prod(w[-3:])) if kind == "GroupConvolution" else float(np.prod(w[1:]))
            total += float(np.prod(list(op.get_output_shape(0)))) * per_out
        elif kind in ("ConvolutionBackpropData", "GroupConvolutionBackpropData"):
            w = list(op.get_input_shape(1))
            per_in = float(np.prod(w[-3:])) if kind.startswith("Group") else float(np.prod(w[1:]))
            total += float(np.prod(list(op.get_input_shape(0)))) * per_in
        elif kind == "MatMul":
            a, out = list(op.get_input_shape(0)), list(op.get_output_shape(0))
            k = a[-1] if not op.get_transpose_a() else a[-2]
            total += float(np.prod(out)) * k
    return total


def start_times(models: list[Model], dirs: dict[tuple[str, str], Path | str]) -> dict[str, dict[str, float]]:
    """Seconds to open each OpenVINO variant with an empty compiled-model cache (first start: compile every batch
    bucket) and again with the cache it left (second start)."""
    import shutil

    from dynpose.runtime.backends.openvino import CACHE_DIRNAME

    out: dict[str, dict[str, float]] = {}
    for m in models:
        for v, (fmt, _, backend) in VARIANTS.items():
            d = dirs[(m.name, v)]
            if fmt != "openvino" or not isinstance(d, Path):
                continue
            shutil.rmtree(d / CACHE_DIRNAME, ignore_errors=True)
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                EngineSet.load(d, LoadOptions(backend=backend, with_detector=False), roles=[m.role]).close()
                times.append(time.perf_counter() - t0)
            out[f"{m.name} {v}"] = {"first_s": times[0], "second_s": times[1]}
    return out


def _solo(d: Path, variant: str, role: Role) -> tuple[EngineSet, CropModel]:
    es = EngineSet.load(d, LoadOptions(backend=VARIANTS[variant][2], with_detector=False), roles=[role])
    return es, es.solo_model(role)


def time_models(
    models: list[Model], dirs: dict[tuple[str, str], Path | str], batches: list[int], spec: RoundSpec
) -> list[dict[str, Any]]:
    """crops/s of every variant of every model at every batch, the variants interleaved; ratios to ORT fp32."""
    out = []
    for m in models:
        opened = {v: _solo(d, v, m.role) for v in VARIANTS if isinstance(d := dirs[(m.name, v)], Path)}
        try:
            for b in batches:
                x = np.random.default_rng(b).standard_normal((b, 3, m.card.input_height, m.card.input_width))
                x = x.astype(np.float32)
                calls: dict[str, Callable[[], Any]] = {
                    v: functools.partial(h.runner.infer_all, x) for v, (_, h) in opened.items()
                }
                rounds = timed_rounds(calls, BASE, spec, progress=None)
                for v in VARIANTS:
                    row: dict[str, Any] = {"model": m.name, "batch": b, "variant": v}
                    if v not in rounds.samples:
                        out.append({**row, "missing": dirs[(m.name, v)]})
                        continue
                    s = rounds.samples[v]
                    ci = paired_ratio_ci(rounds.samples[BASE], s)
                    row.update(crops_per_s=b / float(np.median(s)), ratio=ci.ratio, ci95=[ci.lo, ci.hi], samples_s=s)
                    out.append(row)
                print(f"timed {m.name} at batch {b}", flush=True)
        finally:
            for es, h in opened.values():
                if h is not es.require(m.role):
                    h.runner.deactivate()
                es.close()
    return out


def accuracy(models: list[Model], dirs: dict[tuple[str, str], Path | str], shared: Path) -> dict[str, dict[str, Any]]:
    """Keypoint OKS of every variant of the real models against ONNX Runtime fp32 on the held-out COCO persons."""
    out: dict[str, dict[str, Any]] = {}
    for m in (m for m in models if m.real):
        crops = coco_person_crops(shared / "data" / "coco" / "test_coco.json", m.card)
        if crops is None:
            continue
        outs = {}
        for v in VARIANTS:
            d = dirs[(m.name, v)]
            if isinstance(d, Path):
                es, h = _solo(d, v, m.role)
                try:
                    outs[v] = h.runner.infer_all(crops.x)
                finally:
                    if h is not es.require(m.role):
                        h.runner.deactivate()
                    es.close()
        out[m.name] = {
            v: {k: a[k] for k in ("oks_mean", "oks_min", "crops")}
            for v, o in outs.items()
            if (a := keypoint_agreement(o, outs[BASE], crops, m.card))
        }
    return out


# -- part 2: the DynPose pairs -------------------------------------------------------------------------------------------
def pair_dirs(which: list[str], work: Path, shared: Path, calib: CalibSpec, precision: str) -> dict[str, Path]:
    """The OpenVINO pair dirs at `precision` (default auto: the best gated precision), exported on first use."""
    out = {}
    for name in which:
        d = work / "pairs" / f"{name}-{precision}"
        try:
            man = Manifest.load(d)
            if all(man.get(r, "openvino") for r in (Role.SMALL, Role.LARGE)):
                out[name] = d
                continue
        except Exception:  # noqa: BLE001 - not made yet
            pass
        t0 = time.perf_counter()
        with quiet():
            if name == "lpn":
                small = {Role.SMALL: "lpn_50"}
                export_all(d, models=small, fmt="openvino", precision=precision, calib=calib, min_oks=0.0, progress=False)
            else:
                for key, role in (("tinypose_128", Role.SMALL), ("tinypose_256", Role.LARGE)):
                    m = base_model(key, work, shared)
                    register_onnx(
                        m.onnx, m.card, d, role=role, fmt="openvino", precision=precision, calib=calib, progress=False
                    )
                export_model("router", d, weights="random", fmt="openvino", progress=False)
        print(f"exported pair {name} in {time.perf_counter() - t0:.0f}s", flush=True)
        out[name] = d
    return out


class Calls:
    """The timed pair configurations: name -> one plan of the batch run on the local executor (a worker per model),
    what each is, what to close."""

    def __init__(self, batch: int) -> None:
        self.frame = synthetic_frame()
        self.boxes = boxes_for_batch(batch, self.frame.shape[:2], seed=batch)
        self.calls: dict[str, Callable[[], Any]] = {}
        self.meta: dict[str, dict[str, Any]] = {}
        self.closing: list[Any] = []

    def add(self, name: str, config: Config, **info: Any) -> None:
        self.closing.append(config)
        self.calls[name] = lambda: config.run([([self.frame], [self.boxes])])
        self.meta[name] = info

    def alone(self, name: str, d: Path, backend: str, **info: Any) -> None:
        """The large model of `d` alone on every core (no router), as one would run it without DynPose."""
        es = EngineSet.load(d, LoadOptions(backend=backend, with_detector=False), roles=[Role.LARGE])
        big = es.solo_model(Role.LARGE)
        assert isinstance(big, PoseModel)
        self.closing += [es] + ([big.runner] if big is not es.large else [])
        self.add(name, Config(AllLarge(), {Role.SMALL: big, Role.LARGE: big}), **info)

    def close(self) -> None:
        for c in reversed(self.closing):
            c.close() if hasattr(c, "close") else c.deactivate()


def pair_calls(pairs: dict[str, Path], route: str, batch: int) -> Calls:
    """Each pair on OpenVINO (runtime share, concurrently) and its large model alone on ONNX Runtime fp32 (the pair
    dir's fp32 ONNX entry, which every OpenVINO export writes) and on OpenVINO at its kept precision."""
    c = Calls(batch)
    names = {"lpn": ("LPN-50/HRNet-W32", "HRNet-W32", "fraction:0.3"), "tinypose": ("TinyPose pair", "TinyPose-256", route)}
    for key, d in pairs.items():
        pair, large, policy = names[key]
        c.alone(f"{large} alone ORT fp32", d, "ort", group=key, baseline=True)
        c.alone(f"{large} alone OpenVINO best", d, "openvino", group=key)
        es = EngineSet.load(d, LoadOptions(backend="openvino", with_detector=False))
        c.closing.append(es)
        s, lg = es.pose_models
        models: dict[Role, CropModel] = {Role.SMALL: s, Role.LARGE: lg}
        if es.router is not None:
            models[Role.ROUTER] = es.router
        c.add(f"{pair} OpenVINO @{policy}", Config(parse_policy(policy), models), group=key, policy=policy)
    return c


def time_pairs(pairs: dict[str, Path], route: str, batch: int, spec: RoundSpec) -> list[dict[str, Any]]:
    c = pair_calls(pairs, route, batch)
    try:
        ref = next(n for n, m in c.meta.items() if m.get("baseline"))
        rounds = timed_rounds(c.calls, ref, spec, progress=None)
    finally:
        c.close()
    rows = []
    for name, s in rounds.samples.items():
        group = c.meta[name]["group"]
        base = next(n for n, m in c.meta.items() if m.get("baseline") and m["group"] == group)
        best = next(n for n, m in c.meta.items() if m["group"] == group and "OpenVINO best" in n)
        row = {"config": name, **c.meta[name], "crops_per_s": batch / float(np.median(s)), "samples_s": s}
        for key, ref_name in (("vs_ort_fp32", base), ("vs_openvino_best", best)):
            ci = paired_ratio_ci(rounds.samples[ref_name], s)
            row[key], row[key + "_ci95"] = ci.ratio, [ci.lo, ci.hi]
        rows.append(row)
    return rows


# -- part 3: the machine's peak ------------------------------------------------------------------------------------------
def nominal_ghz() -> float:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1]) / 1e3
    except (OSError, ValueError):
        pass
    return float("nan")


def peaks(macs_per_cycle: dict[str, float], ghz: float, boost: float) -> dict[str, dict[str, float]]:
    cores = len(os.sched_getaffinity(0))
    return {
        p: {"macs_per_cycle_core": n, "cores": cores, "gmac_s_nominal": n * cores * ghz, "gmac_s_boost": n * cores * boost}
        for p, n in macs_per_cycle.items()
    }


def add_shares(rows: list[dict[str, Any]], macs: dict[str, float], peak: dict[str, dict[str, float]]) -> None:
    """GMAC/s of every timed row and its share of the peak of the precision it mostly runs in."""
    for r in rows:
        if "crops_per_s" not in r:
            continue
        p = r["variant"].split()[-1]
        gmac_s = macs[r["model"]] * r["crops_per_s"] / 1e9
        r["gmac_s"] = gmac_s
        r["peak_share_nominal"] = gmac_s / peak[p]["gmac_s_nominal"]
        r["peak_share_boost"] = gmac_s / peak[p]["gmac_s_boost"]


# -- printing --------------------------------------------------------------------------------------------------------
def _ci(v: float, ci: list[float]) -> str:
    return f"{v:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]"


def print_models(rows: list[dict[str, Any]], acc: dict[str, dict[str, Any]], macs: dict[str, float]) -> None:
    print(
        "\n| model | batch | variant | crops/s | vs ORT fp32 (95% CI) | GMAC/s | share of peak (nominal / boost clock) "
        "| OKS vs fp32 mean (min) |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        if "crops_per_s" not in r:
            print(f"| {r['model']} | {r['batch']} | {r['variant']} | - | {r['missing']} | | | |")
            continue
        a = acc.get(r["model"], {}).get(r["variant"])
        oks = f"{a['oks_mean']:.3f} ({a['oks_min']:.3f}), {a['crops']} crops" if a else ""
        share = f"{r['peak_share_nominal']:.0%} / {r['peak_share_boost']:.0%}"
        print(
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r['crops_per_s']:.1f} | {_ci(r['ratio'], r['ci95'])} | "
            f"{r['gmac_s']:.0f} | {share} | {oks} |"
        )
    print("\nmulti-adds per crop: " + ", ".join(f"{k} {v / 1e9:.2f} G" for k, v in macs.items()))


def print_pairs(rows: list[dict[str, Any]], batch: int) -> None:
    print(
        f"\n| configuration ({batch} boxes per call) | crops/s | vs large alone ORT fp32 (95% CI) "
        "| vs large alone OpenVINO best (95% CI) |"
    )
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        ort, best = _ci(r["vs_ort_fp32"], r["vs_ort_fp32_ci95"]), _ci(r["vs_openvino_best"], r["vs_openvino_best_ci95"])
        print(f"| {r['config']} | {r['crops_per_s']:.1f} | {ort} | {best} |")


def precisions_kept(pairs: dict[str, Path]) -> dict[str, dict[str, str]]:
    out = {}
    for key, d in pairs.items():
        man = Manifest.load(d, verify=False)
        out[key] = {
            str(e.role): f"{e.precision} ({(e.openvino or {}).get('kept')})" for e in man.entries if e.format == "openvino"
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "openvino")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--models", default="hrnet_w32,resnet_50,lpn_50,tinypose_256,tinypose_128,router")
    ap.add_argument("--batches", type=parse_batches, default=parse_batches("1,8"))
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds (fixed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pairs", default="lpn,tinypose", help="comma-separated: lpn, tinypose; 'none' for none")
    ap.add_argument("--pair-batch", type=int, default=20)
    ap.add_argument("--tinypose-route", default="box:17734")
    ap.add_argument("--pair-precision", default="auto", help="the pairs' OpenVINO precision (auto: the fastest gated)")
    ap.add_argument("--clock-ghz", type=float, default=nominal_ghz())
    ap.add_argument("--boost-ghz", type=float, default=3.7)
    ap.add_argument("--macs-per-cycle", default=",".join(f"{k}={v}" for k, v in ZEN4_MACS.items()))
    ap.add_argument("--calib-max-crops", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None, help="write the results here (nothing is written without it)")
    args = ap.parse_args()

    coco = args.shared / "data" / "coco" / "test_coco.json"
    calib = CalibSpec.from_root(args.shared / "data", gate_ann=coco, jitter=1, max_crops=args.calib_max_crops)
    models = [base_model(n.strip(), args.work, args.shared) for n in args.models.split(",") if n.strip()]
    dirs = {(m.name, v): variant_dir(m, v, args.work, calib) for m in models for v in VARIANTS}
    which = [p.strip() for p in args.pairs.split(",") if p.strip() and p.strip() != "none"]
    pairs = pair_dirs(which, args.work, args.shared, calib, args.pair_precision)
    macs = {m.name: macs_per_crop(m.onnx) for m in models}
    per_cycle = {k: float(v) for k, v in (kv.split("=") for kv in args.macs_per_cycle.split(","))}
    peak = peaks(per_cycle, args.clock_ghz, args.boost_ghz)
    spec = RoundSpec(min_rounds=args.repeats, max_rounds=args.repeats, warmup=args.warmup)

    load_before = os.getloadavg()
    starts = start_times(models, dirs)
    rows = time_models(models, dirs, args.batches, spec)
    acc = accuracy(models, dirs, args.shared)
    pair_rows = time_pairs(pairs, args.tinypose_route, args.pair_batch, spec) if pairs else []
    load_after = os.getloadavg()
    add_shares(rows, macs, peak)

    info = cpu_info()
    print(
        f"\n{info.name} ({info.isa}), {len(os.sched_getaffinity(0))} cores; OpenVINO {info.release}; {args.repeats} rounds"
    )
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    for p, v in peak.items():
        print(
            f"peak {p}: {v['macs_per_cycle_core']:g} MAC/cycle/core x {v['cores']} cores x {args.clock_ghz:.2f} GHz = "
            f"{v['gmac_s_nominal']:.0f} GMAC/s ({v['gmac_s_boost']:.0f} at {args.boost_ghz:.2f} GHz)"
        )
    print_models(rows, acc, macs)
    print("\nstart (EngineSet.load) with an empty compiled-model cache -> with the cache it left:")
    for k, v in starts.items():
        print(f"  {k}: {v['first_s']:.2f} s -> {v['second_s']:.2f} s")
    if pair_rows:
        print_pairs(pair_rows, args.pair_batch)
        print(f"precisions kept by --precision {args.pair_precision}: " + json.dumps(precisions_kept(pairs)))
    if args.json is not None:
        result = {
            "machine": machine_info("cpu"),
            "openvino": info.metadata(),
            "repeats": args.repeats,
            "load_before": list(load_before),
            "load_after": list(load_after),
            "peak": peak,
            "macs_per_crop": macs,
            "models": rows,
            "accuracy": acc,
            "pairs": pair_rows,
            "pair_batch": args.pair_batch,
            "pair_precisions": precisions_kept(pairs),
            "start_s": starts,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
