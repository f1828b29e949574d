"""`dynpose-train-router`: train the DynPose router on an engine dir's pose pair (from labels, or without them with
the large model as the teacher), or calibrate its routing policy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from dynpose.cli.common import check_threads, setup_logging, user_errors, version_option
from dynpose.errors import DynPoseError

EXAMPLES = """
\b
Examples:
  # train on COCO-format annotations, export the router into the engine dir
  dynpose-train-router --engine-dir engines --ann person_keypoints_train2017.json --images train2017 --epochs 20
  # no labels: persons from your own footage, boxes from the engine dir's detector, the large model as the teacher
  dynpose-train-router --engine-dir engines --unlabelled footage/ --unlabelled street.mp4 --copies 8 \\
      --router-input pooled --eval-ann val.json --eval-images val2017
  # start from the DynPose release router
  dynpose-train-router --engine-dir engines --ann A.json --images DIR --init backbone.pth
  # choose the policy: 30% of crops to the large model, or the cheapest policy within 1 AP point
  dynpose-train-router --calibrate --engine-dir engines --ann val.json --images val2017 --target-fraction 0.3
  dynpose-train-router --calibrate --engine-dir engines --ann val.json --images val2017 --target-ap-drop 0.01 \\
      --detections val_dets.json
  # no labels: the cheapest policy whose keypoints agree with the large model's at mean OKS >= 0.95, checked on
  # held-out frames of your own footage
  dynpose-train-router --calibrate --engine-dir engines --unlabelled footage/ --unlabelled street.mp4 \\
      --detector picodet.onnx --target-agreement 0.95
"""


def _finite(name: str, v: float | None) -> None:
    if v is not None and not math.isfinite(v):
        raise DynPoseError(f"{name} must be a finite number, got {v}")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise DynPoseError(f"--eval-fractions {text!r}: not a comma-separated list of numbers (e.g. 0.25,0.5)") from None
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise DynPoseError(f"--eval-fractions {text!r}: each must be in [0, 1]")
    return vals


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120}, epilog=EXAMPLES)
@version_option
@click.option("--engine-dir", required=True, type=click.Path(file_okay=False), help="Engine dir with small + large.")
@click.option("--ann", default=None, type=click.Path(dir_okay=False), help="COCO-format keypoint annotations (labelled).")
@click.option("--images", default=None, type=click.Path(file_okay=False), help="Folder with the annotated images.")
@click.option(
    "--unlabelled",
    multiple=True,
    type=click.Path(exists=False),
    help="Train without labels on these images / folders / videos (repeatable); the large model is the teacher.",
)
@click.option(
    "--detections", multiple=True, type=click.Path(dir_okay=False), help="COCO-format person detections (repeatable)."
)
@click.option(
    "--detector",
    "detector_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="ONNX person detector [default: the engine dir's].",
)
@click.option("--det-score", default=0.3, show_default=True, type=float, help="--unlabelled: smallest box score used.")
@click.option("--copies", default=8, show_default=True, type=int, help="--unlabelled: augmented variants per person.")
@click.option("--max-frames", default=300, show_default=True, type=int, help="--unlabelled: frames per video.")
@click.option("--frame-step", default=1, show_default=True, type=int, help="--unlabelled: every n-th video frame.")
@click.option(
    "--router-input",
    default="full",
    show_default=True,
    type=click.Choice(["full", "pooled"]),
    help="full: the release router on the 256x192 crop; pooled: fed its 128x96 pooled crop directly (cheaper).",
)
@click.option("--epochs", default=20, show_default=True, type=int)
@click.option("--batch", default=16, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds training and the augmentation.")
@click.option(
    "--out",
    default="router.pth",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Checkpoint (DynPose release format, `backbone.` keys); the loss curve goes beside it.",
)
@click.option("--init", "init", default=None, type=click.Path(dir_okay=False), help="Router checkpoint to start from.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow an --init checkpoint that needs pickle (trusted only).")
@click.option("--no-flip", is_flag=True, help="Labelled: do not add mirrored crops; --unlabelled: no flip variants.")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "tensorrt", "torch", "openvino"]))
@click.option("--device", default="cpu", show_default=True, help="Where the pose models (and the router) run: cpu | cuda.")
@click.option(
    "--train-device",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="Where the router trains (PyTorch); auto = cuda when PyTorch sees a GPU.",
)
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]))
@click.option(
    "--min-agreement", default=0.95, show_default=True, type=float, help="INT8 router: routing agreement with fp32."
)
@click.option("--no-export", is_flag=True, help="Only write the checkpoint; leave the engine dir as it is.")
@click.option("--eval-ann", default=None, type=click.Path(dir_okay=False), help="Held-out labels to report the router on.")
@click.option("--eval-images", default=None, type=click.Path(file_okay=False), help="Images of --eval-ann.")
@click.option("--eval-fractions", default="0.25,0.5", show_default=True, help="Fractions the held-out report uses.")
@click.option(
    "--eval-dets", default=None, type=click.Path(dir_okay=False), help="Detections of --eval-images, for the report."
)
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Cache [default: ENGINE_DIR/cache].")
@click.option("--no-cache", is_flag=True, help="Re-run the pose models; neither read nor write the cache.")
@click.option("--calibrate", is_flag=True, help="Choose the routing policy instead of training.")
@click.option("--evaluate", is_flag=True, help="Only the held-out report (--eval-ann/--eval-images) of the router there.")
@click.option("--target-fraction", default=None, type=float, help="Calibrate: share of crops for the large model.")
@click.option(
    "--target-ap-drop", default=None, type=float, help="Calibrate: largest AP loss vs large-only (0.01 = 1 point)."
)
@click.option(
    "--target-agreement",
    default=None,
    type=float,
    help="Calibrate --unlabelled: mean OKS with the large model's keypoints to reach [default: 0.95].",
)
@click.option(
    "--holdout",
    default=0.5,
    show_default=True,
    type=float,
    help="Calibrate --unlabelled: share of the persons (whole frames) held out to check the policy on.",
)
@click.option("--policies", default=None, help="Calibrate: families to search [default: every one that applies].")
@click.option("--cost-batch", default=8, show_default=True, type=int, help="Calibrate: batch size whose costs decide.")
@click.option("--threads", type=int, default=None, help="CPU cores to use (pose models and the router's training).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def main(**kw: Any) -> None:
    """Train the DynPose router on the engine dir's small/large pair, or (--calibrate) choose its routing policy."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    setup_logging(bool(kw.get("quiet")))
    kw["threads"] = check_threads(kw["threads"])
    if kw["threads"] is not None:
        import torch

        torch.set_num_threads(kw["threads"])  # the router trains with PyTorch's intra-op threads
    for name in ("target_fraction", "target_ap_drop", "target_agreement", "holdout", "lr", "det_score", "min_agreement"):
        _finite("--" + name.replace("_", "-"), kw[name])
    if kw["calibrate"]:
        _calibrate(kw, console)
        return
    if kw["target_fraction"] is not None or kw["target_ap_drop"] is not None or kw["target_agreement"] is not None:
        raise DynPoseError("--target-fraction/--target-ap-drop/--target-agreement choose a policy: add --calibrate")
    if bool(kw["eval_ann"]) != bool(kw["eval_images"]):
        raise DynPoseError("--eval-ann and --eval-images go together")
    if kw["evaluate"]:
        if not kw["eval_ann"]:
            raise DynPoseError("--evaluate needs --eval-ann and --eval-images (held-out labelled persons)")
        _evaluate(kw, console)
        return
    rep = _train(kw, console)
    _print_report(rep, kw, console)
    if kw["eval_ann"] and not rep.exported:
        console.print("held-out report skipped: it scores the engine dir's router, and --no-export left it as it was")
    if kw["eval_ann"] and rep.exported:
        _evaluate(kw, console)


def _evaluate(kw: dict[str, Any], console: Any) -> None:
    from dynpose.router.evaluate import evaluate_router

    ev = evaluate_router(
        kw["engine_dir"], kw["eval_ann"], kw["eval_images"], _fractions(kw["eval_fractions"]), seed=kw["seed"],
        backend=kw["backend"], device=kw["device"], cache_dir=kw["cache_dir"], use_cache=not kw["no_cache"],
        progress=not kw["quiet"], detections=kw["eval_dets"],
    )  # fmt: skip
    for line in ev.lines():
        console.print(line)


def _families(kw: dict[str, Any]) -> dict[str, Any]:
    text = kw["policies"]
    return {"families": tuple(p.strip() for p in text.split(",") if p.strip())} if text is not None else {}


def _calibrate(kw: dict[str, Any], console: Any) -> None:
    from dynpose.router.calibrate import calibrate

    if kw["unlabelled"]:
        if kw["ann"] or kw["images"]:
            raise DynPoseError(
                "--calibrate: give labels (--ann and --images) or unlabelled footage (--unlabelled), not both"
            )
        _calibrate_label_free(kw, console)
        return
    if not kw["ann"] or not kw["images"]:
        raise DynPoseError(
            "--calibrate needs held-out labelled persons (--ann and --images) or your own unlabelled footage "
            "(--unlabelled SRC, checked against the large model)"
        )
    if kw["target_agreement"] is not None:
        raise DynPoseError(
            "--target-agreement is for label-free calibration (--unlabelled SRC); with --ann choose by "
            "--target-ap-drop D or --target-fraction F"
        )
    if len(kw["detections"]) > 1:
        raise DynPoseError("--calibrate takes one --detections file (the boxes of --images)")
    res = calibrate(
        kw["engine_dir"], kw["ann"], kw["images"],
        target_fraction=kw["target_fraction"], target_ap_drop=kw["target_ap_drop"],
        backend=kw["backend"], device=kw["device"], cache_dir=kw["cache_dir"], use_cache=not kw["no_cache"],
        threads=kw["threads"], progress=not kw["quiet"],
        detections=kw["detections"][0] if kw["detections"] else None, cost_batch=kw["cost_batch"], **_families(kw),
    )  # fmt: skip
    console.print(
        f"policy {res.policy} ({res.target}, on {res.boxes}): {res.fraction:.1%} of {res.num_crops} crops to the large model"
    )
    console.print(f"AP {res.ap:.4f} (small-only {res.ap_small:.4f}, large-only {res.ap_large:.4f})")
    if res.agreement is not None and res.agreement_above is not None:
        console.print(
            f"agreement with the large model {res.agreement:.3f} (mean OKS of the routed keypoints to its own; "
            f"{res.agreement_above:.0%} of persons at OKS >= 0.9)"
        )
    if res.cost_ms is not None and res.speedup is not None:
        console.print(
            f"cost {res.cost_ms:.2f} ms per crop by the measured costs (large-only {res.large_ms:.2f}): {res.speedup:.2f}x; "
            f"{res.candidates} policies evaluated"
        )
    for fam, w in res.per_family.items():
        agree = f", agreement {w['agreement']:.3f}" if w.get("agreement") is not None else ""
        console.print(
            f"  cheapest {fam:<15} {w['policy']}: {w['fraction']:.1%} large, AP {w['ap']:.4f}{agree}, "
            f"{w['cost_ms']:.2f} ms per crop ({w['speedup']:.2f}x)"
        )
    console.print(f"stored as the default route in {kw['engine_dir']}/manifest.json")


def _calibrate_label_free(kw: dict[str, Any], console: Any) -> None:
    from dynpose.router.footage import FootageOptions
    from dynpose.router.labelfree import DEFAULT_TARGET, LabelFreeOptions, calibrate_label_free, report_lines

    if kw["target_fraction"] is not None or kw["target_ap_drop"] is not None:
        raise DynPoseError(
            "--target-fraction/--target-ap-drop need labels (--ann); without them calibrate by --target-agreement A "
            "(mean OKS with the large model's keypoints)"
        )
    target = DEFAULT_TARGET if kw["target_agreement"] is None else kw["target_agreement"]
    run = FootageOptions(
        backend=kw["backend"], device=kw["device"], threads=kw["threads"], cache_dir=kw["cache_dir"],
        use_cache=not kw["no_cache"], progress=not kw["quiet"],
    )  # fmt: skip
    opts = LabelFreeOptions(
        target=target, holdout=kw["holdout"], seed=kw["seed"], cost_batch=kw["cost_batch"], run=run, **_families(kw)
    )
    res = calibrate_label_free(kw["engine_dir"], _unlabelled_spec(kw), opts)
    for line in report_lines(res):
        console.print(line)
    console.print(f"stored as the default route in {kw['engine_dir']}/manifest.json")


def _job(kw: dict[str, Any], flip: bool) -> Any:
    from dynpose.router.train import TrainConfig, TrainJob

    device = kw["train_device"]
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TrainConfig(epochs=kw["epochs"], batch=kw["batch"], lr=kw["lr"], seed=kw["seed"], flip=flip, device=device)
    return TrainJob(
        out=kw["out"], init=kw["init"], config=cfg, router_input=kw["router_input"], backend=kw["backend"],
        device=kw["device"], precision=kw["precision"], cache_dir=kw["cache_dir"], use_cache=not kw["no_cache"],
        export=not kw["no_export"], trust_pickle=kw["trust_checkpoint"], min_agreement=kw["min_agreement"],
        progress=not kw["quiet"], threads=kw["threads"],
        reads={"--eval-ann": kw["eval_ann"], "--eval-dets": kw["eval_dets"]},
    )  # fmt: skip


def _unlabelled_spec(kw: dict[str, Any]) -> Any:
    from dynpose.router.augment import AugmentConfig
    from dynpose.router.unlabelled import UnlabelledSpec

    aug = AugmentConfig(copies=kw["copies"], flip=0.0 if kw["no_flip"] else 0.5, seed=kw["seed"])
    return UnlabelledSpec(
        sources=tuple(Path(s) for s in kw["unlabelled"]), detections=tuple(Path(d) for d in kw["detections"]),
        detector=Path(kw["detector_file"]) if kw["detector_file"] else None, det_score=kw["det_score"],
        max_frames=kw["max_frames"], frame_step=kw["frame_step"], augment=aug,
    )  # fmt: skip


def _int8_calib(spec: Any) -> Any:
    """Calibration crops for an INT8 router trained without labels: each detections file with the source folders
    holding its images."""
    from dynpose.data import image_id_map, load_detections
    from dynpose.export.calibration.crops import CalibSpec, Source

    sources = []
    for d in spec.detections:
        ids = set(load_detections(d))
        sources += [Source("dets", d, f) for f in spec.sources if f.is_dir() and ids & set(image_id_map(f))]
    if not sources:
        raise DynPoseError("--precision int8 with --unlabelled needs a --detections file for one of the image folders")
    return CalibSpec(sources=sources)


def _train(kw: dict[str, Any], console: Any) -> Any:
    from dynpose.router.train import train_from_engine_dir, train_unlabelled

    unlabelled = bool(kw["unlabelled"])
    if unlabelled == bool(kw["ann"] or kw["images"]):
        raise DynPoseError("train either from labels (--ann and --images) or without them (--unlabelled SRC), not both")
    if not unlabelled and not (kw["ann"] and kw["images"]):
        raise DynPoseError("labelled training needs --ann and --images")
    if not unlabelled and (kw["detections"] or kw["detector_file"]):
        raise DynPoseError("--detections/--detector give boxes for --unlabelled sources (or --calibrate); labels have boxes")
    # label-free variants carry their own mirrors (with their own targets); the labelled loop adds mirrors itself
    job = _job(kw, flip=not kw["no_flip"] and not unlabelled)
    if unlabelled:
        spec = _unlabelled_spec(kw)
        spec.validate()
        if kw["precision"] == "int8":
            job.calib = _int8_calib(spec)
        return train_unlabelled(kw["engine_dir"], spec, job)
    return train_from_engine_dir(kw["engine_dir"], kw["ann"], kw["images"], job)


def _print_report(rep: Any, kw: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    console.print(f"start: {rep.start}")
    console.print(f"targets: {rep.targets_summary}" + (f" ({rep.persons} persons)" if kw["unlabelled"] else ""))
    table = Table(title="router training loss (mean per epoch)")
    for col in ("epoch", "total", "score[0]", "score[1]", "score[2]"):
        table.add_column(col, justify="right")
    for i, (tot, terms) in enumerate(zip(rep.result.epoch_loss, rep.result.epoch_terms, strict=True), start=1):
        table.add_row(str(i), f"{tot:.4f}", *(f"{t:.4f}" for t in terms))
    console.print(table)
    console.print(f"checkpoint {rep.checkpoint}  loss curve {rep.loss_png}")
    for note in rep.notes:
        console.print(note)
    if rep.exported:
        console.print(rep.route_note)
        console.print(
            f"exported into {kw['engine_dir']}: {', '.join(rep.exported)}; choose the policy for it with "
            f"`dynpose-train-router --calibrate --engine-dir {kw['engine_dir']} --ann VAL.json --images DIR "
            "--target-ap-drop D`"
        )


if __name__ == "__main__":
    main()
