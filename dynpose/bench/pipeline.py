"""The end-to-end benchmark: frames/s over real images through `Pipeline` (read, dispatch with both models at
once, rescoring, OKS-NMS) as `dynpose-run` runs it, plus a per-stage breakdown from a sequential pass that runs the
same plain functions one by one (the concurrent run overlaps small and large, so its stages cannot be separated)."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.engine_set import EngineSet
from dynpose.runtime.model import PoseModel
from dynpose.runtime.pipeline import OKS_NMS_THR, RESCORE_THR, Pipeline, clean_boxes
from dynpose.runtime.policy import Policy, parse_policy
from dynpose.runtime.postprocess import oks_nms, rescore
from dynpose.runtime.sources import read_image

STAGES = ("decode_image", "crop", "router", "small", "large", "decode_keypoints", "rescore_nms")


def _read(path: Path) -> np.ndarray:
    img = read_image(path)
    if img is None:
        raise DynPoseError(f"image {path}: cannot be decoded")
    return img


class _Stages:
    """Seconds per stage, summed over the sequential pass."""

    def __init__(self) -> None:
        self.acc = dict.fromkeys(STAGES, 0.0)
        self.routed = {"small": 0, "large": 0}

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        self.acc[stage] += time.perf_counter() - t
        return out


def _crop_inputs(model: PoseModel, img: np.ndarray, fi: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    return model.inputs(model.crop([img], fi, c, s))


def _sequential_frame(engines: EngineSet, policy: Policy, path: Path, raw: np.ndarray, st: _Stages) -> None:
    """One image through the same steps the Dispatcher takes, each timed on its own (runners time their inference)."""
    img = st.timed("decode_image", lambda: _read(path))
    boxes, _ = clean_boxes(raw, img.shape)
    xywh = boxes[:, :4]
    fi = np.zeros(len(xywh), dtype=np.int64)
    small, large = engines.pose_models
    kps = np.zeros((len(xywh), large.card.keypoint_set.num, 3), dtype=np.float32)
    areas = np.zeros(len(xywh))
    scores = router_x = None
    router = engines.router
    if policy.needs_router:
        assert router is not None
        rc, rs = router.geometry(xywh)
        router_x = st.timed("crop", lambda: router.inputs(router.crop([img], fi, rc, rs)))
        scores = router.scores(router_x)
        st.acc["router"] += router.runner.last_inference_time()
    go_large = policy.decide(scores, xywh).large
    models: dict[str, PoseModel] = {"small": small, "large": large}
    for m, model in models.items():
        idx = np.flatnonzero(go_large if m == "large" else ~go_large)
        if idx.size == 0:
            continue
        st.routed[m] += int(idx.size)
        c, s = model.geometry(xywh[idx])
        if m == "large" and router is not None and router_x is not None and router.same_crop(large):
            x = router_x[idx]  # as the Dispatcher: the router's crops serve the large model as they are
        else:
            x = st.timed("crop", partial(_crop_inputs, model, img, fi[idx], c, s))
        outs = model.infer(x)
        st.acc[m] += model.runner.last_inference_time()
        kps[idx] = st.timed("decode_keypoints", partial(model.decode, outs, c, s))
        areas[idx] = np.prod(s, axis=1)
    sigmas = large.card.keypoint_set.sigmas
    st.timed("rescore_nms", lambda: oks_nms(kps, rescore(kps, boxes[:, 4], thr=RESCORE_THR), areas, OKS_NMS_THR, sigmas))


def pipeline_benchmark(
    engines: EngineSet,
    inputs: list[tuple[Path, np.ndarray]],
    route: str,
    repeats: int,
    warmup: int,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """End-to-end figures and the per-stage breakdown (module doc)."""
    policy = parse_policy(route)
    if policy.needs_router and engines.router is None:
        raise DynPoseError(f"--route {route}: needs a router, the engine dir has none; use all-small/all-large/box:A")
    boxes = int(sum(len(b) for _, b in inputs))
    # A pipeline over the opened models: it does not own (close) them.
    pipe = Pipeline.from_engine_set(engines, route=str(policy))
    found = 0
    try:

        def one_pass() -> int:
            return sum(len(pipe(_read(path), b)) for path, b in inputs)

        log(f"pipeline: {len(inputs)} images, {boxes} boxes, route {policy}, {repeats} passes")
        for _ in range(warmup):
            one_pass()
        pass_s = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            found = one_pass()
            pass_s.append(time.perf_counter() - t0)
        stats = pipe.stats.as_dict()
    finally:
        pipe.close()
    st = _Stages()
    for _ in range(max(1, repeats)):
        for path, raw in inputs:
            _sequential_frame(engines, policy, path, raw, st)
    frames = len(inputs) * max(1, repeats)
    total = sum(st.acc.values())
    med = float(np.median(pass_s))
    passes = max(1, stats["frames"] // max(1, len(inputs)))
    crops = int(sum(stats["crops"].values()) // passes)  # boxes the Dispatcher ran (unusable ones dropped first)
    return {
        "images": len(inputs),
        "boxes": boxes,  # as given (detections)
        "crops": crops,  # after dropping unusable boxes: what the pose models ran
        "dropped_boxes": int(stats["dropped_boxes"] // passes),
        "persons": found,  # after OKS-NMS: what a user gets
        "persons_after_nms": found,
        "large_share": stats["crops"]["large"] / max(1, sum(stats["crops"].values())),
        "route": str(policy),
        "repeats": repeats,
        "fps": len(inputs) / med,
        "crops_per_s": crops / med,
        "persons_per_s": found / med,
        "pass_s": pass_s,
        "sequential_fps": frames / total if total > 0 else None,
        "breakdown_ms_per_frame": {k: v * 1e3 / frames for k, v in st.acc.items()},
        "breakdown_share": {k: (v / total if total > 0 else 0.0) for k, v in st.acc.items()},
        "routed_sequential": st.routed,
    }
