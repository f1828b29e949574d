"""Checks every export must pass: ONNX Runtime vs PyTorch, and lower precision vs fp32 in decoded keypoints.

fp32 is compared on raw outputs (relative L2); fp16/int8 are compared where it matters to a user: keypoints decoded
in image pixels, scored with OKS against the fp32 keypoints of the same crops.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import open_session, rel_l2, run_session

FP32_TOL = 1e-4


def decode_keypoints(heatmaps: np.ndarray, centers: np.ndarray, scales: np.ndarray, card: ModelCard) -> np.ndarray:
    """(N,K,2) keypoints in image pixels with the runtime's own decoder (the card's msra/dark/udp)."""
    from dynpose.runtime.decode import decode_heatmaps

    return np.asarray(decode_heatmaps(heatmaps, centers, scales, card))[..., :2]


def oks_between(
    test_xy: np.ndarray, ref_xy: np.ndarray, areas: np.ndarray, sigmas: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """Per-crop OKS of `test_xy` against `ref_xy` (N,K,2) as ground truth, over the keypoints in `mask`."""
    from dynpose.runtime.postprocess import oks

    m = np.ones(np.shape(ref_xy)[:2], bool) if mask is None else np.asarray(mask, bool)
    gt = np.concatenate([np.asarray(ref_xy, np.float64), m[..., None].astype(np.float64)], axis=-1)
    return np.array([oks(test_xy[i], gt[i], float(areas[i]), sigmas) for i in range(len(gt))])


def keypoint_agreement(test_out: np.ndarray, ref_out: np.ndarray, crops: Any, card: ModelCard) -> dict[str, float]:
    """Mean/min OKS and heatmap relative L2 of a lower-precision output against fp32 on the same crops."""
    finite = bool(np.isfinite(test_out).all())
    if not finite:
        return {"finite": False, "oks_mean": 0.0, "oks_min": 0.0, "heatmap_rel_l2": float("inf")}
    a = decode_keypoints(test_out, crops.centers, crops.scales, card)
    b = decode_keypoints(ref_out, crops.centers, crops.scales, card)
    o = oks_between(a, b, crops.areas, np.asarray(card.keypoint_set.sigmas), crops.mask)
    return {
        "finite": True,
        "oks_mean": float(o.mean()),
        "oks_min": float(o.min()),
        "heatmap_rel_l2": rel_l2(test_out, ref_out),
        "crops": len(o),
    }


def gate_policy(route: str) -> str:
    """The policy whose decisions a lower-precision router must reproduce: the route itself when it reads the
    router's scores, else `fraction:0.5` (box:/all-* decide without the router, which would make any router pass)."""
    from dynpose.runtime.policy import parse_policy

    policy = parse_policy(route)
    return str(policy) if policy.needs_router else "fraction:0.5"


def router_agreement(test_out: np.ndarray, ref_out: np.ndarray, route: str) -> dict[str, Any]:
    """Router scores of a lower-precision model against fp32 on the same crops: max/mean |score difference| and the
    fraction of crops routed the same way under `gate_policy(route)` (all crops in one call, as one batch)."""
    from dynpose.runtime.policy import parse_policy

    test = np.asarray(test_out, np.float64)
    ref = np.asarray(ref_out, np.float64)
    policy = gate_policy(route)
    if not np.isfinite(test).all():
        return {"finite": False, "policy": policy, "crops": len(ref)}
    diff = np.abs(test - ref)
    boxes = np.zeros((len(ref), 4))  # only box: policies read boxes, and those are replaced above
    p = parse_policy(policy)
    same = p.decide(test, boxes).large == p.decide(ref, boxes).large
    return {
        "finite": True,
        "policy": policy,
        "crops": len(ref),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "agreement": float(same.mean()),
    }


def verify_torch_vs_onnx(
    model: Any, onnx_path: str | os.PathLike, card: ModelCard, real: Any | None, tol: float = FP32_TOL, seed: int = 0
) -> dict[str, Any]:
    """ONNX Runtime vs PyTorch at batch 1 and 5 on random crops and (when given) real crops; raises above `tol`."""
    import torch

    sess = open_session(onnx_path)
    rng = np.random.default_rng(seed)
    sets = {"random": rng.standard_normal((5, 3, card.input_height, card.input_width)).astype(np.float32)}
    if real is not None and len(real):
        sets["real"] = real.x[np.arange(5) % len(real.x)]
    checks: dict[str, Any] = {}
    model = model.eval()
    for kind, x in sets.items():
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        for bs in (1, 5):
            got = run_session(sess, x[:bs], batch=bs)
            err = rel_l2(got, ref[:bs])
            checks[f"fp32_rel_l2_{kind}_b{bs}"] = err
            if not np.isfinite(err) or err > tol:
                raise DynPoseError(
                    f"export check failed for {card.name}: ONNX Runtime vs PyTorch relative L2 {err:.3g} > {tol:g} "
                    f"({kind} crops, batch {bs}); the graph does not reproduce the model"
                )
    checks["fp32_rel_l2"] = max(v for k, v in checks.items() if k.startswith("fp32_rel_l2_"))
    return checks


def verify_onnx_batches(onnx_path: str | os.PathLike, card: ModelCard, real: Any | None) -> dict[str, Any]:
    """For a user's ONNX: batch 5 must equal five batch-1 runs (dynamic batch works) and outputs be finite."""
    sess = open_session(onnx_path)
    shape = sess.get_inputs()[0].shape
    if len(shape) != 4 or list(shape[1:]) != [3, card.input_height, card.input_width]:
        raise DynPoseError(
            f"ONNX model {onnx_path}: input shape {shape} does not match the card ({card.input_height}x{card.input_width}, "
            "3 channels, NCHW); fix the card's input_width/input_height"
        )
    x = (
        real.x[:5]
        if real is not None and len(real) >= 5
        else np.random.default_rng(0).standard_normal((5, 3, card.input_height, card.input_width)).astype(np.float32)
    )
    try:
        big = run_session(sess, x, batch=5)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DynPoseError(f"ONNX model {onnx_path}: batch 5 fails ({first}); export it with a dynamic batch axis") from None
    ones = run_session(sess, x, batch=1)
    if not np.isfinite(big).all():
        raise DynPoseError(f"ONNX model {onnx_path}: outputs contain NaN/inf on real crops")
    err = rel_l2(big, ones)
    if err > FP32_TOL:
        raise DynPoseError(f"ONNX model {onnx_path}: batch 5 differs from batch 1 (relative L2 {err:.3g})")
    return {"batch5_vs_batch1_rel_l2": err, "output_shape": list(big.shape[1:])}


def default_verify_dir() -> Path | None:
    """COCO person crops for export checks: $DYNPOSE_VERIFY_COCO, else ../shared/data/coco beside the repo."""
    env = os.environ.get("DYNPOSE_VERIFY_COCO")
    if env:
        return Path(env)
    cand = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco"
    return cand if cand.is_dir() else None
