"""The Pipeline: image -> person boxes -> routed pose models -> rescored, OKS-NMSed persons.

    with Pipeline.from_engine_dir("engines/") as pipe:
        persons = pipe(image_bgr)                      # boxes from the detector
        persons = pipe(image_bgr, boxes=dets_xywhs)    # or from a detections file (M,5) / GT boxes (M,4)

A crop's path, one plain function each: `clean_boxes` (drop unusable boxes) -> `Dispatcher.run` (centre/scale,
crop, route, run, decode) -> `rescore` -> `oks_nms` -> `PersonPose`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.dispatcher import Dispatcher, DispatchResult
from dynpose.runtime.engine_set import EngineSet
from dynpose.runtime.policy import log_route_costs, parse_policy

# Boxes may reach past the image (the crop pads), but not by more than this many image sizes.
MAX_BOX_FACTOR = 4.0
# Official HRNet / MMPose evaluation settings.
RESCORE_THR = 0.2
OKS_NMS_THR = 0.9


@dataclass
class PersonPose:
    """One person: box x,y,w,h and keypoints (K,3) x,y,score in image pixels, the instance score, the model used."""

    box: np.ndarray
    score: float
    keypoints: np.ndarray
    model: str  # "small" | "large"
    router_score: float = float("nan")  # router score[1]; NaN when the policy ran no router

    def to_coco(self, image_id: int, category_id: int = 1) -> dict[str, Any]:
        """A COCO keypoint result record (a non-finite score, from a broken engine, is written as 0)."""
        kp = np.nan_to_num(self.keypoints.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        return {
            "image_id": int(image_id),
            "category_id": category_id,
            "keypoints": [round(float(v), 3) for v in kp.reshape(-1)],
            "score": float(self.score) if np.isfinite(self.score) else 0.0,
        }

    def to_dict(self, exact: bool = False) -> dict[str, Any]:
        """A JSON-ready record; non-finite numbers become null (JSON has no NaN). Numbers are rounded (0.01 px)
        unless `exact`, which keeps every digit (the service answers so, equal to in-process results)."""
        d = None if exact else 2
        return {
            "box": [_finite(v, d) for v in self.box],
            "score": _finite(self.score, None if exact else 5),
            "keypoints": [[_finite(x, d), _finite(y, d), _finite(s, None if exact else 4)] for x, y, s in self.keypoints],
            "model": self.model,
            "router_score": _finite(self.router_score, None if exact else 5),
        }


def _finite(v: Any, digits: int | None) -> float | None:
    f = float(v)
    if not np.isfinite(f):
        return None
    return f if digits is None else round(f, digits)


@dataclass
class RunStats:
    """Totals over a Pipeline's life (updated under a lock; read them when calls are done)."""

    frames: int = 0
    persons: int = 0
    crops: dict[str, int] = field(default_factory=lambda: {"small": 0, "large": 0})
    dropped_boxes: int = 0
    nan_router_scores: int = 0
    dispatches: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "persons": self.persons,
            "crops": dict(self.crops),
            "dropped_boxes": self.dropped_boxes,
            "nan_router_scores": self.nan_router_scores,
            "dispatches": self.dispatches,
            "seconds": round(self.seconds, 3),
        }


def clean_boxes(boxes: np.ndarray | None, image_shape: Sequence[int]) -> tuple[np.ndarray, int]:
    """(M,4|5) x,y,w,h[,score] -> (M',5) usable boxes (score 1 where none was given) and the number dropped.

    Dropped: non-finite coordinates or NaN scores, zero or negative width/height, boxes entirely outside the image,
    and boxes reaching more than `MAX_BOX_FACTOR` image sizes beyond it (1e15-pixel boxes would decode to
    keypoints no float32 holds); boxes partly outside are kept (the crop pads with black, as the official code
    does)."""
    b = _as_boxes(boxes)
    ok = _usable(b, image_shape)
    return b[ok], int((~ok).sum())


def _as_boxes(boxes: np.ndarray | None) -> np.ndarray:
    """(M,4|5) or one box -> (M,5) float64 with score 1 where none was given."""
    if boxes is None:
        return np.zeros((0, 5))
    try:
        b = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise DynPoseError(
            "boxes must be numbers in an (M,4) or (M,5) array of x,y,w,h[,score] (every row the same length)"
        ) from None
    if b.size == 0:
        return np.zeros((0, 5))
    if b.ndim == 1 and b.shape[0] in (4, 5):
        b = b[None]
    if b.ndim != 2 or b.shape[1] not in (4, 5):
        raise DynPoseError(f"boxes must be an (M,4) or (M,5) array of x,y,w,h[,score], got shape {b.shape}")
    if b.shape[1] == 4:
        b = np.concatenate([b, np.ones((len(b), 1))], axis=1)
    return b


def _usable(b: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    h_img, w_img = image_shape[:2]
    x, y, w, h = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    lim_w, lim_h = MAX_BOX_FACTOR * w_img, MAX_BOX_FACTOR * h_img
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.isfinite(b).all(axis=1) & (w > 0) & (h > 0)
        ok &= (x + w > 0) & (y + h > 0) & (x < w_img) & (y < h_img)
        ok &= (x > -lim_w) & (y > -lim_h) & (x + w < w_img + lim_w) & (y + h < h_img + lim_h)
    return ok


def prepare_boxes(
    boxes: np.ndarray | None, image_shape: Sequence[int], from_detector: bool, nms: bool | None = None
) -> tuple[np.ndarray, bool, int]:
    """A frame's boxes as the Pipeline takes them -> (usable (M',5) boxes, whether OKS-NMS runs, boxes dropped).

    OKS-NMS runs when the boxes are detections (from the detector, or given with a score column) unless `nms`
    says otherwise. The service's ingress calls this too, so a request decides exactly as `Pipeline` does."""
    kept, dropped = clean_boxes(boxes, image_shape)  # first: it refuses strings and ragged rows in one line
    has_scores = boxes is not None and np.ndim(boxes) == 2 and np.shape(boxes)[1] == 5
    use_nms = (from_detector or has_scores) if nms is None else nms
    return kept, use_nms, dropped


def persons_from_dispatch(
    res: DispatchResult, boxes: Sequence[np.ndarray], nms: Sequence[bool], sigmas: Sequence[float]
) -> list[list[PersonPose]]:
    """A dispatch result -> each frame's persons: rescoring, then OKS-NMS where `nms[i]`.

    boxes: each frame's (M_i,5) x,y,w,h,score boxes, as dispatched (frames concatenated in `res`). Shared by
    `Pipeline` and the service's ingress, which fills a `DispatchResult` from its remote pose models."""
    from dynpose.runtime.postprocess import oks_nms, rescore

    names = res.model_names
    out: list[list[PersonPose]] = []
    for b, use_nms, sl in zip(boxes, nms, res.frame_slices(len(boxes)), strict=True):
        kps = res.keypoints[sl]
        scores = rescore(kps, b[:, 4], thr=RESCORE_THR) if len(kps) else np.zeros(0)
        # official HRNet: the NMS area is the padded, aspect-corrected box (scale w * h)
        areas = np.prod(res.scales[sl], axis=1)
        keep = oks_nms(kps, scores, areas, thr=OKS_NMS_THR, sigmas=sigmas) if use_nms else range(len(kps))
        out.append(
            [
                PersonPose(
                    box=b[i, :4].copy(),
                    score=float(scores[i]),
                    keypoints=kps[i].copy(),
                    model=names[sl.start + i],
                    router_score=float(res.router_scores[sl.start + i]),
                )
                for i in keep
            ]
        )
    return out


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise DynPoseError(f"image must be a numpy array (H,W,3) uint8 BGR, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise DynPoseError(f"image must be (H,W,3) BGR, got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        raise DynPoseError(f"image must be uint8 BGR (as cv2.imread gives), got {image.dtype}")
    return np.ascontiguousarray(image)


@dataclass
class _Prepared:
    image: np.ndarray
    boxes: np.ndarray  # (M,5)
    nms: bool
    dropped: int
    decisions: np.ndarray | None = None  # (M,) forced routing of the kept boxes (see `Dispatcher.run`)


class Pipeline:
    """Detector (optional) + Dispatcher + rescoring and OKS-NMS. Thread-safe; close it (or use `with`).

    Build one with `Pipeline.from_engine_dir(...)` (it then owns the opened `EngineSet`), or from models you opened:
    `Pipeline(Dispatcher(small, large, router, policy), detector=...)` (you close the models)."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        detector: Any = None,
        max_batch: int = 64,
        engines: EngineSet | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.detector = detector
        self.max_batch = max_batch
        self.keypoint_set = dispatcher.models["large"].card.keypoint_set
        self.engines = engines
        self.info = info or {}
        self.stats = RunStats()
        self._lock = threading.Lock()
        self._closed = False

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_engine_set(
        cls, engines: EngineSet, route: str | None = None, flip: bool = False, max_batch: int = 64, own: bool = False
    ) -> Pipeline:
        """A pipeline over opened models. route: a policy string (`band:LO,HI`, `threshold:T`, `fraction:F`,
        `all-small`, `all-large`, `box:AREA`); None takes the manifest's. own: close `engines` with the pipeline."""
        policy = parse_policy(route if route is not None else engines.manifest.route)
        if policy.needs_router and engines.router is None:
            raise DynPoseError(
                f"engine dir {engines.engine_dir}: routing policy {policy} needs a router but the manifest has none; "
                "export one (`dynpose-export --role router`) or pick --route all-large / all-small / box:AREA"
            )
        small, large = engines.pose_models
        # one line on whether this route can pay, from the costs `dynpose-bench --store-costs` measured (if any)
        log_route_costs(engines.manifest, policy, engines.backend, engines.device, where=f"engine dir {engines.engine_dir}")
        dispatcher = Dispatcher(
            small, large, router=engines.router if policy.needs_router else None, policy=policy, flip=flip
        )
        info = {
            "engine_dir": str(engines.engine_dir),
            "backend": engines.backend,
            "device": engines.device,
            "route": str(policy),
            "flip": flip,
            "models": dict(engines.loaded),
        }
        return cls(dispatcher, detector=engines.detector, max_batch=max_batch, engines=engines if own else None, info=info)

    @classmethod
    def from_engine_dir(
        cls,
        engine_dir: str | os.PathLike,
        route: str | None = None,
        flip: bool = False,
        max_batch: int = 64,
        **load: Any,
    ) -> Pipeline:
        """Load the router, small and large models (and detector) of an engine dir, verified against its manifest.

        route: the routing policy (None: the manifest's); the router is only opened when the policy reads it.
        load: `EngineSet.load` options: backend ("ort" | "tensorrt" | "torch"), device ("cpu" | "cuda"), threads
        (CPU cores to use, default all), detector (an ONNX detector file; default: the manifest's detector entry,
        else boxes must be passed to each call), det_score, det_iou."""
        from dynpose.engines.manifest import Manifest

        if engine_dir is None:
            raise DynPoseError("engine dir: none given; pass the folder dynpose-export wrote (e.g. engines/)")
        policy = parse_policy(route if route is not None else Manifest.load(engine_dir, verify=False).route)
        roles = ["small", "large"] + (["router"] if policy.needs_router else [])
        engines = EngineSet.load(engine_dir, roles=roles, **load)
        try:
            return cls.from_engine_set(engines, route=str(policy), flip=flip, max_batch=max_batch, own=True)
        except BaseException:
            engines.close()
            raise

    # -- calls -----------------------------------------------------------------------------------------------------
    def __call__(self, image_bgr: np.ndarray, boxes: np.ndarray | None = None, nms: bool | None = None) -> list[PersonPose]:
        """Persons in one BGR image. boxes: (M,4|5) x,y,w,h[,score]; None runs the detector. OKS-NMS runs when the
        boxes are detections (from the detector, or given with a score column) unless `nms` says otherwise."""
        return self.run_batch([image_bgr], [boxes], nms=nms)[0]

    def run_batch(
        self,
        images: Sequence[np.ndarray],
        boxes: Sequence[np.ndarray | None] | None = None,
        nms: bool | None = None,
        decisions: Sequence[np.ndarray | None] | None = None,
    ) -> list[list[PersonPose]]:
        """Several frames dispatched together (one router batch and one sub-batch per model).

        decisions: optional forced routing per frame, one int per given box (0 small, 1 large, -1 route normally;
        None: route them all), as `Dispatcher.run` takes it; only for frames whose boxes are given."""
        if boxes is None:
            boxes = [None] * len(images)
        if len(boxes) != len(images):
            raise DynPoseError(f"run_batch: {len(images)} images but {len(boxes)} box arrays")
        if decisions is not None and len(decisions) != len(images):
            raise DynPoseError(f"run_batch: {len(images)} images but {len(decisions)} decision arrays")
        forced = decisions if decisions is not None else [None] * len(images)
        prepared = [self._prepare(im, b, nms, d) for im, b, d in zip(images, boxes, forced, strict=True)]
        return self._dispatch(prepared)

    def run_many(
        self,
        frames: Iterable[tuple[Any, np.ndarray, np.ndarray | None]],
        max_batch: int | None = None,
        max_latency_ms: float | None = None,
        nms: bool | None = None,
    ) -> Iterator[tuple[Any, list[PersonPose]]]:
        """Micro-batching for video and folders: `frames` yields (tag, image, boxes-or-None); frames are collected
        until they hold `max_batch` crops or the oldest has waited `max_latency_ms`, then dispatched together.
        Yields (tag, persons) in input order. The wait is checked as each frame arrives (a pull-based source);
        0 dispatches every frame on its own, None means no time cap."""
        limit = self.max_batch if max_batch is None else max_batch
        if limit < 1:
            raise DynPoseError(f"max_batch must be >= 1, got {limit}")
        pending: list[tuple[Any, _Prepared]] = []
        crops = 0
        t_first = 0.0
        for tag, image, boxes in frames:
            p = self._prepare(image, boxes, nms)
            if not pending:
                t_first = time.perf_counter()
            pending.append((tag, p))
            crops += len(p.boxes)
            waited_ms = (time.perf_counter() - t_first) * 1e3
            if crops >= limit or (max_latency_ms is not None and waited_ms >= max_latency_ms):
                yield from zip([t for t, _ in pending], self._dispatch([q for _, q in pending]), strict=True)
                pending, crops = [], 0
        if pending:
            yield from zip([t for t, _ in pending], self._dispatch([q for _, q in pending]), strict=True)

    # -- internals -------------------------------------------------------------------------------------------------
    def _prepare(
        self, image: np.ndarray, boxes: np.ndarray | None, nms: bool | None, decisions: np.ndarray | None = None
    ) -> _Prepared:
        if self._closed:
            raise DynPoseError("pipeline is closed")
        image = _check_image(image)
        from_detector = boxes is None
        if from_detector:
            if self.detector is None:
                raise DynPoseError(
                    "no boxes given and no detector loaded; pass boxes, a detections file (--detections) or a "
                    "detector (--detector FILE.onnx)"
                )
            boxes = self.detector(image)
        kept, use_nms, dropped = prepare_boxes(boxes, image.shape, from_detector, nms)
        forced = None
        if decisions is not None:
            if from_detector:
                raise DynPoseError("run_batch: decisions need the frame's boxes (they name one decision per box)")
            forced = np.asarray(decisions).reshape(-1)
            given = _as_boxes(boxes)
            if len(forced) != len(given):
                raise DynPoseError(f"run_batch: {len(forced)} decisions for {len(given)} boxes")
            forced = forced[_usable(given, image.shape)]
        return _Prepared(image, kept, use_nms, dropped, forced)

    def _dispatch(self, prepared: list[_Prepared]) -> list[list[PersonPose]]:
        t0 = time.perf_counter()
        forced = [p.decisions for p in prepared] if any(p.decisions is not None for p in prepared) else None
        res: DispatchResult = self.dispatcher.run(
            [p.image for p in prepared], [p.boxes[:, :4] for p in prepared], decisions=forced
        )
        out = persons_from_dispatch(res, [p.boxes for p in prepared], [p.nms for p in prepared], self.keypoint_set.sigmas)
        persons = sum(len(frame) for frame in out)
        with self._lock:
            st = self.stats
            st.frames += len(prepared)
            st.persons += persons
            for m, c in res.counts.items():
                st.crops[m] += c
            st.dropped_boxes += sum(p.dropped for p in prepared)
            st.nan_router_scores += res.nan_scores
            st.dispatches += 1
            st.seconds += time.perf_counter() - t0
        return out

    # -- lifetime --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.dispatcher.close()
        if self.engines is not None:
            self.engines.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
