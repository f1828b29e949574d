"""Export entry points: zoo model or user ONNX -> verified files + manifest entries in an engine directory.

Each entry point is a short composition of the steps in `dynpose.export.steps`, run inside a staging folder of the
engine dir (`dynpose.export.commit`): write the fp32 ONNX and check it, make the fp16 or INT8 variant and judge it
against fp32, optionally build a TensorRT plan, and only then `commit` moves the files in and writes the manifest
last. A failed check raises its one-line message before the commit, leaving the directory as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.engines.manifest import PRECISIONS, ROLES, Entry, tool_versions
from dynpose.errors import DynPoseError
from dynpose.export.calibration.crops import NEEDS_CALIB, CalibSpec, CropSet
from dynpose.export.calibration.quantize import Int8Options
from dynpose.export.commit import commit, existing_manifest, staging
from dynpose.export.judges import Check, Judge, judge_for
from dynpose.export.route import ROUTER_WEIGHTS, UNTUNED_ROUTE, default_route
from dynpose.export.steps import OpenVinoOptions, PlanOptions, adopt_onnx, to_fp16, to_int8, to_onnx, to_openvino, to_plan
from dynpose.export.verify import gate_crops
from dynpose.fileio import sha256_file
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import check_onnx, io_names, load_onnx, opset_of
from dynpose.roles import Role

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt", "openvino")
# Precisions only an OpenVINO export makes: bf16 (a CPU inference precision), auto (the fastest that passes the gate).
OPENVINO_ONLY = ("bf16", "auto")
EXPORT_ROLES = ("router", "small", "large")
# The DynPose set: (zoo name, role).
# The DynPose set: role -> zoo name (the paper's pair; `export_all(models=...)` takes any two zoo pose models with
# the same keypoint set).
DYNPOSE_SET = {"router": "router", "small": "resnet_50", "large": "hrnet_w32"}


# Zoo families exported as the large model unless --role says otherwise: the accurate, costly ones (HRNet and
# SimDR-HRNet, the stacked hourglasses, DPN, RTMPose-m/l, ViTPose); ResNet SimpleBaselines, LPN, RTMPose-t/s and
# everything else are small.
LARGE_FAMILIES = ("hrnet", "simdr_hrnet", "hourglass", "dpn", "rtmpose_m", "rtmpose_l", "vitpose")


def default_role(name: str) -> str:
    """router for the router; large for hrnet_*, simdr_hrnet_*, hourglass_*, dpn, rtmpose_m*, rtmpose_l* and
    vitpose_*; small for resnet_*, lpn_*, rtmpose_t, rtmpose_s and everything else. An explicit role
    (`export_model(role=...)`, `--role`) overrides it."""
    if name == "router" or name.endswith("router"):
        return "router"
    if any(name == f or name.startswith(f + "_") for f in LARGE_FAMILIES):
        return "large"
    return "small"


def _check_args(role: str, precision: str, fmt: str, max_batch: int) -> None:
    if role not in EXPORT_ROLES:
        raise DynPoseError(f"role {role!r}: use one of {EXPORT_ROLES}")
    if precision not in (*PRECISIONS, "auto"):
        raise DynPoseError(f"precision {precision!r}: use one of {(*PRECISIONS, 'auto')}")
    if fmt not in FORMATS:
        raise DynPoseError(f"format {fmt!r}: use one of {FORMATS}")
    if precision in OPENVINO_ONLY and fmt != "openvino":
        raise DynPoseError(
            f"--precision {precision} is made by the OpenVINO export only (a CPU inference precision / the fastest "
            "precision on this machine); add --format openvino"
        )
    if not isinstance(max_batch, int) or max_batch < 1:
        raise DynPoseError(f"max batch {max_batch!r}: must be an integer >= 1")


def _check_machine(fmt: str, precision: str) -> None:
    """Before anything is exported: an OpenVINO export needs openvino, and bf16/fp16 a CPU with those instructions
    (one line each)."""
    if fmt == "openvino":
        from dynpose.runtime.backends.openvino import cpu_info, require_precision

        info = cpu_info()
        if precision not in ("auto", "int8"):
            require_precision(precision, info)


def _require_calib(precision: str, calib: CalibSpec | None) -> None:
    # A spec with only a gate file (fp16's accuracy gate) has nothing to calibrate on.
    if precision == "int8" and (calib is None or not calib.sources):
        raise DynPoseError(NEEDS_CALIB)


@dataclass(frozen=True)
class _Job:
    """One model's export as the public call describes it: where, under which role and name, and how."""

    engine_dir: Path
    role: str
    model: str
    card: ModelCard
    precision: str
    fmt: str
    calib: CalibSpec | None
    min_oks: float
    max_batch: int
    checkpoint_sha: str | None
    plan: PlanOptions
    router_weights: str = "checkpoint"

    def entry(self, file: str, fmt: str, precision: str, checks: dict[str, Any], io: tuple[str, str], **kw: Any) -> Entry:
        """A manifest entry of this job with `io` = (input, output) names (size and hash are filled in by `commit`)."""
        return Entry(
            role=self.role,
            model=self.model,
            file=file,
            format=fmt,
            precision=precision,
            card=self.card,
            input_name=io[0],
            output_name=io[1],
            min_batch=1,
            max_batch=self.max_batch,
            checkpoint_sha256=self.checkpoint_sha,
            checks=dict(checks),
            versions=tool_versions(),
            **kw,
        )


def _judge(job: _Job) -> Judge:
    """The judge of a lower precision: keypoint OKS for a pose model, routing decisions for a router (under the route
    the engine dir will have once it is in, as `commit` sets it)."""
    route = None
    if job.card.task == "router":
        route, _ = default_route(existing_manifest(job.engine_dir), job.router_weights)
    return judge_for(job.card, job.min_oks, route)


def _lower(stage: Path, job: _Job, fp32: Path, gate: tuple[CropSet | None, str]) -> tuple[Path, Check]:
    """The fp16/int8 file beside the fp32 one, judged against it; fp32 itself when that is the precision."""
    if job.precision == "fp32":
        return fp32, Check("fp32", True)
    judge = _judge(job)
    dst = stage / f"{job.role}.{job.precision}.onnx"
    if job.precision == "fp16":
        return to_fp16(fp32, dst, judge, *gate)
    assert job.calib is not None  # checked by the callers
    # The Q/DQ flavour: the spec's when set, else the one the export format runs (TensorRT's symmetric int8).
    target = job.calib.target or ("tensorrt" if job.fmt == "tensorrt" else "ort")
    return to_int8(fp32, dst, job.calib, judge, Int8Options(target, job.engine_dir / "cache", job.plan.progress))


def _finish(
    stage: Path, job: _Job, fp32: Path, fp32_check: Check, gate: tuple[CropSet | None, str], extra: list[Entry]
) -> list[Entry]:
    """Lower the precision, build the plan when asked, commit the entries (the ONNX one first, then `extra`)."""
    if job.fmt == "openvino":
        return _finish_openvino(stage, job, fp32, fp32_check, gate, extra)
    file, check = _lower(stage, job, fp32, gate)
    check.require()
    in_name, out_names = io_names(load_onnx(file, external_data=False))
    io = (in_name, out_names[0])
    checks = {**fp32_check.figures, **check.figures}
    entries = [job.entry(file.name, "onnx", job.precision, checks, io), *extra]
    if job.fmt == "tensorrt":
        plan, built = to_plan(file, stage / f"{job.role}.plan", job.card, job.max_batch, job.plan)
        entries.append(job.entry(plan.name, "tensorrt", job.precision, checks, io, tensorrt=built.figures, source=file.name))
    return commit(stage, job.engine_dir, entries, job.router_weights)


def _finish_openvino(
    stage: Path, job: _Job, fp32: Path, fp32_check: Check, gate: tuple[CropSet | None, str], extra: list[Entry]
) -> list[Entry]:
    """The fp32 ONNX entry (ONNX Runtime keeps running it), `extra`, and the IR at the precision asked (`auto`: the
    fastest that passes the gate here), made from that ONNX."""
    target = (job.calib.target if job.calib is not None else None) or "ort"
    int8 = Int8Options(target, job.engine_dir / "cache", job.plan.progress)
    options = OpenVinoOptions(job.precision, job.calib, int8)
    xml, check = to_openvino(fp32, stage / f"{job.role}.xml", _judge(job), gate, options)
    check.require()
    figures = dict(check.figures)
    meta = figures.pop("openvino")
    in_name, out_names = io_names(load_onnx(fp32, external_data=False))
    io = (in_name, out_names[0])
    entries = [
        job.entry(fp32.name, "onnx", "fp32", fp32_check.figures, io),
        *extra,
        job.entry(
            xml.name, "openvino", meta["precision"], {**fp32_check.figures, **figures}, io, openvino=meta, source=fp32.name
        ),
    ]
    return commit(stage, job.engine_dir, entries, job.router_weights)


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
    _check_machine(fmt, precision)
    if not isinstance(card, ModelCard):
        raise DynPoseError("register_onnx needs a ModelCard (ModelCard.from_json_file(path))")
    src = Path(onnx_path)
    model = load_onnx(src, "user ONNX model")
    check_onnx(model, f"user ONNX model {src}")
    if opset_of(model) < 13:
        raise DynPoseError(f"user ONNX model {src}: opset {opset_of(model)} is too old; re-export it with opset >= 17")
    io_names(model, f"user ONNX model {src}")
    _require_calib(precision, calib)
    job = _Job(
        engine_dir=Path(engine_dir),
        role=role,
        model=card.name,
        card=card,
        precision=precision,
        fmt=fmt,
        calib=calib,
        min_oks=min_oks,
        max_batch=max_batch,
        checkpoint_sha=sha256_file(src),
        plan=PlanOptions(opt_batch, opt_level, Path(engine_dir) / "timing.cache", progress),
    )
    with staging(engine_dir) as stage:
        gate = gate_crops(card, calib)
        fp32, check = adopt_onnx(model, stage / f"{role}.onnx", card, gate[0], source=src, role=role)
        return _finish(stage, job, fp32, check.require(), gate, [])


def _zoo_model(name: str, weights: str, trust_pickle: bool) -> Any:
    from dynpose.models import create_model

    with warnings.catch_warnings():
        # The zoo warns about random weights per model; the export logs its own line.
        warnings.simplefilter("ignore", UserWarning)
        model = create_model(name, weights=weights, trust_pickle=trust_pickle)
    if weights == "random":
        log.warning("%s: random weights (outputs are meaningless; for pipeline tests and speed only)", name)
    return model


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

    role = role or default_role(name)
    _check_args(role, precision, fmt, max_batch)
    _check_machine(fmt, precision)
    router_weights = router_weights or ("random" if weights == "random" else "checkpoint")
    if router_weights not in ROUTER_WEIGHTS:
        raise DynPoseError(f"router weights kind {router_weights!r}: use one of {ROUTER_WEIGHTS}")
    _require_calib(precision, calib)
    model = _zoo_model(name, weights, trust_pickle)
    checkpoint = getattr(model, "checkpoint", None)
    job = _Job(
        engine_dir=Path(engine_dir),
        role=role,
        model=name,
        card=model.card,
        precision=precision,
        fmt=fmt,
        calib=calib,
        min_oks=min_oks,
        max_batch=max_batch,
        checkpoint_sha=checkpoint.sha256 if checkpoint is not None else None,
        plan=PlanOptions(opt_batch, opt_level, Path(engine_dir) / "timing.cache", progress),
        router_weights=router_weights,
    )
    with staging(engine_dir) as stage:
        gate = gate_crops(job.card, calib)
        fp32, check = to_onnx(model, stage / f"{role}.onnx", job.card, gate[0])
        check.require()
        torch.save(model.state_dict(), stage / f"{role}.pt")
        torch_entry = job.entry(f"{role}.pt", "torch", "fp32", check.figures, ("input", "output"))
        return _finish(stage, job, fp32, check, gate, [torch_entry])


def export_all(
    engine_dir: str | os.PathLike,
    *,
    models: dict[str, str] | None = None,
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
    """A whole DynPose set: the router and a small/large pair (default `DYNPOSE_SET`: resnet_50 small, hrnet_w32
    large). The router is always fp32: at 0.85 M parameters a lower precision saves nothing worth a routing change
    (`export_model("router", precision=...)` does it).

    models: role -> zoo name, overriding the default pair (e.g. {"small": "lpn_50"}); any two zoo pose models with
    the same keypoint set make a pair, whatever their input sizes or decoders. weights: role -> weights source (path,
    URL or alias); missing roles get random weights (seeded: the same file every time)."""
    _require_calib(precision, calib)  # before the router is exported, not after
    _check_args(Role.SMALL, precision, fmt, max_batch)
    _check_machine(fmt, precision)
    chosen = {**DYNPOSE_SET, **(models or {})}
    _check_pair(chosen)
    weights = weights or {}
    out: list[Entry] = []
    for role in ("router", "small", "large"):
        out += export_model(
            chosen[role],
            engine_dir,
            role=role,
            weights=weights.get(role, "random"),
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


def _check_pair(models: dict[str, str]) -> None:
    """Refuse a pair that cannot be routed between, before anything is exported."""
    from dynpose.models import get_card

    unknown = sorted(set(models) - set(DYNPOSE_SET))
    if unknown:
        raise DynPoseError(f"export_all: unknown role(s) {unknown}; use router, small, large")
    cards = {role: get_card(name) for role, name in models.items()}
    if cards["router"].task != "router":
        raise DynPoseError(f"--model all: {models['router']!r} is not a router")
    for role in ("small", "large"):
        if cards[role].task != "pose":
            raise DynPoseError(f"--{role} {models[role]!r}: not a pose model")
    if cards["small"].keypoints != cards["large"].keypoints:
        raise DynPoseError(
            f"--small {models['small']} predicts {cards['small'].keypoints} but --large {models['large']} predicts "
            f"{cards['large'].keypoints}; a pair needs the same keypoint set"
        )


def register_detector(onnx_path: str | os.PathLike, engine_dir: str | os.PathLike, *, progress: bool = True) -> list[Entry]:
    """Register an ONNX person detector (PP-PicoDet, YOLOv5 or YOLOv8 output layout) as the engine dir's `detector`
    entry, so `dynpose-run` and `Pipeline.from_engine_dir` find boxes without a `--detector` flag.

    The file is loaded with the runtime's own `OnnxDetector` (which reads the layout from the outputs and needs a fixed
    input size) and run once on a frame, so a model the runtime cannot use is refused here, not at run time.
    `progress` is kept for callers; there is nothing to show progress of."""
    from dynpose.runtime.detector import OnnxDetector

    src = Path(onnx_path)
    check_onnx(load_onnx(src, "detector"), f"detector {src}")
    det = OnnxDetector(src)
    h, w = det.input_hw
    det(np.full((h, w, 3), 114, dtype=np.uint8))  # one real run: shapes and layout work end to end
    log.info("detector %s: %s layout, input %dx%d", src.name, det.layout, w, h)
    card = ModelCard(name=src.stem, input_width=w, input_height=h, task="detector", arch="onnx")
    with staging(engine_dir) as stage:
        shutil.copyfile(src, stage / "detector.onnx")
        entry = Entry(
            role="detector",
            model=src.stem,
            file="detector.onnx",
            format="onnx",
            precision="fp32",
            card=card,
            input_name=det.input_name,
            output_name=det.session.get_outputs()[0].name,
            min_batch=1,
            max_batch=1,
            checkpoint_sha256=sha256_file(src),
            checks={"layout": det.layout},
            versions=tool_versions(),
        )
        return commit(stage, engine_dir, [entry])


__all__ = [
    "CalibSpec",
    "DYNPOSE_SET",
    "ROLES",
    "ROUTER_WEIGHTS",
    "UNTUNED_ROUTE",
    "commit",
    "default_role",
    "default_route",
    "export_all",
    "export_model",
    "register_detector",
    "register_onnx",
    "staging",
]
