"""`dynpose-export`: zoo model or user ONNX -> verified ONNX / fp16 / INT8 / TensorRT files in an engine dir."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dynpose.cli.common import check_finite, setup_logging, sigterm_as_interrupt, user_errors, version_option
from dynpose.engines.manifest import Entry
from dynpose.errors import DynPoseError
from dynpose.roles import MODEL_ROLES, Role

if TYPE_CHECKING:
    from dynpose.export.calibration.crops import CalibSpec
    from dynpose.export.options import ExportOptions

EXAMPLES = """
\b
Examples:
  dynpose-export --model hrnet_w32 --weights random --engine-dir engines/
  dynpose-export --model all --checkpoint mmpose --engine-dir engines/
  # any pair of zoo models with the same keypoints, one checkpoint file per role (offline)
  dynpose-export --model all --small lpn_50 --large hrnet_w32 --checkpoint small=lpn_50.pth \\
      --checkpoint large=pose_hrnet_w32_256x192.pth --checkpoint router=backbone.pth --engine-dir engines/
  dynpose-export --model resnet_50 --checkpoint ckpt/res50.pth --precision fp16 --engine-dir engines/
  dynpose-export --model hrnet_w32 --checkpoint mmpose --precision int8 \\
      --calib-root data/ --gate-ann data/coco/test_coco.json --engine-dir engines/
  dynpose-export --onnx tinypose_256x192.onnx --card tinypose.json --role small --precision int8 \\
      --calib-ann person_keypoints.json --calib-images images/ --engine-dir engines/
  dynpose-export --model hrnet_w32 --checkpoint mmpose --format tensorrt --precision fp16 --engine-dir engines/
  # OpenVINO IR for CPUs: the fastest of fp32 / bf16 / int8 that passes the accuracy gate on this machine
  dynpose-export --model all --small rtmpose_s --checkpoint mmpose --format openvino --precision auto \\
      --calib-root data/ --gate-ann data/coco/test_coco.json --engine-dir engines/
  dynpose-export --detector picodet_s_320_pedestrian.onnx --engine-dir engines/
"""


@dataclass(frozen=True)
class ExportFlags:
    """dynpose-export's flags, as click parses them."""

    model: str | None
    onnx_file: str | None
    card_file: str | None
    checkpoints: tuple[str, ...]
    small_name: str | None
    large_name: str | None
    weights: str | None
    trust_checkpoint: bool
    precision: str
    calib_ann: str | None
    calib_dets: str | None
    calib_images: str | None
    calib_root: str | None
    gate_ann: str | None
    calib_method: str
    calib_max_crops: int
    int8_target: str | None
    role: str | None
    fmt: str
    max_batch: int
    opt_batch: int | None
    opt_level: int
    min_oks: float
    engine_dir: str
    no_costs: bool
    quiet: bool
    detector: str | None

    def options(self) -> ExportOptions:
        """The export's one options object (checked as it is used: `ExportOptions.check`)."""
        from dynpose.export.options import ExportOptions

        check_finite("--min-oks", self.min_oks, 0.0, 1.0)
        return ExportOptions(
            precision=self.precision,
            fmt=self.fmt,
            max_batch=self.max_batch,
            calib=_calib_spec(self),
            min_oks=self.min_oks,
            trust_pickle=self.trust_checkpoint,
            progress=not self.quiet,
            opt_batch=self.opt_batch,
            opt_level=self.opt_level,
        )


def _calib_spec(f: ExportFlags) -> CalibSpec | None:
    """The calibration spec the --calib-* options describe; with only --gate-ann, a spec holding just the gate file
    (fp16 and fp32 checks judge on its persons; INT8 still needs calibration data); None without either."""
    from dynpose.export.calibration.crops import CalibSpec, Source

    root, ann, dets, images, gate_ann = f.calib_root, f.calib_ann, f.calib_dets, f.calib_images, f.gate_ann
    if root is None and ann is None and dets is None:
        if gate_ann is None:
            return None
        if not Path(gate_ann).is_file():
            raise DynPoseError(f"--gate-ann {gate_ann}: file not found")
        return CalibSpec(gate_ann=Path(gate_ann))
    if root is not None:
        spec = CalibSpec.from_root(root)
    else:
        if images is None:
            raise DynPoseError("--calib-ann/--calib-dets need --calib-images DIR (the folder holding their images)")
        sources = []
        if ann is not None:
            sources.append(Source("coco", Path(ann), Path(images)))
        if dets is not None:
            sources.append(Source("dets", Path(dets), Path(images)))
        spec = CalibSpec(sources=sources)
    spec.gate_ann = Path(gate_ann) if gate_ann else None
    spec.method, spec.target, spec.max_crops = f.calib_method, f.int8_target, f.calib_max_crops
    spec.validate()
    return spec


def _check_figure(e: Entry) -> str:
    c = e.checks
    if e.format == "tensorrt":
        return f"built (TensorRT {(e.tensorrt or {}).get('tensorrt_version', '?')})"
    if e.format == "openvino":
        return _openvino_figure(e)
    if e.format == "torch":
        return "state_dict"
    if str(c.get(f"{e.precision}_gate", "")).startswith("skipped"):
        return f"{e.precision} gate {c[e.precision + '_gate']}"
    if "router_decision_agreement" in c:
        return f"{c['router_decision_agreement']:.0%} same route as fp32 ({c['router_gate_policy']})"
    if e.precision == "int8" and "int8_oks" in c:
        return f"OKS {c['int8_oks']:.3f} vs fp32, {c.get('int8_speedup_b8', 0):.2f}x on ORT CPU"
    if e.precision == "fp16" and "fp16_oks" in c:
        return f"OKS {c['fp16_oks']:.3f} vs fp32"
    if "fp32_rel_l2" in c:
        return f"rel L2 {c['fp32_rel_l2']:.1e} vs torch"
    if "batch5_vs_batch1_rel_l2" in c:
        return "dynamic batch ok"
    return "ok"


def _openvino_figure(e: Entry) -> str:
    """What the IR runs and what the export measured: precision, OKS vs fp32, speed vs ONNX Runtime fp32."""
    meta = e.openvino or {}
    cands = meta.get("candidates", {})
    kept = cands.get(meta.get("kept"), {})
    base = cands.get("onnxruntime fp32", {}).get("ms_per_crop_b8")
    parts = [f"{e.precision} on OpenVINO {str(meta.get('openvino_version', '?')).split('-')[0]} ({meta.get('isa', '?')})"]
    if f"{e.precision}_oks" in e.checks:
        parts.append(f"OKS {e.checks[e.precision + '_oks']:.3f} vs fp32")
    if kept.get("ms_per_crop_b8") and base:
        parts.append(f"{base / kept['ms_per_crop_b8']:.2f}x ORT fp32")
    if meta.get("f32_layers"):
        parts.append(f"{len(meta['f32_layers'])} layers f32")
    return ", ".join(parts)


def _summary(entries: list[Entry], engine_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"engine dir {engine_dir}")
    for col in ("role", "file", "format", "precision", "size", "check"):
        t.add_column(col)
    for e in entries:
        t.add_row(e.role, e.file, e.format, e.precision, f"{e.size / 2**20:.1f} MiB", _check_figure(e))
    Console(width=None if sys.stdout.isatty() else 160).print(t)  # a log keeps whole file names
    if any(e.role == Role.ROUTER for e in entries):
        from dynpose.engines.manifest import Manifest

        Console(highlight=False).print(f"default route: {Manifest.load(engine_dir, verify=False).route}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120}, epilog=EXAMPLES)
@version_option
@click.option(
    "--model",
    "model",
    metavar="NAME",
    help="Zoo model (hrnet_w32, resnet_50, router, ...) or `all` for "
    "the DynPose set: router, resnet_50 as small, hrnet_w32 as large.",
)
@click.option(
    "--onnx",
    "onnx_file",
    type=click.Path(dir_okay=False),
    help="Register your own ONNX heatmap model instead of a zoo model (needs --card and --role).",
)
@click.option(
    "--card",
    "card_file",
    type=click.Path(dir_okay=False),
    help="Model card JSON for --onnx (name, input_width, input_height, color_order, mean, std (0-255), keypoints, decoder).",
)
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    help="Weights: a path, an http(s) URL, or an alias (mmpose, official, dynpose). With --model all: one alias for "
    "the set, or one ROLE=SOURCE per role (small=res50.pth large=hrnet.pth router=router.pth); repeatable.",
)
@click.option("--small", "small_name", metavar="NAME", help="--model all: the small model (default resnet_50).")
@click.option("--large", "large_name", metavar="NAME", help="--model all: the large model (default hrnet_w32).")
@click.option("--weights", type=click.Choice(["random"]), help="Random weights (pipeline tests and speed only).")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled checkpoints (only for files you trust).")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16", "int8", "auto"]),
    default="fp32",
    show_default=True,
    help="bf16 and auto: --format openvino only (bf16 needs a CPU with AVX512_BF16 or AMX; auto keeps the fastest "
    "precision that passes the accuracy gate on this machine, int8 among them when calibration data is given).",
)
@click.option("--calib-ann", type=click.Path(dir_okay=False), help="INT8 calibration: COCO keypoint annotations.")
@click.option("--calib-dets", type=click.Path(dir_okay=False), help="INT8 calibration: COCO-format detections.")
@click.option("--calib-images", type=click.Path(file_okay=False), help="Images of --calib-ann / --calib-dets.")
@click.option(
    "--calib-root",
    type=click.Path(file_okay=False),
    help="INT8 calibration: every annotation, detection and MPII JSON under this folder, each with the images beside it.",
)
@click.option(
    "--gate-ann",
    type=click.Path(dir_okay=False),
    help="COCO annotations whose labelled persons form the "
    "fp16/INT8 accuracy gate (for INT8 their images are kept out of calibration). Default: fp16 judges on "
    "$DYNPOSE_VERIFY_COCO's persons, INT8 on a quarter of the calibration images.",
)
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True)
@click.option("--calib-max-crops", type=int, default=256, show_default=True, help="Cap on calibration crops.")
@click.option(
    "--int8-target",
    type=click.Choice(["ort", "tensorrt"]),
    help="Q/DQ flavour: ort (uint8 activations, "
    "int8 per-channel weights) or tensorrt (symmetric int8). Default: from --format (openvino: ort).",
)
@click.option(
    "--role",
    type=click.Choice([r.value for r in MODEL_ROLES]),
    help="Role in the engine dir (default: router for router; large for hrnet_*, simdr_hrnet_*, hourglass_*, dpn, "
    "rtmpose_m*, rtmpose_l*, vitpose_*; small otherwise; required with --onnx).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "tensorrt", "openvino"]),
    default="onnx",
    show_default=True,
    help="onnx (ONNX Runtime), tensorrt (a plan for this GPU) or openvino (an IR for this CPU; pip install "
    "'dynpose[openvino]'). tensorrt and openvino write the ONNX entry too.",
)
@click.option("--max-batch", type=int, default=64, show_default=True)
@click.option("--opt-batch", type=int, help="TensorRT profile's optimal batch (default: the builder's choice).")
@click.option("--opt-level", type=int, default=3, show_default=True, help="TensorRT builder optimisation level.")
@click.option(
    "--min-oks",
    type=float,
    default=0.95,
    show_default=True,
    help="fp16/int8 gate: mean keypoint OKS vs "
    "fp32 on held-out crops (for the router: the fraction of crops routed as fp32 routes them); 0 disables "
    "it (e.g. random weights).",
)
@click.option("--engine-dir", type=click.Path(file_okay=False), default="engines", show_default=True)
@click.option(
    "--no-costs",
    is_flag=True,
    help="Do not time the models afterwards (by default, once the dir holds a small and a large model, their and the "
    "router's per-crop cost on this machine goes into the manifest: dynpose-run then says whether routing pays).",
)
@click.option("--quiet", is_flag=True, help="No progress lines (warnings still show), only the summary table.")
@click.option(
    "--detector",
    type=click.Path(path_type=str),
    default=None,
    help="Register an ONNX person detector (PicoDet, YOLOv5/v8 layouts) as the engine dir's detector.",
)
@user_errors
def main(**flags: Any) -> None:
    """Export pose models to ONNX (fp32/fp16/INT8 Q/DQ), TensorRT or OpenVINO (fp32/bf16/INT8/auto), verify them,
    and record them in the engine directory's manifest.json."""
    f = ExportFlags(**{**flags, "checkpoints": tuple(flags["checkpoints"])})
    setup_logging(f.quiet)
    if sum(x is not None for x in (f.model, f.onnx_file, f.detector)) != 1:
        raise DynPoseError(
            "pass exactly one of --model NAME (zoo), --onnx FILE --card CARD.json (your pose model) or "
            "--detector FILE.onnx (a person detector)"
        )
    engine = Path(f.engine_dir)
    # SIGTERM as Ctrl-C: the staging folder is removed on the way out and the engine dir keeps its old state.
    with sigterm_as_interrupt():
        try:
            entries = _export(f, engine)
        except KeyboardInterrupt:
            raise DynPoseError(f"interrupted: the engine dir {engine} was left as it was") from None
    _summary(entries, engine)
    if not f.no_costs and f.detector is None:
        _store_costs(engine, f.fmt)


def _export(f: ExportFlags, engine: Path) -> list[Entry]:
    """The one export the flags ask for: a detector, the user's ONNX, or zoo models."""
    if f.detector is not None:
        from dynpose.export.api import register_detector

        return register_detector(f.detector, engine, progress=not f.quiet)
    options = f.options()
    if f.onnx_file is not None:
        return _register_user_onnx(f, engine, options)
    return _export_zoo(f, engine, options)


def _store_costs(engine: Path, fmt: str) -> None:
    """Per-crop costs of the engine dir's models on this machine into the manifest (`dynpose.bench.costs`), once it
    has a small and a large model for the exported format; the lines say whether routing can pay."""
    from dynpose.bench.costs import cost_lines, measure_costs_dir, store_costs
    from dynpose.engines.manifest import Manifest

    backend, device = {"tensorrt": ("tensorrt", "cuda"), "openvino": ("openvino", "cpu")}.get(fmt, ("ort", "cpu"))
    fmt_of = {"tensorrt": "tensorrt", "ort": "onnx", "openvino": "openvino"}[backend]
    m = Manifest.load(engine, verify=False)
    if m.get(Role.SMALL, fmt_of) is None or m.get(Role.LARGE, fmt_of) is None:
        return
    record = measure_costs_dir(engine, backend, device)
    store_costs(engine, record)
    for line in cost_lines(record):
        click.echo(line)


def _register_user_onnx(f: ExportFlags, engine: Path, options: ExportOptions) -> list[Entry]:
    from dynpose.export.api import register_onnx
    from dynpose.models.card import ModelCard

    if f.card_file is None:
        raise DynPoseError("--onnx needs --card CARD.json describing its input and keypoints")
    if f.role is None:
        raise DynPoseError("--onnx needs --role router|small|large")
    if f.checkpoints or f.weights:
        raise DynPoseError("--checkpoint/--weights apply to zoo models, not to --onnx")
    assert f.onnx_file is not None
    return register_onnx(f.onnx_file, ModelCard.from_json_file(f.card_file), engine, options, role=f.role)


def _export_zoo(f: ExportFlags, engine: Path, options: ExportOptions) -> list[Entry]:
    from dynpose.export.api import export_model

    assert f.model is not None  # exactly one of --model, --onnx, --detector is given
    if (f.small_name or f.large_name) and f.model != "all":
        raise DynPoseError("--small/--large choose the pair of --model all")
    if f.checkpoints and f.weights:
        raise DynPoseError("pass --checkpoint or --weights random, not both")
    if not f.checkpoints and not f.weights:
        raise DynPoseError("pass --checkpoint PATH|URL|mmpose|official, or --weights random for untrained weights")
    for c in f.checkpoints:
        _check_source(c.partition("=")[2] if _is_role_pair(c) else c)
    if f.model == "all":
        return _export_set(f, engine, options)
    if len(f.checkpoints) > 1 or any(_is_role_pair(c) for c in f.checkpoints):
        raise DynPoseError("ROLE=FILE checkpoints are for --model all; one model takes one --checkpoint")
    source = f.checkpoints[0] if f.checkpoints else "random"
    return export_model(f.model, engine, options, role=f.role, weights=source)


def _is_role_pair(text: str) -> bool:
    return "=" in text and text.partition("=")[0] in MODEL_ROLES


def _check_source(source: str) -> None:
    """A checkpoint that names a file must exist: it is never read as an alias (aliases are plain words)."""
    if "://" in source or re.fullmatch(r"[A-Za-z][\w-]*", source) or Path(source).expanduser().is_file():
        return
    raise DynPoseError(
        f"--checkpoint {source}: file not found; pass an existing checkpoint file, an http(s) URL, or an "
        "alias (mmpose, official)"
    )


def _export_set(f: ExportFlags, engine: Path, options: ExportOptions) -> list[Entry]:
    """--model all: the router and the --small/--large pair, each role's weights from `--checkpoint ROLE=SOURCE` or
    one alias for the whole set (the router's release has its own alias: `dynpose`)."""
    from dynpose.export.api import export_all

    if f.role:
        raise DynPoseError("--role does not apply to --model all (it exports the router, --small and --large)")
    pairs = {
        Role.parse(r, "--checkpoint"): src for r, _, src in (c.partition("=") for c in f.checkpoints if _is_role_pair(c))
    }
    aliases = [c for c in f.checkpoints if not _is_role_pair(c)]
    if len(aliases) > 1 or (aliases and not re.fullmatch(r"[A-Za-z][\w-]*", aliases[0])):
        raise DynPoseError(
            "--model all takes one alias for the whole set (--checkpoint mmpose) or one file per role: --checkpoint "
            "small=res50.pth --checkpoint large=hrnet.pth [--checkpoint router=router.pth]"
        )
    weights: dict[Role, str] = {}
    if aliases:
        router_alias = "official" if aliases[0] == "official" else "dynpose"
        weights = {Role.SMALL: aliases[0], Role.LARGE: aliases[0], Role.ROUTER: router_alias}
    weights.update(pairs)
    pair = {r: n for r, n in ((Role.SMALL, f.small_name), (Role.LARGE, f.large_name)) if n}
    return export_all(engine, options, models=pair, weights=weights)


if __name__ == "__main__":
    main()
