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

from dynpose.calibration.crops import NEEDS_CALIB, CalibSpec, CropSet, coco_person_crops
from dynpose.engines.manifest import DEFAULT_ROUTE, PRECISIONS, ROLES, Entry, Manifest, describe_file, tool_versions
from dynpose.errors import DynPoseError
from dynpose.export.onnx_export import export_torch
from dynpose.export.verify import default_verify_dir, keypoint_agreement, router_agreement, verify_onnx_batches
from dynpose.fileio import sha256_file
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import check_onnx, io_names, load_onnx, open_session, opset_of, run_session, set_card

FORMATS = ("onnx", "tensorrt")
EXPORT_ROLES = ("router", "small", "large")
# The DynPose set: (zoo name, role).
DYNPOSE_SET = (("router", "router"), ("resnet_50", "small"), ("hrnet_w32", "large"))
# Where a router's weights came from; decides the engine dir's default route (`default_route`).
ROUTER_WEIGHTS = ("random", "checkpoint", "trained")
# A route that means something for any router: half the crops (those scored highest) go to the large model.
UNTUNED_ROUTE = "fraction:0.5"

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


def _require_calib(precision: str, calib: CalibSpec | None) -> None:
    if precision == "int8" and calib is None:
        raise DynPoseError(NEEDS_CALIB)


def _int8_target(calib: CalibSpec, fmt: str) -> str:
    """The Q/DQ flavour: the spec's when set, else the one the export format runs (TensorRT's symmetric int8)."""
    return calib.target or ("tensorrt" if fmt == "tensorrt" else "ort")


def default_route(manifest: Manifest, router_weights_kind: str) -> tuple[str, str]:
    """The route an engine dir gets when a router of this kind is written into it, and one line saying why.

    A route chosen by `dynpose-train-router --calibrate` (`notes.router_calibration`) is kept whatever the router.
    Otherwise: DynPose's release band 0.59,0.69 for a router loaded from a checkpoint (it is tuned to the released
    router's scores); `fraction:0.5` for random weights (their scores barely vary, ~0.488 on every crop, so the band
    would send every crop to the small model) and for a freshly trained router (its scores are not the release's).
    """
    if router_weights_kind not in ROUTER_WEIGHTS:
        raise DynPoseError(f"router weights kind {router_weights_kind!r}: use one of {ROUTER_WEIGHTS}")
    if manifest.notes.get("router_calibration"):
        return manifest.route, (
            f"route {manifest.route} kept: chosen by `dynpose-train-router --calibrate` (re-run it "
            "when the router's weights change)"
        )
    if router_weights_kind == "random":
        return UNTUNED_ROUTE, (
            f"route {UNTUNED_ROUTE}: the router has random weights, and DynPose's band "
            f"{DEFAULT_ROUTE.partition(':')[2]} (tuned to the released router) would send every crop "
            "to the small model"
        )
    if router_weights_kind == "trained":
        return UNTUNED_ROUTE, (
            f"route {UNTUNED_ROUTE} for the freshly trained router until `dynpose-train-router "
            f"--calibrate` chooses one (DynPose's band {DEFAULT_ROUTE.partition(':')[2]} fits the "
            "released router's scores, not a retrained one's)"
        )
    return DEFAULT_ROUTE, (
        f"route {DEFAULT_ROUTE}: DynPose's release rule (tuned to the released router; "
        "`dynpose-train-router --calibrate` chooses one for another router)"
    )


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


def commit(
    stage: Path, engine_dir: str | os.PathLike, entries: list[Entry], log: Log = print, router_weights: str | None = None
) -> list[Entry]:
    """Hash the staged files, move them in, merge into the manifest (same role+format replaced), write it last.

    When a router entry is among `entries` and `router_weights` (a `ROUTER_WEIGHTS` kind) is given, the manifest's
    route becomes `default_route(manifest, router_weights)` and its reason is logged."""
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
    if router_weights is not None and any(e.role == "router" for e in entries):
        manifest.route, why = default_route(manifest, router_weights)
        log(why)
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


def _speed_check(src: Path, out: Path, x: np.ndarray, precision: str, name: str, log: Log) -> dict[str, float]:
    """Time per batch of 8 vs fp32 on ONNX Runtime CPU (as for INT8 pose models); warns below 1.1x."""
    from dynpose.calibration.quantize import log_speedup, measure_speedup

    sp = measure_speedup(src, out, x)
    log_speedup(
        sp, precision, name, log, "it is meant for GPUs (TensorRT, CUDA)" if precision == "fp16" else "consider fp32 here"
    )
    return {f"{precision}_speedup_b8": sp["speedup"], f"{precision}_ms_b8": sp["int8_ms"], "fp32_ms_b8": sp["fp32_ms"]}


def _router_lower(
    stage: Path,
    role: str,
    card: ModelCard,
    src: Path,
    precision: str,
    fmt: str,
    calib: CalibSpec | None,
    min_oks: float,
    real: CropSet | None,
    route: str,
    engine_dir: Path,
    log: Log,
    progress: bool,
) -> tuple[str, dict[str, Any]]:
    """fp16/int8 router, judged by routing: scores and decisions vs fp32 on held-out real crops under `route`.

    fp16 is checked on the same real crops as pose models' fp16; int8 on its calibration set's held-out crops (as
    pose INT8). `min_oks` is the gate on the decision agreement (fraction of crops routed as fp32 routes them)."""
    out = f"{role}.{precision}.onnx"
    checks: dict[str, Any]
    if precision == "fp16":
        from dynpose.export.fp16 import convert_fp16

        log(f"{card.name}: converting to fp16")
        checks = dict(convert_fp16(src, stage / out, real.x if real is not None else None))
        gate = real
    else:
        from dynpose.calibration.quantize import quantize_router_int8

        assert calib is not None  # checked by the callers
        checks, gate = quantize_router_int8(
            src,
            stage / out,
            card,
            calib,
            target=_int8_target(calib, fmt),
            cache_dir=engine_dir / "cache",
            log=log,
            progress=progress,
        )
    if gate is None or len(gate) == 0:  # no real crops here: at least the scores must stay finite
        x = np.random.default_rng(0).standard_normal((8, 3, card.input_height, card.input_width)).astype(np.float32)
        if not np.isfinite(run_session(open_session(stage / out), x)).all():
            raise DynPoseError(f"{precision} check failed for {card.name}: NaN/inf in the router scores")
        log(
            f"[yellow]warning[/]: {card.name}: no real crops to compare {precision} routing with fp32 "
            "(set DYNPOSE_VERIFY_COCO or pass --gate-ann)"
        )
        return out, {**checks, f"{precision}_finite": True, **_speed_check(src, stage / out, x, precision, card.name, log)}
    a = router_agreement(run_session(open_session(stage / out), gate.x), run_session(open_session(src), gate.x), route)
    if not a["finite"]:
        raise DynPoseError(f"{precision} check failed for {card.name}: NaN/inf in the router scores on real crops")
    checks.update(
        {
            "router_score_max_abs_diff": a["max_abs_diff"],
            "router_score_mean_abs_diff": a["mean_abs_diff"],
            "router_decision_agreement": a["agreement"],
            "router_gate_policy": a["policy"],
            "router_gate_crops": a["crops"],
            "router_min_agreement": min_oks,
        }
    )
    log(
        f"{card.name}: {precision} vs fp32 on {a['crops']} real crops: score |diff| max {a['max_abs_diff']:.2e} mean "
        f"{a['mean_abs_diff']:.2e}; same decision under {a['policy']} for {a['agreement']:.1%} of crops"
    )
    if min_oks > 0 and a["agreement"] < min_oks:
        raise DynPoseError(
            f"{precision} check failed for {card.name}: {a['agreement']:.1%} of {a['crops']} crops routed as in fp32 "
            f"under {a['policy']} < --min-oks {min_oks} (for the router it is the decision agreement); use fp32, "
            "or --min-oks 0 for random weights"
        )
    checks.update(_speed_check(src, stage / out, gate.x, precision, card.name, log))
    return out, checks


def _lower_precision(
    stage: Path,
    role: str,
    card: ModelCard,
    fp32_file: str,
    precision: str,
    fmt: str,
    calib: CalibSpec | None,
    min_oks: float,
    real: CropSet | None,
    engine_dir: Path,
    log: Log,
    progress: bool,
    router_weights: str = "checkpoint",
) -> tuple[str, dict[str, Any]]:
    """Make `<role>.fp16.onnx` or `<role>.int8.onnx` beside the fp32 file and check it; returns (file, checks)."""
    if precision == "fp32":
        return fp32_file, {}
    src = stage / fp32_file
    if card.task == "router":
        # Judge under the route the engine dir will have once this router is in (what `commit` sets).
        route, _ = default_route(_existing_manifest(engine_dir, log), router_weights)
        return _router_lower(stage, role, card, src, precision, fmt, calib, min_oks, real, route, engine_dir, log, progress)
    if precision == "fp16":
        from dynpose.export.fp16 import convert_fp16

        out = f"{role}.fp16.onnx"
        log(f"{card.name}: converting to fp16")
        info = convert_fp16(src, stage / out, real.x if real is not None else None)
        checks: dict[str, Any] = dict(info)
        if real is not None:
            ref = run_session(open_session(src), real.x)
            got = run_session(open_session(stage / out), real.x)
            agree = keypoint_agreement(got, ref, real, card)
            if not agree["finite"]:
                raise DynPoseError(f"fp16 check failed for {card.name}: NaN/inf in the outputs on real crops")
            checks.update(
                {
                    "fp16_oks": agree["oks_mean"],
                    "fp16_oks_min": agree["oks_min"],
                    "fp16_heatmap_rel_l2": agree["heatmap_rel_l2"],
                    "fp16_crops": agree["crops"],
                }
            )
            log(f"{card.name}: fp16 vs fp32 mean keypoint OKS {agree['oks_mean']:.4f} on {agree['crops']} real crops")
            if agree["oks_mean"] < min_oks:
                raise DynPoseError(
                    f"fp16 check failed for {card.name}: mean OKS vs fp32 {agree['oks_mean']:.4f} < --min-oks {min_oks}"
                )
        else:  # no real crops here: at least the outputs must stay finite
            x = np.random.default_rng(0).standard_normal((2, 3, card.input_height, card.input_width)).astype(np.float32)
            if not np.isfinite(run_session(open_session(stage / out), x)).all():
                raise DynPoseError(f"fp16 check failed for {card.name}: NaN/inf in the outputs")
            checks["fp16_finite"] = True
        return out, checks
    # int8
    from dynpose.calibration.quantize import quantize_int8

    assert calib is not None  # checked by the callers
    out = f"{role}.int8.onnx"
    checks = quantize_int8(
        src,
        stage / out,
        card,
        calib,
        target=_int8_target(calib, fmt),
        min_oks=min_oks,
        cache_dir=engine_dir / "cache",
        log=log,
        progress=progress,
    )
    return out, checks


def _tensorrt_entry(
    stage: Path, engine_dir: Path, onnx_entry: Entry, opt_batch: int | None, opt_level: int, log: Log, progress: bool
) -> Entry:
    from dynpose.runtime.backends.tensorrt.builder import build_engine

    plan = f"{onnx_entry.role}.plan"
    log(f"{onnx_entry.model}: building a TensorRT plan from {onnx_entry.file}")
    info = build_engine(
        stage / onnx_entry.file,
        stage / plan,
        input_name=onnx_entry.input_name,
        input_chw=(3, onnx_entry.card.input_height, onnx_entry.card.input_width),
        max_batch=onnx_entry.max_batch,
        opt_batch=opt_batch,
        timing_cache=engine_dir / "timing.cache",
        opt_level=opt_level,
        progress=progress,
    )
    return Entry(
        role=onnx_entry.role,
        model=onnx_entry.model,
        file=plan,
        format="tensorrt",
        precision=onnx_entry.precision,
        card=onnx_entry.card,
        input_name=onnx_entry.input_name,
        output_name=onnx_entry.output_name,
        min_batch=1,
        max_batch=onnx_entry.max_batch,
        checkpoint_sha256=onnx_entry.checkpoint_sha256,
        checks=dict(onnx_entry.checks),
        versions=tool_versions(),
        tensorrt=dict(info),
        source=onnx_entry.file,
    )


def _finish(
    stage: Path,
    engine_dir: Path,
    role: str,
    model_name: str,
    card: ModelCard,
    fp32_file: str,
    fp32_checks: dict[str, Any],
    precision: str,
    fmt: str,
    calib: CalibSpec | None,
    min_oks: float,
    max_batch: int,
    checkpoint_sha: str | None,
    real: CropSet | None,
    log: Log,
    progress: bool,
    opt_batch: int | None,
    opt_level: int,
    extra: list[Entry],
    router_weights: str = "checkpoint",
) -> list[Entry]:
    file, checks = _lower_precision(
        stage, role, card, fp32_file, precision, fmt, calib, min_oks, real, engine_dir, log, progress, router_weights
    )
    in_name, out_names = io_names(onnx.load(str(stage / file), load_external_data=False))
    out_name = out_names[0]
    entry = Entry(
        role=role,
        model=model_name,
        file=file,
        format="onnx",
        precision=precision,
        card=card,
        input_name=in_name,
        output_name=out_name,
        min_batch=1,
        max_batch=max_batch,
        checkpoint_sha256=checkpoint_sha,
        checks={**fp32_checks, **checks},
        versions=tool_versions(),
    )
    entries = [entry, *extra]
    if fmt == "tensorrt":
        entries.append(_tensorrt_entry(stage, engine_dir, entry, opt_batch, opt_level, log, progress))
    return commit(stage, engine_dir, entries, log, router_weights)


# -- public API --------------------------------------------------------------------------------------------------
def register_onnx(
    onnx_path: str | os.PathLike,
    card: ModelCard,
    engine_dir: str | os.PathLike,
    *,
    role: str,
    precision: str = "fp32",
    calib: CalibSpec | None = None,
    min_oks: float = 0.95,
    fmt: str = "onnx",
    max_batch: int = 64,
    progress: bool = True,
    opt_batch: int | None = None,
    opt_level: int = 3,
) -> list[Entry]:
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
    _require_calib(precision, calib)
    with staging(engine_dir) as stage:
        fp32_file = f"{role}.onnx"
        onnx.save(set_card(model, card), str(stage / fp32_file))
        real = _real_crops(card, calib)
        checks = verify_onnx_batches(stage / fp32_file, card, real)
        log(f"{card.name}: ONNX checks passed (batch 5 vs 5 x batch 1 relative L2 {checks['batch5_vs_batch1_rel_l2']:.2e})")
        return _finish(
            stage,
            engine_dir,
            role,
            card.name,
            card,
            fp32_file,
            checks,
            precision,
            fmt,
            calib,
            min_oks,
            max_batch,
            checkpoint_sha,
            real,
            log,
            progress,
            opt_batch,
            opt_level,
            [],
        )


def export_model(
    name: str,
    engine_dir: str | os.PathLike,
    *,
    role: str | None = None,
    weights: str = "random",
    precision: str = "fp32",
    max_batch: int = 64,
    calib: CalibSpec | None = None,
    min_oks: float = 0.95,
    fmt: str = "onnx",
    trust_pickle: bool = False,
    progress: bool = True,
    opt_batch: int | None = None,
    opt_level: int = 3,
    router_weights: str | None = None,
) -> list[Entry]:
    """Export zoo model `name` (weights: "random", a path, URL or alias) to ONNX + a `torch` state_dict entry.

    For the router, `router_weights` ("random", "checkpoint" or "trained"; default from `weights`) sets the engine
    dir's default route (`default_route`); fp16/int8 routers are gated on routing decisions (`--min-oks` is then the
    decision agreement with fp32)."""
    import torch

    from dynpose.models import create_model

    role = role or default_role(name)
    _check_args(role, precision, fmt, max_batch)
    router_weights = router_weights or ("random" if weights == "random" else "checkpoint")
    if router_weights not in ROUTER_WEIGHTS:
        raise DynPoseError(f"router weights kind {router_weights!r}: use one of {ROUTER_WEIGHTS}")
    log = _printer(progress)
    engine_dir = Path(engine_dir)
    _require_calib(precision, calib)
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
        log(
            f"{name}: ONNX Runtime vs PyTorch relative L2 {checks['fp32_rel_l2']:.2e} (batch 1 and 5, random"
            f"{' and real' if real is not None else ''} crops)"
        )
        pt = f"{role}.pt"
        torch.save(model.state_dict(), stage / pt)
        torch_entry = Entry(
            role=role,
            model=name,
            file=pt,
            format="torch",
            precision="fp32",
            card=card,
            input_name="input",
            output_name="output",
            min_batch=1,
            max_batch=max_batch,
            checkpoint_sha256=checkpoint_sha,
            checks=dict(checks),
            versions=tool_versions(),
        )
        return _finish(
            stage,
            engine_dir,
            role,
            name,
            card,
            fp32_file,
            checks,
            precision,
            fmt,
            calib,
            min_oks,
            max_batch,
            checkpoint_sha,
            real,
            log,
            progress,
            opt_batch,
            opt_level,
            [torch_entry],
            router_weights,
        )


def export_all(
    engine_dir: str | os.PathLike,
    *,
    weights: dict[str, str] | None = None,
    precision: str = "fp32",
    max_batch: int = 64,
    calib: CalibSpec | None = None,
    min_oks: float = 0.95,
    fmt: str = "onnx",
    trust_pickle: bool = False,
    progress: bool = True,
    opt_batch: int | None = None,
    opt_level: int = 3,
) -> list[Entry]:
    """The DynPose set: router, resnet_50 as small, hrnet_w32 as large (the router always in fp32: at 0.85 M
    parameters a lower precision saves nothing worth a routing change; `export_model("router", precision=...)` does it).

    `weights`: zoo name -> weights source; missing names get random weights.
    """
    _require_calib(precision, calib)  # before the router is exported, not after
    weights = weights or {}
    out: list[Entry] = []
    for name, role in DYNPOSE_SET:
        out += export_model(
            name,
            engine_dir,
            role=role,
            weights=weights.get(name, "random"),
            precision="fp32" if role == "router" else precision,
            max_batch=max_batch,
            calib=calib,
            min_oks=min_oks,
            fmt=fmt,
            trust_pickle=trust_pickle,
            progress=progress,
            opt_batch=opt_batch,
            opt_level=opt_level,
        )
    return out


__all__ = [
    "CalibSpec",
    "ROLES",
    "ROUTER_WEIGHTS",
    "commit",
    "default_role",
    "default_route",
    "export_all",
    "export_model",
    "register_detector",
    "register_onnx",
    "staging",
]


def register_detector(onnx_path: str | os.PathLike, engine_dir: str | os.PathLike, *, progress: bool = True) -> list[Entry]:
    """Register an ONNX person detector (PP-PicoDet, YOLOv5 or YOLOv8 output layout) as the engine dir's `detector`
    entry, so `dynpose-run` and `Pipeline.from_engine_dir` find boxes without a `--detector` flag.

    The file is loaded with the runtime's own `OnnxDetector` (which reads the layout from the outputs and needs a fixed
    input size) and run once on a frame, so a model the runtime cannot use is refused here, not at run time."""
    from dynpose.runtime.detector import OnnxDetector

    log = _printer(progress)
    src = Path(onnx_path)
    check_onnx(load_onnx(src, "detector"), f"detector {src}")
    det = OnnxDetector(src)
    h, w = det.input_hw
    det(np.full((h, w, 3), 114, dtype=np.uint8))  # one real run: shapes and layout work end to end
    log(f"detector {src.name}: {det.layout} layout, input {w}x{h}")
    card = ModelCard(name=src.stem, input_width=w, input_height=h, task="detector", arch="onnx")
    in_name = det.input_name
    out_name = det.session.get_outputs()[0].name
    with staging(engine_dir) as stage:
        shutil.copyfile(src, stage / "detector.onnx")
        entry = Entry(
            role="detector",
            model=src.stem,
            file="detector.onnx",
            format="onnx",
            precision="fp32",
            card=card,
            input_name=in_name,
            output_name=out_name,
            min_batch=1,
            max_batch=1,
            checkpoint_sha256=sha256_file(src),
            checks={"layout": det.layout},
            versions=tool_versions(),
        )
        return commit(stage, engine_dir, [entry], log)
