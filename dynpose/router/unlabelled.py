"""Label-free router training data (`dynpose-train-router --unlabelled`): persons found in image folders and videos,
augmented into many crops, each run through both pose models, the large model's keypoints serving as the teacher.

A frame's boxes come from a detections file (COCO format, matched by the frame's numeric image id) when it has
any for that frame, else from the detector (`--detector FILE`, or the engine dir's detector entry). Each box becomes
`copies` variants (`augment`); for each variant the small and the large model crop it at their own input sizes with
the runtime's crop primitive, run (`PoseModel.infer`), decode (`PoseModel.decode`), and keypoints of mirrored
variants are mapped back. The router's uint8 crop of the same variant is kept for training (the large model's crop
when the router crops like it, the small model's when the pooled router does, else its own). Targets come from
`targets.teacher_targets`. The arrays are cached under the engine dir, keyed by everything that makes them (model
files, every source file's sha256, box sources, augmentation, seed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.fileio import atomic_path, sha256_file
from dynpose.models.card import ModelCard
from dynpose.roles import POSE_ROLES, Role
from dynpose.router.augment import AugmentConfig, AugParams, jitter_boxes, photometric, sample_params, unflip_keypoints
from dynpose.router.collect import CACHE_DIRNAME, ROUTER_CROPS_IN_MEMORY
from dynpose.runtime.model import PoseModel
from dynpose.runtime.plan import crop_boxes, same_crop

log = logging.getLogger(__name__)

TEACHER_CACHE_VERSION = 1
CHUNK = 32  # crops per pose-model call (memory stays flat on large frames)


@dataclass(frozen=True)
class UnlabelledSpec:
    """Where the persons come from and how they are turned into training crops."""

    sources: tuple[Path, ...]
    detections: tuple[Path, ...] = ()
    detector: Path | None = None  # None: the engine dir's detector entry, if it has one
    det_score: float = 0.3  # detections below this are not used (files and detector alike)
    min_box: float = 16.0  # boxes narrower or shorter than this many pixels are skipped
    max_frames: int = 300  # per video
    frame_step: int = 1  # every n-th video frame
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        if not self.sources:
            raise DynPoseError("--unlabelled: give at least one image, folder of images or video")
        for s in (*self.sources, *self.detections, *([self.detector] if self.detector else [])):
            if not Path(s).exists():
                raise DynPoseError(f"{s}: no such file or folder (--unlabelled / --detections / --detector)")
        if not 0.0 <= self.det_score <= 1.0:
            raise DynPoseError(f"--det-score must be in [0, 1], got {self.det_score}")
        if self.max_frames < 1 or self.frame_step < 1:
            raise DynPoseError(f"--max-frames and --frame-step must be >= 1 (got {self.max_frames}, {self.frame_step})")
        self.augment.validate()


@dataclass
class TeacherSet:
    """Every training variant: the router's crop, the box it came from, both models' keypoints (image frame)."""

    crops: np.ndarray  # (N,H,W,3) uint8, the router card's size and colour order
    boxes: np.ndarray  # (N,5) the variant's box x,y,w,h and the detection's score
    crop_wh: np.ndarray  # (N,2) the large model's crop size in pixels
    kpts_small: np.ndarray  # (N,K,3)
    kpts_large: np.ndarray
    person: np.ndarray  # (N,) person index over the whole set
    copy: np.ndarray  # (N,) 0 = the plain crop
    flipped: np.ndarray  # (N,) bool
    frame: np.ndarray  # (N,) frame index over the whole set

    def __len__(self) -> int:
        return len(self.person)

    @property
    def num_persons(self) -> int:
        return int(self.person.max()) + 1 if len(self) else 0

    def save(self, path: Path, key: str) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, key=np.array(key), **{fl.name: getattr(self, fl.name) for fl in fields(self)})

    @classmethod
    def load(cls, path: Path, key: str) -> TeacherSet | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != key:
                    return None
                return cls(**{fl.name: z[fl.name] for fl in fields(cls)})
        except (OSError, KeyError, ValueError):
            return None


# -- frames and boxes --------------------------------------------------------------------------------------------------
def _frames(spec: UnlabelledSpec) -> Iterator[Any]:
    """Frames of every source, videos thinned by `frame_step` and cut at `max_frames`."""
    from dynpose.io.sources import open_source

    for src in spec.sources:
        with open_source(src) as fs:
            taken = 0
            for fr in fs:
                if fs.kind == "video":
                    if fr.index % spec.frame_step:
                        continue
                    if taken >= spec.max_frames:
                        break
                taken += 1
                yield fr


def _load_dets(spec: UnlabelledSpec) -> dict[int, np.ndarray]:
    from dynpose.data import load_detections

    out: dict[int, np.ndarray] = {}
    for path in spec.detections:
        for iid, b in load_detections(path, score_thr=spec.det_score).items():
            out[iid] = np.concatenate([out[iid], b]) if iid in out else b
    return out


def _frame_boxes(fr: Any, dets: dict[int, np.ndarray], detector: Any, spec: UnlabelledSpec) -> np.ndarray | None:
    """(M,5) boxes of a frame (detections file first, else the detector), small ones dropped; None: no box source."""
    if fr.image_id is not None and fr.image_id in dets:
        boxes = dets[fr.image_id]
    elif detector is not None:
        boxes = detector(fr.image_bgr)
        boxes = boxes[boxes[:, 4] >= spec.det_score]
    else:
        return None
    return boxes[(boxes[:, 2] >= spec.min_box) & (boxes[:, 3] >= spec.min_box)]


# -- the teacher pass --------------------------------------------------------------------------------------------------
def _augmented_crops(
    img: np.ndarray, boxes: np.ndarray, p: AugParams, card: ModelCard, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 crops, centres, scales) of the variants under one card."""
    u8, c, s = crop_boxes([img], np.zeros(len(boxes), np.int64), boxes, card)
    return photometric(u8, p, seed), c, s


def _keypoints(model: PoseModel, u8: np.ndarray, c: np.ndarray, s: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    out = [
        model.decode(model.infer(model.inputs(u8[a : a + CHUNK])), c[a : a + CHUNK], s[a : a + CHUNK])
        for a in range(0, len(u8), CHUNK)
    ]
    return unflip_keypoints(np.concatenate(out), flipped, c, s, model.card)


def frame_variants(
    img: np.ndarray, boxes: np.ndarray, p: AugParams, small: PoseModel, large: PoseModel, router_card: ModelCard, seed: int
) -> dict[str, np.ndarray]:
    """One frame's variants through both models: the router's crops, the variant boxes and both keypoint sets."""
    jb = jitter_boxes(boxes[p.person], p)
    u8_l, c_l, s_l = _augmented_crops(img, jb, p, large.card, seed)
    u8_s, c_s, s_s = _augmented_crops(img, jb, p, small.card, seed)
    if same_crop(router_card, large.card):
        router_u8 = u8_l
    elif same_crop(router_card, small.card):
        router_u8 = u8_s
    else:
        router_u8 = _augmented_crops(img, jb, p, router_card, seed)[0]
    # both models at once, each on its share of the cores (as the local executor's workers)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="dynpose-teacher") as pool:
        fs = pool.submit(_keypoints, small, u8_s, c_s, s_s, p.flip)
        fl = pool.submit(_keypoints, large, u8_l, c_l, s_l, p.flip)
        kpts_small, kpts_large = fs.result(), fl.result()
    return {
        "crops": router_u8,
        "boxes": np.concatenate([jb, boxes[p.person, 4:5]], axis=1),
        "crop_wh": s_l,
        "kpts_small": kpts_small,
        "kpts_large": kpts_large,
        "copy": p.copy,
        "flipped": p.flip,
    }


def teacher_pass(
    engine_dir: str | os.PathLike,
    spec: UnlabelledSpec,
    router_card: ModelCard,
    backend: str = "ort",
    device: str = "cpu",
    progress: bool = True,
    threads: int | None = None,
) -> TeacherSet:
    """Run both pose models of the engine dir on every variant of every person of the sources (module doc)."""
    from dynpose.runtime.engine_set import EngineSet, LoadOptions

    dets = _load_dets(spec)
    rng = np.random.default_rng(spec.augment.seed)
    parts: list[dict[str, np.ndarray]] = []
    persons = frames = no_boxes = 0
    nbytes = 0
    bar = _bar(progress)
    load = LoadOptions(backend, device, threads, detector=spec.detector, det_score=spec.det_score)
    with EngineSet.load(engine_dir, load, roles=POSE_ROLES) as es:
        small, large = es.pose_models
        for fr in _frames(spec):
            boxes = _frame_boxes(fr, dets, es.detector, spec)
            if boxes is None:
                no_boxes += 1
                continue
            if len(boxes):
                p = sample_params(len(boxes), spec.augment, rng)
                v = frame_variants(fr.image_bgr, boxes, p, small, large, router_card, spec.augment.seed + frames)
                v["person"], v["frame"] = p.person + persons, np.full(len(p), frames)
                parts.append(v)
                persons += len(boxes)
                nbytes += v["crops"].nbytes
                if nbytes > ROUTER_CROPS_IN_MEMORY:
                    raise DynPoseError(
                        f"--unlabelled: more than {ROUTER_CROPS_IN_MEMORY >> 30} GB of router crops after {persons} "
                        "persons; lower --copies or --max-frames, or raise --frame-step"
                    )
            frames += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(persons=persons)
    if bar is not None:
        bar.close()
    if no_boxes:
        log.warning("%d frame(s) had no box source (no detections for their image id and no detector); skipped", no_boxes)
    if not persons:
        raise DynPoseError(
            "--unlabelled: no person found in the sources (check --detections image ids, --det-score, or give a "
            "--detector / register one in the engine dir with `dynpose-export --detector`)"
        )
    cat = {k: np.concatenate([d[k] for d in parts]) for k in parts[0]}
    return TeacherSet(**cat)


def _bar(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="teacher pass (small + large)", unit="frame", leave=False)


# -- cache -------------------------------------------------------------------------------------------------------------
def teacher_key(engine_dir: str | os.PathLike, spec: UnlabelledSpec, router_card: ModelCard, backend: str) -> str:
    """sha256 over everything the teacher set depends on."""
    from dynpose.bench.agreement import content_digest
    from dynpose.engines.manifest import Manifest
    from dynpose.router.collect import pose_entries

    m = Manifest.load(engine_dir, verify=False)
    small, large = pose_entries(m, engine_dir, backend)
    det = m.get(Role.DETECTOR)
    detector = sha256_file(spec.detector) if spec.detector else (det.sha256 if det is not None else None)
    d = {
        "version": TEACHER_CACHE_VERSION,
        "pair": [small.sha256, large.sha256, small.card.to_dict(), large.card.to_dict()],
        "router_card": router_card.to_dict(),
        "backend": backend,
        "sources": [content_digest(s) for s in spec.sources],
        "detections": [sha256_file(p) for p in spec.detections],
        Role.DETECTOR.value: detector,
        "spec": [spec.det_score, spec.min_box, spec.max_frames, spec.frame_step, spec.augment.to_dict()],
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def teacher_set(
    engine_dir: str | os.PathLike,
    spec: UnlabelledSpec,
    router_card: ModelCard,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    **run: Any,
) -> TeacherSet:
    """The teacher set of the sources, from the cache when the same inputs made one before. `run`: backend ("ort"),
    device ("cpu"), progress (True), threads (None), as `teacher_pass` takes them."""
    spec.validate()
    backend = run.get("backend", "ort")
    key = teacher_key(engine_dir, spec, router_card, backend) if use_cache else ""
    path = Path(cache_dir or Path(engine_dir) / CACHE_DIRNAME) / f"teacher-{key[:16]}.npz"
    if use_cache:
        cached = TeacherSet.load(path, key)
        if cached is not None:
            return cached
    ts = teacher_pass(
        engine_dir, spec, router_card, backend, run.get("device", "cpu"), run.get("progress", True), run.get("threads")
    )
    if use_cache:
        ts.save(path, key)
    return ts
