"""The planner: one batch of persons, from frames and boxes to the crops each model runs.

    plan = make_plan(frames, policy, cards)        # pure: no model runs here
    while work := plan.next_work():                # stage 1: the signals the policy reads (router | small model)
        plan.take(executor.run(plan, work))        # stage 2: what the decision leaves to run (escalations)
    result = plan.result()                         # per person: keypoints, the model that answered, why

Per person the plan holds its frame, box, centre/scale for each model's card (aspect ratio and padding), and what
the caller kept (a tracked person's earlier decision). The first stage is what the policy reads: nothing (a box or
fixed policy decides at once: every person goes straight to its model), router crops, or the small model on every
person (the cascade). The decision then leaves a second stage: the pose model each routed person still needs (the
large model for the cascade's escalations). A sampled audit (the large model on persons the policy kept on the
small one) rides along as work of its own that nobody waits for (`audit_work`).

The plan is data and knows no runtime: executors run its `Work` (local workers, `execute.LocalExecutor`; Ray Serve
deployments, `dynpose.serve.app`), cropping with `Plan.crop` — the one place person crops are cut for a plan —
and hand back `Done` results. `crop_boxes` is the same crop for boxes outside a plan (calibration crop sets, router
training data, cost timing), so every person crop in the package is cut here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.roles import POSE_ROLES, Role
from dynpose.runtime.boxes import Boxes
from dynpose.runtime.person import Decision
from dynpose.runtime.policy import Policy, Routing, Signals
from dynpose.runtime.preprocess import box_to_center_scale, crop

# Crops of the first stage are kept for a second-stage model that crops identically (the router's crops serve a
# large model with the same card) only up to this many persons, so a 10,000-box frame never holds them all.
KEEP_CROPS_MAX = 512
FREE, SMALL, LARGE = -1, 0, 1  # a person's model: undecided, small, large (int8 codes of the plan's arrays)
_CODE = {Role.SMALL: SMALL, Role.LARGE: LARGE}


class Purpose(Enum):
    """Why a model runs on some persons."""

    SIGNAL = "signal"  # router scores the policy reads
    POSE = "pose"  # keypoints: the answer, or the cascade's first pass
    AUDIT = "audit"  # the large model on persons the small one answered for, to measure agreement


@dataclass(frozen=True)
class Work:
    """One model on some persons of a plan (`idx`: rows of the plan)."""

    role: Role
    idx: np.ndarray
    purpose: Purpose = Purpose.POSE

    def chunks(self, size: int) -> Iterator[Work]:
        """The same work in pieces of at most `size` persons (a runner's max batch)."""
        for a in range(0, len(self.idx), max(1, size)):
            yield Work(self.role, self.idx[a : a + size], self.purpose)


@dataclass(frozen=True)
class Done:
    """A model's output for a `Work`: router scores (n,C) or keypoints (n,K,3) in image pixels; `span` is the
    runner's (start, end) perf_counter seconds (None where it ran elsewhere)."""

    work: Work
    out: np.ndarray
    span: tuple[float, float] | None = None


@dataclass(frozen=True)
class FrameInput:
    """One frame's part of a batch: the image, its validated boxes, and optionally a kept decision per box
    (`keep[i]`: Role.SMALL / Role.LARGE to skip routing for box i, None to route it)."""

    image: np.ndarray  # H x W x 3 uint8 BGR
    boxes: Boxes
    keep: tuple[Role | None, ...] | None = None
    nms: bool | None = None  # OKS-NMS over the answers; None: when the boxes are detections (they have scores)

    def __post_init__(self) -> None:
        im = self.image
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            what = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
            raise DynPoseError(f"plan: an image must be an H x W x 3 uint8 BGR array, got {what}")
        if self.keep is not None and len(self.keep) != len(self.boxes):
            raise DynPoseError(f"plan: {len(self.keep)} kept decisions for {len(self.boxes)} boxes")

    @property
    def use_nms(self) -> bool:
        return self.boxes.scored if self.nms is None else self.nms

    def keep_codes(self) -> np.ndarray:
        if self.keep is None:
            return np.full(len(self.boxes), FREE, dtype=np.int8)
        return np.array(
            [FREE if k is None else _CODE[Role.parse(k, "kept decision", allowed=POSE_ROLES)] for k in self.keep], np.int8
        )


@dataclass(frozen=True)
class AuditSample:
    """What an audit measured: both models' keypoints (n,K,3) for the same persons, their box areas and frames
    (rows of the plan's frames); and of the whole plan: its persons, how many the small model answered, and the
    policy that routed them (the audit's share of the small model's answers is of `answered_small`)."""

    small: np.ndarray
    large: np.ndarray
    areas: np.ndarray
    frame_index: np.ndarray | None = None  # (n,)
    persons: int = 0
    answered_small: int = 0
    policy: Policy | None = None


@dataclass
class PlanResult:
    """Every person of a plan (frames concatenated, boxes of a frame contiguous, in input order)."""

    frames: Sequence[FrameInput]
    frame_index: np.ndarray  # (N,)
    keypoints: np.ndarray  # (N,K,3) of the model that answered
    model: np.ndarray  # (N,) int8 SMALL | LARGE
    decision: list[Decision]
    router_scores: np.ndarray  # (N,) NaN where the router did not run
    confidence: np.ndarray  # (N,) the small model's confidence, NaN where it did not run first
    scales: np.ndarray  # (N,2) of the answering model's crop (its product is the official OKS-NMS area)
    crops: dict[Role, int]  # persons each model ran on (router included; audit excluded)
    nan_signals: int = 0
    spans: list[tuple[Role, float, float, int]] = field(default_factory=list)

    def frame_slices(self) -> list[slice]:
        bounds = np.searchsorted(self.frame_index, np.arange(len(self.frames) + 1))
        return [slice(int(bounds[i]), int(bounds[i + 1])) for i in range(len(self.frames))]

    def role(self, i: int) -> Role:
        return Role.LARGE if self.model[i] == LARGE else Role.SMALL


def _crop_key(card: ModelCard) -> tuple:
    """Two cards with the same key make identical crops (pixels and geometry) of a box."""
    return (card.input_size, card.color_order, card.padding, card.aspect_ratio, card.decoder == "udp")


def same_crop(a: ModelCard, b: ModelCard) -> bool:
    """Two cards cut identical uint8 crops of a box, so one crop serves both models (each normalises its own)."""
    return _crop_key(a) == _crop_key(b)


def _geometry_key(card: ModelCard) -> tuple[float, float]:
    return (card.aspect_ratio, card.padding)


def crop_boxes(
    images: Sequence[np.ndarray], frame_index: np.ndarray, boxes_xywh: np.ndarray, card: ModelCard
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes outside a plan -> (uint8 crops (n,H,W,3) in the card's colour order, centres (n,2), scales (n,2))."""
    c, s = box_to_center_scale(boxes_xywh, card.aspect_ratio, card.padding)
    return crop(images, frame_index, c, s, card), c, s


def crop_at(
    images: Sequence[np.ndarray], frame_index: np.ndarray, centers: np.ndarray, scales: np.ndarray, card: ModelCard
) -> np.ndarray:
    """Crops at given centres/scales (augmented or jittered geometry, e.g. INT8 calibration's jitter)."""
    return crop(images, frame_index, centers, scales, card)


def box_geometry(boxes_xywh: np.ndarray, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """Centres and scales (n,2) of boxes under a card's aspect ratio and padding."""
    return box_to_center_scale(boxes_xywh, card.aspect_ratio, card.padding)


class Plan:
    """The work of one batch of persons and its results as they come in (see the module doc)."""

    def __init__(self, frames: Sequence[FrameInput], policy: Policy, cards: Mapping[Role, ModelCard]) -> None:
        self.frames = list(frames)
        self.policy = policy
        self.cards = dict(cards)
        sizes = [len(f.boxes) for f in self.frames]
        self.frame_index = np.repeat(np.arange(len(self.frames), dtype=np.int64), sizes)
        self.boxes = np.concatenate([f.boxes.xywh for f in self.frames]) if self.frames else np.zeros((0, 4))
        self.keep = np.concatenate([f.keep_codes() for f in self.frames]) if self.frames else np.zeros(0, np.int8)
        n, k = len(self.boxes), self.cards[Role.LARGE].keypoint_set.num
        self.model = self.keep.copy()
        self.decision = [Decision.KEPT if c != FREE else Decision.POLICY for c in self.keep]
        self.router_scores = np.full(n, np.nan, dtype=np.float32)
        self.confidence = np.full(n, np.nan, dtype=np.float32)
        self.keypoints = {r: np.zeros((n, k, 3), dtype=np.float32) for r in (Role.SMALL, Role.LARGE)}
        self.crops = dict.fromkeys((Role.ROUTER, Role.SMALL, Role.LARGE), 0)
        self.nan_signals = 0
        self.spans: list[tuple[Role, float, float, int]] = []
        self._geometry: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}
        self._kept: dict[tuple, np.ndarray] = {}  # crop key -> (N,H,W,3) first-stage crops a later model reuses
        self._kept_has: dict[tuple, np.ndarray] = {}  # crop key -> (N,) which rows hold a crop
        self._lock = threading.Lock()
        self._stage = 0
        self._outstanding = 0

    def __len__(self) -> int:
        return len(self.boxes)

    # -- geometry and crops ------------------------------------------------------------------------------------------
    def geometry(self, role: Role, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centres and scales (n,2) of persons `idx` under `role`'s card."""
        key = _geometry_key(self.cards[role])
        with self._lock:
            if key not in self._geometry:
                self._geometry[key] = box_to_center_scale(self.boxes, *key)
            c, s = self._geometry[key]
        return c[idx], s[idx]

    def crop(self, work: Work) -> np.ndarray:
        """uint8 crops (n,H,W,3) of the work's persons for its model, in the card's colour order (a first-stage
        crop the model can use as it is is reused, not cut again)."""
        card = self.cards[work.role]
        key = _crop_key(card)
        kept = self._kept.get(key)
        if kept is not None and work.purpose is not Purpose.SIGNAL and self._kept_has[key][work.idx].all():
            return kept[work.idx]
        c, s = self.geometry(work.role, work.idx)
        u8 = crop([f.image for f in self.frames], self.frame_index[work.idx], c, s, card)
        if kept is not None and work.purpose is Purpose.SIGNAL:
            kept[work.idx] = u8  # rows of disjoint chunks: concurrent workers never write the same row
            self._kept_has[key][work.idx] = True
        return u8

    def _keep_crops_for_later(self, first: Role, n: int) -> None:
        """Keep the first stage's crops when a pose model crops the same way and the batch is not too big."""
        card = self.cards[first]
        later = [r for r in (Role.SMALL, Role.LARGE) if r != first and _crop_key(self.cards[r]) == _crop_key(card)]
        if later and 0 < n and len(self) <= KEEP_CROPS_MAX:
            w, h = card.input_size
            self._kept[_crop_key(card)] = np.zeros((len(self), h, w, 3), dtype=np.uint8)
            self._kept_has[_crop_key(card)] = np.zeros(len(self), dtype=bool)

    # -- stages ----------------------------------------------------------------------------------------------------
    def next_work(self) -> list[Work]:
        """The work of the next stage that has any ([] when the plan is complete); every earlier `Work` must be
        `take`n first."""
        if self._outstanding:
            raise DynPoseError(f"plan: {self._outstanding} person(s) of the last stage's work were not taken yet")
        while self._stage < 2:
            self._stage += 1
            stage = self._first_stage() if self._stage == 1 else self._second_stage()
            work = [w for w in stage if len(w.idx)]
            if work:
                self._outstanding = sum(len(w.idx) for w in work)
                return work
        return []

    def _first_stage(self) -> list[Work]:
        free = np.flatnonzero(self.keep == FREE)
        kept = self._pose_work(np.flatnonzero(self.keep != FREE))
        if not len(free):
            return kept
        if self.policy.needs_router:
            self._keep_crops_for_later(Role.ROUTER, len(free))
            return [Work(Role.ROUTER, free, Purpose.SIGNAL), *kept]
        if self.policy.cascades:
            first = np.union1d(free, np.flatnonzero(self.keep == SMALL))
            kept_large = np.flatnonzero(self.keep == LARGE)
            return [Work(Role.SMALL, first), Work(Role.LARGE, kept_large)]
        self._decide(free)  # a box or fixed policy: no signal to wait for
        return self._pose_work(np.arange(len(self)))

    def _second_stage(self) -> list[Work]:
        free = np.flatnonzero(self.keep == FREE)
        if not len(free) or not (self.policy.needs_router or self.policy.cascades):
            return []
        self._decide(free)
        if self.policy.cascades:
            return [Work(Role.LARGE, free[self.model[free] == LARGE])]
        return self._pose_work(free)

    def _pose_work(self, idx: np.ndarray) -> list[Work]:
        return [Work(Role.SMALL, idx[self.model[idx] == SMALL]), Work(Role.LARGE, idx[self.model[idx] == LARGE])]

    def _decide(self, free: np.ndarray) -> None:
        areas = self.boxes[free, 2] * self.boxes[free, 3]
        signals = Signals(
            areas,
            self.router_scores[free] if self.policy.needs_router else None,
            self.confidence[free] if self.policy.cascades else None,
        )
        routing: Routing = self.policy.decide(signals)
        self.model[free] = np.where(routing.large, LARGE, SMALL)
        self.nan_signals += routing.nan
        if self.policy.cascades:
            for i in free[routing.large]:
                self.decision[i] = Decision.ESCALATED

    def take(self, done: Sequence[Done]) -> None:
        """Results of this stage's work (any order, in as many pieces as the executor cut it into)."""
        for d in done:
            w = d.work
            if w.purpose is Purpose.AUDIT:
                raise DynPoseError("plan: audit results go to `audit_sample`, not `take`")
            if w.role is Role.ROUTER:
                self.router_scores[w.idx] = np.asarray(d.out, dtype=np.float32)[:, 1]
            else:
                self.keypoints[w.role][w.idx] = d.out
                if w.role is Role.SMALL and self.policy.cascades:
                    # the statistic is the policy's (mean score, visible-joint mean); a NaN keypoint score is a broken
                    # answer: its confidence is NaN, which escalates and is counted
                    self.confidence[w.idx] = self.policy.confidence(d.out)
            self.crops[w.role] += len(w.idx)
            if d.span is not None:
                self.spans.append((w.role, d.span[0], d.span[1], len(w.idx)))
            self._outstanding -= len(w.idx)
        if self._outstanding < 0:
            raise DynPoseError("plan: more results were taken than the stage's work asked for")

    # -- the answer --------------------------------------------------------------------------------------------------
    def result(self) -> PlanResult:
        """Every person's answer; the plan must be complete (`next_work()` returned [])."""
        if self._stage < 2 or self._outstanding:
            raise DynPoseError("plan: result() before every stage was run and taken")
        large = self.model == LARGE
        kps = np.where(large[:, None, None], self.keypoints[Role.LARGE], self.keypoints[Role.SMALL])
        c_l, s_l = self.geometry(Role.LARGE, np.arange(len(self)))
        c_s, s_s = self.geometry(Role.SMALL, np.arange(len(self)))
        return PlanResult(
            frames=self.frames,
            frame_index=self.frame_index,
            keypoints=kps,
            model=self.model.copy(),
            decision=list(self.decision),
            router_scores=self.router_scores,
            confidence=self.confidence,
            scales=np.where(large[:, None], s_l, s_s),
            crops=dict(self.crops),
            nan_signals=self.nan_signals,
            spans=list(self.spans),
        )

    # -- audit -------------------------------------------------------------------------------------------------------
    def audit_work(self, share: float, rng: np.random.Generator) -> list[Work]:
        """The large model on a random `share` of the persons the small model answered for (after the plan is
        complete); their results go to `audit_sample`, never to the answer."""
        if share <= 0:
            return []
        small = np.flatnonzero(self.model == SMALL)
        pick = small[rng.random(len(small)) < share]
        # an audit may wait in a queue (the executor's pending audits): hold no first-stage crops meanwhile (the few
        # audited persons are cut again)
        self._kept, self._kept_has = {}, {}
        return [Work(Role.LARGE, pick, Purpose.AUDIT)] if len(pick) else []

    def audit_sample(self, done: Sequence[Done]) -> AuditSample:
        """Both models' keypoints for the audited persons of `done` (the large model's audit results)."""
        idx = np.concatenate([d.work.idx for d in done]) if done else np.zeros(0, np.int64)
        large = np.concatenate([d.out for d in done]) if done else np.zeros((0, *self.keypoints[Role.LARGE].shape[1:]))
        areas = self.boxes[idx, 2] * self.boxes[idx, 3]
        return AuditSample(
            self.keypoints[Role.SMALL][idx],
            np.asarray(large, np.float32),
            areas,
            frame_index=self.frame_index[idx],
            persons=len(self),
            answered_small=int((self.model == SMALL).sum()),
            policy=self.policy,
        )


def make_plan(frames: Sequence[FrameInput], policy: Policy, cards: Mapping[Role, ModelCard]) -> Plan:
    """A plan for the boxes of `frames` under `policy`; `cards` holds the small and large models' cards and the
    router's when the policy reads it."""
    for role in (Role.SMALL, Role.LARGE):
        if role not in cards:
            raise DynPoseError(f"plan: no {role.value} model card")
    if cards[Role.SMALL].keypoints != cards[Role.LARGE].keypoints:
        raise DynPoseError(
            f"small model {cards[Role.SMALL].name!r} predicts {cards[Role.SMALL].keypoints} but large model "
            f"{cards[Role.LARGE].name!r} predicts {cards[Role.LARGE].keypoints}; both must use the same keypoint set"
        )
    if policy.needs_router and Role.ROUTER not in cards:
        raise DynPoseError(
            f"routing policy {policy} needs the router, but none was loaded; export a router into the engine dir or "
            "use a router-free policy (all-small, all-large, box:AREA, cascade:T)"
        )
    return Plan(frames, policy, cards)
