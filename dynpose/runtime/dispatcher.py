"""The Dispatcher: route person boxes to the small or the large pose model and run both at once.

One call takes the boxes of one frame or of many (a micro-batch) and does, in this order:

1. centre/scale of every box for each model's own geometry (aspect ratio and padding from its card);
2. if the policy needs it, crop every box for the router, run the router, and decide small | large (boxes whose
   decision the caller forces, e.g. a video tracker keeping a person's decision, skip the router);
3. crop only the boxes routed to the small model, at the small model's input size, and hand the batch to the small
   model's worker; then the same for the large model (reusing the router crops when the router and the large model
   crop identically) so the small model already runs while the large crops are made;
4. each worker runs its model (plus the mirrored batch for the flip test) and decodes heatmaps to image pixels;
5. the results go back into input order.

Each model has its own single worker thread (`ThreadPoolExecutor(max_workers=1)`): on CPU the two ONNX Runtime
sessions then run in parallel on their own share of the cores; GPU runners each own a CUDA stream, so the two
workers' launches overlap on the device. Each call records its models' inference spans (start/end as the runners
timed them) so overlap can be shown, and how many crops went to each model.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from dynpose.engines.manifest import DEFAULT_ROUTE
from dynpose.errors import DynPoseError
from dynpose.runtime.backends.base import Runner
from dynpose.runtime.model import PoseModel, Router
from dynpose.runtime.policy import Policy, parse_policy

MODELS = ("small", "large")


@dataclass(frozen=True)
class WorkerSpan:
    """One model's work in one call: when it started and ended (perf_counter seconds) and how many crops."""

    model: str
    start: float
    end: float
    count: int


@dataclass
class DispatchResult:
    """Keypoints and routing of every box of one call, in input order (frames concatenated)."""

    keypoints: np.ndarray  # (N,K,3) x, y in image pixels, score
    large: np.ndarray  # (N,) True where the large model ran
    router_scores: np.ndarray  # (N,) router score[1]; NaN where the router did not run
    centers: np.ndarray  # (N,2) of the model that ran
    scales: np.ndarray  # (N,2) pixels, of the model that ran (its product is the official OKS-NMS area)
    frame_index: np.ndarray  # (N,) which input frame each box came from
    nan_scores: int = 0
    spans: list[WorkerSpan] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {"small": int((~self.large).sum()), "large": int(self.large.sum())}

    @property
    def model_names(self) -> list[str]:
        return ["large" if v else "small" for v in self.large]

    @classmethod
    def empty(cls, n: int, num_keypoints: int, frame_index: np.ndarray) -> DispatchResult:
        """A result for n boxes to fill in (all small, no router scores, zero keypoints)."""
        return cls(
            keypoints=np.zeros((n, num_keypoints, 3), dtype=np.float32),
            large=np.zeros(n, dtype=bool),
            router_scores=np.full(n, np.nan, dtype=np.float32),
            centers=np.zeros((n, 2)),
            scales=np.zeros((n, 2)),
            frame_index=frame_index,
        )

    def frame_slices(self, num_frames: int) -> list[slice]:
        """Slices of the flat arrays per input frame (boxes of a frame are contiguous)."""
        bounds = np.searchsorted(self.frame_index, np.arange(num_frames + 1))
        return [slice(int(bounds[i]), int(bounds[i + 1])) for i in range(num_frames)]


def _xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4))
    if b.ndim != 2 or b.shape[1] < 4:
        raise DynPoseError(f"dispatcher: boxes must be (M,4) or (M,5) x,y,w,h[,score], got shape {b.shape}")
    return b[:, :4]


def _check_images(images: Sequence[np.ndarray]) -> None:
    for i, im in enumerate(images):
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            what = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
            raise DynPoseError(f"dispatcher: image {i} must be an H x W x 3 uint8 BGR array, got {what}")


def _forced(decisions: Sequence[np.ndarray | None] | None, parts: Sequence[np.ndarray]) -> np.ndarray:
    """The flat (N,) forced routing: -1 (route normally) unless `decisions` says 0 (small) or 1 (large)."""
    n = sum(len(b) for b in parts)
    if decisions is None:
        return np.full(n, -1, dtype=np.int8)
    if len(decisions) != len(parts):
        raise DynPoseError(f"dispatcher: {len(parts)} box arrays but {len(decisions)} decision arrays")
    out = []
    for i, (d, b) in enumerate(zip(decisions, parts, strict=True)):
        a = np.full(len(b), -1, dtype=np.int8) if d is None else np.asarray(d).reshape(-1)
        if len(a) != len(b) or not np.isin(a, (-1, 0, 1)).all():
            raise DynPoseError(
                f"dispatcher: decisions[{i}] must hold one of -1 (route), 0 (small), 1 (large) per box "
                f"({len(b)} boxes), got {a.tolist()[:8]}"
            )
        out.append(a.astype(np.int8))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int8)


def _span(model: str, runner: Runner, count: int) -> WorkerSpan:
    start, end = runner.last_inference or (0.0, 0.0)
    return WorkerSpan(model, start, end, count)


@dataclass
class _Call:
    """One `run`'s inputs and its growing result."""

    images: Sequence[np.ndarray]
    frame_index: np.ndarray
    boxes: np.ndarray
    res: DispatchResult
    geometry: dict[str, tuple[np.ndarray, np.ndarray]]
    router_x: np.ndarray | None = None  # the router's normalised crops, kept when they can serve the large model


class Dispatcher:
    """Router + policy + small and large pose models, each pose model on its own worker thread.

    The dispatcher owns its worker threads (closed by `close()`), not the models' runners: whoever loaded them
    (an `EngineSet`) closes them. Calls are thread-safe: concurrent calls queue on the per-model workers and never
    share mutable state. A call's boxes are worked through in windows of the models' max batch, so memory stays
    bounded whatever the number of boxes; the routing policy still sees all of them at once.
    """

    def __init__(
        self,
        small: PoseModel,
        large: PoseModel,
        router: Router | None = None,
        policy: str | Policy = DEFAULT_ROUTE,
        flip: bool = False,
    ) -> None:
        self.policy = parse_policy(policy)
        if self.policy.needs_router and router is None:
            raise DynPoseError(
                f"routing policy {self.policy} needs the router, but none was loaded; export a router into the engine "
                "dir or use a router-free policy (all-small, all-large, box:AREA)"
            )
        if small.card.keypoints != large.card.keypoints:
            raise DynPoseError(
                f"small model {small.card.name!r} predicts {small.card.keypoints} but large model {large.card.name!r} "
                f"predicts {large.card.keypoints}; both must use the same keypoint set"
            )
        self.models = {"small": small, "large": large}
        self.router = router
        self.flip = flip
        self.reuse_router_crop = router is not None and router.same_crop(large)
        self.window = max(small.runner.max_batch, large.runner.max_batch)
        self._workers = {m: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dynpose-{m}") for m in MODELS}
        self._closed = False

    @property
    def keypoint_set(self) -> str:
        return self.models["large"].card.keypoints

    # -- one call --------------------------------------------------------------------------------------------------
    def __call__(self, image_bgr: np.ndarray, boxes_xywh: np.ndarray) -> DispatchResult:
        """One frame's boxes (M,>=4) x,y,w,h."""
        return self.run([image_bgr], [boxes_xywh])

    def run(
        self,
        images: Sequence[np.ndarray],
        boxes: Sequence[np.ndarray],
        decisions: Sequence[np.ndarray | None] | None = None,
    ) -> DispatchResult:
        """Boxes of several frames (`boxes[i]` (M_i,>=4) x,y,w,h belong to `images[i]`, uint8 BGR), dispatched as one
        batch; the routing policy sees all of them together.

        decisions: optional forced routing, per frame an (M_i,) int array (or None for "route them all"): 0 small,
        1 large, -1 route normally. The router runs only for the -1 boxes and the policy decides among those alone
        (a video tracker that keeps a person's decision across frames skips the router for them)."""
        if self._closed:
            raise DynPoseError("dispatcher is closed")
        if len(images) != len(boxes):
            raise DynPoseError(f"dispatcher: {len(images)} images but {len(boxes)} box arrays")
        _check_images(images)
        parts = [_xywh(b) for b in boxes]
        forced = _forced(decisions, parts)
        frame_index = np.repeat(np.arange(len(parts), dtype=np.int64), [len(b) for b in parts])
        all_boxes = np.concatenate(parts) if parts else np.zeros((0, 4))
        call = _Call(images, frame_index, all_boxes, self._empty_result(len(all_boxes), frame_index), {})
        if len(all_boxes) == 0:
            return call.res
        call.geometry = {m: model.geometry(all_boxes) for m, model in self.models.items()}
        free = np.flatnonzero(forced < 0)
        call.res.large[:] = forced == 1
        if free.size:
            scores = self._route_scores(call, free) if self.policy.needs_router else None
            decision = self.policy.decide(scores, all_boxes[free])
            call.res.large[free] = decision.large
            call.res.nan_scores = decision.nan
        self._run_pose(call)
        return call.res

    def _empty_result(self, n: int, frame_index: np.ndarray) -> DispatchResult:
        return DispatchResult.empty(n, self.models["large"].card.keypoint_set.num, frame_index)

    def _route_scores(self, call: _Call, idx: np.ndarray) -> np.ndarray:
        """Router scores of the boxes `idx`, a window at a time (its crops are kept for the large model when every
        box of the call is routed in one window and the two crop alike)."""
        router = self.router
        assert router is not None
        n = len(idx)
        rc, rs = call.geometry["large"] if self.reuse_router_crop else router.geometry(call.boxes)
        keep_crops = self.reuse_router_crop and n == len(call.boxes) and n <= self.window
        parts, kept = [], []
        for a in range(0, n, router.runner.max_batch):
            sl = idx[a : a + router.runner.max_batch]
            x = router.inputs(router.crop(call.images, call.frame_index[sl], rc[sl], rs[sl]))
            parts.append(router.scores(x))
            call.res.spans.append(_span("router", router.runner, len(x)))
            if keep_crops:
                kept.append(x)
        if kept:
            call.router_x = kept[0] if len(kept) == 1 else np.concatenate(kept)
        scores = np.concatenate(parts)
        call.res.router_scores[idx] = scores[:, 1]
        return scores

    def _run_pose(self, call: _Call) -> None:
        """Crop and submit each window's boxes to their model's worker; crop the next window while the workers run
        this one, then collect it (at most two windows of crops in memory)."""
        n = len(call.boxes)
        pending: list[list[tuple[np.ndarray, Future]]] = []
        for a in range(0, n, self.window):
            pending.append(self._submit_window(call, np.arange(a, min(a + self.window, n))))
            if len(pending) > 1:
                self._collect(call, pending.pop(0))
        for p in pending:
            self._collect(call, p)

    def _submit_window(self, call: _Call, window: np.ndarray) -> list[tuple[np.ndarray, Future]]:
        res = call.res
        # Large first when its crops are free (reused from the router), otherwise small first: the first model
        # submitted runs while the second one's crops are made.
        order = ("large", "small") if call.router_x is not None else ("small", "large")
        futures = []
        for m in order:
            idx = window[res.large[window]] if m == "large" else window[~res.large[window]]
            if idx.size == 0:
                continue
            model = self.models[m]
            centers, scales = call.geometry[m][0][idx], call.geometry[m][1][idx]
            res.centers[idx], res.scales[idx] = centers, scales
            if m == "large" and call.router_x is not None:
                x = call.router_x[idx]
            else:
                x = model.inputs(model.crop(call.images, call.frame_index[idx], centers, scales))
            try:
                fut = self._workers[m].submit(self._work, m, x, centers, scales)
            except RuntimeError:  # the executor was shut down by a concurrent close()
                raise DynPoseError("dispatcher is closed") from None
            futures.append((idx, fut))
        return futures

    def _collect(self, call: _Call, futures: list[tuple[np.ndarray, Future]]) -> None:
        for idx, fut in futures:
            kps, span = fut.result()
            call.res.keypoints[idx] = kps
            call.res.spans.append(span)

    def _work(self, m: str, x: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, WorkerSpan]:
        """Runs on the model's worker thread: infer (and the mirrored batch), then decode to image pixels."""
        model = self.models[m]
        kps = model.decode(model.infer(x, self.flip), centers, scales)
        return kps, _span(m, model.runner, len(x))

    # -- lifetime --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers.values():
            w.shutdown(wait=True)

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
