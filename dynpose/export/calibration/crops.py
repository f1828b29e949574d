"""Calibration crop sets: real person crops made with exactly the runtime's preprocessing.

Boxes come from COCO-format keypoint annotations, COCO-format detection files or MPII-style lists (center/scale);
each box is cropped with the runtime's one crop primitive (`dynpose.runtime.plan.crop_at`) under the model's card,
so INT8 ranges are measured on the inputs the runtime will feed. The set is split by image: crops of *gate* images
never calibrate, they only judge the quantized model. Crops are cached as the primitive's uint8 pixels in the engine
dir's cache folder, keyed by a hash of the input files and the card fields that change a crop.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dynpose.data import gt_boxes, image_id_map, load_coco, load_detections, resolve_image
from dynpose.errors import DynPoseError
from dynpose.fileio import atomic_path, read_json, sha256_file
from dynpose.models.card import ModelCard
from dynpose.runtime.plan import box_geometry, crop_at
from dynpose.runtime.preprocess import normalize

CALIB_METHODS = ("minmax", "entropy", "percentile")
INT8_TARGETS = ("ort", "tensorrt")
NEEDS_CALIB = (
    "int8 needs calibration data: pass --calib-ann COCO.json --calib-images DIR, "
    "--calib-dets DETS.json --calib-images DIR, or --calib-root DIR"
)


@dataclass
class Source:
    """One box file and the folder holding its images. kind: coco (GT annotations), dets, mpii."""

    kind: str
    path: Path
    images: Path


@dataclass
class CalibSpec:
    """Where calibration crops come from and how INT8 is made.

    `gate_ann`: a COCO-format annotation file whose labelled persons (>= 5 keypoints) form the accuracy gate; their
    images are kept out of calibration. Without it a quarter of the images (chosen by file-name hash) gate.
    """

    sources: list[Source] = field(default_factory=list)
    gate_ann: Path | None = None
    flip: bool = True
    jitter: int = 5  # extra randomly shifted/scaled copies of each calibration box
    max_crops: int = 256
    det_score: float = 0.3
    method: str = "minmax"
    target: str | None = None  # ort | tensorrt; None: from the export format
    seed: int = 0

    def validate(self) -> None:
        n = self.max_crops
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DynPoseError(f"--calib-max-crops {n!r}: must be an integer >= 1 (the most calibration crops to use)")
        if not self.sources:
            raise DynPoseError(NEEDS_CALIB)
        for s in self.sources:
            if not s.path.is_file():
                raise DynPoseError(f"calibration {s.kind} file {s.path}: file not found")
            if not s.images.is_dir():
                raise DynPoseError(f"calibration images {s.images}: not a directory; pass the folder holding the images")
        if self.gate_ann is not None and not Path(self.gate_ann).is_file():
            raise DynPoseError(f"gate annotation file {self.gate_ann}: file not found")
        if self.method not in CALIB_METHODS:
            raise DynPoseError(f"calibration method {self.method!r}: use one of {CALIB_METHODS}")
        if self.target is not None and self.target not in INT8_TARGETS:
            raise DynPoseError(f"int8 target {self.target!r}: use one of {INT8_TARGETS}")

    @classmethod
    def from_root(cls, root: str | os.PathLike, **kw: object) -> CalibSpec:
        """Every box file under `root`, each with the images in its own folder.

        COCO-format dicts are annotations, lists of {image_id, bbox} detections, lists of {image, center, scale}
        MPII-style boxes. Other JSON files are ignored.
        """
        root = Path(root)
        if not root.is_dir():
            raise DynPoseError(f"calibration root {root}: not a directory")
        sources = []
        for p in sorted(root.rglob("*.json")):
            kind = _sniff(p)
            if kind:
                sources.append(Source(kind, p, p.parent))
        if not sources:
            raise DynPoseError(f"calibration root {root}: no COCO annotation, detection or MPII JSON files found under it")
        return cls(sources=sources, **kw)  # type: ignore[arg-type]


def _sniff(path: Path) -> str | None:
    try:
        d = read_json(path, "calibration file")
    except DynPoseError:
        return None
    if isinstance(d, dict) and "images" in d and "annotations" in d:
        return "coco"
    if isinstance(d, list) and d and isinstance(d[0], dict):
        if "bbox" in d[0] and "image_id" in d[0]:
            return "dets"
        if "center" in d[0] and "scale" in d[0] and "image" in d[0]:
            return "mpii"
    return None


@dataclass
class CropSet:
    """Normalised crops plus what is needed to decode and score keypoints in image pixels."""

    x: np.ndarray  # (N,3,H,W) fp32, normalised
    centers: np.ndarray  # (N,2)
    scales: np.ndarray  # (N,2)
    areas: np.ndarray  # (N,) person area for OKS (annotation area, else box area)
    mask: np.ndarray  # (N,K) bool: keypoints that count in OKS (labelled ones for GT persons)
    gate: np.ndarray  # (N,) bool: held out from calibration
    flipped: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: np.ndarray) -> CropSet:
        return CropSet(
            self.x[idx],
            self.centers[idx],
            self.scales[idx],
            self.areas[idx],
            self.mask[idx],
            self.gate[idx],
            self.flipped[idx],
        )

    @property
    def calib(self) -> CropSet:
        return self.subset(np.flatnonzero(~self.gate))

    @property
    def held_out(self) -> CropSet:
        return self.subset(np.flatnonzero(self.gate & ~self.flipped))


@dataclass
class _Box:
    image: Path
    box: np.ndarray  # x,y,w,h
    area: float
    labelled: np.ndarray | None  # (K,) bool for GT persons


def _boxes(src: Source, det_score: float) -> list[_Box]:
    out: list[_Box] = []
    if src.kind == "coco":
        ds = load_coco(src.path)
        for iid, box, person in gt_boxes(ds, min_keypoints=1):
            img = resolve_image(src.images, ds.images[iid].file_name)
            out.append(_Box(img, box, person.area, person.keypoints[:, 2] > 0))
    elif src.kind == "dets":
        ids = image_id_map(src.images)
        for iid, dets in load_detections(src.path, score_thr=det_score).items():
            if iid not in ids:
                continue
            for d in dets:
                out.append(_Box(ids[iid], d[:4], float(d[2] * d[3]), None))
    elif src.kind == "mpii":
        from dynpose.eval.mpii import load_mpii

        for r in load_mpii(src.path, need=("center", "scale", "image")):
            # MPII's scale is the person height / 200 around `center`.
            s = float(r["scale"]) * 200.0
            cx, cy = (float(v) for v in r["center"])
            box = np.array([cx - s * 0.375, cy - s * 0.5, s * 0.75, s])
            out.append(_Box(resolve_image(src.images, r["image"]), box, float(box[2] * box[3]) * 0.53, None))
    else:
        raise DynPoseError(f"calibration source {src.path}: unknown kind {src.kind!r}")
    return [b for b in out if b.box[2] >= 8 and b.box[3] >= 8]


def _gate_images(spec: CalibSpec, boxes: list[_Box]) -> tuple[set[Path], list[_Box]]:
    """Images whose crops judge the model, and the gate boxes themselves."""
    if spec.gate_ann is not None:
        gate_path = Path(spec.gate_ann)
        ds = load_coco(gate_path)
        gate = []
        for iid, box, person in gt_boxes(ds, min_keypoints=5):
            img = _find_image(ds.images[iid].file_name, gate_path.parent, spec)
            gate.append(_Box(img, box, person.area, person.keypoints[:, 2] > 0))
        if not gate:
            raise DynPoseError(f"gate annotation file {gate_path}: no person with >= 5 labelled keypoints")
        return {b.image.resolve() for b in gate}, gate
    images = sorted({b.image.resolve() for b in boxes})
    held = {p for p in images if int(hashlib.sha256(p.name.encode()).hexdigest(), 16) % 4 == 0}
    if not held and len(images) > 1:
        held = {images[-1]}
    return held, [b for b in boxes if b.image.resolve() in held]


def _find_image(file_name: str, near: Path, spec: CalibSpec) -> Path:
    for folder in [near, *(s.images for s in spec.sources)]:
        try:
            return resolve_image(folder, file_name)
        except DynPoseError:
            continue
    raise DynPoseError(f"gate image {file_name!r} not found beside {near} or in the calibration image folders")


def _spec_key(spec: CalibSpec, card: ModelCard) -> str:
    h = hashlib.sha256()
    for s in spec.sources:
        h.update(f"{s.kind}|{sha256_file(s.path)}|{s.images.resolve()}".encode())
    if spec.gate_ann is not None:
        h.update(sha256_file(spec.gate_ann).encode())
    h.update(json.dumps([spec.flip, spec.jitter, spec.max_crops, spec.det_score, spec.seed]).encode())
    pre = [card.input_width, card.input_height, card.color_order, card.mean, card.std, card.padding, card.keypoints]
    pre += [card.aspect_ratio, card.decoder == "udp"]  # both change the warp (`runtime.preprocess.warp_matrix`)
    h.update(json.dumps(pre).encode())
    return h.hexdigest()[:16]


def _crop(
    card: ModelCard, boxes: list[_Box], jitter: int = 0, rng: np.random.Generator | None = None
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """uint8 NHWC crops (un-normalised) plus centres/scales of `boxes`: one pass as boxed, then `jitter` passes with
    randomly shifted/scaled boxes. Each image is decoded once for all passes (decoding costs far more than a warp)."""
    by_image: dict[Path, list[int]] = {}
    for i, b in enumerate(boxes):
        by_image.setdefault(b.image, []).append(i)
    n = len(boxes)
    c0, s0 = box_geometry(np.stack([b.box for b in boxes]) if boxes else np.empty((0, 4)), card)
    centers, scales = [c0], [s0]
    for _ in range(jitter):
        assert rng is not None
        c, s = c0.copy(), s0.copy()
        for idx in by_image.values():  # draws in pass, then image order: the same crops as cropping pass by pass
            c[idx] += rng.uniform(-0.08, 0.08, size=(len(idx), 2)) * s0[idx]
            s[idx] *= rng.uniform(0.9, 1.1, size=(len(idx), 1))
        centers.append(c)
        scales.append(s)
    passes = len(centers)
    crops = np.empty((passes, n, card.input_height, card.input_width, 3), np.uint8)
    for img_path, idx in by_image.items():
        img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
        if img is None:
            raise DynPoseError(f"calibration image {img_path}: cannot be read as an image")
        u8 = crop_at(
            [img],
            np.zeros(passes * len(idx), np.int64),
            np.concatenate([c[idx] for c in centers]),
            np.concatenate([s[idx] for s in scales]),
            card,
        )
        crops[:, idx] = u8.reshape(passes, len(idx), *u8.shape[1:])
    return [(crops[p], centers[p], scales[p]) for p in range(passes)]


def _keypoint_mask(boxes: list[_Box], k: int) -> np.ndarray:
    """(N,K) keypoints that count in OKS: a GT person's labelled ones, every keypoint otherwise."""
    m = np.ones((len(boxes), k), bool)
    for i, b in enumerate(boxes):
        if b.labelled is not None and len(b.labelled) == k and b.labelled.any():
            m[i] = b.labelled
    return m


def build_crop_set(
    spec: CalibSpec, card: ModelCard, cache_dir: str | os.PathLike | None = None, progress: bool = False
) -> CropSet:
    """Crop every box of the spec (plus flips and jittered copies for calibration), cached by content hash."""
    spec.validate()
    key = _spec_key(spec, card)
    cache = Path(cache_dir) / f"calib-{card.name}-{key}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            return _load(cache, card)
        except (OSError, ValueError, KeyError):
            cache.unlink(missing_ok=True)  # a damaged cache is rebuilt, never trusted

    boxes = [b for s in spec.sources for b in _boxes(s, spec.det_score)]
    held_images, gate_boxes = _gate_images(spec, boxes)
    calib_boxes = [b for b in boxes if b.image.resolve() not in held_images]
    if not calib_boxes:
        raise DynPoseError("calibration data: every image is in the gate set; add images that are not gated")
    rng = np.random.default_rng(spec.seed)
    parts = [(crop, calib_boxes, False) for crop in _crop(card, calib_boxes, spec.jitter, rng)]
    parts.append((_crop(card, gate_boxes)[0], gate_boxes, True))

    k = card.keypoint_set.num
    u8s, cs, ss, areas, masks, gates, flips = [], [], [], [], [], [], []
    for (u8, c, s), bxs, gate in parts:
        n = len(bxs)
        m = _keypoint_mask(bxs, k)
        u8s.append(u8)
        cs.append(c)
        ss.append(s)
        areas.append(np.array([b.area for b in bxs]))
        masks.append(m)
        gates.append(np.full(n, gate))
        flips.append(np.zeros(n, bool))
        if spec.flip and not gate:
            u8s.append(u8[:, :, ::-1])
            cs.append(c)
            ss.append(s)
            areas.append(areas[-1])
            masks.append(m)
            gates.append(np.zeros(n, bool))
            flips.append(np.ones(n, bool))
    arrays = {
        "u8": np.concatenate(u8s),
        "centers": np.concatenate(cs),
        "scales": np.concatenate(ss),
        "areas": np.concatenate(areas),
        "mask": np.concatenate(masks),
        "gate": np.concatenate(gates),
        "flipped": np.concatenate(flips),
    }
    # Cap the calibration part only; the gate set stays whole so its figure is comparable across runs.
    calib_idx = np.flatnonzero(~arrays["gate"])
    if len(calib_idx) > spec.max_crops:
        keep = np.sort(rng.choice(calib_idx, spec.max_crops, replace=False))
        sel = np.concatenate([keep, np.flatnonzero(arrays["gate"])])
        arrays = {k2: v[sel] for k2, v in arrays.items()}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy stubs read any key as allow_pickle
    return _from_arrays(arrays, card)


def _load(path: Path, card: ModelCard) -> CropSet:
    with np.load(path) as z:
        return _from_arrays({k: z[k] for k in z.files}, card)


def _from_arrays(a: dict[str, np.ndarray], card: ModelCard) -> CropSet:
    return CropSet(
        normalize(np.ascontiguousarray(a["u8"]), card),
        a["centers"],
        a["scales"],
        a["areas"],
        a["mask"].astype(bool),
        a["gate"].astype(bool),
        a["flipped"].astype(bool),
    )


def coco_person_crops(coco: str | os.PathLike, card: ModelCard, min_keypoints: int = 5) -> CropSet | None:
    """The annotated persons (>= `min_keypoints` labelled) of a COCO annotation file, or of the first one in a
    folder, with the images beside it, as a gate-only crop set; None when there is none (export verification then
    uses random inputs only)."""
    coco = Path(coco)
    if coco.is_file():
        anns, coco_dir = [coco], coco.parent
    else:
        anns = [p for p in sorted(coco.glob("*.json")) if _sniff(p) == "coco"] if coco.is_dir() else []
        coco_dir = coco
    if not anns:
        return None
    spec = CalibSpec(sources=[Source("coco", anns[0], coco_dir)], gate_ann=anns[0], flip=False, jitter=0)
    ds = load_coco(anns[0])
    boxes = []
    for iid, box, person in gt_boxes(ds, min_keypoints=min_keypoints):
        boxes.append(
            _Box(_find_image(ds.images[iid].file_name, coco_dir, spec), box, person.area, person.keypoints[:, 2] > 0)
        )
    if not boxes:
        return None
    ((u8, c, s),) = _crop(card, boxes)
    mask = _keypoint_mask(boxes, card.keypoint_set.num)
    n = len(boxes)
    return CropSet(normalize(u8, card), c, s, np.array([b.area for b in boxes]), mask, np.ones(n, bool), np.zeros(n, bool))
