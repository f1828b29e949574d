"""Export as small file-to-file steps, each returning the file it wrote and its `Check`.

    to_onnx (torch -> fp32 ONNX, checked against PyTorch) | adopt_onnx (a user's ONNX, its dynamic batch checked)
        -> to_fp16 | to_int8 (judged against the fp32 file on real crops)
        -> to_plan (a TensorRT plan)
    to_onnx | adopt_onnx -> to_openvino (an OpenVINO IR at fp32 / bf16 / fp16 / int8 / the fastest that passes the
        gate: `dynpose.export.openvino`)

A check is truthy when its gate holds and carries the figures for the manifest entry's `checks`; a step never
raises for a failed gate (its caller decides: `check.require()` raises the check's one-line message), only for
input it cannot work with. Steps write where they are told (the export API points them at a staging folder) and
know nothing of manifests or engine dirs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dynpose.export.calibration.crops import CalibSpec, CropSet
from dynpose.export.calibration.quantize import Int8Options, quantize_router_int8, search_int8
from dynpose.export.fp16 import convert_fp16
from dynpose.export.judges import Check, Judge, PoseJudge, compare_speed
from dynpose.export.onnx_export import export_torch
from dynpose.export.openvino import OpenVinoOptions
from dynpose.export.openvino import to_openvino as _to_openvino
from dynpose.export.verify import NO_CROPS, verify_onnx_batches, verify_torch_vs_onnx
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import io_names, load_onnx, open_session, run_session_all, set_card
from dynpose.roles import Role

log = logging.getLogger(__name__)

# The hint a "does not pay" speed warning gives, per precision.
SPEED_HINT = {"fp16": "it is meant for GPUs (TensorRT, CUDA)", "int8": "consider fp32 here"}


@dataclass(frozen=True)
class PlanOptions:
    """How a TensorRT plan is built: the profile's optimal batch (None: the builder's choice), the builder's
    optimisation level, the timing cache file shared by builds on this machine, and a progress display."""

    opt_batch: int | None = None
    opt_level: int = 3
    timing_cache: Path | None = None
    progress: bool = True


def to_onnx(model: Any, dst: str | os.PathLike, card: ModelCard, real: CropSet | None = None) -> tuple[Path, Check]:
    """A torch model -> fp32 ONNX at `dst` (opset 17, dynamic batch, card in its metadata), checked against
    PyTorch at batch 1 and 5 on random and (when given) real crops (`verify_torch_vs_onnx`)."""
    log.info("%s: exporting to ONNX (opset 17, dynamic batch)", card.name)
    dst = export_torch(model, dst, card)
    check = verify_torch_vs_onnx(model, dst, card, real)
    if check:
        log.info(
            "%s: ONNX Runtime vs PyTorch relative L2 %.2e (batch 1 and 5, random%s crops)",
            *(card.name, check.figures["fp32_rel_l2"], " and real" if real is not None else ""),
        )
    return dst, check


def adopt_onnx(
    model: onnx.ModelProto,
    dst: str | os.PathLike,
    card: ModelCard,
    real: CropSet | None = None,
    source: str | os.PathLike | None = None,
    role: str | None = None,
) -> tuple[Path, Check]:
    """A user's fp32 ONNX (already read and checked; `source` is its file, named in messages) -> `dst` with the card
    in its metadata, its names kept; checked for an input matching the card, a working dynamic batch and finite
    outputs (`verify_onnx_batches`)."""
    dst = Path(dst)
    onnx.save(set_card(model, card), str(dst))
    check = verify_onnx_batches(dst, card, real, name=source, role=role)
    if check:
        log.info(
            "%s: ONNX checks passed (batch 5 vs 5 x batch 1 relative L2 %.2e)",
            *(card.name, check.figures["batch5_vs_batch1_rel_l2"]),
        )
    return dst, check


def to_fp16(
    src: str | os.PathLike, dst: str | os.PathLike, judge: Judge, crops: CropSet | None = None, skipped: str = NO_CROPS
) -> tuple[Path, Check]:
    """fp32 ONNX -> fp16 ONNX (fp32 inputs/outputs; layers overflowing on `crops` kept fp32), judged against `src`
    on `crops` by `judge`. Without crops the gate cannot run: the outputs must at least be finite on random input,
    a warning says why (`skipped`), and the figures record `fp16_gate: "skipped: <why>"`. A router's figures also
    carry its speed vs fp32 on ONNX Runtime CPU."""
    src, dst = Path(src), Path(dst)
    card = judge.card
    log.info("%s: converting to fp16", card.name)
    figures: dict[str, Any] = dict(convert_fp16(src, dst, crops.x if crops is not None and len(crops) else None))
    if crops is None or len(crops) == 0:
        log.warning("%s: fp16 accuracy gate skipped: %s", card.name, skipped)
        check, x = _finite_on_random(dst, card, "fp16")
        figures["fp16_gate"] = f"skipped: {skipped}"
    else:
        check, x = judge.files(dst, src, crops, "fp16"), crops.x
        log.info(judge.summary(check))
    if check and card.task == Role.ROUTER:  # as ever: routers record their CPU speed at every precision
        figures.update(compare_speed(src, dst, x, "fp16", card.name, SPEED_HINT["fp16"]).figures)
    return dst, Check("fp16", check.passed, {**figures, **check.figures}, check.message)


def to_int8(
    src: str | os.PathLike, dst: str | os.PathLike, calib: CalibSpec, judge: Judge, options: Int8Options
) -> tuple[Path, Check]:
    """fp32 ONNX -> INT8 Q/DQ ONNX calibrated on `calib`'s crops (made under `judge.card`) and judged on its held-out
    crops. A pose model gets the layer search (`search_int8`: layers go back to fp32 until `judge` passes); a router
    is quantized once and judged by routing decisions, then timed against fp32 on ONNX Runtime CPU."""
    src, dst = Path(src), Path(dst)
    if isinstance(judge, PoseJudge):
        return dst, search_int8(src, dst, calib, judge, options)
    card = judge.card
    figures, gate = quantize_router_int8(
        src, dst, card, calib, target=options.target, cache_dir=options.cache_dir, progress=options.progress
    )
    check = judge.files(dst, src, gate, "int8")
    log.info(judge.summary(check))
    if check:
        figures.update(compare_speed(src, dst, gate.x, "int8", card.name, SPEED_HINT["int8"]).figures)
    return dst, Check("int8", check.passed, {**figures, **check.figures}, check.message)


def to_plan(
    src: str | os.PathLike, dst: str | os.PathLike, card: ModelCard, max_batch: int, options: PlanOptions
) -> tuple[Path, Check]:
    """ONNX (any precision: it lives in the graph) -> a TensorRT plan for batch 1..`max_batch`. The check's figures
    are the build metadata the manifest keeps in `entry.tensorrt` (TensorRT version, GPU, profile)."""
    from dynpose.runtime.backends.tensorrt.builder import build_engine

    src, dst = Path(src), Path(dst)
    log.info("%s: building a TensorRT plan from %s", card.name, src.name)
    info = build_engine(
        src,
        dst,
        input_name=io_names(load_onnx(src, external_data=False))[0],
        input_chw=(3, card.input_height, card.input_width),
        max_batch=max_batch,
        opt_batch=options.opt_batch,
        timing_cache=options.timing_cache,
        opt_level=options.opt_level,
        progress=options.progress,
    )
    return dst, Check("tensorrt", True, dict(info))


def to_openvino(
    src: str | os.PathLike, dst: str | os.PathLike, judge: Judge, gate: tuple[CropSet | None, str], options: OpenVinoOptions
) -> tuple[Path, Check]:
    """fp32 ONNX -> an OpenVINO IR (`dst` and the `.bin` beside it) at `options.precision`, judged by `judge` on the
    `gate` crops (INT8: on the calibration data's held-out crops); with `auto` the fastest passing precision on this
    machine. The check's figures carry the entry's `openvino` record under "openvino" (`dynpose.export.openvino`)."""
    return _to_openvino(src, dst, judge, gate, options)


def _finite_on_random(path: Path, card: ModelCard, precision: str) -> tuple[Check, np.ndarray]:
    """The check a model gets when no real crops are at hand: finite outputs (all of them) on random input (8 crops
    for a router, as its speed is timed on them too; 2 for a pose model). Returns the check and the input."""
    router = card.task == Role.ROUTER
    x = np.random.default_rng(0).standard_normal((8 if router else 2, 3, card.input_height, card.input_width))
    x = x.astype(np.float32)
    if all(np.isfinite(o).all() for o in run_session_all(open_session(path), x)):
        return Check(precision, True, {f"{precision}_finite": True}), x
    what = "the router scores" if router else "the outputs"
    return Check(precision, False, {}, f"{precision} check failed for {card.name}: NaN/inf in {what}"), x
