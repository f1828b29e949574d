"""INT8 Q/DQ ONNX with a sensitivity search that keeps the layers breaking the accuracy gate in fp32.

Heatmap models do not survive naive INT8: a heatmap's peak moves by a pixel when a few layers lose precision, and
one pixel at 1/4 resolution is a large keypoint error. So after ONNX Runtime's `quantize_static` (Q/DQ format),
the quantized model's keypoints are compared with fp32's on held-out crops (mean OKS), and while the gate fails the
most sensitive layers go back to fp32 (`nodes_to_exclude`): first the heatmap head, then layers ranked by the
quantization noise they inject on real activations (weight + input + output noise-to-signal ratio, measured with the
calibration ranges). The number kept in fp32 doubles until the gate holds, then a short bisection trims it.
Calibration runs once; its ranges are cached (ORT's calibration cache) so each search step only rewrites the graph.

Two flavours: `ort` (uint8 asymmetric activations, int8 per-channel weights: what ORT's CPU kernels run fast) and
`tensorrt` (int8 symmetric activations and weights, as TensorRT's explicit quantization expects).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from dynpose.calibration.crops import CalibSpec, CropSet, build_crop_set
from dynpose.errors import DynPoseError
from dynpose.export.verify import keypoint_agreement
from dynpose.fileio import atomic_path, sha256_file
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import copy_metadata, io_names, load_onnx, name_nodes, open_session, run_session

WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Which ops get Q/DQ, per target. ORT CPU: also the glue between convolutions, so tensors stay uint8 across the
# residual Adds, ReLUs and HRNet's upsample/fuse paths (HRNet-W32 at batch 8 measured 2.55x faster than fp32 this
# way vs 2.14x with convolutions alone). TensorRT: the ops its explicit-quantization fusions expect Q/DQ on.
OP_TYPES = {
    "ort": WEIGHTED + ("Add", "Mul", "Relu", "Resize", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool"),
    "tensorrt": WEIGHTED + ("Add",),
}
MAX_STEPS = 12
SPEED_BATCH = 8
WARN_SPEEDUP = 1.1

Log = Callable[[str], None]


def _console_log(msg: str) -> None:
    """Progress lines on stderr; rich renders the [yellow] warning markup."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(msg)


class _Reader:
    """CalibrationDataReader over an array, `batch` crops per call; `set_range` windows it in batches (ORT's
    strided min/max calibration computes and merges ranges window by window, so memory stays one batch deep)."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 8, on_batch: Callable[[int], Any] | None = None) -> None:
        self.input_name, self.x, self.batch, self.on_batch = input_name, x, batch, on_batch
        self.i, self.end = 0, len(x)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= self.end:
            return None
        b = self.x[self.i : min(self.i + self.batch, self.end)]
        self.i += self.batch
        if self.on_batch is not None:
            self.on_batch(len(b))
        return {self.input_name: np.ascontiguousarray(b, np.float32)}

    def rewind(self) -> None:
        self.i = 0

    def __len__(self) -> int:
        return (len(self.x) + self.batch - 1) // self.batch

    def set_range(self, start_index: int, end_index: int) -> None:
        self.i, self.end = start_index * self.batch, min(end_index * self.batch, len(self.x))


def _ort_quant() -> Any:
    from onnxruntime import quantization as q

    # ORT logs "please run pre-processing" on every call; the graph is shape-inferred here already.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    return q


def _settings(target: str, method: str) -> dict[str, Any]:
    q = _ort_quant()
    methods = {
        "minmax": q.CalibrationMethod.MinMax,
        "entropy": q.CalibrationMethod.Entropy,
        "percentile": q.CalibrationMethod.Percentile,
    }
    common = {
        "quant_format": q.QuantFormat.QDQ,
        "per_channel": True,
        "reduce_range": False,
        "calibrate_method": methods[method],
        "weight_type": q.QuantType.QInt8,
        "op_types_to_quantize": list(OP_TYPES[target]),
    }
    # Strided min/max: ranges are computed per batch and merged, instead of holding every activation of every
    # calibration crop in memory (gigabytes for HRNet).
    extra: dict[str, Any] = {"CalibStridedMinMax": 1} if method == "minmax" else {}
    if target == "ort":
        return {**common, "activation_type": q.QuantType.QUInt8, "extra_options": extra}
    if target == "tensorrt":
        extra.update({"ActivationSymmetric": True, "WeightSymmetric": True})
        return {**common, "activation_type": q.QuantType.QInt8, "extra_options": extra}
    raise DynPoseError(f"int8 target {target!r}: use ort or tensorrt")


def _prepare(src: Path, dst: Path) -> onnx.ModelProto:
    """The graph the quantizer sees: ONNX Runtime's basic (hardware-independent) optimisations applied, shapes
    inferred, every node named (exclusion lists refer to node names).

    The basic level folds constants and fuses Conv+Add(bias)/Conv+BatchNorm; without it a converted graph such as
    TinyPose's (bias as a separate Add after every Conv) gets Q/DQ between the Conv and its bias, which blocks the
    fusion at run time and costs accuracy for nothing.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
        model = onnx.load(str(dst))
    except Exception:  # an unoptimisable graph still quantizes as it is
        model = load_onnx(src)
    # ORT lists every domain it knows; keep only those in use so other consumers (TensorRT's parser) see a plain graph.
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    name_nodes(model)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shapes only help the quantizer; a graph without them still quantizes
        pass
    onnx.save(model, str(dst))
    return model


def _quantize(
    prepared: Path,
    out: Path,
    calib: np.ndarray,
    input_name: str,
    settings: dict[str, Any],
    ranges: Path,
    exclude: list[str],
    progress: bool = False,
) -> None:
    q = _ort_quant()
    bar = None
    if progress and not ranges.is_file():  # only the first call calibrates; later ones reuse the cached ranges
        from tqdm import tqdm

        bar = tqdm(total=len(calib), desc="calibrating", unit="crop", leave=False)
    try:
        q.quantize_static(
            str(prepared),
            str(out),
            _Reader(input_name, calib, on_batch=bar.update if bar else None),
            nodes_to_exclude=list(exclude),
            calibration_cache_path=str(ranges),
            **settings,
        )
    except DynPoseError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DynPoseError(f"int8 quantization failed ({type(e).__name__}: {first})") from None
    finally:
        if bar is not None:
            bar.close()


def _noise(x: np.ndarray, lo: float, hi: float, symmetric: bool) -> float:
    """Noise-to-signal ratio of fake-quantizing x to 8 bits over [lo, hi], the way the quantizer will."""
    if symmetric:
        a = max(abs(lo), abs(hi)) or 1.0
        scale, zp, qmin, qmax = a / 127.0, 0.0, -127.0, 127.0
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / 255.0 or 1.0
        zp, qmin, qmax = float(np.round(-lo / scale)), 0.0, 255.0
    y = (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale
    return float(((x - y) ** 2).sum() / max(float((x**2).sum()), 1e-12))


def _weight_noise(w: np.ndarray, axis: int = 0) -> float:
    w2 = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    scale = np.abs(w2).max(1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    y = np.clip(np.round(w2 / scale), -127, 127) * scale
    return float(((w2 - y) ** 2).sum() / max(float((w2**2).sum()), 1e-12))


def rank_sensitive(
    prepared: Path, model: onnx.ModelProto, ranges: Path, sample: np.ndarray, op_types: tuple[str, ...], symmetric: bool
) -> list[str]:
    """Quantizable nodes, most sensitive first: the ones producing graph outputs, then by injected noise (all their
    float inputs and their output fake-quantized with the calibrated ranges, plus per-channel weight noise)."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    tr = load_tensors_data(ranges).data
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in op_types]
    outputs = {o.name for o in model.graph.output}
    watch = {t for n in nodes for t in (*n.input, n.output[0]) if t in tr and t not in inits}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in sorted(watch - outputs):
        m.graph.output.add(name=t)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "watch.onnx"
        onnx.save(m, str(p))
        sess = open_session(p)
        names = [o.name for o in sess.get_outputs()]
        acts = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: sample}), strict=True))

    def act_noise(t: str) -> float:
        if t not in tr or t not in acts:
            return 0.0
        lo, hi = tr[t].range_value
        return _noise(np.asarray(acts[t], np.float32), float(np.min(lo)), float(np.max(hi)), symmetric)

    scores: dict[str, float] = {}
    for n in nodes:
        weighted = n.op_type in WEIGHTED
        acts_in = [n.input[0]] if weighted else [t for t in n.input if t and t not in inits]
        s = sum(act_noise(t) for t in acts_in) + act_noise(n.output[0])
        if weighted and len(n.input) > 1 and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]])
            s += _weight_noise(w, 1 if n.op_type == "ConvTranspose" else 0) if w.ndim > 1 else 0.0
        scores[n.name] = s
    heads = [n.name for n in nodes if n.output[0] in outputs]
    rest = sorted((k for k in scores if k not in heads), key=lambda k: -scores[k])
    return heads + rest


def measure_speedup(
    fp32: Path, int8: Path, x: np.ndarray, batch: int = SPEED_BATCH, repeats: int = 5, threads: int = 0
) -> dict[str, float]:
    """fp32 vs int8 time per batch on ORT CPU, interleaved (a, b, a, b, ...) so load changes hit both; medians."""
    xb = np.ascontiguousarray(x[np.arange(batch) % len(x)], np.float32)
    sa, sb = open_session(fp32, threads=threads), open_session(int8, threads=threads)
    name = sa.get_inputs()[0].name
    for s in (sa, sb):
        s.run(None, {name: xb})  # warm-up: first runs allocate and pick kernels
    ta, tb = [], []
    for _ in range(repeats):
        for s, acc in ((sa, ta), (sb, tb)):
            t0 = time.perf_counter()
            s.run(None, {name: xb})
            acc.append(time.perf_counter() - t0)
    a, b = float(np.median(ta)), float(np.median(tb))
    return {"fp32_ms": a * 1e3, "int8_ms": b * 1e3, "speedup": a / b, "batch": batch, "repeats": repeats}


def log_speedup(speed: dict[str, float], precision: str, name: str, log: Log, hint: str) -> None:
    """One line with `measure_speedup`'s figures; a warning with `hint` when the lower precision does not pay."""
    msg = (
        f"{name}: {precision} vs fp32 on ONNX Runtime CPU at batch {speed['batch']}: {speed['speedup']:.2f}x "
        f"({speed['fp32_ms']:.1f} ms -> {speed['int8_ms']:.1f} ms)"
    )
    if speed["speedup"] < WARN_SPEEDUP:
        log(f"[yellow]warning[/]: {msg}: {precision} does not pay on this backend; {hint}")
    else:
        log(msg)


def _ranges_path(cache_dir: Path, src: Path, crops_key: str, target: str, method: str) -> Path:
    # "prep2": ranges name the tensors of the graph `_prepare` makes; a change there must not reuse old ranges.
    key = f"prep2|{sha256_file(src)}|{crops_key}|{target}|{method}|{OP_TYPES[target]}"
    h = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"ranges-{h}.json"


def _prepare_with_ranges(
    src: Path, tmp: Path, cache: Path | None, crops: CropSet, target: str, method: str
) -> tuple[Path, onnx.ModelProto, Path]:
    """(prepared graph in `tmp`, its proto, where the calibration ranges live): in the cache dir when there is one,
    so a later export of the same model on the same crops skips calibration, else beside the graph."""
    prepared = tmp / "prepared.onnx"
    model = _prepare(src, prepared)
    ranges = _ranges_path(cache, src, _crop_key(crops), target, method) if cache is not None else tmp / "ranges.json"
    return prepared, model, ranges


def _calibration_split(spec: CalibSpec, card: ModelCard, cache: Path | None, log: Log) -> tuple[CropSet, CropSet, CropSet]:
    """The crop set (cached) and its calibration / held-out halves; both halves must be non-empty."""
    log(f"{card.name}: building calibration crops ({len(spec.sources)} box files)")
    crops = build_crop_set(spec, card, cache)
    if len(crops.calib) == 0 or len(crops.held_out) == 0:
        raise DynPoseError("calibration data: need both calibration crops and held-out gate crops")
    return crops, crops.calib, crops.held_out


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    card: ModelCard,
    spec: CalibSpec,
    *,
    target: str = "ort",
    min_oks: float = 0.95,
    cache_dir: str | os.PathLike | None = None,
    log: Log = _console_log,
    progress: bool = True,
    max_steps: int = MAX_STEPS,
) -> dict[str, Any]:
    """Calibrate on real crops, quantize to Q/DQ, search the fp32 exclusions that keep the OKS gate; write `dst`.

    Returns the figures stored in the manifest's `checks`: gate OKS (mean/min), layers kept in fp32, the search's
    steps, and the measured INT8/FP32 speed-up at batch 8 on ORT CPU. Raises DynPoseError with the best OKS reached
    when no exclusion set meets `min_oks` (0 disables the gate).
    """
    src, dst = Path(src), Path(dst)
    spec.validate()
    settings = _settings(target, spec.method)
    symmetric = target == "tensorrt"
    cache = Path(cache_dir) if cache_dir is not None else None
    t_start = time.perf_counter()
    crops, cal, gate = _calibration_split(spec, card, cache, log)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp_s:
        tmp = Path(tmp_s)
        prepared, model, ranges = _prepare_with_ranges(src, tmp, cache, crops, target, spec.method)
        in_name, _ = io_names(model)
        ref_sess = open_session(prepared)
        ref_gate = run_session(ref_sess, gate.x)
        del ref_sess

        def evaluate(exclude: list[str], out: Path) -> dict[str, float]:
            _quantize(prepared, out, cal.x, in_name, settings, ranges, exclude, progress)
            sess = open_session(out)
            g = keypoint_agreement(run_session(sess, gate.x), ref_gate, gate, card)
            return {"gate": g["oks_mean"], "gate_min": g["oks_min"], "rel_l2": g["heatmap_rel_l2"], "finite": g["finite"]}

        log(f"{card.name}: calibrating int8 ({target}, {spec.method}) on {len(cal)} crops; gate: {len(gate)} held-out crops")
        t0 = time.perf_counter()
        steps: list[dict[str, Any]] = []
        best: tuple[float, list[str], Path] | None = None
        candidate = tmp / "q0.onnx"
        r = evaluate([], candidate)
        log(f"  all layers int8: gate OKS {r['gate']:.4f} [{time.perf_counter() - t0:.0f}s]")
        steps.append({"fp32_layers": 0, **r})

        def holds(res: dict[str, float]) -> bool:
            return bool(res["finite"]) and res["gate"] >= min_oks

        chosen: tuple[list[str], Path, dict[str, float]] | None = ([], candidate, r) if holds(r) else None
        best = (r["gate"], [], candidate)
        if chosen is None:
            sample = cal.x[np.flatnonzero(~cal.flipped)][: 16 if src.stat().st_size < 20e6 else 4]
            order = rank_sensitive(prepared, model, ranges, sample, OP_TYPES[target], symmetric)
            n_all = len(order)
            # Start at ~6% of the layers: single layers rarely fix a heatmap model and each try costs a quantization
            # (ORT's quantizer takes ~10 s per graph rewrite on TinyPose's 269 convolutions).
            k, lo_fail = max(1, n_all // 16), 0
            step = 1
            while chosen is None and step < max_steps:
                k = min(k, n_all)
                out = tmp / f"q{step}.onnx"
                r = evaluate(order[:k], out)
                steps.append({"fp32_layers": k, **r})
                log(f"  {k} of {n_all} layers kept fp32: gate OKS {r['gate']:.4f} [{time.perf_counter() - t0:.0f}s]")
                if r["gate"] > best[0]:
                    best = (r["gate"], order[:k], out)
                step += 1
                if holds(r):
                    chosen = (order[:k], out, r)
                    break
                if k >= n_all:
                    break
                lo_fail, k = k, k * 2
            # Trim: bisect between the last failing count and the passing one until the gap is a quarter of it.
            while chosen is not None and step < max_steps and len(chosen[0]) - lo_fail > max(2, len(chosen[0]) // 4):
                mid = (lo_fail + len(chosen[0])) // 2
                out = tmp / f"q{step}.onnx"
                r = evaluate(order[:mid], out)
                steps.append({"fp32_layers": mid, **r})
                log(f"  {mid} of {n_all} layers kept fp32: gate OKS {r['gate']:.4f} [{time.perf_counter() - t0:.0f}s]")
                step += 1
                if holds(r):
                    chosen = (order[:mid], out, r)
                else:
                    lo_fail = mid
        if chosen is None:
            raise DynPoseError(
                f"int8 for {card.name}: no layer set reaches mean OKS {min_oks} vs fp32 (best {best[0]:.4f} with "
                f"{len(best[1])} layers kept fp32, {len(steps)} tries); use --precision fp16, more calibration data, "
                "or lower --min-oks"
            )
        excluded, qpath, res = chosen
        _save_with_metadata(qpath, src, dst)
        speed = measure_speedup(src, dst, gate.x)

    n_q = sum(1 for n in model.graph.node if n.op_type in OP_TYPES[target]) - len(excluded)
    log(
        f"{card.name}: int8 gate mean OKS vs fp32 {res['gate']:.4f} (min {res['gate_min']:.4f}) on {len(gate)} held-out "
        f"crops; {len(excluded)} layers kept fp32, {n_q} int8; search took {time.perf_counter() - t_start:.0f}s"
    )
    log_speedup(speed, "int8", card.name, log, "consider fp32/fp16 here")
    return {
        "int8_target": target,
        "int8_method": spec.method,
        "int8_calib_crops": len(cal),
        "int8_gate_crops": len(gate),
        "int8_oks": res["gate"],
        "int8_oks_min": res["gate_min"],
        "int8_heatmap_rel_l2": res["rel_l2"],
        "int8_min_oks": min_oks,
        "int8_fp32_layers": excluded,
        "int8_quantized_layers": n_q,
        "int8_search_steps": steps,
        "int8_speedup_b8": speed["speedup"],
        "int8_ms_b8": speed["int8_ms"],
        "fp32_ms_b8": speed["fp32_ms"],
    }


def _save_with_metadata(qpath: Path, src: Path, dst: Path) -> None:
    """Write the quantized model to `dst` with the fp32 file's metadata (the card travels in the quantized file too;
    the quantizer drops metadata_props)."""
    qmodel = copy_metadata(onnx.load(str(src), load_external_data=False), onnx.load(str(qpath)))
    with atomic_path(dst) as out_tmp:
        onnx.save(qmodel, str(out_tmp))


def quantize_router_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    card: ModelCard,
    spec: CalibSpec,
    *,
    target: str = "ort",
    cache_dir: str | os.PathLike | None = None,
    log: Log = _console_log,
    progress: bool = True,
) -> tuple[dict[str, Any], CropSet]:
    """INT8 Q/DQ router: calibrate on the spec's crops made under the router's card and quantize once; write `dst`.

    No layer search: the router's output is three scores, not heatmaps, and the caller judges the result by routing
    decisions on the returned held-out gate crops (`dynpose.export.verify.router_agreement`). Returns (checks, gate).
    """
    src, dst = Path(src), Path(dst)
    spec.validate()
    settings = _settings(target, spec.method)
    cache = Path(cache_dir) if cache_dir is not None else None
    crops, cal, gate = _calibration_split(spec, card, cache, log)
    log(f"{card.name}: calibrating int8 ({target}, {spec.method}) on {len(cal)} crops; gate: {len(gate)} held-out crops")
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp_s:
        tmp = Path(tmp_s)
        prepared, model, ranges = _prepare_with_ranges(src, tmp, cache, crops, target, spec.method)
        _quantize(prepared, tmp / "q.onnx", cal.x, io_names(model)[0], settings, ranges, [], progress)
        _save_with_metadata(tmp / "q.onnx", src, dst)
    n_q = sum(1 for n in model.graph.node if n.op_type in OP_TYPES[target])
    return {
        "int8_target": target,
        "int8_method": spec.method,
        "int8_calib_crops": len(cal),
        "int8_gate_crops": len(gate),
        "int8_quantized_layers": n_q,
        "int8_fp32_layers": [],
    }, gate


def _crop_key(crops: CropSet) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(crops.x[:: max(1, len(crops) // 16)]).tobytes())
    h.update(str(crops.x.shape).encode())
    return h.hexdigest()[:16]
