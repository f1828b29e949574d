"""The end-to-end benchmark: frames/s over real images through `Pipeline` (read, plan, both models at once,
rescoring, OKS-NMS) as `dynpose-run` runs it, plus a per-stage breakdown from a sequential pass that walks the same
plan with an executor running one part at a time (the concurrent run overlaps small and large, so its stages cannot
be separated)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.io.sources import read_image
from dynpose.roles import Role
from dynpose.runtime.boxes import Boxes
from dynpose.runtime.engine_set import EngineSet
from dynpose.runtime.execute import execute
from dynpose.runtime.model import CropModel, PoseModel, Router
from dynpose.runtime.pipeline import Pipeline, persons_of
from dynpose.runtime.plan import Done, FrameInput, Plan, Work, make_plan
from dynpose.runtime.policy import Policy, parse_policy

STAGES = ("decode_image", "crop", Role.ROUTER.value, Role.SMALL.value, Role.LARGE.value, "decode_keypoints", "rescore_nms")


def _read(path: Path) -> np.ndarray:
    img = read_image(path)
    if img is None:
        raise DynPoseError(f"image {path}: cannot be decoded")
    return img


class _Stages:
    """Seconds per stage, summed over the sequential pass."""

    def __init__(self) -> None:
        self.acc = dict.fromkeys(STAGES, 0.0)
        self.routed = dict.fromkeys((Role.SMALL.value, Role.LARGE.value), 0)

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        self.acc[stage] += time.perf_counter() - t
        return out


class _TimedExecutor:
    """Runs a plan's work on the calling thread, one part at a time, each timed into its stage (the runners time
    their own inference)."""

    def __init__(self, models: dict[Role, CropModel], st: _Stages) -> None:
        self.models, self.st = models, st

    def submit(self, plan: Plan, work: Sequence[Work]) -> list[Future[Done]]:
        futures: list[Future[Done]] = []
        for w in work:
            f: Future[Done] = Future()
            f.set_result(self._run(plan, w))
            futures.append(f)
        return futures

    def _run(self, plan: Plan, w: Work) -> Done:
        model = self.models[w.role]
        x = self.st.timed("crop", lambda: model.inputs(plan.crop(w)))
        if isinstance(model, Router):
            out = model.scores(x)
            self.st.acc[w.role.value] += model.runner.last_inference_time()
            return Done(w, out)
        assert isinstance(model, PoseModel)
        outs = model.infer(x)
        self.st.acc[w.role.value] += model.runner.last_inference_time()
        c, s = plan.geometry(w.role, w.idx)
        return Done(w, self.st.timed("decode_keypoints", partial(model.decode, outs, c, s)))


def _sequential_frame(models: dict[Role, CropModel], policy: Policy, path: Path, raw: np.ndarray, st: _Stages) -> None:
    """One image through the planner's stages, each part timed on its own (`_TimedExecutor`)."""
    img = st.timed("decode_image", lambda: _read(path))
    boxes = Boxes.of(raw, img.shape)
    plan = make_plan([FrameInput(img, boxes)], policy, {r: m.card for r, m in models.items()})
    res = execute(plan, _TimedExecutor(models, st))
    for r in (Role.SMALL, Role.LARGE):
        st.routed[r.value] += int(sum(res.role(i) == r for i in range(len(res.model))))
    sigmas = models[Role.LARGE].card.keypoint_set.sigmas
    st.timed("rescore_nms", lambda: persons_of(res, sigmas))  # as the Pipeline answers (NMS only for scored boxes)


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
    pipe = Pipeline.from_engine_set(engines, route=policy)
    models: dict[Role, CropModel] = {r: m for r in (Role.ROUTER, Role.SMALL, Role.LARGE) if (m := getattr(engines, r))}
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
            _sequential_frame(models, policy, path, raw, st)
    frames = len(inputs) * max(1, repeats)
    total = sum(st.acc.values())
    med = float(np.median(pass_s))
    passes = max(1, stats["frames"] // max(1, len(inputs)))
    crops = int(sum(stats["answered"].values()) // passes)  # persons the pose models answered (unusable boxes dropped)
    return {
        "images": len(inputs),
        "boxes": boxes,  # as given (detections)
        "crops": crops,  # after dropping unusable boxes: what the pose models ran
        "dropped_boxes": int(stats["dropped_boxes"] // passes),
        "persons": found,  # after OKS-NMS: what a user gets
        "persons_after_nms": found,
        "large_share": stats["answered"][Role.LARGE.value] / max(1, sum(stats["answered"].values())),
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
