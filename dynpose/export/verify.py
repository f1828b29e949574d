"""The fp32 checks every export must pass, and the real crops lower precisions are judged on.

fp32 is compared on raw outputs (relative L2, every output: the worst counts): ONNX Runtime against PyTorch for a
zoo model, batch 5 against five batch-1 runs for a user's ONNX. fp16/int8 are judged where it matters to a user
(`dynpose.export.judges`), on the real person crops `gate_crops` finds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.export.calibration.crops import CalibSpec, CropSet, coco_person_crops
from dynpose.export.judges import Check
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import open_session, rel_l2, run_session_all
from dynpose.runtime.model import check_output_shapes

log = logging.getLogger(__name__)

FP32_TOL = 1e-4
NO_CROPS = "no real crops (set DYNPOSE_VERIFY_COCO or pass --gate-ann)"


def default_verify_dir() -> Path | None:
    """COCO person crops for export checks: $DYNPOSE_VERIFY_COCO, else ../shared/data/coco beside the repo."""
    env = os.environ.get("DYNPOSE_VERIFY_COCO")
    if env:
        return Path(env)
    cand = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco"
    return cand if cand.is_dir() else None


def gate_crops(card: ModelCard, calib: CalibSpec | None) -> tuple[CropSet | None, str]:
    """(the COCO person crops under `card` that fp32 verification and the fp16 gate use, or None; why there are
    none). From the spec's `gate_ann` when given (a file without a usable person is an error: the user asked for
    it), else from `default_verify_dir()`. The router gets them too: it is fed the same crops."""
    if calib is not None and calib.gate_ann is not None:
        crops = coco_person_crops(calib.gate_ann, card)
        if crops is None:
            raise DynPoseError(f"gate annotation file {calib.gate_ann}: no person with >= 5 labelled keypoints")
        return crops, ""
    d = default_verify_dir()
    if d is None:
        return None, NO_CROPS
    crops = coco_person_crops(d, card)
    if crops is None:
        return None, f"no COCO annotations with labelled persons in {d} (set DYNPOSE_VERIFY_COCO or pass --gate-ann)"
    return crops, ""


def torch_outputs(model: Any, x: np.ndarray) -> list[np.ndarray]:
    """A torch model's outputs on a numpy batch as fp32 arrays (one tensor, or a tuple/list of them: SimDR's x, y)."""
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [o.float().cpu().numpy() for o in outs]


def worst_rel_l2(test: list[np.ndarray], ref: list[np.ndarray]) -> tuple[float, int]:
    """(the largest relative L2 over paired outputs, its output index); inf when the output counts differ."""
    if len(test) != len(ref):
        return float("inf"), 0
    errs = [rel_l2(t, r) for t, r in zip(test, ref, strict=True)]
    i = int(np.argmax([e if np.isfinite(e) else np.inf for e in errs]))
    return errs[i], i


def verify_torch_vs_onnx(
    model: Any, onnx_path: str | os.PathLike, card: ModelCard, real: CropSet | None, tol: float = FP32_TOL, seed: int = 0
) -> Check:
    """ONNX Runtime vs PyTorch at batch 1 and 5 on random crops and (when given) real crops, every output (SimDR:
    both vectors); fails above `tol`. Figures: `fp32_rel_l2_<random|real>_b<1|5>` (the worst output's) and their
    maximum `fp32_rel_l2`."""
    sess = open_session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(seed)
    sets = {"random": rng.standard_normal((5, 3, card.input_height, card.input_width)).astype(np.float32)}
    if real is not None and len(real):
        sets["real"] = real.x[np.arange(5) % len(real.x)]
    figures: dict[str, Any] = {}
    model = model.eval()
    for kind, x in sets.items():
        ref = torch_outputs(model, x)
        if len(ref) != len(names):
            return Check(
                "fp32",
                False,
                figures,
                f"export check failed for {card.name}: the ONNX graph has {len(names)} outputs, the model {len(ref)}",
            )
        for bs in (1, 5):
            err, i = worst_rel_l2(run_session_all(sess, x[:bs], batch=bs), [r[:bs] for r in ref])
            figures[f"fp32_rel_l2_{kind}_b{bs}"] = err
            if not np.isfinite(err) or err > tol:
                which = f" on output {names[i]!r}" if len(names) > 1 else ""
                return Check(
                    "fp32",
                    False,
                    figures,
                    f"export check failed for {card.name}: ONNX Runtime vs PyTorch relative L2 {err:.3g} > {tol:g}"
                    f"{which} ({kind} crops, batch {bs}); the graph does not reproduce the model",
                )
    figures["fp32_rel_l2"] = max(figures.values())
    return Check("fp32", True, figures)


def verify_onnx_batches(
    onnx_path: str | os.PathLike,
    card: ModelCard,
    real: CropSet | None,
    name: str | os.PathLike | None = None,
    role: str | None = None,
) -> Check:
    """For a user's ONNX: the input matches the card, a pose model's outputs are what the card's decoder reads
    (`model.check_output_shapes`), batch 5 equals five batch-1 runs (dynamic batch works) and outputs are finite,
    for every output. Figures: `batch5_vs_batch1_rel_l2` (the worst output's), `output_shape`
    (the first output's, per crop), and `output_shapes` (every output's) for a model with several. `name`: the file
    to name in messages (the user's own, not the staged copy being checked)."""
    sess = open_session(onnx_path)
    shape = sess.get_inputs()[0].shape
    where = f"{role + ' ' if role else ''}ONNX model {name or onnx_path}"
    if len(shape) != 4 or list(shape[1:]) != [3, card.input_height, card.input_width]:
        return Check(
            "fp32",
            False,
            {},
            f"{where}: input shape {shape} does not match the card ({card.input_height}x{card.input_width}, 3 "
            "channels, NCHW); fix the card's input_width/input_height",
        )
    x = (
        real.x[:5]
        if real is not None and len(real) >= 5
        else np.random.default_rng(0).standard_normal((5, 3, card.input_height, card.input_width)).astype(np.float32)
    )
    try:
        ones = run_session_all(sess, x, batch=1)
    except Exception as e:  # ONNX Runtime's own error types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        return Check("fp32", False, {}, f"{where}: ONNX Runtime fails to run it on a crop ({first}); check the model")
    try:
        check_output_shapes([o.shape for o in ones], card, where)
    except DynPoseError as e:
        return Check("fp32", False, {}, str(e))
    try:
        big = run_session_all(sess, x, batch=5)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return Check("fp32", False, {}, f"{where}: batch 5 fails ({first}); export it with a dynamic batch axis")
    if not all(np.isfinite(b).all() for b in big):
        return Check("fp32", False, {}, f"{where}: outputs contain NaN/inf on real crops")
    err, _ = worst_rel_l2(big, ones)
    figures: dict[str, Any] = {"batch5_vs_batch1_rel_l2": err, "output_shape": list(big[0].shape[1:])}
    if len(big) > 1:
        figures["output_shapes"] = [list(b.shape[1:]) for b in big]
    if err > FP32_TOL:
        return Check("fp32", False, figures, f"{where}: batch 5 differs from batch 1 (relative L2 {err:.3g})")
    return Check("fp32", True, figures)
