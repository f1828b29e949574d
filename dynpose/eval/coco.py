"""COCO-style keypoint AP/AR with pycocotools: COCO, OCHuman, HumanArt (17 keypoints) and CrowdPose (14).

The numbers come from pycocotools' own `COCOeval` (iouType 'keypoints'); this module only prepares its inputs,
handles the cases where pycocotools crashes (empty results, foreign image ids) and names the figures.

CrowdPose: crowdposetools (the official CrowdPose API) is a fork of pycocotools that differs in four places; we
run plain pycocotools with those four differences set as data, so no fork is needed:
  1. OKS sigmas: the 14 CrowdPose sigmas (`dynpose.keypoints.CROWDPOSE14`).
  2. The OKS scale: the GT has no 'area'; crowdposetools uses bbox w*h*0.53 (for OKS and for the area filter),
     so we write that into each GT annotation's 'area' before evaluating.
  3. One area range, 'all' ([0, 1e5^2]), and maxDets 20 (crowdposetools reports no medium/large figures).
  4. AP(easy/medium/hard): images are split by their `crowdIndex` into < 0.2, 0.2 to < 0.8 and >= 0.8 (the split
     crowdposetools' `summarize` uses: `get_type_result(first=0.2, second=0.8)`; the CrowdPose paper describes
     0.1/0.8, the code uses 0.2), each subset is evaluated on its own, and the figure is
     round(mean(precision[:, :, :, area 'all', :]), 4) over all entries, as crowdposetools computes it.

Results come as COCO result records (a JSON list) or as the `.jsonl` `dynpose-run --out` writes (one frame per
line, persons with [[x, y, score], ...] keypoints), converted here to COCO records.

A COCO-17 model on CrowdPose: its 51-value results are mapped to CrowdPose-14 (`dynpose.keypoints.
COCO17_TO_CROWDPOSE14`). CrowdPose's head and neck have no COCO joint; they are not guessed but left out of the
scoring (the ground truth's head and neck are set unlabelled in the copy that is evaluated), so the figures are
CrowdPose AP over the twelve limb joints, reported with `mapped_from: coco17` and a warning.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.data import (
    KeypointLayout,
    as_box,
    as_id,
    as_number,
    category_keypoints,
    check_coords,
    check_record,
    flat_keypoints,
    keypoint_layout,
)
from dynpose.errors import DynPoseError
from dynpose.fileio import parse_json, read_json
from dynpose.keypoints import COCO17, COCO17_TO_CROWDPOSE14, CROWDPOSE14, map_keypoints

COCO_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
CROWDPOSE_NAMES = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP(easy)", "AP(medium)", "AP(hard)")
# crowdposetools' summarize() splits images by crowdIndex at these two values
CROWD_SPLIT = (0.2, 0.8)
CROWDPOSE_AREA_FACTOR = 0.53
KINDS = ("auto", "coco", "crowdpose")

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The evaluation's notes (e.g. the annotation-id-0 one) off for the block: a scan that evaluates many routings
    of the same data would otherwise repeat them at every step."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _gt_annotation(a: Any, num: int | None, where: str) -> dict[str, Any]:
    """One checked annotation with the fields COCO keypoint eval reads (others, e.g. segmentation, are dropped)."""
    a = check_record(a, where, ("id", "image_id", "bbox", "keypoints"))
    out: dict[str, Any] = {
        "id": as_id(a["id"], "id", where),
        "image_id": as_id(a["image_id"], "image_id", where),
        "category_id": as_id(a.get("category_id", 1), "category_id", where),
        "iscrowd": as_id(a.get("iscrowd", 0), "iscrowd", where),
        "bbox": check_coords(as_box(a["bbox"], where), "bbox", where).tolist(),
        "keypoints": check_coords(flat_keypoints(a["keypoints"], num, where), "keypoints", where).reshape(-1).tolist(),
    }
    if "num_keypoints" in a:
        out["num_keypoints"] = as_id(a["num_keypoints"], "num_keypoints", where)
    if "area" in a:
        out["area"] = as_number(a["area"], "area", where, finite=True)
    return out


def _gt_image(im: Any, where: str) -> dict[str, Any]:
    im = check_record(im, where, ("id",))
    out: dict[str, Any] = {"id": as_id(im["id"], "id", where)}
    for k in ("width", "height"):
        if k in im:
            out[k] = as_id(im[k], k, where)
    if isinstance(im.get("file_name"), str):
        out["file_name"] = im["file_name"]
    if "crowdIndex" in im:
        out["crowdIndex"] = as_number(im["crowdIndex"], "crowdIndex", where, finite=True)
    return out


def check_gt(d: Any, where: str) -> dict[str, Any]:
    """The ground truth as pycocotools gets it, rebuilt from checked fields: every image and annotation an object
    with integer ids, boxes and keypoints of finite numbers (3 per keypoint of the category), categories a list of
    objects. A one-line DynPoseError naming the record and the field, where pycocotools would raise a KeyError."""
    if not isinstance(d, dict) or "images" not in d or "annotations" not in d:
        raise DynPoseError(f"{where}: not COCO format (needs 'images' and 'annotations')")
    for key in ("images", "annotations"):
        if not isinstance(d[key], list):
            raise DynPoseError(f"{where}: {key!r} must be a list, got {type(d[key]).__name__}")
    category_keypoints(d, where)  # categories: a list of objects, names strings
    layout = keypoint_layout(d, where)  # the annotations' count where an extended name list disagrees (HumanArt)
    cats = [
        {
            **{k: c[k] for k in ("name", "supercategory", "keypoints", "skeleton") if k in c},
            "id": as_id(c.get("id", 1), "id", f"{where}: category {i}"),
        }
        for i, c in enumerate(d.get("categories", []))
    ]
    images = [_gt_image(im, f"{where}: image {i}") for i, im in enumerate(d["images"])]
    anns = [_gt_annotation(a, layout.num, f"{where}: annotation {i}") for i, a in enumerate(d["annotations"])]
    return {"images": images, "annotations": anns, "categories": cats}


def resolve_kind(gt: dict, kind: str, where: str = "ground truth", layout: KeypointLayout | None = None) -> str:
    """'coco' or 'crowdpose' from the GT's keypoint count (17 or 14; `dynpose.data.keypoint_layout`, passed in when
    the caller has it); an explicit kind must match that count."""
    if kind not in KINDS:
        raise DynPoseError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    k = (layout or keypoint_layout(gt, where)).num
    if k is None:
        raise DynPoseError(f"{where}: no keypoint category and no annotated keypoints; is this a keypoint annotation file?")
    by_count = {COCO17.num: "coco", CROWDPOSE14.num: "crowdpose"}
    if k not in by_count:
        raise DynPoseError(f"{where}: {k} keypoints per person; COCO-style eval knows 17 (COCO) and 14 (CrowdPose)")
    if kind != "auto" and by_count[k] != kind:
        want = COCO17.num if kind == "coco" else CROWDPOSE14.num
        raise DynPoseError(
            f"{where}: kind {kind!r} needs {want} keypoints per person, the file has {k}; use --kind {by_count[k]} (or auto)"
        )
    return by_count[k]


def _frame_results(rec: Any, where: str) -> list[dict]:
    """COCO records of one `dynpose-run` JSON line ({frame, name, image_id, persons: [{score, keypoints}]})."""
    if not isinstance(rec, dict) or "image_id" not in rec or not isinstance(rec.get("persons"), list):
        raise DynPoseError(f"{where}: expected a dynpose-run frame {{frame, name, image_id, persons: [...]}}")
    iid = as_id(rec["image_id"], "image_id", where)
    out = []
    for j, p in enumerate(rec["persons"]):
        pw = f"{where} person {j}"
        if not isinstance(p, dict) or "keypoints" not in p or "score" not in p:
            raise DynPoseError(f"{pw}: needs keypoints and score")
        kp = p["keypoints"]
        if not isinstance(kp, list) or not all(isinstance(k, list) and len(k) == 3 for k in kp):
            raise DynPoseError(f"{pw}: 'keypoints' must be a list of [x, y, score] triples")
        flat = [as_number(v, "keypoints", pw) for k in kp for v in k]
        out.append({"image_id": iid, "category_id": 1, "keypoints": flat, "score": as_number(p["score"], "score", pw)})
    return out


def jsonl_results(path: str | os.PathLike) -> list[dict]:
    """COCO result records from the `.jsonl` that `dynpose-run --out` writes. Frames without an image id (a video,
    images not named by their COCO id) cannot be matched to the ground truth: they are left out with a warning."""
    p = Path(path)
    if not p.is_file():
        raise DynPoseError(f"results {p}: file not found")
    out: list[dict] = []
    no_id: list[str] = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = parse_json(line, f"results {p}: line {n}", hint="is this dynpose-run's .jsonl?")
            if isinstance(rec, dict) and rec.get("image_id", 0) is None:
                no_id.append(str(rec.get("name", f"line {n}")))
                continue
            out += _frame_results(rec, f"results {p}: line {n}")
    if no_id:
        log.warning(
            f"results {p}: {len(no_id)} frame(s) have no image id (e.g. {no_id[0]}) and are not scored; name images "
            "by their numeric COCO id (000000000785.jpg) or run with --ann",
        )
    return out


def load_results(results: list | str | os.PathLike) -> list:
    """Result records from a list, a COCO results JSON file, or dynpose-run's `.jsonl` (by suffix, or a file whose
    first character opens an object rather than a list)."""
    if isinstance(results, list):
        return results
    p = Path(results)
    if p.suffix.lower() == ".jsonl":
        return jsonl_results(p)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4096).lstrip().startswith(b"{"):
                return jsonl_results(p)
    return read_json(p, "results", hint="pass a COCO results file or dynpose-run's .jsonl")


def _check_record(r: Any, i: int, where: str) -> dict:
    if not isinstance(r, dict) or "image_id" not in r or "keypoints" not in r or "score" not in r:
        raise DynPoseError(f"{where}: record {i} needs image_id, keypoints and score")
    rw = f"{where}: record {i}"
    kp = r["keypoints"]
    if not isinstance(kp, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in kp):
        raise DynPoseError(f"{rw}: 'keypoints' must be a flat list of numbers [x, y, score] * K")
    r = dict(r)
    r["image_id"] = as_id(r["image_id"], "image_id", rw)
    as_number(r["score"], "score", rw)
    r.setdefault("category_id", 1)
    return r


def _check_results(results: list, gt: dict, num_kpts: int, where: str) -> tuple[list[dict], bool]:
    """Validate and copy results (pycocotools' loadRes writes area/id/bbox into each record, only at the top level, so a
    shallow copy keeps the caller's records intact); give a DynPoseError where pycocotools would assert. COCO-17
    records against CrowdPose-14 ground truth are mapped (module note); returns (records, mapped)."""
    if not isinstance(results, list):
        raise DynPoseError(f"{where}: expected a JSON list of {{image_id, category_id, keypoints, score}} records")
    gt_ids = {int(im["id"]) for im in gt["images"]}
    out = [_check_record(r, i, where) for i, r in enumerate(results)]
    mapped = num_kpts == CROWDPOSE14.num and bool(out) and all(len(r["keypoints"]) == 3 * COCO17.num for r in out)
    for i, r in enumerate(out):
        if mapped:
            kp = map_keypoints(np.asarray(r["keypoints"]).reshape(COCO17.num, 3), COCO17_TO_CROWDPOSE14, fill=0.0)
            r["keypoints"] = kp.reshape(-1).tolist()
        elif len(r["keypoints"]) != num_kpts * 3:
            n = len(r["keypoints"])
            raise DynPoseError(
                f"{where}: record {i} has {n} keypoint values, the ground truth needs {num_kpts * 3} ({num_kpts} "
                f"keypoints x 3){_count_hint(n, num_kpts)}"
            )
    foreign = sorted({r["image_id"] for r in out} - gt_ids, key=str)
    if foreign:
        few = ", ".join(str(x) for x in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise DynPoseError(
            f"{where}: {len(foreign)} image id(s) not in the ground truth ({few}); evaluate against the annotation "
            "file the results were made from"
        )
    return out, mapped


def _count_hint(n: int, num_kpts: int) -> str:
    if n == 3 * CROWDPOSE14.num and num_kpts == COCO17.num:
        return "; these are CrowdPose-14 results, which COCO-17 ground truth cannot score"
    if n == 3 * COCO17.num:
        return "; COCO-17 results are mapped to CrowdPose-14 only when every record has 51 values"
    return ""


def _mask_unmapped(gt: dict) -> dict:
    """The CrowdPose GT with the joints COCO-17 lacks (head, neck) set unlabelled, so OKS is over the 12 it has."""
    unmapped = [j for j, src in enumerate(COCO17_TO_CROWDPOSE14) if src is None]
    for a in gt["annotations"]:
        kp = list(a["keypoints"])
        for j in unmapped:
            kp[3 * j : 3 * j + 3] = [0, 0, 0]
        a["keypoints"] = kp
        a["num_keypoints"] = int(np.count_nonzero(np.asarray(kp[2::3]) > 0))
    return gt


def _coco_api(dataset: dict) -> Any:
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def _load_results(coco_gt: Any, results: list[dict]) -> Any:
    if results:
        return coco_gt.loadRes(results)
    # pycocotools' loadRes indexes results[0]; an empty result set is a COCO object with no annotations instead,
    # which COCOeval scores as it would any image without detections (AP 0 where there is GT, -1 where none).
    return _coco_api(
        {
            "images": list(coco_gt.dataset["images"]),
            "annotations": [],
            "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        }
    )


def _crowdpose_gt(gt: dict) -> dict:
    gt = copy.deepcopy(gt)
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        a["area"] = w * h * CROWDPOSE_AREA_FACTOR
        a.setdefault("iscrowd", 0)
        if "num_keypoints" not in a:
            a["num_keypoints"] = int(np.count_nonzero(np.asarray(a["keypoints"][2::3]) > 0))
    return gt


def _labelled(a: dict) -> int:
    return int(np.count_nonzero(np.asarray(a.get("keypoints") or [], dtype=np.float64)[2::3] > 0))


def _coco_gt(gt: dict, where: str) -> dict:
    """COCO-kind ground truth as pycocotools needs it. pycocotools reads each person's 'num_keypoints' (its ignore
    rule) and 'area' (the OKS scale) and crashes without them; xtcocotools (what MMPose scores OCHuman and HumanArt
    with) counts the labelled joints instead and, for files without 'area' (its use_area=False), takes bbox w*h*0.53.
    Missing fields are filled the xtcocotools way (a copy, with a warning); present ones are used as they are, with a
    warning where 'num_keypoints' disagrees with the labelled joints, the one place the two tools then differ."""
    anns = gt["annotations"]
    off = sum("num_keypoints" in a and a["num_keypoints"] != _labelled(a) for a in anns)
    if off:
        log.warning(
            f"{where}: {off} person(s) have a 'num_keypoints' other than their labelled joints; pycocotools (used "
            "here) ignores a person by 'num_keypoints' == 0, xtcocotools (MMPose) by no labelled joint",
        )
    no_num = sum("num_keypoints" not in a for a in anns)
    no_area = sum("area" not in a for a in anns)
    if not no_num and not no_area:
        return gt
    if no_area:
        log.warning(f"{where}: {no_area} person(s) without 'area'; their OKS scale is bbox w*h*0.53 (xtcocotools)")
    fixed = []
    for a in anns:
        a = dict(a)
        a.setdefault("num_keypoints", _labelled(a))
        if "area" not in a:
            a["area"] = a["bbox"][2] * a["bbox"][3] * CROWDPOSE_AREA_FACTOR
        fixed.append(a)
    return {**gt, "annotations": fixed}


def _prepare_gt(gt: dict, kind: str, mapped: bool, where: str) -> dict:
    """The ground truth pycocotools is given: the kind's fixes (`_coco_gt`, `_crowdpose_gt`), head and neck masked for
    mapped COCO-17 results; the note on annotation id 0."""
    if any(a.get("id") == 0 for a in gt["annotations"]):
        log.warning(
            f"{where}: an annotation has id 0, which pycocotools reads as 'unmatched'; its matches count as false "
            "positives (renumber annotation ids from 1 to avoid this)",
        )
    out = _crowdpose_gt(gt) if kind == "crowdpose" else _coco_gt(gt, where)
    return _mask_unmapped(out) if mapped else out


def _cocoeval(coco_gt: Any, coco_dt: Any, kind: str, img_ids: list | None = None) -> Any:
    from pycocotools.cocoeval import COCOeval

    ev = COCOeval(coco_gt, coco_dt, "keypoints")
    if kind == "crowdpose":
        ev.params.kpt_oks_sigmas = np.array(CROWDPOSE14.sigmas)
        ev.params.areaRng = [[0**2, 1e5**2]]
        ev.params.areaRngLbl = ["all"]
        ev.params.maxDets = [20]
    if img_ids is not None:
        ev.params.imgIds = img_ids
    return ev


def _crowd_type_results(coco_gt: Any, coco_dt: Any, gt: dict) -> list[float]:
    missing = [im["id"] for im in gt["images"] if "crowdIndex" not in im]
    if missing:
        log.warning(f"{len(missing)} image(s) lack 'crowdIndex' (e.g. {missing[0]}); AP(easy/medium/hard) set to -1")
        return [-1.0, -1.0, -1.0]
    lo, hi = CROWD_SPLIT
    subsets: list[list] = [[], [], []]
    for im in gt["images"]:
        ci = im["crowdIndex"]
        subsets[0 if ci < lo else 1 if ci < hi else 2].append(im["id"])
    out = []
    for ids in subsets:
        ev = _cocoeval(coco_gt, coco_dt, "crowdpose", img_ids=ids)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
        out.append(round(float(np.mean(ev.eval["precision"][:, :, :, 0, :])), 4))
    return out


def evaluate_results(
    results: list | str | os.PathLike,
    gt: str | os.PathLike,
    *,
    kind: str = "auto",
    verbose: bool = False,
) -> dict[str, Any]:
    """Keypoint AP/AR of `results` (COCO result records or a JSON file of them) against the annotation file `gt`.

    Returns the named figures (COCO: AP AP50 AP75 APm APl AR AR50 AR75 ARm ARl; CrowdPose: AP AP50 AP75 AR AR50
    AR75 AP(easy) AP(medium) AP(hard)), plus `kind`, `names`, `stats` (the figures in that order), `summary` (text)
    and counts. pycocotools' own prints are shown only when `verbose`.
    """
    raw = read_json(gt, "ground truth", hint="pass a COCO-format file")
    gt_data = check_gt(raw, f"ground truth {gt}")
    layout = keypoint_layout(raw, f"ground truth {gt}")  # the checked copy drops fields (keypoints_21) it reports
    kind = resolve_kind(gt_data, kind, f"ground truth {gt}", layout)
    note = layout.note()
    if note:
        log.info(f"ground truth {gt}: {note}")
    where = f"results {results}" if not isinstance(results, list) else "results"
    raw = load_results(results)
    num_kpts = COCO17.num if kind == "coco" else CROWDPOSE14.num
    res, mapped = _check_results(raw, gt_data, num_kpts, where)
    if mapped:
        log.warning(
            f"{where}: COCO-17 results mapped to CrowdPose-14; CrowdPose's head and neck have no COCO joint and are "
            "left out, so these figures are over the 12 limb joints (not comparable to a CrowdPose-14 model's)",
        )
    if not res:
        log.warning(f"{where}: no results; every AP/AR is 0 (or -1 where the ground truth has no persons)")

    gt_eval = _prepare_gt(gt_data, kind, mapped, f"ground truth {gt}")
    out_buf = io.StringIO()
    sink: Any = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(out_buf)
    with sink:
        coco_gt = _coco_api(gt_eval)
        coco_dt = _load_results(coco_gt, res)
        ev = _cocoeval(coco_gt, coco_dt, kind)
        ev.evaluate()
        ev.accumulate()
        summary_buf = io.StringIO()
        with contextlib.redirect_stdout(summary_buf):
            ev.summarize()
    s = [float(v) for v in ev.stats]
    names: tuple[str, ...]
    if kind == "coco":
        names, stats = COCO_NAMES, s
        summary = summary_buf.getvalue()
    else:
        names = CROWDPOSE_NAMES
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
            types = _crowd_type_results(coco_gt, coco_dt, gt_eval)
        stats = s[0:3] + s[5:8] + types
        lines = [ln for ln in summary_buf.getvalue().splitlines() if "area=   all" in ln]
        for label, v in zip(("easy", "medium", "hard"), types, strict=True):
            lines.append(f" Average Precision  (AP) @[ IoU=0.50:0.95 | type={label:>6s} | maxDets= 20 ] = {v:0.3f}")
        summary = "\n".join(lines) + "\n"
    if verbose:
        print(summary, end="")
    out: dict[str, Any] = {"kind": kind, **dict(zip(names, stats, strict=True))}
    out.update(keypoints_per_person=layout.num, keypoints_from=layout.source)
    out.update(names=list(names), stats=stats, summary=summary, num_results=len(res), num_images=len(gt_data["images"]))
    if mapped:
        out.update(mapped_from="coco17", joints_scored=sum(src is not None for src in COCO17_TO_CROWDPOSE14))
    return out
