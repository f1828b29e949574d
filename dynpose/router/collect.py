"""Per-crop outputs of the engine dir's small and large pose models on ground-truth boxes, cached.

For every annotated (non-crowd, >= 1 labelled keypoint) person: crop the box for each model at that model's own
input size and run it (the runtime's own `PoseModel` handles from `EngineSet.load`, any backend), decode the
keypoints to image pixels, and record each model's OKS against the ground truth and its
per-joint normalised distances (`targets.joint_distances`, normalised by the large model's crop size). Running the
pose models is the expensive part of router training, so the arrays are cached in an npz keyed by a hash of what
determines them: the small and large entries' sha256 (the exact files), the backend, the annotation file's sha256
and every used image's sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dynpose.data import CocoDataset, gt_boxes, image_id_map, load_coco, load_detections
from dynpose.engines.manifest import Entry, Manifest
from dynpose.errors import DynPoseError
from dynpose.fileio import atomic_path, sha256_file
from dynpose.models.card import ModelCard
from dynpose.roles import POSE_ROLES, Role
from dynpose.router.targets import crop_error, joint_distances
from dynpose.runtime.boxes import Boxes
from dynpose.runtime.plan import FrameInput, box_geometry, crop_at

CACHE_VERSION = 1
CACHE_DIRNAME = "cache"  # inside the engine dir unless --cache-dir says otherwise

log = logging.getLogger(__name__)


@dataclass
class Crops:
    """The persons used, in a fixed order (grouped by image): ground-truth persons (`gt_crops`) or detections
    (`det_crops`: `gt` all zero, `ann_ids` -1, `scores` the detector's)."""

    image_ids: np.ndarray  # (N,) int64
    ann_ids: np.ndarray  # (N,) int64
    boxes: np.ndarray  # (N,4) x,y,w,h
    areas: np.ndarray  # (N,)
    gt: np.ndarray  # (N,K,3)
    paths: dict[int, Path]  # image id -> file
    scores: np.ndarray | None = None  # (N,) box scores of detections; None for ground-truth boxes (score 1)

    def __len__(self) -> int:
        return len(self.image_ids)

    def box_scores(self) -> np.ndarray:
        return np.ones(len(self)) if self.scores is None else self.scores

    def by_image(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(image id, BGR image, indices of its crops), each image read once."""
        # one stable sort groups the crops by image (a per-image scan would be quadratic on COCO-sized sets)
        order = np.argsort(self.image_ids, kind="stable")
        ids = self.image_ids[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], len(ids)], strict=True):
            iid = int(ids[a])
            yield iid, _read_image(self.paths[iid]), order[a:b]


def gt_crops(ann: CocoDataset, images_dir: str | os.PathLike, min_keypoints: int = 1) -> Crops:
    """The annotated persons whose image is present under `images_dir` (missing images: warned and skipped)."""
    paths = image_id_map(images_dir, ann)
    items = gt_boxes(ann, min_keypoints=min_keypoints)
    missing = sorted({iid for iid, _, _ in items if iid not in paths})
    if missing:
        log.warning(
            "%d annotated image(s) not found under %s (e.g. id %s); their persons are skipped",
            len(missing),
            images_dir,
            missing[0],
        )
    items = [it for it in items if it[0] in paths]
    if not items:
        raise DynPoseError(
            f"annotation file {ann.path}: no usable person (non-crowd, >= {min_keypoints} labelled keypoint, image "
            f"under {images_dir}); check --ann and --images"
        )
    return Crops(
        image_ids=np.array([iid for iid, _, _ in items], dtype=np.int64),
        ann_ids=np.array([p.id for _, _, p in items], dtype=np.int64),
        boxes=np.stack([b for _, b, _ in items]).astype(np.float64),
        areas=np.array([p.area for _, _, p in items], dtype=np.float64),
        gt=np.stack([p.keypoints for _, _, p in items]).astype(np.float64),
        paths={iid: paths[iid] for iid, _, _ in items},
    )


def det_crops(
    dets_path: str | os.PathLike, images_dir: str | os.PathLike, num_keypoints: int, ann: CocoDataset | None = None
) -> Crops:
    """Every detection (any score) of the images found under `images_dir`, in image order, as the runtime gets
    them from a detections file (unusable boxes dropped as the Pipeline drops them)."""
    dets = load_detections(dets_path)
    paths = image_id_map(images_dir, ann)
    rows = []
    for iid in sorted(i for i in dets if i in paths):
        h, w = _read_image(paths[iid]).shape[:2]
        for b in Boxes.of(dets[iid], (h, w), where=f"detections file {dets_path}").as_array():
            rows.append((iid, b))
    if not rows:
        raise DynPoseError(f"detections file {dets_path}: no box on an image under {images_dir}; check the image ids")
    boxes = np.stack([b for _, b in rows])
    ids = np.array([i for i, _ in rows], dtype=np.int64)
    return Crops(
        image_ids=ids,
        ann_ids=np.full(len(rows), -1, dtype=np.int64),
        boxes=boxes[:, :4],
        areas=boxes[:, 2] * boxes[:, 3],
        gt=np.zeros((len(rows), num_keypoints, 3)),
        paths={int(i): paths[int(i)] for i in np.unique(ids)},
        scores=boxes[:, 4],
    )


class _Cached:
    """Save/load of a dataclass of arrays as an npz tagged with its cache key."""

    def save(self, path: str | os.PathLike, key: str) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, key=np.array(key), **{fl.name: getattr(self, fl.name) for fl in fields(self)})  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | os.PathLike, key: str | None = None) -> Any:
        """The cached arrays, or None when the file is missing, unreadable or made for another key."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if key is not None and str(z["key"]) != key:
                    return None
                return cls(**{fl.name: z[fl.name] for fl in fields(cls)})  # type: ignore[arg-type]
        except (OSError, KeyError, ValueError):
            return None


@dataclass
class CropOutputs(_Cached):
    """Both pose models' results per crop (arrays aligned with `Crops`)."""

    image_ids: np.ndarray
    ann_ids: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    gt: np.ndarray
    crop_wh: np.ndarray  # (N,2) the large model's crop size in pixels (distance normalisation)
    kpts_small: np.ndarray  # (N,K,3) x,y,score in image pixels
    kpts_large: np.ndarray
    oks_small: np.ndarray  # (N,)
    oks_large: np.ndarray
    dist_small: np.ndarray  # (N,K) normalised joint distances, NaN where unlabelled
    dist_large: np.ndarray
    err_small: np.ndarray  # (N,) `targets.crop_error`
    err_large: np.ndarray

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass
class DetOutputs(_Cached):
    """Both pose models' keypoints on detection boxes, and what the Pipeline needs to score them (box scores for
    the rescoring, the crop scale's area for OKS-NMS)."""

    image_ids: np.ndarray
    boxes: np.ndarray  # (N,4)
    scores: np.ndarray  # (N,) box scores
    nms_areas: np.ndarray  # (N,) scale w * h of the crop (the official OKS-NMS area)
    kpts_small: np.ndarray
    kpts_large: np.ndarray
    crop_wh: np.ndarray  # (N,2) the large model's crop size in pixels

    def __len__(self) -> int:
        return len(self.image_ids)


def pose_entries(manifest: Manifest, engine_dir: str | os.PathLike, backend: str) -> tuple[Entry, Entry]:
    """The small and large entries the backend runs (ONNX for ort, plans for tensorrt, .pt for torch), which must
    predict the same keypoint set."""
    from dynpose.runtime.backends import BACKEND_FORMAT

    if backend not in BACKEND_FORMAT:
        raise DynPoseError(f"unknown backend {backend!r}; use one of {', '.join(BACKEND_FORMAT)}")
    fmt = BACKEND_FORMAT[backend]
    small, large = manifest.require(Role.SMALL, fmt, engine_dir), manifest.require(Role.LARGE, fmt, engine_dir)
    if small.card.keypoints != large.card.keypoints:
        raise DynPoseError(
            f"engine dir {engine_dir}: small model has {small.card.keypoints} keypoints, large {large.card.keypoints}; "
            "the router compares models with the same keypoint set"
        )
    return small, large


def cache_key(
    small: Entry, large: Entry, backend: str, ann_path: str | os.PathLike, crops: Crops, min_keypoints: int
) -> str:
    """sha256 over everything that determines the outputs."""
    spec: dict[str, Any] = {
        "version": CACHE_VERSION,
        Role.SMALL.value: small.sha256,
        Role.LARGE.value: large.sha256,
        "decoders": [small.card.decoder, large.card.decoder],
        "backend": backend,
        "ann": sha256_file(ann_path),
        "min_keypoints": min_keypoints,
        "images": {str(i): sha256_file(p) for i, p in sorted(crops.paths.items())},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


PAIR_BATCH = 64  # persons per plan: both models busy, memory flat


def _image_groups(crops: Crops) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """(image, indices of its crops) pairs, grouped until a group holds `PAIR_BATCH` persons."""
    group: list[tuple[np.ndarray, np.ndarray]] = []
    for _, img, idx in crops.by_image():
        group.append((img, idx))
        if sum(len(i) for _, i in group) >= PAIR_BATCH:
            yield group
            group = []
    if group:
        yield group


def run_pair(
    engine_dir: str | os.PathLike, crops: Crops, backend: str = "ort", device: str = "cpu", progress: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(small keypoints, large keypoints, the large model's crop size) of every crop: both models of the engine dir
    on every person, planned and run as the runtime runs them (`execute.run_both`, a worker per model)."""
    from dynpose.runtime.engine_set import EngineSet, LoadOptions
    from dynpose.runtime.execute import LocalExecutor, run_both

    n = len(crops)
    crop_wh = np.zeros((n, 2))
    bar = _bar(len(crops.paths), "run small + large", progress)
    try:
        with EngineSet.load(engine_dir, LoadOptions(backend, device, with_detector=False), roles=POSE_ROLES) as es:
            models = {r: es.require(r) for r in POSE_ROLES}
            k = models[Role.LARGE].card.keypoint_set.num
            kp_s, kp_l = np.zeros((n, k, 3)), np.zeros((n, k, 3))
            with LocalExecutor(models) as ex:
                for group in _image_groups(crops):
                    frames = [FrameInput(img, Boxes.of(crops.boxes[idx], img.shape)) for img, idx in group]
                    rows = np.concatenate([idx[f.boxes.rows] for (_, idx), f in zip(group, frames, strict=True)])
                    small, large = run_both(frames, {r: m.card for r, m in models.items()}, ex)
                    kp_s[rows], kp_l[rows], crop_wh[rows] = small.keypoints, large.keypoints, large.scales
                    if bar is not None:
                        bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()
    return kp_s, kp_l, crop_wh


def score_outputs(crops: Crops, kp_s: np.ndarray, kp_l: np.ndarray, crop_wh: np.ndarray, sigmas: Any) -> CropOutputs:
    """Each model's OKS, joint distances and crop error against the ground truth of the crops."""
    from dynpose.runtime.postprocess import oks

    n = len(crops)
    d_s = joint_distances(kp_s, crops.gt, crop_wh)
    d_l = joint_distances(kp_l, crops.gt, crop_wh)
    return CropOutputs(
        image_ids=crops.image_ids,
        ann_ids=crops.ann_ids,
        boxes=crops.boxes,
        areas=crops.areas,
        gt=crops.gt,
        crop_wh=crop_wh,
        kpts_small=kp_s,
        kpts_large=kp_l,
        oks_small=np.array([oks(kp_s[i, :, :2], crops.gt[i], crops.areas[i], sigmas) for i in range(n)]),
        oks_large=np.array([oks(kp_l[i, :, :2], crops.gt[i], crops.areas[i], sigmas) for i in range(n)]),
        dist_small=d_s,
        dist_large=d_l,
        err_small=crop_error(d_s, sigmas),
        err_large=crop_error(d_l, sigmas),
    )


def _cache_file(engine_dir: str | os.PathLike, cache_dir: str | os.PathLike | None, prefix: str, key: str) -> Path:
    return Path(cache_dir or Path(engine_dir) / CACHE_DIRNAME) / f"{prefix}-{key[:16]}.npz"


@dataclass(frozen=True)
class CollectOptions:
    """Where both models run and how their outputs are cached."""

    backend: str = "ort"
    device: str = "cpu"
    cache_dir: str | os.PathLike | None = None  # default: the engine dir's cache folder
    use_cache: bool = True
    min_keypoints: int = 1  # ground-truth persons with fewer labelled keypoints are left out
    progress: bool = True


def collect_outputs(
    engine_dir: str | os.PathLike, ann_path: str | os.PathLike, images_dir: str | os.PathLike, **options: Any
) -> tuple[CropOutputs, Crops]:
    """Run the engine dir's small and large models on every ground-truth crop (or load the cached result).
    `options`: `CollectOptions` fields."""
    o = CollectOptions(**options)
    backend, device, cache_dir, use_cache, progress = o.backend, o.device, o.cache_dir, o.use_cache, o.progress
    min_keypoints = o.min_keypoints
    small, large = pose_entries(Manifest.load(engine_dir), engine_dir, backend)
    crops = gt_crops(load_coco(ann_path), images_dir, min_keypoints)
    kset = large.card.keypoint_set
    if crops.gt.shape[1] != kset.num:
        raise DynPoseError(
            f"annotation file {ann_path}: {crops.gt.shape[1]} keypoints per person, the engine dir's models give "
            f"{kset.num} ({kset.name})"
        )
    key = cache_key(small, large, backend, ann_path, crops, min_keypoints)
    cache_file = _cache_file(engine_dir, cache_dir, "router-outputs", key)
    if use_cache:
        cached = CropOutputs.load(cache_file, key)
        if cached is not None and len(cached) == len(crops):
            return cached, crops
    kp_s, kp_l, crop_wh = run_pair(engine_dir, crops, backend, device, progress)
    out = score_outputs(crops, kp_s, kp_l, crop_wh, kset.sigmas)
    if use_cache:
        out.save(cache_file, key)
    return out, crops


def collect_det_outputs(
    engine_dir: str | os.PathLike,
    dets_path: str | os.PathLike,
    images_dir: str | os.PathLike,
    ann_path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    **run: Any,
) -> tuple[DetOutputs, Crops]:
    """Both pose models on every detection of a detections file (cached like `collect_outputs`). `run`: backend
    ("ort"), device ("cpu"), progress (True), as `run_pair` takes them, and use_cache (True)."""
    backend = run.get("backend", "ort")
    small, large = pose_entries(Manifest.load(engine_dir), engine_dir, backend)
    ann = load_coco(ann_path) if ann_path is not None else None
    crops = det_crops(dets_path, images_dir, large.card.keypoint_set.num, ann)
    spec = {
        "version": CACHE_VERSION,
        "pair": [small.sha256, large.sha256, small.card.decoder, large.card.decoder],
        "backend": backend,
        "dets": sha256_file(dets_path),
        "images": {str(i): sha256_file(p) for i, p in sorted(crops.paths.items())},
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    cache_file = _cache_file(engine_dir, cache_dir, "det-outputs", key)
    use_cache = run.get("use_cache", True)
    cached = DetOutputs.load(cache_file, key) if use_cache else None
    if cached is not None and len(cached) == len(crops):
        return cached, crops
    kp_s, kp_l, crop_wh = run_pair(engine_dir, crops, backend, run.get("device", "cpu"), run.get("progress", True))
    out = DetOutputs(crops.image_ids, crops.boxes, crops.box_scores(), np.prod(crop_wh, axis=1), kp_s, kp_l, crop_wh)
    if use_cache:
        out.save(cache_file, key)
    return out, crops


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False)


ROUTER_CROPS_IN_MEMORY = 2 << 30  # bytes of uint8 crops held in memory; beyond it crops are cut per batch


class LazyRouterCrops:
    """Router crops cut from the images on demand (`crops[idx]` -> (len(idx),H,W,3) uint8), for training sets whose
    crops do not fit in memory; each call reads every image its indices touch once."""

    def __init__(self, crops: Crops, card: ModelCard) -> None:
        self.crops, self.card = crops, card
        self.centers, self.scales = box_geometry(crops.boxes, card)
        self.shape = (len(crops), card.input_height, card.input_width, 3)
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx))
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.uint8)
        ids = self.crops.image_ids[idx]
        for iid in dict.fromkeys(ids.tolist()):
            js = np.flatnonzero(ids == iid)
            img = _read_image(self.crops.paths[iid])
            out[js] = crop_at([img], np.zeros(len(js), np.int64), self.centers[idx[js]], self.scales[idx[js]], self.card)
        return out


def _read_image(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DynPoseError(f"image {path}: cannot be read (corrupt or not an image); remove it from the annotations")
    return img


def router_crops(crops: Crops, card: ModelCard, max_bytes: int = ROUTER_CROPS_IN_MEMORY) -> np.ndarray | LazyRouterCrops:
    """(N,H,W,3) uint8 crops at the router's input size, in its colour order (normalised later, per batch), made
    with the runtime's own crop primitive so the router trains on the exact pixels it is fed at run time: an array
    when they fit in `max_bytes`, else a `LazyRouterCrops` that cuts them per batch."""
    w, h = card.input_size
    if len(crops) * h * w * 3 > max_bytes:
        return LazyRouterCrops(crops, card)
    out = np.empty((len(crops), h, w, 3), dtype=np.uint8)
    centers, scales = box_geometry(crops.boxes, card)
    for _, img, idx in crops.by_image():
        out[idx] = crop_at([img], np.zeros(len(idx), np.int64), centers[idx], scales[idx], card)
    return out
