"""The router's training loop on cached arrays, the loss curve, and the checkpoint in the DynPose release format.

Input: the router crops as uint8 (N,H,W,3) in the router card's colour order and size, and the targets from
`targets.make_targets`. Each epoch sees every crop and its horizontal mirror (the router's input is flipped, the
targets are not: a mirrored person is as hard for both pose models), shuffled, in batches; Adam; the loss is
`targets.router_loss`. Normalisation (card mean/std) is done per batch so the crops stay uint8 in memory (a quarter
of fp32).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.fileio import atomic_path
from dynpose.models.card import ModelCard
from dynpose.roles import Role
from dynpose.router.targets import LOSS_WEIGHTS, Targets, router_loss

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


def _check_inputs(crops: np.ndarray | LazyRouterCrops, targets: np.ndarray, card: ModelCard) -> np.ndarray | LazyRouterCrops:
    if not hasattr(crops, "shape"):  # LazyRouterCrops and arrays pass as they are (the former cut per batch)
        crops = np.asarray(crops)
    if len(crops.shape) != 4 or crops.shape[-1] != 3:
        raise DynPoseError(f"router crops must be (N,H,W,3), got {crops.shape}")
    if (crops.shape[1], crops.shape[2]) != (card.input_height, card.input_width):
        raise DynPoseError(
            f"router crops are {crops.shape[2]}x{crops.shape[1]}, the router card wants {card.input_width}x"
            f"{card.input_height}"
        )
    if len(targets) != len(crops) or len(crops) == 0:
        raise DynPoseError(f"router training: {len(crops)} crops but {len(targets)} targets; need the same, > 0")
    return crops


def _epoch_plan(n: int, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(crop index, flipped?) of every sample of an epoch (each crop, plus its mirror with `cfg.flip`) and the
    batch bounds over them."""
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
    return idx_all, flip_all, bounds


@dataclass
class _Loop:
    """What one training run holds between batches."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    crops: np.ndarray | LazyRouterCrops
    targets: torch.Tensor
    mean: torch.Tensor
    inv_std: torch.Tensor
    cfg: TrainConfig

    def step(self, idx: np.ndarray, flipped: np.ndarray, epoch: int) -> tuple[float, np.ndarray]:
        import torch

        x = _batch_tensor(self.crops, idx, flipped, self.mean, self.inv_std, self.cfg.device)
        scores = self.model(x)
        if scores.ndim != 2 or scores.shape[1] < 3:
            raise DynPoseError(f"router output must be (B,3) scores, got {tuple(scores.shape)}")
        loss, parts = router_loss(scores, self.targets[idx], self.cfg.loss_weights)
        if not torch.isfinite(loss):
            raise DynPoseError(f"router training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item(), np.array([p_.item() for p_ in parts])


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
    crops = _check_inputs(crops, targets, card)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(cfg.device).train()
    loop = _Loop(
        model,
        torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
        crops,
        torch.from_numpy(np.asarray(targets, dtype=np.float32)).to(cfg.device),
        torch.tensor(card.mean, dtype=torch.float32, device=cfg.device),
        1.0 / torch.tensor(card.std, dtype=torch.float32, device=cfg.device),
        cfg,
    )
    idx_all, flip_all, bounds = _epoch_plan(len(crops), cfg)
    m = len(idx_all)
    result = TrainResult(samples_per_epoch=m)
    bar = _progress(cfg.epochs * len(bounds), progress)
    try:
        for epoch in range(cfg.epochs):
            order = rng.permutation(m)
            tot, terms = 0.0, np.zeros(3)
            for a, b in bounds:
                sel = order[a:b]
                loss, parts = loop.step(idx_all[sel], flip_all[sel], epoch)
                tot += loss * len(sel)
                terms += parts * len(sel)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}")
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
    """What a training run did, for the CLI to print."""

    result: TrainResult
    checkpoint: Path
    loss_png: Path
    num_crops: int
    targets_summary: str
    exported: list[str] = field(default_factory=list)  # entry files written into the engine dir
    start: str = "random init"  # where the weights came from: "random init" or "<path> (<checkpoint format>)"
    route_note: str = ""  # the engine dir's default route after the export, and why (`default_route`)
    notes: list[str] = field(default_factory=list)  # e.g. the INT8 router's decision agreement, or why fp32 stayed
    persons: int = 0  # distinct persons behind the crops (label-free: crops = persons x copies)


@dataclass
class TrainJob:
    """What a training run writes and where it runs: shared by the labelled and the label-free path."""

    out: str | os.PathLike = "router.pth"
    init: str | os.PathLike | None = None
    config: TrainConfig = field(default_factory=TrainConfig)
    router_input: str = "full"  # "pooled": the router fed its 128x96 pooled crop (`variant`)
    backend: str = "ort"
    device: str = "cpu"
    precision: str = "fp32"
    cache_dir: str | os.PathLike | None = None
    use_cache: bool = True
    loss_png: str | os.PathLike | None = None
    export: bool = True
    trust_pickle: bool = False
    min_agreement: float = 0.95  # INT8 router: decision agreement with fp32 it must keep, else fp32 is exported
    calib: Any = None  # CalibSpec for an INT8 router
    progress: bool = True
    threads: int | None = None  # CPU cores for the pose models (EngineSet.load)
    reads: dict[str, Any] = field(default_factory=dict)  # more files the caller reads (flag -> path): outputs avoid them

    def validate(self) -> None:
        self.config.validate()
        if self.precision not in ("fp32", "fp16", "int8"):
            raise DynPoseError(f"--precision must be fp32, fp16 or int8, got {self.precision!r}")
        if self.init is not None and not Path(self.init).is_file():
            raise DynPoseError(f"--init {self.init}: file not found; pass a router checkpoint (e.g. DynPose's backbone.pth)")
        if self.precision == "int8" and self.export and self.calib is None:
            raise DynPoseError("an INT8 router needs calibration crops: labelled --ann/--images, or --detections for images")


def seeded_router(job: TrainJob) -> torch.nn.Module:
    """The router to train, its initial weights drawn from `job.config.seed` (so a run from random init
    reproduces) unless `job.init` gives them; the global RNG is left as it was."""
    import torch

    from dynpose.router.variant import make_router

    with torch.random.fork_rng():
        torch.manual_seed(job.config.seed)
        return make_router(job.router_input, job.init, job.trust_pickle)


def _start_note(model: torch.nn.Module, init: str | os.PathLike | None) -> str:
    loaded = getattr(model, "checkpoint", None)
    return "random init" if loaded is None else f"{init} ({loaded.format} format, sha256 {loaded.sha256[:12]})"


def _export(
    engine_dir: str | os.PathLike, model: torch.nn.Module, checkpoint: Path, job: TrainJob, gate_x: np.ndarray | None
) -> tuple[list[str], str, list[str]]:
    """Export the trained router (at `job.precision`; an INT8 router that changes fp32's routing decisions on
    more than 1 - `min_agreement` of the `gate_x` crops is replaced by fp32). -> (files, route note, notes)."""
    from dynpose.router.variant import export_router, int8_agreement

    fmt = "tensorrt" if job.backend == "tensorrt" else "onnx"
    try:
        entries, route_note = export_router(
            model, engine_dir, checkpoint, precision=job.precision, calib=job.calib, fmt=fmt, progress=job.progress
        )
        notes: list[str] = []
        if job.precision == "int8" and gate_x is not None and len(gate_x):
            int8 = next(e for e in entries if e.format == "onnx")
            with tempfile.TemporaryDirectory(prefix="dynpose-gate-") as tmp:
                fp32 = _fp32_onnx(model, Path(tmp) / "router.fp32.onnx")
                a = int8_agreement(fp32, Path(engine_dir) / int8.file, gate_x)
            notes.append(
                f"INT8 router: same routing as fp32 for {a['agreement']:.1%} of {len(gate_x)} crops (worst of 10-50% large)"
            )
            if a["agreement"] < job.min_agreement:
                notes.append(f"below --min-agreement {job.min_agreement:.0%}: exported fp32 instead")
                entries, route_note = export_router(
                    model, engine_dir, checkpoint, precision="fp32", fmt=fmt, progress=job.progress
                )
    except DynPoseError as e:
        # the training is not lost: say where the checkpoint is and how to export it later
        raise DynPoseError(
            f"trained router saved to {checkpoint}, but its export failed: {e} (export it with "
            f"`dynpose-export --model router --checkpoint {checkpoint} --engine-dir {engine_dir}`)"
        ) from None
    return [e.file for e in entries], route_note, notes


def _fp32_onnx(model: torch.nn.Module, path: Path) -> Path:
    from dynpose.export.onnx_export import export_torch

    return export_torch(model, path, model.card)  # type: ignore[arg-type]


def check_outputs(job: TrainJob, engine_dir: str | os.PathLike, inputs: dict[str, Any]) -> None:
    """The checkpoint and its loss curve may not replace a file the run reads (`inputs`: flag -> path(s)) nor go
    into the engine dir (`dynpose.fileio.OutputGuard`); checked before any work."""
    from dynpose.fileio import OutputGuard

    guard = OutputGuard.of({**inputs, "--init": job.init}, {"--engine-dir": engine_dir})
    guard.check_file(job.out, "--out")
    guard.check_file(loss_png_path(job), "--out (its loss curve)")


def loss_png_path(job: TrainJob) -> Path:
    return Path(job.loss_png) if job.loss_png is not None else Path(job.out).with_suffix(".loss.png")


def fit_and_export(
    engine_dir: str | os.PathLike,
    model: torch.nn.Module,
    images: np.ndarray | LazyRouterCrops,
    targets: Targets,
    job: TrainJob,
    title: str,
) -> TrainReport:
    """Train on the crops and targets, save the checkpoint and the loss curve, export into the engine dir."""
    import torch

    with torch.random.fork_rng():
        result = train_router(model, images, targets.as_array(), model.card, job.config, progress=job.progress)  # type: ignore[arg-type]
    checkpoint = save_checkpoint(model, job.out)
    png = loss_png_path(job)
    plot_loss_curve(result, png, title=title)
    rep = TrainReport(result, checkpoint, png, len(targets), targets.summary(), start=_start_note(model, job.init))
    if job.export:
        gate = None
        if isinstance(images, np.ndarray):
            from dynpose.runtime.preprocess import normalize

            gate = normalize(images[:: max(1, len(images) // 256)], model.card)  # type: ignore[arg-type]
        rep.exported, rep.route_note, rep.notes = _export(engine_dir, model, checkpoint, job, gate)
    return rep


def train_from_engine_dir(
    engine_dir: str | os.PathLike,
    ann_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    job: TrainJob | None = None,
    **options: Any,
) -> TrainReport:
    """The labelled `dynpose-train-router` run: pose outputs on the ground-truth persons (cached) -> targets vs the
    ground truth -> train -> checkpoint + loss curve -> export into the engine dir as the router entry.
    `options`: `TrainJob` fields, for a call without a job (e.g. `out=..., config=...`)."""
    from dynpose.router.collect import collect_outputs, router_crops
    from dynpose.router.targets import make_targets

    job = job or TrainJob(**options)
    if job.precision == "int8" and job.calib is None:
        from dynpose.export.calibration.crops import CalibSpec, Source

        job.calib = CalibSpec(sources=[Source("coco", Path(ann_path), Path(images_dir))])
    job.validate()
    check_outputs(job, engine_dir, {"--ann": ann_path, **job.reads})
    outputs, crops = collect_outputs(
        engine_dir, ann_path, images_dir, backend=job.backend, device=job.device, cache_dir=job.cache_dir,
        use_cache=job.use_cache, progress=job.progress,
    )  # fmt: skip
    targets = make_targets(outputs.err_small, outputs.err_large, outputs.oks_small, outputs.oks_large)
    model = seeded_router(job)
    images = router_crops(crops, model.card)  # type: ignore[arg-type]
    title = f"router training ({len(crops)} crops x{2 if job.config.flip else 1})"
    rep = fit_and_export(engine_dir, model, images, targets, job, title)
    rep.persons = len(crops)
    return rep


def train_unlabelled(engine_dir: str | os.PathLike, spec: Any, job: TrainJob) -> TrainReport:
    """The label-free run (`--unlabelled`): persons of the sources, augmented, judged by the large model as the
    teacher (`unlabelled.teacher_set`, cached) -> `targets.teacher_targets` -> train -> checkpoint -> export.
    Mirrored crops are variants with their own targets, so the loop adds no mirrors of its own."""
    from dynpose.router.targets import teacher_targets
    from dynpose.router.unlabelled import teacher_set

    job.validate()
    reads = {"--unlabelled": spec.sources, "--detections": spec.detections, "--detector": spec.detector}
    check_outputs(job, engine_dir, {**reads, **job.reads})
    model = seeded_router(job)
    ts = teacher_set(
        engine_dir, spec, model.card, backend=job.backend, device=job.device, cache_dir=job.cache_dir,  # type: ignore[arg-type]
        use_cache=job.use_cache, progress=job.progress, threads=job.threads,
    )  # fmt: skip
    from dynpose.engines.manifest import Manifest
    from dynpose.keypoints import get_keypoint_set

    kset = get_keypoint_set(Manifest.load(engine_dir, verify=False).require(Role.LARGE).card.keypoints)
    targets, _ = teacher_targets(ts.kpts_small, ts.kpts_large, ts.boxes, ts.crop_wh, kset.sigmas)
    title = f"label-free router training ({ts.num_persons} persons x {spec.augment.copies} variants)"
    rep = fit_and_export(engine_dir, model, ts.crops, targets, job, title)
    rep.persons = ts.num_persons
    return rep
