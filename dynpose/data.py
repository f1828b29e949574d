"""COCO-format annotations and detection files: the person boxes every part starts from.

One reader for calibration, the runtime, evaluation and router training, so "which image is id 785" and "which
boxes count" are decided in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.fileio import read_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Person:
    """One annotated person: box x,y,w,h (pixels), keypoints (K,3) x,y,visibility, area for OKS."""

    id: int
    image_id: int
    bbox: np.ndarray
    keypoints: np.ndarray
    area: float
    iscrowd: int = 0

    @property
    def num_keypoints(self) -> int:
        return int((self.keypoints[:, 2] > 0).sum())


@dataclass
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int
    persons: list[Person] = field(default_factory=list)


@dataclass
class CocoDataset:
    path: Path
    images: dict[int, CocoImage]
    keypoint_names: list[str]

    def image_path(self, images_dir: str | os.PathLike, image_id: int) -> Path:
        return resolve_image(images_dir, self.images[image_id].file_name)


def load_coco(path: str | os.PathLike) -> CocoDataset:
    """Read a COCO keypoint annotation file (COCO, CrowdPose, OCHuman, ExLPose all use this shape)."""
    d = read_json(path, "annotation file")
    if not isinstance(d, dict) or "images" not in d or "annotations" not in d:
        raise DynPoseError(f"annotation file {path}: not COCO format (needs 'images' and 'annotations')")
    names: list[str] = []
    for c in d.get("categories", []):
        if c.get("keypoints"):
            names = list(c["keypoints"])
            break
    images = {
        int(im["id"]): CocoImage(int(im["id"]), str(im["file_name"]), int(im.get("width", 0)), int(im.get("height", 0)))
        for im in d["images"]
    }
    for a in d["annotations"]:
        if a.get("category_id", 1) != 1 or int(a["image_id"]) not in images:
            continue
        kp = np.asarray(a.get("keypoints", []), dtype=np.float64).reshape(-1, 3)
        bbox = np.asarray(a["bbox"], dtype=np.float64)
        area = float(a.get("area", bbox[2] * bbox[3]))
        images[int(a["image_id"])].persons.append(
            Person(int(a.get("id", 0)), int(a["image_id"]), bbox, kp, area, int(a.get("iscrowd", 0)))
        )
    return CocoDataset(Path(path), images, names)


def resolve_image(images_dir: str | os.PathLike, file_name: str) -> Path:
    """The image file for an annotation's `file_name`: as given (may hold sub-folders), else by its base name."""
    root = Path(images_dir)
    for cand in (root / file_name, root / Path(file_name).name):
        if cand.is_file():
            return cand
    raise DynPoseError(f"image {file_name!r} not found under {root}; pass the folder that holds the annotated images")


def load_detections(path: str | os.PathLike, score_thr: float = 0.0) -> dict[int, np.ndarray]:
    """COCO-format detections (list of {image_id, bbox xywh, score, category_id}) -> image id -> (M,5) x,y,w,h,score.

    Only person detections (category 1) at or above `score_thr` are kept; non-finite or non-positive boxes are
    dropped here so no later stage sees them.
    """
    d = read_json(path, "detections file")
    if not isinstance(d, list):
        raise DynPoseError(f"detections file {path}: expected a JSON list of {{image_id, bbox, score}} records")
    out: dict[int, list[list[float]]] = {}
    for i, r in enumerate(d):
        try:
            if r.get("category_id", 1) != 1:
                continue
            x, y, w, h = (float(v) for v in r["bbox"])
            s = float(r.get("score", 1.0))
            iid = int(r["image_id"])
        except (KeyError, TypeError, ValueError):
            raise DynPoseError(f"detections file {path}: record {i} lacks image_id/bbox/score") from None
        if not np.isfinite([x, y, w, h, s]).all() or w <= 0 or h <= 0 or s < score_thr:
            continue
        out.setdefault(iid, []).append([x, y, w, h, s])
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def image_id_map(images_dir: str | os.PathLike, ann: CocoDataset | None = None) -> dict[int, Path]:
    """image id -> file. From the annotation file when given (as MMPose pairs bbox_file with ann_file), else from
    file names whose stem is the numeric id (COCO's `000000000785.jpg`)."""
    if ann is not None:
        out = {}
        for iid, im in ann.images.items():
            try:
                out[iid] = resolve_image(images_dir, im.file_name)
            except DynPoseError:
                continue
        return out
    out = {}
    for p in sorted(Path(images_dir).rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.isdigit():
            out[int(p.stem)] = p
    return out


def gt_boxes(ds: CocoDataset, min_keypoints: int = 1) -> list[tuple[int, np.ndarray, Person]]:
    """(image_id, box xywh, person) for each non-crowd annotated person with at least `min_keypoints` labelled."""
    return [
        (iid, p.bbox, p)
        for iid, im in ds.images.items()
        for p in im.persons
        if not p.iscrowd and p.num_keypoints >= min_keypoints and p.bbox[2] > 0 and p.bbox[3] > 0
    ]
