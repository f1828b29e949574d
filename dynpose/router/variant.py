"""Router variants and their export into an engine dir.

`full` is the DynPose router as released: it takes the pose models' normalised 256x192 crop, averages the three
channels and halves the resolution with a 2x2 average pool before its first convolution. `pooled` feeds it that
resolution directly: a 128x96 crop (half the width and height, same aspect ratio, padding, colour order and
normalisation), channel mean, no pool. Every tensor is the same (the pool has no weights), so the release
checkpoint and `router.pth` files load into either; what changes is the card (input 96x128) and the ONNX graph.
What it saves: the 256x192 crop and normalisation for the router and the pool (the convolutions cost the same), and
its crop is then exactly the small model's crop when the small model is 96x128 with the same normalisation (the
TinyPose pair), so the two share it (the planner keeps the router's crop for whichever pose model crops the same way:
`runtime.plan.Plan.crop`). A 128x96 warp is not bit-identical to the 2x2 mean of a 256x192 warp, so a router meant for
`pooled` is trained on pooled crops (`--router-input pooled`), which the label-free training does.

The pooled variant is not in the model zoo (`export_model` builds zoo models), so it is exported from this module
with `export_torch` and registered with the export API's `register_onnx` (ONNX checks, fp16/INT8 + their checks,
optional TensorRT plan, manifest entry), then the manifest's route is set as for a freshly trained router and any
stale router entry of another format (a `router.pt` of the full router) is dropped.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynpose.engines.lock import engine_dir_lock
from dynpose.engines.manifest import Entry, Manifest, updating_manifest
from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.models.router import DynPoseRouter
from dynpose.roles import Role

ROUTER_INPUTS = ("full", "pooled")
POOLED_NAME = "router_pooled"


class PooledRouter(DynPoseRouter):
    """The DynPose router fed at its pooled resolution: N x 3 x 128 x 96 -> N x 3 scores. The release's average
    pool becomes the identity (it holds no weights, so every checkpoint still loads)."""

    def __init__(self) -> None:
        super().__init__()
        self.avg_pool = torch.nn.Identity()  # type: ignore[assignment]


def pooled_card(card: ModelCard) -> ModelCard:
    """The full router's card at half the width and height (what its average pool made of the crop)."""
    if card.input_width % 8 or card.input_height % 8:
        raise DynPoseError(
            f"router card {card.name!r}: {card.input_width}x{card.input_height} cannot be halved to a multiple of 4"
        )
    return card.with_(name=POOLED_NAME, input_width=card.input_width // 2, input_height=card.input_height // 2, sources={})


def make_router(kind: str = "full", init: str | os.PathLike | None = None, trust_pickle: bool = False) -> torch.nn.Module:
    """A router of the variant `kind` (with `.card`, and `.checkpoint` when `init` was loaded), weights from `init`
    (a release-format or dynpose checkpoint) or PyTorch's default initialisation."""
    from dynpose.models.zoo import create_model

    if kind not in ROUTER_INPUTS:
        raise DynPoseError(f"--router-input {kind!r}: use {' or '.join(ROUTER_INPUTS)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights.*")  # training replaces them
        full = create_model(Role.ROUTER.value, weights=None if init is None else str(init), trust_pickle=trust_pickle)
    if kind == "full":
        return full
    model = PooledRouter()
    model.load_state_dict(full.state_dict())
    card: ModelCard = full.card  # type: ignore[assignment]
    model.card = pooled_card(card)  # type: ignore[assignment]
    model.checkpoint = getattr(full, "checkpoint", None)  # type: ignore[assignment]
    return model


def _drop_stale_router_entries(engine_dir: Path, keep: list[Entry]) -> list[str]:
    """Remove router entries the new router does not replace (another format of the old router), and route as for
    a freshly trained router (`default_route`); returns the reason line."""
    from dynpose.export.api import default_route

    with engine_dir_lock(engine_dir, "replace the router"):
        with updating_manifest(engine_dir, "replace the router") as m:
            kept = {(e.role, e.format) for e in keep}
            stale = [e for e in m.entries if e.role == Role.ROUTER and (e.role, e.format) not in kept]
            m.entries = [e for e in m.entries if e not in stale]
            m.route, why = default_route(m, "trained")
        named = {f for e in m.entries for f in e.files()}
        for e in stale:
            for f in e.files():
                if f not in named:
                    (engine_dir / f).unlink(missing_ok=True)
    return [why]


def export_router(
    model: torch.nn.Module,
    engine_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    *,
    precision: str = "fp32",
    calib: Any = None,
    fmt: str = "onnx",
    progress: bool = True,
) -> tuple[list[Entry], str]:
    """Export a trained router into the engine dir as its `router` entry; (entries, route note).

    The full variant goes through `export_model("router", weights=checkpoint)` (ONNX + torch entries), the pooled
    one through `export_torch` + `register_onnx` (module doc). Lower precisions are checked against fp32 but not
    gated here (`min_oks=0`); `int8_agreement` is the routing-decision gate."""
    from dynpose.export.api import default_route, export_model, register_onnx
    from dynpose.export.onnx_export import export_torch

    engine_dir = Path(engine_dir)
    card: ModelCard = model.card  # type: ignore[assignment]
    if card.name != POOLED_NAME:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*random weights.*")
            entries = export_model(
                Role.ROUTER.value, engine_dir, role=Role.ROUTER, weights=str(checkpoint), precision=precision, calib=calib,
                min_oks=0.0, fmt=fmt, progress=progress, router_weights="trained",
            )  # fmt: skip
        return entries, default_route(Manifest.load(engine_dir, verify=False), "trained")[1]
    with tempfile.TemporaryDirectory(prefix="dynpose-router-") as tmp:
        onnx_path = export_torch(model, Path(tmp) / f"{POOLED_NAME}.onnx", card)
        entries = register_onnx(
            onnx_path, card, engine_dir, role=Role.ROUTER, precision=precision, calib=calib, min_oks=0.0, fmt=fmt,
            progress=progress,
        )  # fmt: skip
    return entries, _drop_stale_router_entries(engine_dir, entries)[0]


def int8_agreement(fp32_onnx: str | os.PathLike, int8_onnx: str | os.PathLike, x: np.ndarray) -> dict[str, float]:
    """How often an INT8 router makes fp32's routing decisions on the crops `x` (normalised NCHW): for thresholds
    sending 10%, 20%, 30% and 50% of these crops to the large model (by fp32's score[1]), the share of crops both
    route alike; the minimum over the four is the gate figure (any operating point a calibration may pick)."""
    from dynpose.onnx_utils import open_session, run_session

    ref = run_session(open_session(fp32_onnx), x)[:, 1]
    got = run_session(open_session(int8_onnx), x)[:, 1]
    out: dict[str, float] = {"max_abs_diff": float(np.abs(ref - got).max())}
    for f in (0.1, 0.2, 0.3, 0.5):
        thr = np.quantile(ref, 1.0 - f)
        out[f"agreement@{f:g}"] = float(((ref >= thr) == (got >= thr)).mean())
    out["agreement"] = min(v for k, v in out.items() if k.startswith("agreement@"))
    return out
