"""The router's training loop on cached arrays, the loss curve, and the checkpoint in the DynPose release format.

Input: the router crops as uint8 (N,H,W,3) in the router card's colour order and size, and the targets from
`targets.make_targets`. Each epoch sees every crop and its horizontal mirror (the router's input is flipped, the
targets are not: a mirrored person is as hard for both pose models), shuffled, in batches; Adam; the loss is
`targets.router_loss`. Normalisation (card mean/std) is done per batch so the crops stay uint8 in memory (a quarter
of fp32).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.fileio import atomic_path
from dynpose.models.card import ModelCard
from dynpose.router.targets import LOSS_WEIGHTS, router_loss

if TYPE_CHECKING:
    import torch

    from dynpose.router.collect import LazyRouterCrops

RELEASE_PREFIX = "backbone."  # the DynPose router release (backbone.pth) prefixes every tensor


@dataclass
class TrainConfig:
    epochs: int = 20
    batch: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    flip: bool = True
    seed: int = 0
    loss_weights: tuple[float, float, float] = LOSS_WEIGHTS
    device: str = "cpu"

    def validate(self) -> None:
        if self.epochs < 1:
            raise DynPoseError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch < 1:
            raise DynPoseError(f"--batch must be >= 1, got {self.batch}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise DynPoseError(f"--lr must be a positive number, got {self.lr}")


@dataclass
class TrainResult:
    """Per-epoch mean losses (total and the three terms), in training order."""

    epoch_loss: list[float] = field(default_factory=list)
    epoch_terms: list[tuple[float, float, float]] = field(default_factory=list)
    samples_per_epoch: int = 0


def _batch_tensor(
    crops: np.ndarray | LazyRouterCrops,
    idx: np.ndarray,
    flipped: np.ndarray,
    mean: torch.Tensor,
    inv_std: torch.Tensor,
    device: str,
) -> torch.Tensor:
    import torch

    x = crops[idx].astype(np.float32)  # (B,H,W,3)
    if flipped.any():
        x[flipped] = x[flipped][:, :, ::-1]
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    t = (t - mean) * inv_std
    return t.permute(0, 3, 1, 2).contiguous()


def train_router(
    model: torch.nn.Module,
    crops: np.ndarray | LazyRouterCrops,
    targets: np.ndarray,
    card: ModelCard,
    config: TrainConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `model` in place on (N,H,W,3) uint8 crops (an array or `LazyRouterCrops`) and (N,5) targets
    (`Targets.as_array()`).

    The loss reported per epoch is the mean of the batch losses weighted by batch size, in training mode (the
    figure the loss curve shows)."""
    import torch

    cfg = config or TrainConfig()
    cfg.validate()
    if not hasattr(crops, "shape"):  # LazyRouterCrops and arrays pass as they are (the former cut per batch)
        crops = np.asarray(crops)
    if len(crops.shape) != 4 or crops.shape[-1] != 3:
        raise DynPoseError(f"router crops must be (N,H,W,3), got {crops.shape}")
    if (crops.shape[1], crops.shape[2]) != (card.input_height, card.input_width):
        raise DynPoseError(
            f"router crops are {crops.shape[2]}x{crops.shape[1]}, the router card wants {card.input_width}x"
            f"{card.input_height}"
        )
    tg = torch.from_numpy(np.asarray(targets, dtype=np.float32))
    if len(tg) != len(crops) or len(crops) == 0:
        raise DynPoseError(f"router training: {len(crops)} crops but {len(tg)} targets; need the same, > 0")

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(cfg.device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    mean = torch.tensor(card.mean, dtype=torch.float32, device=cfg.device)
    inv_std = 1.0 / torch.tensor(card.std, dtype=torch.float32, device=cfg.device)
    tg = tg.to(cfg.device)

    n = len(crops)
    idx_all = np.arange(n)
    flip_all = np.zeros(n, dtype=bool)
    if cfg.flip:
        idx_all = np.concatenate([idx_all, idx_all])
        flip_all = np.concatenate([flip_all, np.ones(n, dtype=bool)])
    m = len(idx_all)
    # A last batch of one would put BatchNorm on a single sample (its variance is undefined): fold it in.
    starts = list(range(0, m, cfg.batch))
    if len(starts) > 1 and m - starts[-1] == 1:
        starts.pop()
    bounds = [(s, starts[i + 1] if i + 1 < len(starts) else m) for i, s in enumerate(starts)]

    result = TrainResult(samples_per_epoch=m)
    bar = _progress(cfg.epochs * len(bounds), progress)
    try:
        for epoch in range(cfg.epochs):
            order = rng.permutation(m)
            tot, terms = 0.0, np.zeros(3)
            for a, b in bounds:
                sel = order[a:b]
                x = _batch_tensor(crops, idx_all[sel], flip_all[sel], mean, inv_std, cfg.device)
                scores = model(x)
                if scores.ndim != 2 or scores.shape[1] < 3:
                    raise DynPoseError(f"router output must be (B,3) scores, got {tuple(scores.shape)}")
                loss, parts = router_loss(scores, tg[idx_all[sel]], cfg.loss_weights)
                if not torch.isfinite(loss):
                    raise DynPoseError(f"router training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.item() * len(sel)
                terms += np.array([p.item() for p in parts]) * len(sel)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
            result.epoch_loss.append(tot / m)
            result.epoch_terms.append(tuple(float(v) for v in terms / m))  # type: ignore[arg-type]
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return result


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train router", unit="batch", leave=False)


def plot_loss_curve(result: TrainResult, path: str | os.PathLike, title: str = "router training") -> Path:
    """Total and per-term loss per epoch as a PNG (matplotlib Agg, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(result.epoch_loss) + 1)
    terms = np.asarray(result.epoch_terms).reshape(-1, 3)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        ax.plot(epochs, result.epoch_loss, "k-o", label="total", markersize=3)
        for i, name in enumerate(("score[0] cost share", "score[1] error reduction", "score[2] difficulty")):
            ax.plot(epochs, terms[:, i], "--", label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def release_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with DynPose's `backbone.` prefix (the release `backbone.pth` layout)."""
    return {RELEASE_PREFIX + k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """torch.save the release-format state_dict atomically (plain tensors only: loads with weights_only=True)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(release_state_dict(model), tmp)
    return Path(path)


def loss_fell(result: TrainResult) -> bool:
    return len(result.epoch_loss) >= 2 and result.epoch_loss[-1] < result.epoch_loss[0]


def format_losses(values: Sequence[float]) -> str:
    return " ".join(f"{v:.4f}" for v in values)


@dataclass
class TrainReport:
    """What `train_from_engine_dir` did, for the CLI to print."""

    result: TrainResult
    checkpoint: Path
    loss_png: Path
    num_crops: int
    targets_summary: str
    exported: list[str] = field(default_factory=list)  # entry files written into the engine dir
    start: str = "random init"  # where the weights came from: "random init" or "<path> (<checkpoint format>)"
    route_note: str = ""  # the engine dir's default route after the export, and why (`default_route`)


def train_from_engine_dir(
    engine_dir: str | os.PathLike,
    ann_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    *,
    out: str | os.PathLike = "router.pth",
    init: str | os.PathLike | None = None,
    config: TrainConfig | None = None,
    backend: str = "ort",
    device: str = "cpu",
    precision: str = "fp32",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    loss_png: str | os.PathLike | None = None,
    export: bool = True,
    trust_pickle: bool = False,
    progress: bool = True,
) -> TrainReport:
    """The whole `dynpose-train-router` run: pose outputs (cached) -> targets -> train -> checkpoint + loss curve
    -> export into the engine dir as the router entry (ONNX at `precision`, via `dynpose.export.api`)."""
    import torch

    from dynpose.models.zoo import create_model
    from dynpose.router.collect import collect_outputs, router_crops
    from dynpose.router.targets import make_targets

    cfg = config or TrainConfig()
    cfg.validate()
    if precision not in ("fp32", "fp16", "int8"):
        raise DynPoseError(f"--precision must be fp32, fp16 or int8, got {precision!r}")
    if init is not None and not Path(init).is_file():
        raise DynPoseError(f"--init {init}: file not found; pass a router checkpoint (e.g. DynPose's backbone.pth)")
    outputs, crops = collect_outputs(
        engine_dir,
        ann_path,
        images_dir,
        backend=backend,
        device=device,
        cache_dir=cache_dir,
        use_cache=use_cache,
        progress=progress,
    )
    targets = make_targets(outputs.err_small, outputs.err_large, outputs.oks_small, outputs.oks_large)
    # start from the given checkpoint, else PyTorch's default initialisation (training replaces it)
    model = create_model("router", weights=None if init is None else str(init), trust_pickle=trust_pickle)
    loaded = getattr(model, "checkpoint", None)
    start = "random init" if loaded is None else f"{init} ({loaded.format} format, sha256 {loaded.sha256[:12]})"
    images = router_crops(crops, model.card)
    with torch.random.fork_rng():
        result = train_router(model, images, targets.as_array(), model.card, cfg, progress=progress)
    checkpoint = save_checkpoint(model, out)
    png = Path(loss_png) if loss_png is not None else Path(out).with_suffix(".loss.png")
    plot_loss_curve(result, png, title=f"router training ({len(crops)} crops x{2 if cfg.flip else 1})")
    exported: list[str] = []
    if export:
        from dynpose.export.api import export_model

        calib = None
        if precision == "int8":
            from dynpose.calibration.crops import CalibSpec, Source

            calib = CalibSpec(sources=[Source("coco", Path(ann_path), Path(images_dir))])
        fmt = "tensorrt" if backend == "tensorrt" else "onnx"
        # min_oks=0: the fp16/int8 routing-decision figures vs fp32 are printed and stored in the entry, but do not
        # fail the run (the checkpoint exists; `dynpose-export --min-oks` enforces them). router_weights="trained":
        # route fraction:0.5 until --calibrate, unless a calibrated route is already there (`default_route`).
        with warnings.catch_warnings():
            # export_model builds a randomly initialised router before loading our checkpoint into it; its
            # "random weights" warning would be wrong here
            warnings.filterwarnings("ignore", message=".*random weights.*")
            try:
                entries = export_model(
                    "router",
                    engine_dir,
                    role="router",
                    weights=str(checkpoint),
                    precision=precision,
                    calib=calib,
                    min_oks=0.0,
                    fmt=fmt,
                    progress=progress,
                    router_weights="trained",
                )
            except DynPoseError as e:
                # the training is not lost: say where the checkpoint is and how to export it later
                raise DynPoseError(
                    f"trained router saved to {checkpoint}, but its export failed: {e} (export it with "
                    f"`dynpose-export --model router --checkpoint {checkpoint} --engine-dir "
                    f"{engine_dir}`)"
                ) from None
        exported = [e.file for e in entries]
        from dynpose.engines.manifest import Manifest
        from dynpose.export.api import default_route

        # the route the export just set (same rule, same manifest), for the CLI to print
        route_note = default_route(Manifest.load(engine_dir, verify=False), "trained")[1]
    else:
        route_note = ""
    return TrainReport(result, checkpoint, png, len(crops), targets.summary(), exported, start, route_note)
