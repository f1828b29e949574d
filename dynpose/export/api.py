"""Export entry points: zoo model or user ONNX -> verified files + manifest entries in an engine directory.

The path of one export, in order: write the fp32 ONNX into a staging folder inside the engine dir, verify it, make
the fp16 or INT8 variant and verify that against fp32, optionally build a TensorRT plan, and only then move the
files into the engine dir and write the manifest last. Anything failing before the move leaves the directory as it
was; the staging folder is removed either way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dynpose.calibration.crops import CalibSpec, CropSet, coco_person_crops
from dynpose.engines.manifest import PRECISIONS, ROLES, Entry, Manifest, describe_file, tool_versions
from dynpose.errors import DynPoseError
from dynpose.export.onnx_export import check_onnx, export_torch, io_names, load_onnx, opset_of, set_card
from dynpose.export.verify import default_verify_dir, keypoint_agreement, ort_session, run_ort, verify_onnx_batches
from dynpose.fileio import sha256_file
from dynpose.models.card import ModelCard

FORMATS = ("onnx", "tensorrt")
EXPORT_ROLES = ("router", "small", "large")
# The DynPose set: (zoo name, role).
DYNPOSE_SET = (("router", "router"), ("resnet_50", "small"), ("hrnet_w32", "large"))

Log = Callable[[str], None]


def _printer(progress: bool) -> Log:
    if not progress:
        return lambda msg: None
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    return lambda msg: console.print(msg)


def default_role(name: str) -> str:
    """router for the router, large for hrnet_*, small for resnet_* (and everything else)."""
    if name == "router" or name.endswith("router"):
        return "router"
    if name.startswith("hrnet"):
        return "large"
    return "small"


def _check_args(role: str, precision: str, fmt: str, max_batch: int) -> None:
    if role not in EXPORT_ROLES:
        raise DynPoseError(f"role {role!r}: use one of {EXPORT_ROLES}")
    if precision not in PRECISIONS:
        raise DynPoseError(f"precision {precision!r}: use one of {PRECISIONS}")
    if fmt not in FORMATS:
        raise DynPoseError(f"format {fmt!r}: use one of {FORMATS}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise DynPoseError(f"max batch {max_batch!r}: must be an integer >= 1")


# -- staging and commit ------------------------------------------------------------------------------------------------
@contextmanager
def staging(engine_dir: str | os.PathLike) -> Iterator[Path]:
    """A temp folder inside the engine dir (same filesystem, so the final moves are atomic renames)."""
    engine_dir = Path(engine_dir)
    if engine_dir.exists() and not engine_dir.is_dir():
        raise DynPoseError(f"engine dir {engine_dir}: exists and is not a directory")
    engine_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=engine_dir))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _existing_manifest(engine_dir: Path, log: Log) -> Manifest:
    if not (engine_dir / "manifest.json").is_file():
        return Manifest()
    try:
        return Manifest.load(engine_dir, verify=False)
    except DynPoseError as e:
        log(f"[yellow]warning[/]: replacing an unreadable manifest ({e})")
        return Manifest()


def commit(stage: Path, engine_dir: str | os.PathLike, entries: list[Entry], log: Log = print) -> list[Entry]:
    """Hash the staged files, move them in, merge into the manifest (same role+format replaced), write it last."""
    engine_dir = Path(engine_dir)
    files = {e.file for e in entries}
    for e in entries:
        info = describe_file(stage, e.file)
        e.size, e.sha256 = info["size"], info["sha256"]
    manifest = _existing_manifest(engine_dir, log)
    replaced = {old.file for e in entries for old in manifest.entries if old.role == e.role and old.format == e.format}
    for f in sorted(files):
        os.replace(stage / f, engine_dir / f)
    for e in entries:
        manifest.put(e)
    manifest.save(engine_dir)
    still_used = {e.file for e in manifest.entries}
    for f in replaced - still_used:
        (engine_dir / f).unlink(missing_ok=True)  # a replaced entry's old file would otherwise linger unlisted
    return entries


# -- shared steps --------------------------------------------------------------------------------------------------
def _real_crops(card: ModelCard, calib: CalibSpec | None) -> CropSet | None:
    """COCO person crops under the card (the router gets them too: it is fed the same crops)."""
    if calib is not None and calib.gate_ann is not None:
        crops = coco_person_crops(calib.gate_ann, card)
        if crops is not None:
            return crops
    d = default_verify_dir()
    return coco_person_crops(d, card) if d is not None else None


def _lower_precision(stage: Path, role: str, card: ModelCard, fp32_file: str, precision: str, fmt: str,
                     calib: CalibSpec | None, min_oks: float, real: CropSet | None, engine_dir: Path,
                     log: Log, progress: bool) -> tuple[str, dict[str, Any]]:
    """Make `<role>.fp16.onnx` or `<role>.int8.onnx` beside the fp32 file and check it; returns (file, checks)."""
    if precision == "fp32":
        return fp32_file, {}
    if card.task != "pose":
        raise DynPoseError(f"{card.name}: the router is exported in fp32 only (it is tiny); drop --precision for it")
    src = stage / fp32_file
    if precision == "fp16":
        from dynpose.export.fp16 import convert_fp16

        out = f"{role}.fp16.onnx"
        log(f"{card.name}: converting to fp16")
        info = convert_fp16(src, stage / out, real.x if real is not None else None)
        checks: dict[str, Any] = dict(info)
        if real is not None:
            ref = run_ort(ort_session(src), real.x)
            got = run_ort(ort_session(stage / out), real.x)
            agree = keypoint_agreement(got, ref, real, card)
            if not agree["finite"]:
                raise DynPoseError(f"fp16 check failed for {card.name}: NaN/inf in the outputs on real crops")
            checks.update({"fp16_oks": agree["oks_mean"], "fp16_oks_min": agree["oks_min"],
                           "fp16_heatmap_rel_l2": agree["heatmap_rel_l2"], "fp16_crops": agree["crops"]})
            log(f"{card.name}: fp16 vs fp32 mean keypoint OKS {agree['oks_mean']:.4f} on {agree['crops']} real crops")
            if agree["oks_mean"] < min_oks:
                raise DynPoseError(
                    f"fp16 check failed for {card.name}: mean OKS vs fp32 {agree['oks_mean']:.4f} < --min-oks {min_oks}"
                )
        else:  # no real crops here: at least the outputs must stay finite
            x = np.random.default_rng(0).standard_normal((2, 3, card.input_height, card.input_width)).astype(np.float32)
            if not np.isfinite(run_ort(ort_session(stage / out), x)).all():
                raise DynPoseError(f"fp16 check failed for {card.name}: NaN/inf in the outputs")
            checks["fp16_finite"] = True
        return out, checks
    # int8
    from dynpose.calibration.quantize import quantize_int8

    if calib is None:
        raise DynPoseError(
            "int8 needs calibration data: pass --calib-ann COCO.json --calib-images DIR, "
            "--calib-dets DETS.json --calib-images DIR, or --calib-root DIR"
        )
    target = calib.target or ("tensorrt" if fmt == "tensorrt" else "ort")
    out = f"{role}.int8.onnx"
    checks = quantize_int8(src, stage / out, card, calib, target=target, min_oks=min_oks,
                           cache_dir=engine_dir / "cache", log=log, progress=progress)
    return out, checks


def _tensorrt_entry(stage: Path, engine_dir: Path, onnx_entry: Entry, opt_batch: int | None, opt_level: int,
                    log: Log, progress: bool) -> Entry:
    try:
        from dynpose.engines.tensorrt_build import build_engine
    except ImportError:
        raise DynPoseError("--format tensorrt: dynpose.engines.tensorrt_build is not available in this install") from None
    plan = f"{onnx_entry.role}.plan"
    log(f"{onnx_entry.model}: building a TensorRT plan from {onnx_entry.file}")
    info = build_engine(
        stage / onnx_entry.file, stage / plan, input_name=onnx_entry.input_name,
        input_chw=(3, onnx_entry.card.input_height, onnx_entry.card.input_width), max_batch=onnx_entry.max_batch,
        opt_batch=opt_batch, timing_cache=engine_dir / "timing.cache", opt_level=opt_level, progress=progress,
    )
    return Entry(
        role=onnx_entry.role, model=onnx_entry.model, file=plan, format="tensorrt", precision=onnx_entry.precision,
        card=onnx_entry.card, input_name=onnx_entry.input_name, output_name=onnx_entry.output_name,
        min_batch=1, max_batch=onnx_entry.max_batch, checkpoint_sha256=onnx_entry.checkpoint_sha256,
        checks=dict(onnx_entry.checks), versions=tool_versions(), tensorrt=dict(info), source=onnx_entry.file,
    )


def _finish(stage: Path, engine_dir: Path, role: str, model_name: str, card: ModelCard, fp32_file: str,
            fp32_checks: dict[str, Any], precision: str, fmt: str, calib: CalibSpec | None, min_oks: float,
            max_batch: int, checkpoint_sha: str | None, real: CropSet | None, log: Log, progress: bool,
            opt_batch: int | None, opt_level: int, extra: list[Entry]) -> list[Entry]:
    file, checks = _lower_precision(stage, role, card, fp32_file, precision, fmt, calib, min_oks, real, engine_dir,
                                    log, progress)
    in_name, out_name = io_names(onnx.load(str(stage / file), load_external_data=False))
    entry = Entry(
        role=role, model=model_name, file=file, format="onnx", precision=precision, card=card,
        input_name=in_name, output_name=out_name, min_batch=1, max_batch=max_batch,
        checkpoint_sha256=checkpoint_sha, checks={**fp32_checks, **checks}, versions=tool_versions(),
    )
    entries = [entry, *extra]
    if fmt == "tensorrt":
        entries.append(_tensorrt_entry(stage, engine_dir, entry, opt_batch, opt_level, log, progress))
    return commit(stage, engine_dir, entries, log)


# -- public API --------------------------------------------------------------------------------------------------
def register_onnx(onnx_path: str | os.PathLike, card: ModelCard, engine_dir: str | os.PathLike, *, role: str,
                  precision: str = "fp32", calib: CalibSpec | None = None, min_oks: float = 0.95, fmt: str = "onnx",
                  max_batch: int = 64, progress: bool = True, opt_batch: int | None = None,
                  opt_level: int = 3) -> list[Entry]:
    """Register a user's ONNX heatmap model (names in its graph are kept and recorded) under `role`.

    The file is checked (onnx.checker, single input matching the card, dynamic batch: batch 5 == 5 x batch 1, finite
    outputs on real crops), copied in as `<role>.onnx` with the card in its metadata, and for fp16/int8 converted
    and checked against itself in fp32. Returns the manifest entries written.
    """
    _check_args(role, precision, fmt, max_batch)
    if not isinstance(card, ModelCard):
        raise DynPoseError("register_onnx needs a ModelCard (ModelCard.from_json_file(path))")
    log = _printer(progress)
    engine_dir = Path(engine_dir)
    src = Path(onnx_path)
    model = load_onnx(src, "user ONNX model")
    check_onnx(model, f"user ONNX model {src}")
    if opset_of(model) < 13:
        raise DynPoseError(f"user ONNX model {src}: opset {opset_of(model)} is too old; re-export it with opset >= 17")
    io_names(model, f"user ONNX model {src}")
    checkpoint_sha = sha256_file(src)
    if precision == "int8" and calib is None:
        raise DynPoseError(
            "int8 needs calibration data: pass --calib-ann COCO.json --calib-images DIR, "
            "--calib-dets DETS.json --calib-images DIR, or --calib-root DIR"
        )
    with staging(engine_dir) as stage:
        fp32_file = f"{role}.onnx"
        onnx.save(set_card(model, card), str(stage / fp32_file))
        real = _real_crops(card, calib)
        checks = verify_onnx_batches(stage / fp32_file, card, real)
        log(f"{card.name}: ONNX checks passed (batch 5 vs 5 x batch 1 relative L2 {checks['batch5_vs_batch1_rel_l2']:.2e})")
        return _finish(stage, engine_dir, role, card.name, card, fp32_file, checks, precision, fmt, calib, min_oks,
                       max_batch, checkpoint_sha, real, log, progress, opt_batch, opt_level, [])


def export_model(name: str, engine_dir: str | os.PathLike, *, role: str | None = None, weights: str = "random",
                 precision: str = "fp32", max_batch: int = 64, calib: CalibSpec | None = None, min_oks: float = 0.95,
                 fmt: str = "onnx", trust_pickle: bool = False, progress: bool = True, opt_batch: int | None = None,
                 opt_level: int = 3) -> list[Entry]:
    """Export zoo model `name` (weights: "random", a path, URL or alias) to ONNX + a `torch` state_dict entry."""
    import torch

    from dynpose.models import create_model

    role = role or default_role(name)
    _check_args(role, precision, fmt, max_batch)
    log = _printer(progress)
    engine_dir = Path(engine_dir)
    if precision == "int8" and calib is None:
        raise DynPoseError(
            "int8 needs calibration data: pass --calib-ann COCO.json --calib-images DIR, "
            "--calib-dets DETS.json --calib-images DIR, or --calib-root DIR"
        )
    with warnings.catch_warnings():
        # The CLI prints its own line about random weights; the zoo's warning would repeat it per model.
        warnings.simplefilter("ignore", UserWarning)
        model = create_model(name, weights=weights, trust_pickle=trust_pickle)
    checkpoint = getattr(model, "checkpoint", None)
    checkpoint_sha = checkpoint.sha256 if checkpoint is not None else None
    if weights == "random":
        log(f"[yellow]{name}: random weights[/] (outputs are meaningless; for pipeline tests and speed only)")
    card: ModelCard = model.card
    with staging(engine_dir) as stage:
        fp32_file = f"{role}.onnx"
        log(f"{name}: exporting to ONNX (opset 17, dynamic batch)")
        export_torch(model, stage / fp32_file, card)
        real = _real_crops(card, calib)
        from dynpose.export.verify import verify_torch_vs_onnx

        checks = verify_torch_vs_onnx(model, stage / fp32_file, card, real)
        log(f"{name}: ONNX Runtime vs PyTorch relative L2 {checks['fp32_rel_l2']:.2e} (batch 1 and 5, random"
            f"{' and real' if real is not None else ''} crops)")
        pt = f"{role}.pt"
        torch.save(model.state_dict(), stage / pt)
        torch_entry = Entry(
            role=role, model=name, file=pt, format="torch", precision="fp32", card=card, input_name="input",
            output_name="output", min_batch=1, max_batch=max_batch, checkpoint_sha256=checkpoint_sha,
            checks=dict(checks), versions=tool_versions(),
        )
        return _finish(stage, engine_dir, role, name, card, fp32_file, checks, precision, fmt, calib, min_oks,
                       max_batch, checkpoint_sha, real, log, progress, opt_batch, opt_level, [torch_entry])


def export_all(engine_dir: str | os.PathLike, *, weights: dict[str, str] | None = None, precision: str = "fp32",
               max_batch: int = 64, calib: CalibSpec | None = None, min_oks: float = 0.95, fmt: str = "onnx",
               trust_pickle: bool = False, progress: bool = True, opt_batch: int | None = None,
               opt_level: int = 3) -> list[Entry]:
    """The DynPose set: router, resnet_50 as small, hrnet_w32 as large (the router always in fp32).

    `weights`: zoo name -> weights source; missing names get random weights.
    """
    weights = weights or {}
    out: list[Entry] = []
    for name, role in DYNPOSE_SET:
        out += export_model(
            name, engine_dir, role=role, weights=weights.get(name, "random"),
            precision="fp32" if role == "router" else precision, max_batch=max_batch, calib=calib, min_oks=min_oks,
            fmt=fmt, trust_pickle=trust_pickle, progress=progress, opt_batch=opt_batch, opt_level=opt_level,
        )
    return out


__all__ = ["CalibSpec", "ROLES", "commit", "default_role", "export_all", "export_model", "register_onnx", "staging"]
