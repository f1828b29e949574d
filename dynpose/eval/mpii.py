"""MPII PCKh@0.5 and @0.1 in the official evaluation's form (as HRNet's and MMPose's MPII evaluation compute it).

Annotations: MPII JSON as HRNet/MMPose ship it (`test_mpii.json`): a list of {image, joints (16,2), joints_vis (16),
center, scale}, 0-based pixel coordinates, joints in MPII order (0 r_ankle ... 9 head_top ... 15 l_wrist).

Head size, the PCKh normaliser, per person:
  - when the record carries `headbox` ([[x1, y1], [x2, y2]] or [x1, y1, x2, y2]), it is 0.6 * the length of the
    head box diagonal: the official evaluation (`SC_BIAS = 0.6` applied to `headboxes_src` from `gt_valid.mat`),
    which MMPose's `MpiiPCKAccuracy` reproduces from the `headbox` of `mpii_gt_val.mat`;
  - otherwise (our JSON has no head box) it is the head segment length ||head_top (9) - upper_neck (8)||: the
    definition PCKh is named after (a fraction of the head segment), which 0.6 * diagonal approximates. A person
    whose head top or upper neck is not labelled cannot be normalised this way and is left out (with a warning).
Figures are per joint pair as the HRNet README table: Head, Shoulder, Elbow, Wrist, Hip, Knee, Ankle (mean of left
and right), Mean (pelvis and thorax excluded, weighted by labelled-joint counts) and Mean@0.1. Mean@0.1 is at
threshold 0.1 as MMPose 1.x computes it (`pckAll[10]`); HRNet's and MMPose 0.x's code index `pckAll[11]`, which is
threshold 0.11, so their Mean@0.1 reads slightly higher than this one on the same predictions.

A COCO-17 model's predictions ((N,17,2|3)) are mapped to MPII-16 (`dynpose.keypoints.COCO17_TO_MPII16`): the twelve
limb joints exist in both. Pelvis, thorax, upper neck and head top have no COCO joint and are not guessed: they are
not scored (per-joint figure -1, Head -1), and Mean / Mean@0.1 are over the twelve limb joints (the official Mean
also leaves out pelvis and thorax; here upper neck and head top are out too). The result says `mapped_from: coco17`
and a warning says the figures are not comparable to a 16-joint model's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.fileio import read_json
from dynpose.keypoints import COCO17, COCO17_TO_MPII16, MPII16_NAMES, map_keypoints

SC_BIAS = 0.6
NUM_JOINTS = 16
HEAD_TOP, UPPER_NECK = 9, 8
PELVIS, THORAX = 6, 7
# (name, joint ids) in MPII order, as the official table pairs them
GROUPS = (
    ("Head", (9,)),
    ("Shoulder", (13, 12)),
    ("Elbow", (14, 11)),
    ("Wrist", (15, 10)),
    ("Hip", (3, 2)),
    ("Knee", (4, 1)),
    ("Ankle", (5, 0)),
)
NAMES = tuple(g[0] for g in GROUPS) + ("Mean", "Mean@0.1")

log = logging.getLogger(__name__)


# the fields of an MPII record that are checked when present: (shape, what)
_MPII_FIELDS = {
    "joints": ((NUM_JOINTS, 2), "16 [x, y] pairs of finite numbers"),
    "joints_vis": ((NUM_JOINTS,), "16 numbers"),
    "center": ((2,), "[x, y], 2 finite numbers"),
    "scale": ((), "a number > 0 (person height / 200)"),
    "headbox": ((2, 2), "[[x1, y1], [x2, y2]] of finite numbers"),
}


def _mpii_array(r: dict, key: str, where: str) -> np.ndarray:
    shape, what = _MPII_FIELDS[key]
    v = r[key]
    ok = isinstance(v, list | int | float) and not isinstance(v, bool)
    try:
        a = np.asarray(v, dtype=np.float64) if ok else None
    except (TypeError, ValueError, OverflowError):  # strings, ragged lists
        a = None
    if a is None or (a.shape != shape and not (key == "headbox" and a.shape == (4,))) or not np.isfinite(a).all():
        raise DynPoseError(f"{where}: {key!r} must be {what}, got {str(v)[:40]}")
    if key == "scale" and not a > 0:
        raise DynPoseError(f"{where}: 'scale' must be {what}, got {v}")
    return a


def load_mpii(path: str | os.PathLike, need: tuple[str, ...] = ()) -> list[dict]:
    """The MPII JSON annotation list: every record has `joints` (16,2) and `joints_vis` (16) and the fields in
    `need`; each of those and `center`, `scale`, `headbox` present is checked (numbers of the right shape)."""
    d = read_json(path, "MPII annotations")
    if not isinstance(d, list) or not d:
        raise DynPoseError(f"MPII annotations {path}: expected a non-empty JSON list of {{image, joints, joints_vis}}")
    for i, r in enumerate(d):
        where = f"MPII annotations {path}: record {i}"
        missing = [k for k in ("joints", "joints_vis", *need) if not isinstance(r, dict) or k not in r]
        if missing:
            raise DynPoseError(f"{where} lacks {', '.join(missing)}")
        for key in _MPII_FIELDS.keys() & r.keys():
            _mpii_array(r, key, where)
        if "image" in r and (not isinstance(r["image"], str) or not r["image"]):
            raise DynPoseError(f"{where}: 'image' must be a file name, got {str(r['image'])[:40]}")
    return d


def _load_npy(p: Path) -> np.ndarray:
    """A .npy of real numbers (no pickle), or a one-line error naming the file."""
    if not p.is_file():
        raise DynPoseError(f"predictions {p}: file not found")
    try:
        a = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DynPoseError(f"predictions {p}: not a readable .npy array ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "iuf":
        raise DynPoseError(f"predictions {p}: dtype {getattr(a, 'dtype', type(a).__name__)}, expected float (N,16,2) joints")
    return a


def load_predictions(preds: np.ndarray | list | str | os.PathLike) -> np.ndarray:
    """(N,16,2) predictions from an array, a nested list, a .npy file, or a JSON file holding a list of (16,2|3)
    per-person joints or {"preds": ...}; a third column (scores) is dropped. COCO-17 joints ((N,17,2|3)) are mapped
    to MPII order with NaN where COCO has no joint (see the module note)."""
    where = f"predictions {preds}" if isinstance(preds, str | os.PathLike) else "predictions"
    if isinstance(preds, str | os.PathLike):
        p = Path(preds)
        if p.suffix.lower() == ".jsonl":
            raise DynPoseError(
                f"predictions {p}: MPII predictions are one (16,2) list per annotated person, in the annotation "
                "file's order; dynpose-run's .jsonl lists persons per frame and cannot be matched to that order"
            )
        if p.suffix == ".npy":
            preds = _load_npy(p)
        else:
            d = read_json(p, "predictions")
            preds = d["preds"] if isinstance(d, dict) and "preds" in d else d
            if isinstance(preds, list) and preds and isinstance(preds[0], dict):
                preds = [r.get("joints", r.get("keypoints")) for r in preds]
    try:
        a = np.asarray(preds, dtype=np.float64)
    except (TypeError, ValueError):
        raise DynPoseError(f"{where}: not a numeric (N,16,2) array; write one (16,2) list per person") from None
    if a.ndim == 2 and a.shape[1] in (NUM_JOINTS * 2, NUM_JOINTS * 3, COCO17.num * 2, COCO17.num * 3):
        a = a.reshape(len(a), NUM_JOINTS if a.shape[1] in (NUM_JOINTS * 2, NUM_JOINTS * 3) else COCO17.num, -1)
    if a.ndim == 3 and a.shape[1] == COCO17.num and a.shape[2] in (2, 3):
        a = map_keypoints(a, COCO17_TO_MPII16)
    if a.ndim != 3 or a.shape[1] != NUM_JOINTS or a.shape[2] not in (2, 3):
        raise DynPoseError(f"{where}: shape {a.shape}, expected (N,16,2) in MPII joint order (or (N,17,2) COCO-17)")
    return a[:, :, :2]


def head_sizes(anns: list[dict]) -> np.ndarray:
    """PCKh normaliser per person (see the module note); NaN where it cannot be computed."""
    out = np.full(len(anns), np.nan)
    for i, r in enumerate(anns):
        if "headbox" in r:
            hb = np.asarray(r["headbox"], dtype=np.float64).reshape(2, 2)
            out[i] = SC_BIAS * np.linalg.norm(hb[1] - hb[0])
            continue
        j = np.asarray(r["joints"], dtype=np.float64)
        vis = np.asarray(r["joints_vis"])
        if vis[HEAD_TOP] > 0 and vis[UPPER_NECK] > 0:
            out[i] = np.linalg.norm(j[HEAD_TOP] - j[UPPER_NECK])
    return out


def pckh(
    preds: np.ndarray | list | str | os.PathLike,
    anns: list[dict] | str | os.PathLike,
    *,
    thr: float = 0.5,
) -> dict[str, Any]:
    """PCKh per joint group, Mean and Mean@0.1 (percent), following the official MPII evaluation's arithmetic."""
    if not isinstance(anns, list):
        anns = load_mpii(anns)
    p = load_predictions(preds)
    if len(p) != len(anns):
        raise DynPoseError(f"predictions: {len(p)} persons but the annotations have {len(anns)}; keep their order")
    gt = np.asarray([r["joints"] for r in anns], dtype=np.float64)
    visible = np.asarray([r["joints_vis"] for r in anns], dtype=np.float64) > 0
    size = head_sizes(anns)
    bad = ~np.isfinite(size) | (size <= 0)
    if bad.any():
        log.warning(f"{int(bad.sum())} person(s) without a head box or labelled head top/upper neck are left out")
        visible[bad] = False
        size[bad] = 1.0
    # A joint predicted for nobody (NaN throughout: what a COCO-17 model mapped to MPII lacks) is not scored; a NaN
    # for one person is that person's miss.
    scored = ~np.isnan(p).all(axis=(0, 2))
    if not scored.all():
        missing = ", ".join(MPII16_NAMES[j] for j in np.flatnonzero(~scored))
        in_mean = sum(bool(scored[j]) for j in range(NUM_JOINTS) if j not in (PELVIS, THORAX))
        log.warning(
            f"predictions: no prediction for {missing} (a COCO-17 model mapped to MPII-16 has no such joints); "
            f"they are not scored (-1) and Mean is over {in_mean} joints, not comparable to a 16-joint model's Mean",
        )
        visible[:, ~scored] = False
    err = np.linalg.norm(p - gt, axis=2) / size[:, None]  # (N,16)
    count = visible.sum(axis=0)  # per joint

    def rate(t: float) -> np.ndarray:
        hit = ((err <= t) & visible).sum(axis=0)
        return np.where(count > 0, 100.0 * hit / np.maximum(count, 1), 0.0)

    at_thr, at_01 = rate(thr), rate(0.1)
    at_thr[~scored] = -1.0  # -1, as pycocotools marks a figure with nothing to score
    # official: pelvis and thorax excluded from the mean, joints weighted by how often they are labelled
    weight = count.astype(np.float64)
    weight[[PELVIS, THORAX]] = 0
    weight[~scored] = 0
    if weight.sum() == 0:
        raise DynPoseError("MPII annotations: no labelled joints to score")
    weight /= weight.sum()
    out: dict[str, Any] = {
        name: float(np.mean(at_thr[list(ids)])) if scored[list(ids)].all() else -1.0 for name, ids in GROUPS
    }
    out["Mean"] = float(np.sum(at_thr * weight))
    out["Mean@0.1"] = float(np.sum(at_01 * weight))
    out.update(
        kind="mpii",
        names=list(NAMES),
        stats=[out[n] for n in NAMES],
        per_joint=at_thr.tolist(),
        thr=thr,
        num_persons=len(anns),
        num_scored=int((~bad).sum()),
    )
    if not scored.all():
        out["joints_scored"] = int(scored.sum())
    out["summary"] = " | ".join(f"{n} {out[n]:.2f}" for n in NAMES) + "\n"
    return out
