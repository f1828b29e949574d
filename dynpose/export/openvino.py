"""OpenVINO export: ONNX -> an IR at the precision asked, judged by the gate every precision passes.

    fp32   the IR as converted, run in f32
    bf16   OpenVINO's bf16 inference precision (CPUs with AVX512_BF16 or AMX; a one-line refusal elsewhere); fp16
           likewise where OpenVINO lists FP16 (AVX512_FP16 / AMX-FP16). Layers whose low-precision kernel is slower
           than f32 on this CPU (a per-layer profile) stay in f32, and when the gate fails the layers nearest the
           output go back to f32 as the INT8 search does (`calibration.search`); the marks live in the IR
    int8   the faster of two quantizations that pass the gate: the project's Q/DQ calibration with its layer search
           (`calibration.quantize.search_int8`, each step run and judged in OpenVINO) and NNCF post-training
           quantization (`calibration.nncf_int8`); float layers run in f32
    auto   every precision this CPU runs (int8 when calibration data is given), each judged; the fastest that
           passes, timed at batch 8 on this machine, is kept, and the export logs every figure it measured

The gate is the one fp16 and INT8 pass on ONNX Runtime (`export.judges`): decoded keypoints against the fp32 ONNX
on held-out real crops, mean OKS >= --min-oks (a router: the same routing decisions). The ONNX Runtime fp32 model is
timed beside the candidates, so every export says what OpenVINO gains over it.

Why LPN-50 was slow in bf16 (0.37x ONNX Runtime fp32 in OpenVINO's default mode while its f32 was on par): its two
upsampling layers are *grouped* transposed convolutions (256 groups of 2 -> 1 channels, 4x4, stride 2).
OpenVINO 2026.4's CPU plugin runs them in f32 with its depthwise JIT kernels, but in bf16 with a generic brgemm
convolution that handles each tiny group as its own GEMM, 4-40x slower per layer in our profiles: one layer pair
becomes about 60% of the model's time, while every other layer runs 2x faster in bf16. The per-layer profile finds
exactly these two and keeps them in f32, and bf16 LPN-50 then runs about twice as fast as f32.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.export.calibration.crops import CalibSpec, CropSet
from dynpose.export.calibration.quantize import Int8Options, quantize_router_int8, search_int8
from dynpose.export.calibration.search import MAX_STEPS, Trial, search_fp32_layers
from dynpose.export.judges import SPEED_BATCH, Check, Judge, PoseJudge
from dynpose.onnx_utils import open_session, run_session_all
from dynpose.runtime.backends.openvino import (
    INFERENCE_PRECISION,
    CompileOptions,
    CpuInfo,
    OpenVinoRunner,
    convert_onnx,
    cpu_info,
    import_openvino,
    read_ir,
    require_precision,
    save_ir,
    weighted_layers,
)
from dynpose.runtime.backends.openvino.builder import with_fused_tails
from dynpose.runtime.backends.openvino.runner import BUCKETS

log = logging.getLogger(__name__)

CHOICES = ("fp32", "fp16", "bf16", "int8", "auto")
# A layer stays f32 under bf16/fp16 when its low-precision time is over SLOWER x its f32 time and the difference is
# over MIN_SHARE of the whole model's low-precision time (noise on a busy machine moves small layers by more).
SLOWER = 1.5
MIN_SHARE = 0.01
ORT_FP32 = "onnxruntime fp32"


@dataclass(frozen=True)
class OpenVinoOptions:
    """How an IR is made: the precision asked (`CHOICES`), calibration data (INT8 needs it; `auto` tries INT8 only
    with it), the INT8 options (Q/DQ flavour, cache dir, progress, search steps), the timing repeats."""

    precision: str = "fp32"
    calib: CalibSpec | None = None
    int8: Int8Options = field(default_factory=Int8Options)
    repeats: int = 5


@dataclass(frozen=True)
class Candidate:
    """One IR tried: its label, the manifest precision, OpenVINO's inference precision, the file, its gate check,
    the layers it keeps in f32, and for INT8 where it came from (qdq | nncf)."""

    label: str
    precision: str
    hint: str
    xml: Path
    check: Check
    keep_f32: tuple[str, ...] = ()
    source: str | None = None


@dataclass(frozen=True)
class _Ctx:
    """What every candidate is made and judged with."""

    src: Path
    tmp: Path
    judge: Judge
    crops: CropSet | None
    skipped: str
    ref: Callable[[np.ndarray], list[np.ndarray]]
    options: OpenVinoOptions


def ov_evaluate(hint: str) -> Callable[[Path, np.ndarray], list[np.ndarray]]:
    """Runs an IR (or an ONNX file, converted beside itself first) on crops in OpenVINO at inference precision
    `hint`, every core, compiled for batch 8 only (a gate runs once): every output, fp32."""

    def run(path: Path, x: np.ndarray) -> list[np.ndarray]:
        path = Path(path)
        if path.suffix.lower() == ".onnx":
            path = save_ir(convert_onnx(path), path.with_suffix(".xml"))
        with OpenVinoRunner(path, CompileOptions(hint, buckets=(SPEED_BATCH,))) as runner:
            return runner.infer_all(x)

    return run


def wanted_precisions(asked: str, info: CpuInfo, calib: CalibSpec | None, where: str) -> list[str]:
    """The precisions to make for `asked`: itself (refused in one line when the CPU cannot run it), or for `auto`
    fp32 plus every lower one this CPU runs (int8 only with calibration data)."""
    if asked not in CHOICES:
        raise DynPoseError(f"--precision {asked}: use one of {', '.join(CHOICES)} for --format openvino")
    if asked != "auto":
        require_precision(asked, info)
        return [asked]
    out = ["fp32"] + [p for p in ("bf16", "fp16") if info.supports(p)]
    if calib is not None and calib.sources:
        out.append("int8")
    else:
        log.info("%s: auto leaves int8 out: no calibration data (--calib-root / --calib-ann ...)", where)
    return out


# -- judging ---------------------------------------------------------------------------------------------------------
def _judged(ctx: _Ctx, xml: Path, hint: str, precision: str) -> Check:
    """The gate on the real crops (every output run in OpenVINO at `hint`, against ONNX Runtime fp32); without
    crops, finite outputs on random input and a warning, as fp16 on ONNX Runtime does."""
    card = ctx.judge.card
    if ctx.crops is not None and len(ctx.crops):
        try:
            out = ov_evaluate(hint)(xml, ctx.crops.x)
        except DynPoseError as e:  # the CPU plugin refused this precision mix: a failed candidate, not a failed export
            none = {f"{precision}_oks": 0.0, f"{precision}_oks_min": 0.0, f"{precision}_heatmap_rel_l2": None}
            return Check(precision, False, none, str(e))
        check = ctx.judge(out, ctx.ref(ctx.crops.x), ctx.crops, precision)
        log.info("  %s", ctx.judge.summary(check))
        return check
    x = np.random.default_rng(0).standard_normal((2, 3, card.input_height, card.input_width)).astype(np.float32)
    if all(np.isfinite(o).all() for o in ov_evaluate(hint)(xml, x)):
        log.warning("%s: openvino %s accuracy gate skipped: %s", card.name, precision, ctx.skipped)
        return Check(precision, True, {f"{precision}_gate": f"skipped: {ctx.skipped}"})
    return Check(precision, False, {}, f"openvino {precision} check failed for {card.name}: NaN/inf in the outputs")


def _float_candidate(ctx: _Ctx, fp32_xml: Path, precision: str) -> Candidate:
    """bf16 / fp16: slow layers kept f32, judged; on a failed gate the layers nearest the output go back to f32
    (the INT8 layer search's doubling + bisection) until it passes or the steps run out."""
    hint = INFERENCE_PRECISION[precision]
    slow = slow_layers(fp32_xml, hint, ctx.options.repeats)
    model = read_ir(fp32_xml)
    keep = with_fused_tails(model, slow)
    xml = save_ir(read_ir(fp32_xml), ctx.tmp / f"{precision}.xml", keep)
    check = _judged(ctx, xml, hint, precision)
    figures: dict[str, Any] = {f"{precision}_slow_layers_f32": sorted(slow)}
    if check or not isinstance(ctx.judge, PoseJudge) or ctx.crops is None or ctx.judge.min_oks <= 0:
        return Candidate(precision, precision, hint, xml, _with(check, figures), tuple(keep))
    order = [n for n in reversed(weighted_layers(model)) if n not in slow]

    def trial(k: int) -> Trial:
        marks = with_fused_tails(model, [*slow, *order[:k]])
        path = save_ir(read_ir(fp32_xml), ctx.tmp / f"{precision}-{k}.xml", marks)
        return Trial(order[:k], path, _judged(ctx, path, hint, precision), precision=precision)

    chosen, tried = search_fp32_layers(trial, len(order), MAX_STEPS, [Trial([], xml, check, precision=precision)])
    figures[f"{precision}_search_steps"] = [t.step() for t in tried]
    if chosen is None:
        best = max(tried, key=lambda t: t.oks)
        message = (
            f"openvino {precision} for {ctx.judge.card.name}: no set of f32 layers reaches mean OKS {ctx.judge.min_oks} "
            f"vs fp32 (best {best.oks:.4f} with {len(best.exclude)} layers f32, {len(tried)} tries); use fp32 or int8"
        )
        return Candidate(precision, precision, hint, xml, Check(precision, False, figures, message))
    figures[f"{precision}_fp32_layers"] = list(chosen.exclude)
    keep = with_fused_tails(model, [*slow, *chosen.exclude])
    return Candidate(precision, precision, hint, chosen.path, _with(chosen.check, figures), tuple(keep))


def _with(check: Check, figures: dict[str, Any]) -> Check:
    return Check(check.name, check.passed, {**check.figures, **figures}, check.message)


def _failed_int8(make: Callable[[], Check]) -> Check:
    """A path to INT8 that OpenVINO refuses (a quantized graph its CPU plugin cannot run) is a failed candidate: the
    other INT8 path, fp32 and bf16 are still judged."""
    try:
        return make()
    except DynPoseError as e:
        return Check("int8", False, {"int8_oks": 0.0, "int8_oks_min": 0.0}, str(e))


def _qdq_int8(ctx: _Ctx, calib: CalibSpec, options: Int8Options, xml: Path) -> Check:
    """Our Q/DQ INT8 (pose: the calibration and the fp32-layer search, judged in OpenVINO), converted to `xml`."""
    qdq = ctx.tmp / "int8-qdq.onnx"
    if isinstance(ctx.judge, PoseJudge):
        log.info("%s: int8 from the Q/DQ calibration (layer search judged in OpenVINO)", ctx.judge.card.name)
        check = search_int8(ctx.src, qdq, calib, ctx.judge, options)
    else:
        figures, gate = quantize_router_int8(
            ctx.src, qdq, ctx.judge.card, calib, target=options.target, cache_dir=options.cache_dir,
            progress=options.progress,
        )  # fmt: skip
        check = _with(ctx.judge(ov_evaluate("f32")(qdq, gate.x), ctx.ref(gate.x), gate, "int8"), figures)
    if check:
        save_ir(convert_onnx(qdq), xml)
    return check


def _int8_candidates(ctx: _Ctx, fp32_xml: Path) -> list[Candidate]:
    """The Q/DQ INT8 (our calibration and layer search, judged in OpenVINO) and, for pose models, NNCF's."""
    calib = ctx.options.calib
    if calib is None or not calib.sources:
        raise DynPoseError(
            "int8 needs calibration data: pass --calib-root DIR or --calib-ann/--calib-dets with --calib-images"
        )
    run = ov_evaluate("f32")
    options = replace(ctx.options.int8, evaluate=run)
    xml = ctx.tmp / "int8-qdq.xml"
    check = _failed_int8(lambda: _qdq_int8(ctx, calib, options, xml))
    out = [Candidate("int8 (qdq)", "int8", "f32", xml, _with(check, {"int8_source": "qdq"}), source="qdq")]
    judge = ctx.judge
    if isinstance(judge, PoseJudge):
        from dynpose.export.calibration.nncf_int8 import nncf_int8

        log.info("%s: int8 from NNCF post-training quantization", judge.card.name)
        nxml = ctx.tmp / "int8-nncf.xml"
        check = _failed_int8(lambda: nncf_int8(fp32_xml, nxml, calib, judge, options, run, ctx.ref))
        log.info("  %s", judge.summary(check) if "int8_oks" in check.figures else check.message)
        out.append(Candidate("int8 (nncf)", "int8", "f32", nxml, check, source="nncf"))
    return out


# -- the per-layer profile -----------------------------------------------------------------------------------------------
def _layer_ms(xml: Path, hints: tuple[str, ...], batch: int, runs: int) -> list[dict[str, float]]:
    """Per-layer milliseconds at each inference precision in `hints` (OpenVINO's performance counters, median of
    `runs`) at a static batch; the precisions take turns run by run, so a busy spell hits them alike."""
    ov = import_openvino()
    model = read_ir(xml)
    shape = model.inputs[0].get_partial_shape()
    dims = [batch, *(shape[i].get_length() for i in (1, 2, 3))]
    model.reshape(dims)
    core = ov.Core()
    requests = [
        core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": h, "PERF_COUNT": True}).create_infer_request()
        for h in hints
    ]
    x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    samples: list[dict[str, list[float]]] = [{} for _ in hints]
    for r in range(runs + 1):  # the first round is the warm-up: first runs allocate and pick kernels
        for request, acc in zip(requests, samples, strict=True):
            request.infer({0: x})
            if r:
                for p in request.profiling_info:
                    acc.setdefault(p.node_name, []).append(p.real_time.total_seconds() * 1e3)
    return [{k: float(np.median(v)) for k, v in acc.items()} for acc in samples]


def slow_layers(fp32_xml: Path, hint: str, runs: int = 3, batch: int = SPEED_BATCH) -> list[str]:
    """Layers whose kernel at inference precision `hint` is slower than in f32 on this CPU (over `SLOWER` x, and
    the difference over `MIN_SHARE` of the model's time): kept in f32, they cost nothing in accuracy and save time."""
    if hint == "f32":
        return []
    f32, low = _layer_ms(fp32_xml, ("f32", hint), batch, runs)
    total = sum(low.values()) or 1.0
    names = set(weighted_layers(read_ir(fp32_xml)))
    out = []
    for name, t in sorted(low.items(), key=lambda kv: -kv[1]):
        base = f32.get(name)
        if name in names and base is not None and t > SLOWER * base and t - base > MIN_SHARE * total:
            log.info("  %s: %.1f ms in %s vs %.1f ms in f32 at batch %d: kept in f32", name, t, hint, base, batch)
            out.append(name)
    return out


# -- timing ------------------------------------------------------------------------------------------------------------
def time_candidates(src: Path, candidates: list[Candidate], x: np.ndarray, repeats: int) -> dict[str, float]:
    """Milliseconds per crop at batch len(x) of each candidate and of ONNX Runtime fp32 (`ORT_FP32`), every core,
    interleaved (a, b, c, a, b, c, ...) so load changes hit all alike; medians."""
    batch = (len(x),)
    runners = {c.label: OpenVinoRunner(c.xml, CompileOptions(c.hint, buckets=batch)).activate() for c in candidates}
    session = open_session(src)
    calls: dict[str, Callable[[], Any]] = {k: functools.partial(r.infer_all, x) for k, r in runners.items()}
    calls[ORT_FP32] = lambda: run_session_all(session, x)
    try:
        for call in calls.values():
            call()  # warm-up
        samples: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(repeats):
            for k, call in calls.items():
                t0 = time.perf_counter()
                call()
                samples[k].append(time.perf_counter() - t0)
    finally:
        for r in runners.values():
            r.deactivate()
    return {k: float(np.median(v)) * 1e3 / len(x) for k, v in samples.items()}


def _speed_batch(ctx: _Ctx) -> np.ndarray:
    card = ctx.judge.card
    if ctx.crops is not None and len(ctx.crops):
        return np.ascontiguousarray(ctx.crops.x[np.arange(SPEED_BATCH) % len(ctx.crops)], np.float32)
    rng = np.random.default_rng(0)
    return rng.standard_normal((SPEED_BATCH, 3, card.input_height, card.input_width)).astype(np.float32)


# -- the step ----------------------------------------------------------------------------------------------------------
def _make(ctx: _Ctx, fp32_xml: Path, precision: str) -> list[Candidate]:
    if precision == "fp32":
        return [Candidate("fp32", "fp32", "f32", fp32_xml, _judged(ctx, fp32_xml, "f32", "fp32"))]
    if precision in ("bf16", "fp16"):
        log.info("%s: openvino %s (per-layer profile against f32, then the gate)", ctx.judge.card.name, precision)
        return [_float_candidate(ctx, fp32_xml, precision)]
    return _int8_candidates(ctx, fp32_xml)


def _report(name: str, made: list[Candidate], ms: dict[str, float], chosen: Candidate) -> dict[str, Any]:
    """Log what was measured, one line per candidate; the record the manifest keeps."""
    base = ms.get(ORT_FP32)
    record: dict[str, Any] = {}
    for c in made:
        t = ms.get(c.label)
        speed = ""
        if t:
            speed = f"; {t:.2f} ms/crop at batch {SPEED_BATCH}" + (f", {base / t:.2f}x ONNX Runtime fp32" if base else "")
        gate = "gate passed" if c.check else f"gate failed: {c.check.message}"
        log.info("%s: openvino %-11s %s%s%s", name, c.label, gate, speed, "  <- kept" if c is chosen else "")
        record[c.label] = {"passed": c.check.passed, "ms_per_crop_b8": t}
        if not c.check:
            record[c.label]["why"] = c.check.message
    if base:
        record[ORT_FP32] = {"ms_per_crop_b8": base}
    return record


def to_openvino(
    src: str | os.PathLike, dst: str | os.PathLike, judge: Judge, gate: tuple[CropSet | None, str], options: OpenVinoOptions
) -> tuple[Path, Check]:
    """fp32 ONNX `src` -> the IR `dst` (+ its `.bin`) at `options.precision` (see the module doc). The check is falsy
    with the asked precision's message when nothing passes the gate; its figures carry the gate's figures of the
    kept IR and, under "openvino", the entry's `openvino` record (this machine, the precision and inference
    precision kept, the layers kept f32, INT8's source, every candidate's gate and time)."""
    src, dst = Path(src), Path(dst)
    name = judge.card.name
    info = cpu_info()
    wanted = wanted_precisions(options.precision, info, options.calib, name)
    session = open_session(src)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp_s:
        ctx = _Ctx(src, Path(tmp_s), judge, gate[0], gate[1], lambda x: run_session_all(session, x), options)
        log.info("%s: converting to OpenVINO IR (OpenVINO %s, %s)", name, info.release, info.isa)
        fp32_xml = save_ir(convert_onnx(src), ctx.tmp / "fp32.xml")
        made = [c for p in wanted for c in _make(ctx, fp32_xml, p)]
        passing = [c for c in made if c.check]
        if not passing:
            failed = next((c for c in made if c.precision == options.precision), made[-1])
            return dst, failed.check
        ms = time_candidates(src, passing, _speed_batch(ctx), options.repeats)
        chosen = min(passing, key=lambda c: ms[c.label])
        record = _report(name, made, ms, chosen)
        os.replace(chosen.xml, dst)
        os.replace(chosen.xml.with_suffix(".bin"), dst.with_suffix(".bin"))
    meta = {
        **info.metadata(),
        "precision": chosen.precision,
        "inference_precision": chosen.hint,
        "f32_layers": list(chosen.keep_f32),
        "int8_source": chosen.source,
        "batch_buckets": list(BUCKETS),
        "asked": options.precision,
        "kept": chosen.label,
        "candidates": record,
    }
    return dst, Check(chosen.precision, True, {**chosen.check.figures, "openvino": meta})
