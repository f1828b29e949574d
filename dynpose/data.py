"""COCO-format annotations and detection files: the person boxes every part starts from.

One reader for calibration, the runtime, evaluation and router training, so "which image is id 785" and "which
boxes count" are decided in one place.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.fileio import read_json
from dynpose.keypoints import KEYPOINT_SETS

# every image suffix OpenCV decodes (its imread list), so an image is never opened as a video
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".avif", ".tif", ".tiff", ".jp2", ".j2k", ".gif",
    ".pbm", ".pgm", ".ppm", ".pnm", ".pxm", ".pam", ".pfm", ".sr", ".ras", ".hdr", ".pic",
)  # fmt: skip


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


def _short(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


# Largest coordinate or box side taken from a file (pixels): far past any image, small enough that products
# (areas, scales) stay finite; 1e308 boxes otherwise train a router on infinities.
MAX_COORD = 1e7
# Most person boxes one image may have in a detections file (after the score threshold): detectors give <= 100;
# 100,000 boxes for one image would run for minutes and is a broken file.
MAX_BOXES_PER_IMAGE = 1000


def _is_number(v: object) -> bool:
    """A JSON number a float can hold (a 400-digit integer is not one: float() would overflow)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    return not isinstance(v, int) or v.bit_length() <= 1023


def as_id(v: object, name: str, where: str) -> int:
    """An integer id or count; a float only when it is integral (785.0), never 785.7, "785" or true."""
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        raise DynPoseError(f"{where}: {name!r} must be an integer, got {_short(v)}")
    return int(v)


def as_number(v: object, name: str, where: str, finite: bool = False) -> float:
    """A number (`finite`: NaN and infinities refused too)."""
    if not _is_number(v) or (finite and not math.isfinite(float(v))):  # type: ignore[arg-type]
        raise DynPoseError(f"{where}: {name!r} must be a {'finite ' if finite else ''}number, got {_short(v)}")
    return float(v)  # type: ignore[arg-type]


def check_coords(a: np.ndarray, name: str, where: str) -> np.ndarray:
    """Annotated coordinates must be finite and within +-MAX_COORD pixels."""
    if not np.isfinite(a).all() or (np.abs(a) > MAX_COORD).any():
        bad = a[~np.isfinite(a) | (np.abs(a) > MAX_COORD)][0]
        raise DynPoseError(f"{where}: {name!r} holds {bad:g}; coordinates must be finite and within +-{MAX_COORD:g} pixels")
    return a


def as_box(v: object, where: str) -> np.ndarray:
    """x, y, w, h as 4 numbers (a string such as "1234" is not a box, though it has 4 characters)."""
    if not isinstance(v, list | tuple) or len(v) != 4 or not all(_is_number(x) for x in v):
        raise DynPoseError(f"{where}: 'bbox' must be a list of 4 numbers [x, y, w, h], got {_short(v)}")
    return np.asarray(v, dtype=np.float64)


def check_record(r: object, where: str, needs: tuple[str, ...]) -> dict:
    if not isinstance(r, dict):
        raise DynPoseError(f"{where}: expected an object with {', '.join(needs)}, got {_short(r)}")
    missing = [k for k in needs if k not in r]
    if missing:
        raise DynPoseError(f"{where}: lacks {', '.join(repr(k) for k in missing)}")
    return r


def flat_keypoints(v: object, num: int | None, where: str) -> np.ndarray:
    """(K,3) from a flat [x, y, v] * K list; K must be the category's keypoint count when it names one."""
    if not isinstance(v, list) or not all(_is_number(x) for x in v) or len(v) % 3:
        raise DynPoseError(f"{where}: 'keypoints' must be a flat list of [x, y, visibility] numbers, got {_short(v)}")
    if num is not None and v and len(v) != 3 * num:
        raise DynPoseError(f"{where}: {len(v)} keypoint values, the category's {num} keypoints need {3 * num}")
    return np.asarray(v, dtype=np.float64).reshape(-1, 3)


@dataclass(frozen=True)
class KeypointLayout:
    """How many keypoints a COCO-format file gives each person, and where that number was read.

    `source` is "category" (the category's name list, the usual case) or "annotations": the category lists more names
    than the persons' `keypoints` hold and its first names are a known set's (HumanArt: 21 names, the 17 COCO joints
    in `keypoints`, the 21-joint set in `keypoints_21`). `names` are the names of those joints (empty when the file
    names none); `listed` is how many names the category lists; `other_fields` the annotations' other
    `keypoints_*` fields, which are not read.
    """

    num: int | None
    names: tuple[str, ...]
    source: str
    listed: int
    other_fields: tuple[str, ...] = ()

    def note(self) -> str | None:
        """One line saying that the count came from the annotations, or None when the category's list gave it."""
        if self.source != "annotations" or not self.listed:
            return None
        unread = f"; {', '.join(repr(f) for f in self.other_fields)} not read" if self.other_fields else ""
        return (
            f"the category lists {self.listed} keypoint names, the persons' 'keypoints' hold {self.num} (the first "
            f"{self.num} names): scoring {self.num} keypoints per person{unread}"
        )


def keypoint_layout(d: dict, where: str) -> KeypointLayout:
    """The keypoint count of a COCO-format document: the category's name list, unless that list is longer than what
    the annotations' `keypoints` hold and begins with the names of a known set of that size (COCO-17, CrowdPose-14):
    then the annotations' count, as pycocotools and xtcocotools read `keypoints` whatever the names say. A file whose
    persons hold different counts and no name list to settle it is a DynPoseError."""
    names: tuple[str, ...] = ()
    for c in d.get("categories", []) or []:
        if isinstance(c, dict) and c.get("keypoints"):
            names = tuple(str(n) for n in c["keypoints"])
            break
    anns = [a for a in d.get("annotations", []) if isinstance(a, dict)]
    counts = sorted({len(a["keypoints"]) // 3 for a in anns if isinstance(a.get("keypoints"), list) and a["keypoints"]})
    if not counts or len(names) in counts:
        return KeypointLayout(len(names) or None, names, "category", len(names))
    known = {ks.num: ks.names for ks in KEYPOINT_SETS.values()}
    if len(counts) == 1 and len(names) > counts[0] and names[: counts[0]] == known.get(counts[0]):
        num = counts[0]
        extra = sorted({k for a in anns for k in a if k.startswith("keypoints_")})
        return KeypointLayout(num, names[:num], "annotations", len(names), tuple(extra))
    if not names and len(counts) == 1:
        return KeypointLayout(counts[0], (), "annotations", 0)
    if not names:
        raise DynPoseError(f"{where}: persons hold {counts} keypoints each; one count per file")
    return KeypointLayout(len(names), names, "category", len(names))


def _coco_image(im: object, where: str) -> CocoImage:
    im = check_record(im, where, ("id", "file_name"))
    if not isinstance(im["file_name"], str) or not im["file_name"]:
        raise DynPoseError(f"{where}: 'file_name' must be a non-empty string, got {_short(im['file_name'])}")
    w, h = (as_id(im.get(k, 0), k, where) for k in ("width", "height"))
    return CocoImage(as_id(im["id"], "id", where), im["file_name"], w, h)


def _coco_person(a: dict, num: int | None, where: str) -> Person:
    bbox = check_coords(as_box(a["bbox"], where), "bbox", where)
    kp = check_coords(flat_keypoints(a.get("keypoints", []), num, where), "keypoints", where)
    area = as_number(a["area"], "area", where, finite=True) if "area" in a else float(bbox[2] * bbox[3])
    iid = as_id(a["image_id"], "image_id", where)
    return Person(as_id(a.get("id", 0), "id", where), iid, bbox, kp, area, as_id(a.get("iscrowd", 0), "iscrowd", where))


def load_coco(path: str | os.PathLike) -> CocoDataset:
    """Read a COCO keypoint annotation file (COCO, CrowdPose, OCHuman, ExLPose all use this shape).

    Ids must be integers, boxes 4 numbers and keypoints 3 numbers per keypoint of the category; anything else is a
    one-line DynPoseError naming the file and the record."""
    d = read_json(path, "annotation file")
    if not isinstance(d, dict) or "images" not in d or "annotations" not in d:
        raise DynPoseError(f"annotation file {path}: not COCO format (needs 'images' and 'annotations')")
    for key in ("images", "annotations"):
        if not isinstance(d[key], list):
            raise DynPoseError(f"annotation file {path}: {key!r} must be a list, got {type(d[key]).__name__}")
    category_keypoints(d, f"annotation file {path}")  # categories: a list of objects, names strings
    layout = keypoint_layout(d, f"annotation file {path}")
    images = {}
    for i, im in enumerate(d["images"]):
        image = _coco_image(im, f"annotation file {path}: image {i}")
        images[image.id] = image
    for i, a in enumerate(d["annotations"]):
        where = f"annotation file {path}: annotation {i}"
        a = check_record(a, where, ("image_id", "bbox"))
        if as_id(a.get("category_id", 1), "category_id", where) != 1:
            continue
        p = _coco_person(a, layout.num, where)
        if p.image_id in images:
            images[p.image_id].persons.append(p)
    return CocoDataset(Path(path), images, list(layout.names))


def resolve_image(images_dir: str | os.PathLike, file_name: str) -> Path:
    """The image file for an annotation's `file_name`: as given (may hold sub-folders), else by its base name."""
    root = Path(images_dir)
    for cand in (root / file_name, root / Path(file_name).name):
        if cand.is_file():
            return cand
    raise DynPoseError(f"image {file_name!r} not found under {root}; pass the folder that holds the annotated images")


def load_detections(
    path: str | os.PathLike, score_thr: float = 0.0, max_per_image: int = MAX_BOXES_PER_IMAGE
) -> dict[int, np.ndarray]:
    """COCO-format detections (list of {image_id, bbox xywh, score, category_id}) -> image id -> (M,5) x,y,w,h,score.

    Only person detections (category 1) at or above `score_thr` are kept; non-finite, non-positive or absurd
    (past +-MAX_COORD) boxes are dropped here so no later stage sees them. A record of the wrong shape (not an
    object, a string box, a fractional id) is a one-line DynPoseError naming the file and the record, and so is
    an image with more than `max_per_image` boxes kept (a broken file; a higher score threshold keeps fewer).
    """
    d = read_json(path, "detections file")
    if not isinstance(d, list):
        raise DynPoseError(f"detections file {path}: expected a JSON list of {{image_id, bbox, score}} records")
    out: dict[int, list[list[float]]] = {}
    for i, r in enumerate(d):
        where = f"detections file {path}: record {i}"
        r = check_record(r, where, ("image_id", "bbox"))
        if as_id(r.get("category_id", 1), "category_id", where) != 1:
            continue
        x, y, w, h = as_box(r["bbox"], where)
        s = as_number(r.get("score", 1.0), "score", where)
        iid = as_id(r["image_id"], "image_id", where)
        if not np.isfinite([x, y, w, h, s]).all() or w <= 0 or h <= 0 or s < score_thr:
            continue
        if max(abs(x), abs(y), w, h) > MAX_COORD:
            continue
        boxes = out.setdefault(iid, [])
        boxes.append([x, y, w, h, s])
        if len(boxes) > max_per_image:
            raise DynPoseError(
                f"detections file {path}: image {iid} has more than {max_per_image} person boxes with score >= "
                f"{score_thr:g} (a broken file, or keep fewer: --det-score)"
            )
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def category_keypoints(d: dict, where: str) -> list[str]:
    """The keypoint names of the file's first category that lists them; `categories` must be a list of objects."""
    cats = d.get("categories", [])
    if not isinstance(cats, list):
        raise DynPoseError(f"{where}: 'categories' must be a list of category objects, got {_short(cats)}")
    for i, c in enumerate(cats):
        if not isinstance(c, dict):
            raise DynPoseError(f"{where}: category {i}: expected an object {{id, name, keypoints}}, got {_short(c)}")
        names = c.get("keypoints")
        if names:
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DynPoseError(f"{where}: category {i}: 'keypoints' must be a list of names, got {_short(names)}")
            return list(names)
    return []


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
