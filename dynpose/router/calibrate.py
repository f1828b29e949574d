"""Routing calibration: choose the policy parameters on held-out data and store them in the manifest.

The engine dir's router and both pose models run on every ground-truth crop of the given annotations (the pose
outputs come from the same cache as training). Then:

- `--target-fraction F`: a `threshold:T` policy with T between the k-th and (k+1)-th highest score[1], k =
  round(F * N), so exactly k crops (F of them) go to the large model, unless scores tie at the cut.
- `--target-ap-drop D`: COCO keypoint AP (pycocotools, on the ground-truth boxes) of the mixed predictions is
  computed for sending the top-k crops by score[1] to the large model, for k on a grid from 0 to N; the smallest k
  whose AP is at most D below large-only wins, and T is placed at that cut as above.

Why a threshold and not a band: score[1] is trained to predict the relative error reduction of the large model, so
it ranks crops by what the large model would gain; sending the top F by that ranking is the one policy a fraction
pins down, whereas a band `LO,HI` has two parameters for one constraint (DynPose's release band 0.59-0.69 reflects
where its own router's scores of the crops that gain fall, not a rule that transfers to a retrained router). A
threshold, unlike `fraction:F`, decides each crop on its own, so the routing of a crop does not depend on which
other crops share its batch.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.router.collect import CropOutputs, Crops, collect_outputs, router_crops

AP_GRID = 40  # fraction grid for the AP-drop scan: at most this many + 1 AP evaluations


@dataclass
class Calibration:
    """The chosen policy and what it achieves on the calibration crops."""

    policy: str
    fraction: float  # share of crops the policy sends to the large model
    num_crops: int
    ap: float  # COCO AP of the routed predictions
    ap_small: float  # all-small
    ap_large: float  # all-large
    target: str  # e.g. "fraction 0.3" or "AP drop <= 0.01"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_fraction(f: float) -> float:
    if not (isinstance(f, (int, float)) and np.isfinite(f) and 0.0 <= f <= 1.0):
        raise DynPoseError(f"--target-fraction must be a number in [0, 1], got {f!r}")
    return float(f)


def check_ap_drop(d: float) -> float:
    if not (isinstance(d, (int, float)) and np.isfinite(d) and 0.0 <= d <= 1.0):
        raise DynPoseError(f"--target-ap-drop must be an AP difference in [0, 1] (e.g. 0.01 for one AP point), got {d!r}")
    return float(d)


def threshold_at(s1: np.ndarray, k: int) -> float:
    """A threshold T with `score[1] >= T` true for the k highest scores (more only when scores tie at the cut)."""
    s = np.sort(np.asarray(s1, dtype=np.float64))[::-1]
    n = len(s)
    if k <= 0:
        return float(np.nextafter(s[0], np.inf)) if n else 1.0
    if k >= n:
        return float(s[-1])
    return float((s[k - 1] + s[k]) / 2.0) if s[k - 1] > s[k] else float(s[k - 1])


def policy_string(threshold: float, s1: np.ndarray) -> str:
    """`threshold:T` with as few digits as keep the decisions on these scores unchanged (the manifest stays
    readable, and a rounded T never moves a crop across the cut)."""
    from dynpose.runtime.policy import parse_policy

    s = np.asarray(s1, dtype=np.float64)
    want = s >= threshold
    for digits in (3, 4, 6, 9, 12, 17):
        text = f"threshold:{threshold:.{digits}g}"
        if np.array_equal(s >= parse_policy(text).params[0], want):
            return text
    return f"threshold:{threshold!r}"


def policy_for_fraction(s1: np.ndarray, fraction: float) -> tuple[str, float]:
    """(policy string, achieved fraction) sending `fraction` of these crops to the large model."""
    from dynpose.runtime.policy import parse_policy

    s = np.asarray(s1, dtype=np.float64)
    k = int(round(check_fraction(fraction) * len(s)))
    text = policy_string(threshold_at(s, k), s)
    large = parse_policy(text).decide(np.stack([s, s, s], axis=1), np.zeros((len(s), 4))).large
    return text, float(large.mean())


def coco_results(out: CropOutputs, large: np.ndarray) -> list[dict[str, Any]]:
    """COCO keypoint results of the routed predictions (large[i]: crop i from the large model), scored as the
    official evaluation does (mean of keypoint scores above 0.2; box score 1 for ground-truth boxes)."""
    from dynpose.runtime.postprocess import rescore

    kp = np.where(np.asarray(large)[:, None, None], out.kpts_large, out.kpts_small)
    scores = rescore(kp, np.ones(len(kp)))
    return [
        {
            "image_id": int(out.image_ids[i]),
            "category_id": 1,
            "keypoints": kp[i].reshape(-1).round(3).tolist(),
            "score": float(scores[i]),
        }
        for i in range(len(kp))
    ]


def routed_ap(out: CropOutputs, large: np.ndarray, ann_path: str | os.PathLike) -> float:
    import warnings

    from dynpose.eval.coco import evaluate_results

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the annotation-id-0 note, once per scan step
        return float(evaluate_results(coco_results(out, large), ann_path)["AP"])


def router_scores(
    engine_dir: str | os.PathLike, crops: Crops, *, backend: str = "ort", device: str = "cpu", chunk: int = 64
) -> np.ndarray:
    """(N,3) scores of the engine dir's router on the crops (chunked so memory stays flat)."""
    from dynpose.runtime.engine_set import EngineSet

    with EngineSet.load(engine_dir, backend, device, roles=("router",)) as engines:
        router = engines.router
        assert router is not None
        images = router_crops(crops, router.card)
        parts = [
            router.scores(router.inputs(images[np.arange(a, min(a + chunk, len(images)))]))
            for a in range(0, len(images), chunk)
        ]
    return np.concatenate(parts, axis=0)


def calibrate(
    engine_dir: str | os.PathLike,
    ann_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    *,
    target_fraction: float | None = None,
    target_ap_drop: float | None = None,
    backend: str = "ort",
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    save: bool = True,
    progress: bool = True,
) -> Calibration:
    """Choose the routing policy (module docstring) and, with `save`, store it as the manifest's `route`."""
    if (target_fraction is None) == (target_ap_drop is None):
        raise DynPoseError("calibration needs exactly one of --target-fraction F or --target-ap-drop D")
    if target_fraction is not None:
        check_fraction(target_fraction)
    else:
        check_ap_drop(target_ap_drop)  # type: ignore[arg-type]
    out, crops = collect_outputs(
        engine_dir, ann_path, images_dir, backend=backend, device=device, cache_dir=cache_dir, progress=progress
    )
    s1 = router_scores(engine_dir, crops, backend=backend, device=device)[:, 1].astype(np.float64)
    if not np.isfinite(s1).all():
        raise DynPoseError(
            f"engine dir {engine_dir}: the router gave non-finite scores on {int((~np.isfinite(s1)).sum())} "
            "crops; re-export or retrain it"
        )
    n = len(s1)
    ap_small = routed_ap(out, np.zeros(n, bool), ann_path)
    ap_large = routed_ap(out, np.ones(n, bool), ann_path)

    if target_fraction is not None:
        policy, achieved = policy_for_fraction(s1, target_fraction)
        target = f"fraction {target_fraction:g}"
    else:
        d = float(target_ap_drop)  # type: ignore[arg-type]
        order = np.argsort(-s1, kind="stable")
        ks = np.unique(np.round(np.linspace(0, n, min(n, AP_GRID) + 1)).astype(int))
        chosen = n
        for k in ks:
            large = np.zeros(n, bool)
            large[order[:k]] = True
            if ap_large - routed_ap(out, large, ann_path) <= d + 1e-12:
                chosen = int(k)
                break
        policy, achieved = policy_for_fraction(s1, chosen / n)
        target = f"AP drop <= {d:g}"

    from dynpose.runtime.policy import parse_policy

    large = parse_policy(policy).decide(np.stack([s1, s1, s1], axis=1), np.zeros((n, 4))).large
    result = Calibration(
        policy=policy,
        fraction=achieved,
        num_crops=n,
        ap=routed_ap(out, large, ann_path),
        ap_small=ap_small,
        ap_large=ap_large,
        target=target,
    )
    if save:
        manifest = Manifest.load(engine_dir)
        manifest.route = policy
        manifest.notes["router_calibration"] = {**result.to_dict(), "annotations": str(ann_path), "backend": backend}
        manifest.save(engine_dir)
    return result
