"""INT8 Q/DQ ONNX with a sensitivity search that keeps the layers breaking the accuracy gate in fp32.

Heatmap models do not survive naive INT8: a heatmap's peak moves by a pixel when a few layers lose precision, and
one pixel at 1/4 resolution is a large keypoint error. So after ONNX Runtime's `quantize_static` (Q/DQ format),
the quantized model is judged against fp32 on held-out crops (`dynpose.export.judges.PoseJudge`: mean keypoint
OKS, decoded from all outputs: SimDR's two vectors too), and while the gate fails the most sensitive layers go back to
fp32 (`nodes_to_exclude`): first the output heads (the heatmap conv; SimDR's two linear layers and their bias Adds),
then layers ranked by the quantization noise they inject on real activations (weight + input + output
noise-to-signal ratio, measured with the calibration ranges). The number kept in fp32 doubles until the gate holds,
then a short bisection trims it (`dynpose.export.calibration.search`). Calibration runs once; its ranges are cached (ORT's
calibration cache) so each search step only rewrites the graph.

Two flavours: `ort` (uint8 asymmetric activations, int8 per-channel weights: what ORT's CPU kernels run fast) and
`tensorrt` (int8 symmetric activations and weights, as TensorRT's explicit quantization expects).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from dynpose.errors import DynPoseError
from dynpose.export.calibration.crops import CalibSpec, CropSet, build_crop_set
from dynpose.export.calibration.search import MAX_STEPS, Trial, best_trial, search_fp32_layers
from dynpose.export.judges import Check, PoseJudge, compare_speed
from dynpose.fileio import atomic_path, sha256_file
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import copy_metadata, io_names, load_onnx, name_nodes, open_session, run_session_all

log = logging.getLogger(__name__)

WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Which ops get Q/DQ, per target. ORT CPU: also the glue between convolutions, so tensors stay uint8 across the
# residual Adds, ReLUs and HRNet's upsample/fuse paths (HRNet-W32 at batch 8 measured 2.55x faster than fp32 this
# way vs 2.14x with convolutions alone). TensorRT: the ops its explicit-quantization fusions expect Q/DQ on.
OP_TYPES = {
    "ort": WEIGHTED + ("Add", "Mul", "Relu", "Resize", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool"),
    "tensorrt": WEIGHTED + ("Add",),
}
# ONNX Runtime's quantization package logs through the root logger (module-level `logging.warning`) and a few
# named loggers under this one.
ORT_QUANT_LOGGER = "onnxruntime.quantization"


# Runs a model file on a batch of crops and returns every output (fp32, graph order).
Evaluate = Callable[[Path, np.ndarray], list[np.ndarray]]


def ort_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """`Evaluate` on ONNX Runtime CPU."""
    return run_session_all(open_session(path), x)


@dataclass(frozen=True)
class Int8Options:
    """How INT8 is made: the Q/DQ flavour (ort | tensorrt), where calibration crops and ranges are cached, whether
    a calibration progress bar shows, the most quantizations the layer search may try, and what runs each candidate
    for the gate (`evaluate`: the runtime that will run the file, e.g. OpenVINO; None: ONNX Runtime CPU, and the
    result is then also timed against fp32 there)."""

    target: str = "ort"
    cache_dir: Path | None = None
    progress: bool = True
    max_steps: int = MAX_STEPS
    evaluate: Evaluate | None = None


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


# -- ONNX Runtime's quantizer, quietly ---------------------------------------------------------------------------------
class _DropBelowError(logging.Filter):
    """Drops records below ERROR logged from files under `folder` (ORT's quantization package)."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(self.folder)


class _LastResort(logging.Handler):
    """Passes records on to `logging.lastResort`, as the logging module does when a logger has no handler."""

    def emit(self, record: logging.LogRecord) -> None:
        last = logging.lastResort
        if last is not None and record.levelno >= last.level:
            last.handle(record)


@contextmanager
def quiet_ort_quantization() -> Iterator[None]:
    """Silence ONNX Runtime's quantization notes (warnings such as "Please consider to run pre-processing" on every
    call; the graph is shape-inferred here already) for the block; its errors and every other record pass.

    ORT logs them through the root logger, so the block adds a filter there that drops only records from ORT's
    quantization files, and lowers nothing: the root logger's level (and what the host and dynpose log) is left
    alone. The named `onnxruntime.quantization` loggers are set to ERROR for the block. ORT's module-level
    `logging.warning` would also call `logging.basicConfig()` on a handler-less root logger, leaving a handler
    behind; a stand-in handler that forwards to `logging.lastResort` prevents that. Everything is restored after.
    """
    from onnxruntime import quantization

    root = logging.getLogger()
    named = logging.getLogger(ORT_QUANT_LOGGER)
    drop = _DropBelowError(os.path.dirname(os.path.abspath(quantization.__file__)))
    stand_in = _LastResort() if not root.handlers else None
    level = named.level
    root.addFilter(drop)
    named.setLevel(logging.ERROR)
    if stand_in is not None:
        root.addHandler(stand_in)
    try:
        yield
    finally:
        if stand_in is not None:
            root.removeHandler(stand_in)
        named.setLevel(level)
        root.removeFilter(drop)


def _settings(target: str, method: str) -> dict[str, Any]:
    from onnxruntime import quantization as q

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
    try:
        open_session(src, level="basic", optimized_model_path=dst)
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


@dataclass(frozen=True)
class _Quantizer:
    """Everything one `quantize_static` call needs but the exclusion list: the prepared graph, its input, the
    calibration crops, the settings and where the ranges are cached."""

    prepared: Path
    input_name: str
    calib: np.ndarray
    settings: dict[str, Any]
    ranges: Path
    progress: bool = False

    def __call__(self, out: Path, exclude: list[str]) -> None:
        """Write the Q/DQ model to `out` with the nodes in `exclude` left in fp32."""
        from onnxruntime import quantization as q

        bar = None
        if self.progress and not self.ranges.is_file():  # only the first call calibrates; later ones reuse the ranges
            from tqdm import tqdm

            bar = tqdm(total=len(self.calib), desc="calibrating", unit="crop", leave=False)
        try:
            with quiet_ort_quantization():
                q.quantize_static(
                    str(self.prepared),
                    str(out),
                    _Reader(self.input_name, self.calib, on_batch=bar.update if bar else None),
                    nodes_to_exclude=list(exclude),
                    calibration_cache_path=str(self.ranges),
                    **self.settings,
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
    """Quantizable nodes, most sensitive first: the output heads (`head_nodes`), then by injected noise (all their
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
    heads = head_nodes(model, op_types)
    rest = sorted((k for k in scores if k not in heads), key=lambda k: -scores[k])
    return heads + rest


def head_nodes(model: onnx.ModelProto, op_types: tuple[str, ...], max_depth: int = 8) -> list[str]:
    """The quantizable nodes between each graph output and the nearest weighted layer before it, that layer
    included, output by output: a heatmap model's last conv; SimDR's bias Add and MatMul of each of its two linear
    heads (a 3-D Linear exports as MatMul + Add, and a uint8 Add alone would leave the MatMul's logits
    quantized). The walk follows each node's first input made by another node, at most `max_depth` nodes."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    heads: list[str] = []
    for out in model.graph.output:
        node = producer.get(out.name)
        for _ in range(max_depth):
            if node is None:
                break
            if node.op_type in op_types and node.name not in heads:
                heads.append(node.name)
            if node.op_type in WEIGHTED:
                break
            node = next((producer[t] for t in node.input if t in producer), None)
    return heads


def _ranges_path(cache_dir: Path, src: Path, crops_key: str, target: str, method: str) -> Path:
    # "prep2": ranges name the tensors of the graph `_prepare` makes; a change there must not reuse old ranges.
    key = f"prep2|{sha256_file(src)}|{crops_key}|{target}|{method}|{OP_TYPES[target]}"
    h = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"ranges-{h}.json"


def _crop_key(crops: CropSet) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(crops.x[:: max(1, len(crops) // 16)]).tobytes())
    h.update(str(crops.x.shape).encode())
    return h.hexdigest()[:16]


def calibration_split(spec: CalibSpec, card: ModelCard, options: Int8Options) -> tuple[CropSet, CropSet, CropSet]:
    """The crop set (cached) and its calibration / held-out halves (each a copy: made once); both must be
    non-empty. Every INT8 path (Q/DQ here, NNCF for OpenVINO) calibrates and judges on this split."""
    log.info("%s: building calibration crops (%d box files)", card.name, len(spec.sources))
    crops = build_crop_set(spec, card, options.cache_dir)
    cal, gate = crops.calib, crops.held_out
    if len(cal) == 0 or len(gate) == 0:
        raise DynPoseError("calibration data: need both calibration crops and held-out gate crops")
    log.info(
        "%s: calibrating int8 (%s, %s) on %d crops; gate: %d held-out crops",
        *(card.name, options.target, spec.method, len(cal), len(gate)),
    )
    return crops, cal, gate


def _quantizer(
    src: Path, tmp: Path, crops: CropSet, cal: CropSet, method: str, options: Int8Options
) -> tuple[_Quantizer, onnx.ModelProto]:
    """The quantizer over the prepared graph in `tmp` (and that graph's proto). The calibration ranges live in the
    cache dir when there is one, so a later export of the same model on the same crops skips calibration."""
    prepared = tmp / "prepared.onnx"
    model = _prepare(src, prepared)
    cache = options.cache_dir
    ranges = tmp / "ranges.json" if cache is None else _ranges_path(cache, src, _crop_key(crops), options.target, method)
    settings = _settings(options.target, method)
    return _Quantizer(prepared, io_names(model)[0], cal.x, settings, ranges, options.progress), model


def _save_with_metadata(qpath: Path, src: Path, dst: Path) -> None:
    """Write the quantized model to `dst` with the fp32 file's metadata (the card travels in the quantized file too;
    the quantizer drops metadata_props)."""
    qmodel = copy_metadata(onnx.load(str(src), load_external_data=False), onnx.load(str(qpath)))
    with atomic_path(dst) as out_tmp:
        onnx.save(qmodel, str(out_tmp))


def _count(model: onnx.ModelProto, target: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type in OP_TYPES[target])


# -- pose models: quantize + layer search ------------------------------------------------------------------------------
def _trial_fn(
    quantize: _Quantizer, judge: PoseJudge, gate: CropSet, tmp: Path, evaluate: Evaluate
) -> Callable[[list[str], str], Trial]:
    """One search step: quantize with `exclude` kept fp32, run it with `evaluate`, judge it on the gate crops
    against the prepared fp32 graph's outputs (ONNX Runtime), log one line."""
    ref = run_session_all(open_session(quantize.prepared), gate.x)
    t0 = time.perf_counter()
    names = itertools.count()

    def trial(exclude: list[str], label: str) -> Trial:
        out = tmp / f"q{next(names)}.onnx"
        quantize(out, exclude)
        got = evaluate(out, gate.x)
        check = judge(got, ref, gate, "int8")
        log.info("  %s: gate OKS %.4f [%.0fs]", label, check.figures["int8_oks"], time.perf_counter() - t0)
        return Trial(exclude, out, check, all(bool(np.isfinite(o).all()) for o in got))

    return trial


def _search(
    quantize: _Quantizer,
    model: onnx.ModelProto,
    judge: PoseJudge,
    cal: CropSet,
    gate: CropSet,
    tmp: Path,
    options: Int8Options,
) -> tuple[Trial | None, list[Trial]]:
    """Every layer INT8 first; while the gate fails, the layer search over the sensitivity ranking."""
    trial = _trial_fn(quantize, judge, gate, tmp, options.evaluate or ort_outputs)
    first = trial([], "all layers int8")
    if first.check or options.max_steps <= 1:
        return (first if first.check else None), [first]
    sample = cal.x[np.flatnonzero(~cal.flipped)][: 16 if quantize.prepared.stat().st_size < 20e6 else 4]
    symmetric = options.target == "tensorrt"
    order = rank_sensitive(quantize.prepared, model, quantize.ranges, sample, OP_TYPES[options.target], symmetric)
    n_all = len(order)
    return search_fp32_layers(
        lambda k: trial(order[:k], f"{k} of {n_all} layers kept fp32"), n_all, options.max_steps, [first]
    )


def _int8_figures(
    chosen: Trial, tried: list[Trial], crops: tuple[int, int], method: str, judge: PoseJudge, target: str
) -> dict[str, Any]:
    """The manifest figures of a passing search; `crops`: (calibration, gate) crop counts."""
    f = chosen.check.figures
    return {
        "int8_target": target,
        "int8_method": method,
        "int8_calib_crops": crops[0],
        "int8_gate_crops": crops[1],
        "int8_oks": f["int8_oks"],
        "int8_oks_min": f["int8_oks_min"],
        "int8_heatmap_rel_l2": f["int8_heatmap_rel_l2"],
        "int8_min_oks": judge.min_oks,
        "int8_fp32_layers": chosen.exclude,
        "int8_search_steps": [t.step() for t in tried],
    }


def search_int8(
    src: str | os.PathLike, dst: str | os.PathLike, spec: CalibSpec, judge: PoseJudge, options: Int8Options
) -> Check:
    """Calibrate on real crops under `judge.card`, quantize to Q/DQ, search the fp32 exclusions that pass `judge`
    (mean OKS vs fp32 on the held-out crops); write `dst` when one does.

    The check's figures are what the manifest keeps in `checks`: gate OKS (mean/min), layers kept in fp32, the
    search's steps, the INT8/FP32 speed-up at batch 8 on ORT CPU (only when ORT judged it: `options.evaluate` is
    None). Falsy, with the best OKS reached in its message, when no exclusion set passes within `options.max_steps`
    quantizations.
    """
    src, dst = Path(src), Path(dst)
    spec.validate()
    _settings(options.target, spec.method)  # a bad target fails before the crops are built
    card = judge.card
    t_start = time.perf_counter()
    crops, cal, gate = calibration_split(spec, card, options)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp_s:
        quantize, model = _quantizer(src, Path(tmp_s), crops, cal, spec.method, options)
        chosen, tried = _search(quantize, model, judge, cal, gate, Path(tmp_s), options)
        if chosen is None:
            best = best_trial(tried)
            return Check(
                "int8",
                False,
                {"int8_search_steps": [t.step() for t in tried]},
                f"int8 for {card.name}: no layer set reaches mean OKS {judge.min_oks} vs fp32 (best "
                f"{best.check.figures['int8_oks']:.4f} with {len(best.exclude)} layers kept fp32, {len(tried)} tries); "
                "use --precision fp16, more calibration data, or lower --min-oks",
            )
        _save_with_metadata(chosen.path, src, dst)
    figures = _int8_figures(chosen, tried, (len(cal), len(gate)), spec.method, judge, options.target)
    figures["int8_quantized_layers"] = n_q = _count(model, options.target) - len(chosen.exclude)
    log.info(
        "%s: int8 gate mean OKS vs fp32 %.4f (min %.4f) on %d held-out crops; %d layers kept fp32, %d int8; search "
        "took %.0fs",
        *(card.name, figures["int8_oks"], figures["int8_oks_min"], len(gate), len(chosen.exclude), n_q),
        time.perf_counter() - t_start,
    )
    if options.evaluate is not None:  # judged in another runtime, which times it itself
        return Check("int8", True, figures)
    speed = compare_speed(src, dst, gate.x, "int8", card.name, "consider fp32/fp16 here")
    return Check("int8", True, {**figures, **speed.figures})


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    card: ModelCard,
    spec: CalibSpec,
    min_oks: float = 0.95,
    **options: Any,
) -> dict[str, Any]:
    """`search_int8` with a `PoseJudge(card, min_oks)` (0 disables the gate): the manifest figures, or a
    DynPoseError with the best OKS reached when no exclusion set meets `min_oks`. `options`: `Int8Options` fields
    (target, cache_dir, progress, max_steps)."""
    o = Int8Options(**options)
    if o.cache_dir is not None:
        o = replace(o, cache_dir=Path(o.cache_dir))
    return search_int8(src, dst, spec, PoseJudge(card, min_oks), o).require().figures


# -- the router: quantized once ----------------------------------------------------------------------------------------
def quantize_router_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    card: ModelCard,
    spec: CalibSpec,
    *,
    target: str = "ort",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], CropSet]:
    """INT8 Q/DQ router: calibrate on the spec's crops made under the router's card and quantize once; write `dst`.

    No layer search: the router's output is three scores, not heatmaps, and the caller judges the result by routing
    decisions on the returned held-out gate crops (`dynpose.export.judges.RouterJudge`). Returns (checks, gate).
    """
    src, dst = Path(src), Path(dst)
    spec.validate()
    options = Int8Options(target, Path(cache_dir) if cache_dir is not None else None, progress)
    _settings(target, spec.method)
    crops, cal, gate = calibration_split(spec, card, options)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp_s:
        quantize, model = _quantizer(src, Path(tmp_s), crops, cal, spec.method, options)
        quantize(Path(tmp_s) / "q.onnx", [])
        _save_with_metadata(Path(tmp_s) / "q.onnx", src, dst)
    return {
        "int8_target": target,
        "int8_method": spec.method,
        "int8_calib_crops": len(cal),
        "int8_gate_crops": len(gate),
        "int8_quantized_layers": _count(model, target),
        "int8_fp32_layers": [],
    }, gate
