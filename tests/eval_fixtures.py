"""HumanArt- and OCHuman-shaped annotation files made at test time from the real COCO sample in ../shared (no data
files in the repo), and closed-form perturbed results (no RNG, so frozen reference figures cannot drift).

The shapes follow the datasets' own files (as in MMPose's tests/data/humanart/test_humanart.json and
tests/data/ochuman/test_ochuman.json): HumanArt lists 21 keypoint names in its category (COCO's 17, then fingers and
toes), keeps the 17 COCO joints in `keypoints` and the 21-joint set in `keypoints_21` with `num_keypoints_21`, and
adds `self_contact` / `annotator` per person and `category` / `description` per image; OCHuman lists the 17 COCO
names, keeps `segmentation`, `area`, `num_keypoints`, and its images carry only file name, size and id.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

HUMANART_EXTRA = ("left_finger", "right_finger", "left_toe", "right_toe")
# the extra joints are drawn next to these COCO joints (wrists, ankles)
HUMANART_EXTRA_FROM = (9, 10, 15, 16)


def humanart_doc(coco: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(coco)
    cat = d["categories"][0]
    cat["keypoints"] = list(cat["keypoints"]) + list(HUMANART_EXTRA)
    cat["skeleton"] = list(cat.get("skeleton", [])) + [[10, 18], [11, 19], [16, 20], [17, 21]]
    for im in d["images"]:
        for k in ("license", "coco_url", "date_captured", "flickr_url"):
            im.pop(k, None)
        im.update(category="real_human", description="a photo", author="", picture_name=im["file_name"])
    for a in d["annotations"]:
        kp = list(a["keypoints"])
        extra: list[float] = []
        for j in HUMANART_EXTRA_FROM:
            x, y, v = kp[3 * j : 3 * j + 3]
            extra += [x + 6, y + 9, v] if v else [0, 0, 0]
        a.pop("segmentation", None)
        a["keypoints_21"] = kp + extra
        a["num_keypoints_21"] = sum(1 for v in a["keypoints_21"][2::3] if v > 0)
        a.update(self_contact=[], annotator=0)
    return d


def ochuman_doc(coco: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(coco)
    d.pop("licenses", None)
    d["images"] = [{k: im[k] for k in ("file_name", "width", "height", "id")} for im in d["images"]]
    for a in d["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return d


def write(doc: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(doc))
    return path


def closed_form_results(gt: dict[str, Any], px: float = 6.0) -> list[dict[str, Any]]:
    """Every scorable GT person as a result moved by up to `px` pixels along a fixed pattern, scores spread over
    [0.3, 1), and one false positive per image (its first person shifted 80 px, score 0.95): AP between 0 and 1."""
    out = []
    scorable = [a for a in gt["annotations"] if a.get("num_keypoints", 1) > 0 and not a.get("iscrowd", 0)]
    for i, a in enumerate(scorable):
        kp = [float(v) for v in a["keypoints"]]
        for j in range(len(kp) // 3):
            kp[3 * j] += px * math.sin(1.3 * i + 0.7 * j)
            kp[3 * j + 1] += px * math.cos(0.9 * i + 1.1 * j)
            kp[3 * j + 2] = 1.0
        score = 0.3 + 0.7 * ((0.618034 * (i + 1)) % 1.0)
        out.append({"image_id": a["image_id"], "category_id": 1, "keypoints": kp, "score": score})
    for iid in sorted({r["image_id"] for r in out}):
        first = next(r for r in out if r["image_id"] == iid)
        kp = [v + 80.0 if j % 3 != 2 else v for j, v in enumerate(first["keypoints"])]
        out.append({**first, "keypoints": kp, "score": 0.95})
    return out
