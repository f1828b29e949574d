"""`dynpose-train-router`: train the DynPose router on an engine dir's pose pair, or calibrate its routing policy."""

from __future__ import annotations

import math
import warnings

import click

from dynpose.cli.common import user_errors
from dynpose.errors import DynPoseError

EXAMPLES = """
\b
Examples:
  # train on COCO-format annotations, export the router into the engine dir
  dynpose-train-router --engine-dir engines --ann person_keypoints_train2017.json --images train2017 --epochs 20
  # start from the DynPose release router
  dynpose-train-router --engine-dir engines --ann A.json --images DIR --init backbone.pth
  # choose the policy: 30% of crops to the large model, or the fewest large crops within 1 AP point
  dynpose-train-router --calibrate --engine-dir engines --ann val.json --images val2017 --target-fraction 0.3
  dynpose-train-router --calibrate --engine-dir engines --ann val.json --images val2017 --target-ap-drop 0.01
"""


def _finite(name: str, v: float | None) -> None:
    if v is not None and not math.isfinite(v):
        raise DynPoseError(f"{name} must be a finite number, got {v}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXAMPLES)
@click.option("--engine-dir", required=True, type=click.Path(file_okay=False), help="Engine dir with small + large.")
@click.option("--ann", required=True, type=click.Path(dir_okay=False), help="COCO-format keypoint annotations.")
@click.option("--images", required=True, type=click.Path(file_okay=False), help="Folder with the annotated images.")
@click.option("--epochs", default=20, show_default=True, type=int)
@click.option("--batch", default=16, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--out",
    default="router.pth",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Checkpoint (DynPose release format, `backbone.` keys); the loss curve goes beside it.",
)
@click.option(
    "--init",
    "init",
    default=None,
    type=click.Path(dir_okay=False),
    help="Router checkpoint to start from (e.g. DynPose's backbone.pth).",
)
@click.option("--trust-checkpoint", is_flag=True, help="Allow an --init checkpoint that needs pickle (trusted only).")
@click.option("--no-flip", is_flag=True, help="Do not add mirrored crops.")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "tensorrt", "torch"]))
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where the pose models (and, for --calibrate, the router) run: cpu | cuda (| trt with ort).",
)
@click.option(
    "--train-device",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="Where the router trains (PyTorch); auto = cuda when PyTorch sees a GPU.",
)
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    type=click.Choice(["fp32", "fp16", "int8"]),
    help="Precision of the exported router.",
)
@click.option("--no-export", is_flag=True, help="Only write the checkpoint; leave the engine dir as it is.")
@click.option(
    "--cache-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where the per-crop model outputs are cached [default: ENGINE_DIR/cache].",
)
@click.option("--no-cache", is_flag=True, help="Re-run the pose models; neither read nor write the cache.")
@click.option("--calibrate", is_flag=True, help="Choose the routing policy instead of training.")
@click.option("--target-fraction", default=None, type=float, help="Calibrate: share of crops for the large model.")
@click.option(
    "--target-ap-drop", default=None, type=float, help="Calibrate: largest AP loss against large-only (0.01 = one AP point)."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def main(
    engine_dir: str,
    ann: str,
    images: str,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    out: str,
    init: str | None,
    trust_checkpoint: bool,
    no_flip: bool,
    backend: str,
    device: str,
    train_device: str,
    precision: str,
    no_export: bool,
    cache_dir: str | None,
    no_cache: bool,
    calibrate: bool,
    target_fraction: float | None,
    target_ap_drop: float | None,
    quiet: bool,
) -> None:
    """Train the DynPose router on the engine dir's small/large pair, or (--calibrate) choose its routing policy."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    _finite("--target-fraction", target_fraction)
    _finite("--target-ap-drop", target_ap_drop)
    _finite("--lr", lr)
    if calibrate:
        from dynpose.router.calibrate import calibrate as run_calibration

        res = run_calibration(
            engine_dir,
            ann,
            images,
            target_fraction=target_fraction,
            target_ap_drop=target_ap_drop,
            backend=backend,
            device=device,
            cache_dir=cache_dir,
            progress=not quiet,
        )
        console.print(f"policy {res.policy} ({res.target}): {res.fraction:.1%} of {res.num_crops} crops to the large model")
        console.print(
            f"AP {res.ap:.4f} (small-only {res.ap_small:.4f}, large-only {res.ap_large:.4f}); "
            f"stored as the default route in {engine_dir}/manifest.json"
        )
        return
    if target_fraction is not None or target_ap_drop is not None:
        raise DynPoseError("--target-fraction/--target-ap-drop choose a policy: add --calibrate")

    from rich.table import Table

    from dynpose.router.train import TrainConfig, train_from_engine_dir

    if train_device == "auto":
        import torch

        train_device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TrainConfig(epochs=epochs, batch=batch, lr=lr, seed=seed, flip=not no_flip, device=train_device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = train_from_engine_dir(
            engine_dir,
            ann,
            images,
            out=out,
            init=init,
            config=cfg,
            backend=backend,
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            use_cache=not no_cache,
            export=not no_export,
            trust_pickle=trust_checkpoint,
            progress=not quiet,
        )
    for w in caught:
        if str(w.message).startswith("router targets"):
            console.print(f"[yellow]warning:[/] {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    console.print(f"start: {rep.start}")
    console.print(f"targets: {rep.targets_summary}")
    table = Table(title="router training loss (mean per epoch)")
    for col in ("epoch", "total", "score[0]", "score[1]", "score[2]"):
        table.add_column(col, justify="right")
    for i, (tot, terms) in enumerate(zip(rep.result.epoch_loss, rep.result.epoch_terms, strict=True), start=1):
        table.add_row(str(i), f"{tot:.4f}", *(f"{t:.4f}" for t in terms))
    console.print(table)
    console.print(f"checkpoint {rep.checkpoint}  loss curve {rep.loss_png}")
    if rep.exported:
        console.print(rep.route_note)
        console.print(
            f"exported into {engine_dir}: {', '.join(rep.exported)}; choose the policy for it with "
            f"`dynpose-train-router --calibrate --engine-dir {engine_dir} --ann VAL.json --images DIR "
            "--target-fraction F`"
        )


if __name__ == "__main__":
    main()
