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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.engines.manifest import Entry, current_manifest, tool_versions
from dynpose.errors import DynPoseError
from dynpose.export.calibration.crops import CalibSpec, CropSet
from dynpose.export.calibration.quantize import Int8Options
from dynpose.export.commit import commit, staging
from dynpose.export.judges import Check, Judge, judge_for
from dynpose.export.options import ExportOptions
from dynpose.export.route import ROUTER_WEIGHTS, UNTUNED_ROUTE, default_route
from dynpose.export.steps import OpenVinoOptions, PlanOptions, adopt_onnx, to_fp16, to_int8, to_onnx, to_openvino, to_plan
from dynpose.export.verify import gate_crops
from dynpose.fileio import sha256_file
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import check_onnx, io_names, load_onnx, opset_of
from dynpose.roles import MODEL_ROLES, POSE_ROLES, Role

log = logging.getLogger(__name__)

# The DynPose set: role -> zoo name (the paper's pair; `export_all(models=...)` takes any two zoo pose models with
# the same keypoint set).
DYNPOSE_SET = {Role.ROUTER: Role.ROUTER.value, Role.SMALL: "resnet_50", Role.LARGE: "hrnet_w32"}


# Zoo families exported as the large model unless --role says otherwise: the accurate, costly ones (HRNet and
# SimDR-HRNet, the stacked hourglasses, DPN, RTMPose-m/l, ViTPose); ResNet SimpleBaselines, LPN, RTMPose-t/s and
# everything else are small.
LARGE_FAMILIES = ("hrnet", "simdr_hrnet", "hourglass", "dpn", "rtmpose_m", "rtmpose_l", "vitpose")


def default_role(name: str) -> Role:
    """router for the router; large for hrnet_*, simdr_hrnet_*, hourglass_*, dpn, rtmpose_m*, rtmpose_l* and
    vitpose_*; small for resnet_*, lpn_*, rtmpose_t, rtmpose_s and everything else. An explicit role
    (`export_model(role=...)`, `--role`) overrides it."""
    if name == Role.ROUTER or name.endswith(Role.ROUTER.value):
        return Role.ROUTER
    if any(name == f or name.startswith(f + "_") for f in LARGE_FAMILIES):
        return Role.LARGE
    return Role.SMALL


@dataclass(frozen=True)
class _Job:
    """One model's export as the public call describes it: where, under which role and name, and how."""

    engine_dir: Path
    role: Role
    model: str
    card: ModelCard
    options: ExportOptions
    checkpoint_sha: str | None
    router_weights: str = "checkpoint"

    @property
    def precision(self) -> str:
        return self.options.precision

    @property
    def fmt(self) -> str:
        return self.options.fmt

    @property
    def calib(self) -> CalibSpec | None:
        return self.options.calib

    @property
    def min_oks(self) -> float:
        return self.options.min_oks

    @property
    def max_batch(self) -> int:
        return self.options.max_batch

    @property
    def plan(self) -> PlanOptions:
        return self.options.plan(self.engine_dir)

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
    if job.card.task == Role.ROUTER:
        route, _ = default_route(current_manifest(job.engine_dir), job.router_weights)
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
    options: ExportOptions | None = None,
    *,
    role: Role | str,
    **fields: Any,
) -> list[Entry]:
    """Register a user's ONNX heatmap model (names in its graph are kept and recorded) under `role`; `options` (or
    its fields as keywords) say how (`ExportOptions`).

    The file is checked (onnx.checker, single input matching the card, dynamic batch: batch 5 == 5 x batch 1, finite
    outputs on real crops), copied in as `<role>.onnx` with the card in its metadata, and for fp16/int8 converted
    and checked against itself in fp32. Returns the manifest entries written.
    """
    opts = ExportOptions.of(options, fields)
    role = Role.parse(role, "register_onnx role")
    opts.check(role)
    if not isinstance(card, ModelCard):
        raise DynPoseError("register_onnx needs a ModelCard (ModelCard.from_json_file(path))")
    src = Path(onnx_path)
    model = load_onnx(src, "user ONNX model")
    check_onnx(model, f"user ONNX model {src}")
    if opset_of(model) < 13:
        raise DynPoseError(f"user ONNX model {src}: opset {opset_of(model)} is too old; re-export it with opset >= 17")
    io_names(model, f"user ONNX model {src}")
    job = _Job(Path(engine_dir), role, card.name, card, opts, sha256_file(src))
    with staging(engine_dir) as stage:
        gate = gate_crops(card, opts.calib)
        fp32, check = adopt_onnx(model, stage / f"{role.value}.onnx", card, gate[0], source=src, role=role.value)
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
    options: ExportOptions | None = None,
    *,
    role: Role | str | None = None,
    weights: str = "random",
    router_weights: str | None = None,
    **fields: Any,
) -> list[Entry]:
    """Export zoo model `name` (weights: "random", a path, URL or alias) to ONNX + a `torch` state_dict entry;
    `options` (or its fields as keywords) say how (`ExportOptions`).

    For the router, `router_weights` ("random", "checkpoint" or "trained"; default from `weights`) sets the engine
    dir's default route (`default_route`); fp16/int8 routers are gated on routing decisions (`min_oks` is then the
    decision agreement with fp32)."""
    import torch

    opts = ExportOptions.of(options, fields)
    role = Role.parse(role, "export_model role") if role is not None else default_role(name)
    opts.check(role)
    router_weights = router_weights or ("random" if weights == "random" else "checkpoint")
    if router_weights not in ROUTER_WEIGHTS:
        raise DynPoseError(f"router weights kind {router_weights!r}: use one of {ROUTER_WEIGHTS}")
    model = _zoo_model(name, weights, opts.trust_pickle)
    checkpoint = getattr(model, "checkpoint", None)
    sha = checkpoint.sha256 if checkpoint is not None else None
    job = _Job(Path(engine_dir), role, name, model.card, opts, sha, router_weights)
    with staging(engine_dir) as stage:
        gate = gate_crops(job.card, opts.calib)
        fp32, check = to_onnx(model, stage / f"{role.value}.onnx", job.card, gate[0])
        check.require()
        torch.save(model.state_dict(), stage / f"{role.value}.pt")
        torch_entry = job.entry(f"{role.value}.pt", "torch", "fp32", check.figures, ("input", "output"))
        return _finish(stage, job, fp32, check, gate, [torch_entry])


def export_all(
    engine_dir: str | os.PathLike,
    options: ExportOptions | None = None,
    *,
    models: dict[Role, str] | None = None,
    weights: dict[Role, str] | None = None,
    **fields: Any,
) -> list[Entry]:
    """A whole DynPose set: the router and a small/large pair (default `DYNPOSE_SET`: resnet_50 small, hrnet_w32
    large). The router is always fp32: at 0.85 M parameters a lower precision saves nothing worth a routing change
    (`export_model("router", precision=...)` does it).

    models: role -> zoo name, overriding the default pair (e.g. {Role.SMALL: "lpn_50"}); any two zoo pose models with
    the same keypoint set make a pair, whatever their input sizes or decoders. weights: role -> weights source (path,
    URL or alias); missing roles get random weights (seeded: the same file every time)."""
    opts = ExportOptions.of(options, fields)
    opts.check(Role.SMALL)  # before the router is exported, not after
    chosen = {**DYNPOSE_SET, **{Role.parse(r, "export_all models"): n for r, n in (models or {}).items()}}
    _check_pair(chosen)
    weights = {Role.parse(r, "export_all weights"): w for r, w in (weights or {}).items()}
    from dynpose.models import get_card
    from dynpose.models.weights import check_source

    for role, source in weights.items():  # a missing file for the large model must not leave a new router behind
        check_source(get_card(chosen[role]), source)
    out: list[Entry] = []
    for role in MODEL_ROLES:
        role_opts = replace(opts, precision="fp32") if role is Role.ROUTER else opts
        out += export_model(chosen[role], engine_dir, role_opts, role=role, weights=weights.get(role, "random"))
    return out


def _check_pair(models: dict[Role, str]) -> None:
    """Refuse a pair that cannot be routed between, before anything is exported."""
    from dynpose.models import get_card

    cards = {role: get_card(name) for role, name in models.items()}
    if cards[Role.ROUTER].task != Role.ROUTER:
        raise DynPoseError(f"--model all: {models[Role.ROUTER]!r} is not a router")
    for role in POSE_ROLES:
        if cards[role].task != "pose":
            raise DynPoseError(f"--{role.value} {models[role]!r}: not a pose model")
    small, large = Role.SMALL, Role.LARGE
    if cards[small].keypoints != cards[large].keypoints:
        raise DynPoseError(
            f"--small {models[small]} predicts {cards[small].keypoints} but --large {models[large]} predicts "
            f"{cards[large].keypoints}; a pair needs the same keypoint set"
        )


def register_detector(onnx_path: str | os.PathLike, engine_dir: str | os.PathLike, *, progress: bool = True) -> list[Entry]:
    """Register an ONNX person detector (PP-PicoDet, YOLOv5 or YOLOv8 output layout) as the engine dir's `detector`
    entry, so `dynpose-run` and `Pipeline.from_engine_dir` find boxes without a `--detector` flag.

    The file is loaded with the runtime's own `OnnxDetector` (which reads the layout from the outputs and needs a fixed
    input size) and run once on a frame, so a model the runtime cannot use is refused here, not at run time.
    `progress` is kept for callers; there is nothing to show progress of."""
    from dynpose.runtime.detector import OnnxDetector

    src = Path(onnx_path)
    check_onnx(load_onnx(src, Role.DETECTOR.value), f"detector {src}")
    det = OnnxDetector(src)
    h, w = det.input_hw
    det(np.full((h, w, 3), 114, dtype=np.uint8))  # one real run: shapes and layout work end to end
    log.info("detector %s: %s layout, input %dx%d", src.name, det.layout, w, h)
    card = ModelCard(name=src.stem, input_width=w, input_height=h, task=Role.DETECTOR.value, arch="onnx")
    file = f"{Role.DETECTOR.value}.onnx"
    with staging(engine_dir) as stage:
        shutil.copyfile(src, stage / file)
        entry = Entry(
            role=Role.DETECTOR,
            model=src.stem,
            file=file,
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
    "ExportOptions",
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
