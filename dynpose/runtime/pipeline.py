"""The Pipeline: image -> person boxes -> planned, routed pose models -> rescored, OKS-NMSed persons.

    with Pipeline.from_engine_dir("engines/") as pipe:
        persons = pipe(image_bgr)                      # boxes from the detector
        persons = pipe(image_bgr, boxes=dets_xywhs)    # or from a detections file (M,5) / GT boxes (M,4)

A crop's path, one plain function each: `Boxes.of` (the usable boxes) -> `plan.make_plan` (centre/scale per model,
the stages the policy needs) -> `execute.execute` (crop, infer, decode on a worker per model) -> `persons_of`
(`rescore` -> `oks_nms` -> `Person`). The service's ingress runs the same plan on remote models and calls the
same `persons_of`.

`audit=F` (or `audit.AuditOptions`) re-runs a random share F of the small model's answers on the large model,
off the hot path, and keeps the live agreement in `pipe.auditor` (`dynpose/runtime/audit.py`); with a target, the
auditor replaces `pipe.policy` (the next plan uses the new one) when the agreement falls short.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.roles import Role
from dynpose.runtime.audit import AuditOptions, Auditor, with_calibration
from dynpose.runtime.boxes import Boxes
from dynpose.runtime.engine_set import EngineSet, LoadOptions
from dynpose.runtime.execute import LocalExecutor, execute_many
from dynpose.runtime.model import CropModel
from dynpose.runtime.person import Decision, Person
from dynpose.runtime.plan import LARGE, AuditSample, FrameInput, PlanResult, make_plan
from dynpose.runtime.policy import Policy, parse_policy
from dynpose.runtime.postprocess import oks_nms, rescore

# Official HRNet / MMPose evaluation settings.
RESCORE_THR = 0.2
OKS_NMS_THR = 0.9


@dataclass
class RunStats:
    """Totals over a Pipeline's life (updated under a lock; read them when calls are done)."""

    frames: int = 0
    persons: int = 0
    crops: dict[Role, int] = field(default_factory=lambda: dict.fromkeys((Role.ROUTER, Role.SMALL, Role.LARGE), 0))
    answered: dict[Role, int] = field(default_factory=lambda: dict.fromkeys((Role.SMALL, Role.LARGE), 0))
    escalated: int = 0  # persons the cascade ran again on the large model
    audit_crops: int = 0  # large-model crops spent on the live audit (not in `crops`: no answer comes from them)
    dropped_boxes: int = 0
    nan_signals: int = 0
    batches: int = 0
    seconds: float = 0.0

    def add(self, result: PlanResult, dropped: int, persons: int, seconds: float) -> None:
        self.frames += len(result.frames)
        self.persons += persons
        for role, n in result.crops.items():
            self.crops[role] += n
        large = int((result.model == LARGE).sum())
        self.answered[Role.LARGE] += large
        self.answered[Role.SMALL] += len(result.model) - large
        self.escalated += sum(d is Decision.ESCALATED for d in result.decision)
        self.dropped_boxes += dropped
        self.nan_signals += result.nan_signals
        self.batches += 1
        self.seconds += seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "persons": self.persons,
            "crops": {r.value: n for r, n in self.crops.items()},
            "answered": {r.value: n for r, n in self.answered.items()},
            "escalated": self.escalated,
            "audit_crops": self.audit_crops,
            "dropped_boxes": self.dropped_boxes,
            "nan_signals": self.nan_signals,
            "batches": self.batches,
            "seconds": round(self.seconds, 3),
        }


def check_image(image: Any) -> np.ndarray:
    """An image as the runtime takes it: (H,W,3) uint8 BGR (grey and BGRA are converted); else a one-line error."""
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


def persons_of(result: PlanResult, sigmas: Sequence[float]) -> list[list[Person]]:
    """A plan's answer -> each frame's persons: rescoring, then OKS-NMS where the frame asks for it (detections)."""
    out: list[list[Person]] = []
    for frame, sl in zip(result.frames, result.frame_slices(), strict=True):
        kps = result.keypoints[sl]
        boxes = frame.boxes
        scores = rescore(kps, boxes.scores, thr=RESCORE_THR) if len(kps) else np.zeros(0)
        # official HRNet: the NMS area is the padded, aspect-corrected box (scale w * h)
        areas = np.prod(result.scales[sl], axis=1)
        keep = oks_nms(kps, scores, areas, thr=OKS_NMS_THR, sigmas=sigmas) if frame.use_nms else range(len(kps))
        out.append([_person(result, sl.start + i, frame, i, float(scores[i])) for i in keep])
    return out


def _person(result: PlanResult, j: int, frame: FrameInput, i: int, score: float) -> Person:
    return Person(
        index=int(frame.boxes.rows[i]),
        box=frame.boxes.xywh[i].copy(),
        score=score,
        keypoints=result.keypoints[j].copy(),
        model=result.role(j),
        decision=result.decision[j],
        box_score=float(frame.boxes.scores[i]),
        router_score=float(result.router_scores[j]),
        confidence=float(result.confidence[j]),
    )


class Pipeline:
    """Detector (optional) + planner + a worker per model + rescoring and OKS-NMS. Thread-safe; close it (or use
    `with`).

    Build one with `Pipeline.from_engine_dir(...)` (it then owns the opened `EngineSet`), or from models you opened:
    `Pipeline({Role.SMALL: small, Role.LARGE: large, Role.ROUTER: router}, "band:0.59,0.69")` (you close them)."""

    def __init__(
        self,
        models: Mapping[Role, CropModel],
        policy: str | Policy,
        detector: Any = None,
        flip: bool = False,
        audit: float | AuditOptions | None = None,
        engines: EngineSet | None = None,
    ) -> None:
        self.policy = parse_policy(policy)
        self.cards: dict[Role, ModelCard] = {r: m.card for r, m in models.items()}
        make_plan([], self.policy, self.cards)  # a missing router or mismatched keypoints fail here, once
        self.detector = detector
        self.keypoint_set = self.cards[Role.LARGE].keypoint_set
        self.engines = engines
        self.info: dict[str, Any] = {"route": str(self.policy), "flip": flip}
        self.stats = RunStats()
        self._lock = threading.Lock()
        opts = AuditOptions.of(audit)
        self.auditor = (
            None
            if opts is None
            else Auditor(opts, self.keypoint_set.sigmas, self.policy, on_move=self._set_policy, on_sample=self._audited)
        )
        self._executor = LocalExecutor(models, flip)
        self._closed = False

    def _set_policy(self, policy: Policy) -> None:
        """The audit's steering: plans made from now on use `policy` (one attribute swap: a plan reads it once)."""
        self.policy = policy
        self.info["route"] = str(policy)

    def _audited(self, sample: AuditSample) -> None:
        with self._lock:
            self.stats.audit_crops += len(sample.large)

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_engine_set(
        cls,
        engines: EngineSet,
        route: str | Policy | None = None,
        flip: bool = False,
        own: bool = False,
        audit: float | AuditOptions | None = None,
    ) -> Pipeline:
        """A pipeline over opened models. route: a policy (`band:LO,HI`, `threshold:T`, `fraction:F`, `all-small`,
        `all-large`, `box:AREA`, `cascade:T`, ...); None takes the manifest's. own: close `engines` with it. audit:
        the live audit (a share, or `AuditOptions`; the manifest's calibrated agreement is what drift is judged by)."""
        policy = parse_policy(route if route is not None else engines.manifest.route)
        if policy.needs_router and engines.router is None:
            raise DynPoseError(
                f"engine dir {engines.engine_dir}: routing policy {policy} needs a router but the manifest has none; "
                "export one (`dynpose-export --model router`) or pick --route all-large / all-small / box:AREA / cascade:T"
            )
        small, large = engines.pose_models
        models: dict[Role, CropModel] = {Role.SMALL: small, Role.LARGE: large}
        if policy.needs_router and engines.router is not None:
            models[Role.ROUTER] = engines.router
        opts = AuditOptions.of(audit)
        if opts is not None:
            opts = with_calibration(opts, engines.manifest.calibration)
        pipe = cls(models, policy, engines.detector, flip, opts, engines if own else None)
        pipe.info.update(
            engine_dir=str(engines.engine_dir),
            backend=engines.backend,
            device=engines.device,
            models={r.value: what for r, what in engines.loaded.items()},
        )
        return pipe

    @classmethod
    def from_engine_dir(
        cls,
        engine_dir: str | os.PathLike,
        route: str | Policy | None = None,
        flip: bool = False,
        audit: float | AuditOptions | None = None,
        **load: Any,
    ) -> Pipeline:
        """Load the small and large models (the router when the policy reads it, and the detector) of an engine dir,
        verified against its manifest, which is read once.

        route: the routing policy (None: the manifest's). audit: a share of the small model's answers re-run on the
        large model (or `AuditOptions`; see `dynpose/runtime/audit.py`). load: `LoadOptions` fields: backend ("ort" |
        "openvino" | "tensorrt" | "torch"), device ("cpu" | "cuda"), threads (CPU cores to use, default all),
        detector (an ONNX detector file; default: the manifest's detector entry, else boxes must be passed to each
        call), det_score, det_iou."""
        from dynpose.engines.manifest import Manifest

        if engine_dir is None or str(engine_dir) == "":
            raise DynPoseError("engine dir: none given; pass the folder dynpose-export wrote (e.g. engines/)")
        manifest = Manifest.load(engine_dir, verify=True)
        policy = parse_policy(route if route is not None else manifest.route)
        roles = [Role.SMALL, Role.LARGE] + ([Role.ROUTER] if policy.needs_router else [])
        engines = EngineSet.open(manifest, LoadOptions(**load), roles=roles)
        try:
            return cls.from_engine_set(engines, route=policy, flip=flip, own=True, audit=audit)
        except BaseException:
            engines.close()
            raise

    # -- calls -----------------------------------------------------------------------------------------------------
    def __call__(self, image_bgr: np.ndarray, boxes: Any = None, nms: bool | None = None) -> list[Person]:
        """Persons in one BGR image. boxes: (M,4|5) x,y,w,h[,score] or `Boxes`; None runs the detector. OKS-NMS runs
        when the boxes are detections (from the detector, or given with a score column) unless `nms` says no."""
        return self.run_batch([image_bgr], [boxes], nms=nms)[0]

    def run_batch(
        self,
        images: Sequence[np.ndarray],
        boxes: Sequence[Any] | None = None,
        nms: bool | None = None,
        keep: Sequence[Sequence[Role | None] | None] | None = None,
    ) -> list[list[Person]]:
        """Several frames planned together (one router batch, one batch per pose model).

        keep: per frame, a kept decision per given box (Role.SMALL / Role.LARGE to skip routing it, None to route
        it), as a video tracker keeps a person's decision; only for frames whose boxes are given."""
        n = len(images)
        boxes = [None] * n if boxes is None else boxes
        keep = [None] * n if keep is None else keep
        if len(boxes) != n or len(keep) != n:
            raise DynPoseError(f"run_batch: {n} images but {len(boxes)} box arrays and {len(keep)} kept-decision lists")
        frames = [self.prepare(im, b, nms, k) for im, b, k in zip(images, boxes, keep, strict=True)]
        return next(self.run_frames([frames]))

    def prepare(
        self, image: Any, boxes: Any = None, nms: bool | None = None, keep: Sequence[Role | None] | None = None
    ) -> FrameInput:
        """One frame as a plan takes it: the checked image, its usable boxes (the detector's when none are given),
        the kept decisions of the usable boxes, whether OKS-NMS runs."""
        if self._closed:
            raise DynPoseError("pipeline is closed")
        image = check_image(image)
        if boxes is None:
            if self.detector is None:
                raise DynPoseError(
                    "no boxes given and no detector loaded; pass boxes, a detections file (--detections) or a "
                    "detector (--detector FILE.onnx)"
                )
            if keep is not None:
                raise DynPoseError("run_batch: kept decisions need the frame's boxes (one decision per box)")
            boxes = self.detector(image)
        b = Boxes.of(boxes, image.shape)
        kept = None
        if keep is not None:  # aligned with the Boxes given, or with the rows of the array given
            given = len(b) if isinstance(boxes, Boxes) else len(b) + b.dropped
            if len(keep) != given:
                raise DynPoseError(f"run_batch: {len(keep)} kept decisions for {given} boxes")
            kept = tuple(keep) if isinstance(boxes, Boxes) else tuple(keep[int(r)] for r in b.rows)
        return FrameInput(image, b, kept, nms)

    def run_frames(self, batches: Iterable[Sequence[FrameInput]], depth: int | None = None) -> Iterator[list[list[Person]]]:
        """Each batch of prepared frames -> its frames' persons, in order. Up to `depth` batches are in flight
        (default: 2 for the cascade, whose small model can run the next batch while the large one escalates; 1
        otherwise, where the models of one batch already run at once)."""
        depth = depth or (2 if self.policy.cascades else 1)
        started: list[float] = []

        def plans() -> Iterator[Any]:
            for frames in batches:
                started.append(time.perf_counter())
                yield make_plan(frames, self.policy, self.cards)

        audit = self.auditor.sampler if self.auditor is not None else None
        for result in execute_many(plans(), self._executor, depth, audit):
            out = persons_of(result, self.keypoint_set.sigmas)
            with self._lock:
                dropped = sum(f.boxes.dropped for f in result.frames)
                self.stats.add(result, dropped, sum(len(p) for p in out), time.perf_counter() - started.pop(0))
            yield out

    # -- lifetime --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.close()
        if self.engines is not None:
            self.engines.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
