"""The Dispatcher: route person boxes to the small or the large pose model and run both at once.

One call takes the boxes of one frame or of many (a micro-batch) and does, in this order:

1. centre/scale of every box for each model's own geometry (aspect ratio and padding from its card);
2. if the policy needs it, crop every box for the router, run the router, and decide small | large;
3. crop only the boxes routed to the small model, at the small model's input size, and hand the batch to the small
   model's worker; then the same for the large model (reusing the router crops when the router and the large model
   crop identically) so the small model already runs while the large crops are made;
4. each worker runs its model (plus the mirrored batch for the flip test) and decodes heatmaps to image pixels;
5. the results go back into input order.

Each model has its own single worker thread (`ThreadPoolExecutor(max_workers=1)`): on CPU the two ONNX Runtime
sessions then run in parallel on their own share of the cores; GPU runners each own a CUDA stream, so the two
workers' launches overlap on the device. Each call records its workers' start/end times (`time.perf_counter`) so
overlap can be shown, and how many crops went to each model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType

import cv2
import numpy as np

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.runtime.backends.base import Runner
from dynpose.runtime.decode import average_flip, decode_heatmaps
from dynpose.runtime.policy import Policy, parse_policy
from dynpose.runtime.preprocess import box_to_center_scale, normalize, warp_matrix

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

    def frame_slices(self, num_frames: int) -> list[slice]:
        """Slices of the flat arrays per input frame (boxes of a frame are contiguous)."""
        bounds = np.searchsorted(self.frame_index, np.arange(num_frames + 1))
        return [slice(int(bounds[i]), int(bounds[i + 1])) for i in range(num_frames)]


def same_crop(a: ModelCard, b: ModelCard) -> bool:
    """Two models see identical input tensors for a box, so one crop serves both."""
    return (
        a.input_size == b.input_size
        and a.color_order == b.color_order
        and a.mean == b.mean
        and a.std == b.std
        and a.padding == b.padding
        and (a.decoder == "udp") == (b.decoder == "udp")
    )


def crop_boxes(
    images: Sequence[np.ndarray], frame_index: np.ndarray, centers: np.ndarray, scales: np.ndarray, card: ModelCard
) -> np.ndarray:
    """Warp each box of its BGR frame to the card's input size and normalise -> (n,3,H,W) fp32.

    Warping is per channel, so the BGR frame is warped as is and only the small crops are put into the card's
    colour order (cheaper than converting whole frames, and no full-frame copy per model)."""
    w, h = card.input_size
    out = np.empty((len(centers), h, w, 3), dtype=np.uint8)
    for j in range(len(centers)):
        m = warp_matrix(centers[j], scales[j], card)
        out[j] = cv2.warpAffine(images[frame_index[j]], m, (w, h), flags=cv2.INTER_LINEAR)
    if card.color_order == "rgb":
        out = out[..., ::-1]
    return normalize(out, card)


def _xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4))
    if b.ndim != 2 or b.shape[1] < 4:
        raise DynPoseError(f"dispatcher: boxes must be (M,4) or (M,5) x,y,w,h[,score], got shape {b.shape}")
    return b[:, :4]


class Dispatcher:
    """Router + policy + small and large runners, each pose model on its own worker thread.

    The dispatcher owns its worker threads (closed by `close()`), not the runners: whoever loaded them closes them.
    Calls are thread-safe: concurrent calls queue on the per-model workers and never share mutable state.
    """

    def __init__(
        self,
        small: Runner,
        large: Runner,
        small_card: ModelCard,
        large_card: ModelCard,
        router: Runner | None = None,
        router_card: ModelCard | None = None,
        policy: str | Policy = "band:0.59,0.69",
        flip: bool = False,
    ) -> None:
        self.policy = parse_policy(policy)
        if self.policy.needs_router and (router is None or router_card is None):
            raise DynPoseError(
                f"routing policy {self.policy} needs the router, but none was loaded; export a router into the engine "
                "dir or use a router-free policy (all-small, all-large, box:AREA)"
            )
        if small_card.keypoints != large_card.keypoints:
            raise DynPoseError(
                f"small model {small_card.name!r} predicts {small_card.keypoints} but large model {large_card.name!r} "
                f"predicts {large_card.keypoints}; both must use the same keypoint set"
            )
        self.runners = {"small": small, "large": large}
        self.cards = {"small": small_card, "large": large_card}
        self.router, self.router_card = router, router_card
        self.flip = flip
        self.flip_index = large_card.keypoint_set.flip_index()
        self.reuse_router_crop = router_card is not None and same_crop(router_card, large_card)
        self._workers = {m: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dynpose-{m}") for m in MODELS}
        self._closed = False

    @property
    def keypoint_set(self) -> str:
        return self.cards["large"].keypoints

    # -- one call --------------------------------------------------------------------------------------------------
    def __call__(self, image_bgr: np.ndarray, boxes_xywh: np.ndarray) -> DispatchResult:
        """One frame's boxes (M,>=4) x,y,w,h."""
        return self.run([image_bgr], [boxes_xywh])

    def run(self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> DispatchResult:
        """Boxes of several frames (`boxes[i]` (M_i,>=4) x,y,w,h belong to `images[i]`, uint8 BGR), dispatched as one
        batch; the routing policy sees all of them together."""
        if self._closed:
            raise DynPoseError("dispatcher is closed")
        if len(images) != len(boxes):
            raise DynPoseError(f"dispatcher: {len(images)} images but {len(boxes)} box arrays")
        for i, im in enumerate(images):
            if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                what = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
                raise DynPoseError(f"dispatcher: image {i} must be an H x W x 3 uint8 BGR array, got {what}")
        parts = [_xywh(b) for b in boxes]
        frame_index = np.repeat(np.arange(len(parts), dtype=np.int64), [len(b) for b in parts])
        all_boxes = np.concatenate(parts) if parts else np.zeros((0, 4))
        n = len(all_boxes)
        k = self.cards["large"].keypoint_set.num
        res = DispatchResult(
            keypoints=np.zeros((n, k, 3), dtype=np.float32),
            large=np.zeros(n, dtype=bool),
            router_scores=np.full(n, np.nan, dtype=np.float32),
            centers=np.zeros((n, 2)),
            scales=np.zeros((n, 2)),
            frame_index=frame_index,
        )
        if n == 0:
            return res

        geometry = {m: box_to_center_scale(all_boxes, c.aspect_ratio, c.padding) for m, c in self.cards.items()}
        router_crops = None
        scores = None
        if self.policy.needs_router:
            assert self.router is not None and self.router_card is not None
            rc, rs = (
                geometry["large"]
                if self.reuse_router_crop
                else box_to_center_scale(all_boxes, self.router_card.aspect_ratio, self.router_card.padding)
            )
            router_crops = crop_boxes(images, frame_index, rc, rs, self.router_card)
            t0 = time.perf_counter()
            scores = self.router.infer(router_crops)
            res.spans.append(WorkerSpan("router", t0, time.perf_counter(), n))
            res.router_scores[:] = scores[:, 1]
        decision = self.policy.decide(scores, all_boxes)
        res.large[:] = decision.large
        res.nan_scores = decision.nan

        # Large first when its crops are free (reused from the router), otherwise small first: the first model
        # submitted runs while the second one's crops are made.
        order = ("large", "small") if self.reuse_router_crop and router_crops is not None else ("small", "large")
        futures: dict[str, tuple[np.ndarray, Future]] = {}
        for m in order:
            idx = np.flatnonzero(res.large if m == "large" else ~res.large)
            if idx.size == 0:
                continue
            centers, scales = geometry[m][0][idx], geometry[m][1][idx]
            res.centers[idx], res.scales[idx] = centers, scales
            if m == "large" and self.reuse_router_crop and router_crops is not None:
                batch = router_crops[idx]
            else:
                batch = crop_boxes(images, frame_index[idx], centers, scales, self.cards[m])
            futures[m] = (idx, self._workers[m].submit(self._work, m, batch, centers, scales))
        for idx, fut in futures.values():
            kps, span = fut.result()
            res.keypoints[idx] = kps
            res.spans.append(span)
        return res

    def _work(self, model: str, batch: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, WorkerSpan]:
        """Runs on the model's worker thread: infer (and the mirrored batch), then decode to image pixels."""
        t0 = time.perf_counter()
        runner, card = self.runners[model], self.cards[model]
        n = len(batch)
        if self.flip:
            # One call for both passes: a GPU gets one bigger batch, and the runner splits it if over max_batch.
            out = runner.infer(np.concatenate([batch, batch[..., ::-1]]))
            heatmaps = average_flip(out[:n], out[n:], self.flip_index, shift=card.decoder != "udp")
        else:
            heatmaps = runner.infer(batch)
        kps = decode_heatmaps(heatmaps, centers, scales, card)
        return np.asarray(kps, dtype=np.float32), WorkerSpan(model, t0, time.perf_counter(), n)

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
