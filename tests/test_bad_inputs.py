"""The bad-input corpus: every malformed file or argument a user can hand the low-level readers and writers, each
expected to give one `DynPoseError` line that names the file (and the record) and says what is wrong.

To grow it, add a case to the list of the entry point it reaches: (id, input, regex the message must match).
Each case is checked for: a DynPoseError (no other exception type), one line, the file's path in it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from dynpose.data import load_coco, load_detections
from dynpose.engines.manifest import MANIFEST_NAME, Entry, Manifest
from dynpose.errors import DynPoseError
from dynpose.eval.coco import evaluate_results
from dynpose.fileio import write_json_atomic
from dynpose.io.sources import FrameSource, decode_image, open_source
from dynpose.models.card import ModelCard


def one_line_error(fn: Callable[[], Any], match: str, names: str | Path | None = None) -> str:
    with pytest.raises(DynPoseError) as e:
        fn()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    assert re.search(match, msg), f"{match!r} not in {msg!r}"
    if names is not None:
        assert str(names) in msg, f"{names} not named in {msg!r}"
    return msg


# -- detections files (dynpose.data.load_detections) --------------------------------------------------------------
DET = {"image_id": 785, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.9, "category_id": 1}
DETECTIONS_CASES = [
    ("not-a-list", {"image_id": 785}, r"expected a JSON list"),
    ("list-of-ints", [1, 2, 3], r"record 0: expected an object with image_id, bbox, got 1"),
    ("null-record", [None], r"record 0: expected an object"),
    ("no-image-id", [{"bbox": [1, 2, 3, 4]}], r"record 0: lacks 'image_id'"),
    ("no-bbox", [{"image_id": 785}], r"lacks 'bbox'"),
    ("string-bbox", [DET | {"bbox": "1234"}], r"record 0: 'bbox' must be a list of 4 numbers .*'1234'"),
    ("short-bbox", [DET, DET | {"bbox": [1, 2, 3]}], r"record 1: 'bbox' must be a list of 4 numbers"),
    ("string-in-bbox", [DET | {"bbox": [1, 2, "3", 4]}], r"'bbox' must be a list of 4 numbers"),
    ("bool-in-bbox", [DET | {"bbox": [1, 2, True, 4]}], r"'bbox' must be a list of 4 numbers"),
    ("fractional-id", [DET | {"image_id": 785.7}], r"record 0: 'image_id' must be an integer, got 785.7"),
    ("string-id", [DET | {"image_id": "785"}], r"'image_id' must be an integer, got '785'"),
    ("bool-id", [DET | {"image_id": True}], r"'image_id' must be an integer, got True"),
    ("string-score", [DET | {"score": "high"}], r"'score' must be a number, got 'high'"),
    ("string-category", [DET | {"category_id": "1"}], r"'category_id' must be an integer"),
    ("not-json", "[{'image_id': 785}]", r"not valid JSON"),
    ("nested-100k", "[" * 100_000 + "]" * 100_000, r"JSON nested too deeply"),
    (
        "5000-digit-int",
        "[" + json.dumps(DET)[:-1] + ', "image_id": ' + "7" * 5000 + "}]",
        r"a number in the JSON is too long",
    ),
    ("4000-digit-int-box", [DET | {"bbox": [1, 2, 3, int("9" * 4000)]}], r"'bbox' must be a list of 4 numbers"),
    ("100k-boxes-one-image", [DET] * 100_000, r"image 785 has more than 1000 person boxes .* --det-score"),
]


@pytest.mark.parametrize("content,match", [c[1:] for c in DETECTIONS_CASES], ids=[c[0] for c in DETECTIONS_CASES])
def test_bad_detections_file(tmp_path: Path, content: Any, match: str) -> None:
    f = tmp_path / "dets.json"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    one_line_error(lambda: load_detections(f), match, names=f)


def test_valid_detections_keep_working(tmp_path: Path, shared: Path) -> None:
    real = load_detections(shared / "data" / "coco" / "test_coco_det_AP_H_56.json")  # float scores, int ids
    assert sorted(real) == [785, 40083, 196141, 197388] and all(v.shape[1] == 5 for v in real.values())
    f = tmp_path / "dets.json"
    recs = [
        DET | {"image_id": 785.0},  # an integral float id is the integer
        DET | {"bbox": [1, 2, 0, 4]},  # empty box: dropped
        DET | {"score": float("nan")},  # NaN score (json reads NaN): dropped
        DET | {"category_id": 3},  # not a person: skipped
        {"image_id": 9, "bbox": (5, 5, 5, 5)},  # no score: 1.0
    ]
    f.write_text(json.dumps(recs))
    d = load_detections(f)
    assert sorted(d) == [9, 785] and d[785].tolist() == [[10, 20, 30, 40, 0.9]] and d[9][0, 4] == 1.0


# -- COCO annotation files (dynpose.data.load_coco) -----------------------------------------------------------------
def coco_doc() -> dict:
    kp = [100.0, 100.0, 2] * 17
    return {
        "images": [{"id": 785, "file_name": "000000000785.jpg", "width": 640, "height": 425}],
        "annotations": [
            {"id": 1, "image_id": 785, "category_id": 1, "bbox": [1, 2, 30, 40], "keypoints": kp, "area": 900.0}
        ],
        "categories": [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(17)]}],
    }


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation that sets a field given as 'annotations.0.bbox' (list indices as numbers)."""

    def apply(d: dict) -> None:
        *head, last = path.split(".")
        node: Any = d
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return apply


def _del(path: str) -> Callable[[dict], None]:
    def apply(d: dict) -> None:
        *head, last = path.split(".")
        node: Any = d
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        del node[last]

    return apply


ANNOTATION_CASES = [
    ("images-not-list", _set("images", {"785": {}}), r"'images' must be a list, got dict"),
    ("annotations-not-list", _set("annotations", "abc"), r"'annotations' must be a list"),
    ("image-null", _set("images.0", None), r"image 0: expected an object"),
    ("image-fractional-id", _set("images.0.id", 785.5), r"image 0: 'id' must be an integer"),
    ("image-no-file-name", _del("images.0.file_name"), r"image 0: lacks 'file_name'"),
    ("image-file-name-number", _set("images.0.file_name", 785), r"'file_name' must be a non-empty string"),
    ("image-string-width", _set("images.0.width", "640"), r"'width' must be an integer"),
    ("annotation-null", _set("annotations.0", None), r"annotation 0: expected an object"),
    ("string-bbox", _set("annotations.0.bbox", "1234"), r"annotation 0: 'bbox' must be a list of 4 numbers"),
    ("fractional-image-id", _set("annotations.0.image_id", 785.7), r"'image_id' must be an integer, got 785.7"),
    ("keypoints-wrong-length", _set("annotations.0.keypoints", [1.0] * 50), r"'keypoints' must be a flat list"),
    ("keypoints-other-count", _set("annotations.0.keypoints", [1.0] * 42), r"42 keypoint values, .* 17 keypoints need 51"),
    ("keypoints-strings", _set("annotations.0.keypoints", ["1"] * 51), r"'keypoints' must be a flat list of"),
    ("area-string", _set("annotations.0.area", "big"), r"'area' must be a finite number"),
    ("bbox-1e308", _set("annotations.0.bbox", [0, 0, 1e308, 1e308]), r"annotation 0: 'bbox' holds 1e\+308; .* finite"),
    ("keypoints-nan", _set("annotations.0.keypoints", [float("nan")] * 51), r"'keypoints' holds nan"),
    ("bbox-huge-int", _set("annotations.0.bbox", [0, 0, 10**400, 5]), r"'bbox' must be a list of 4 numbers"),
    ("categories-strings", _set("categories", ["person"]), r"category 0: expected an object \{id, name, keypoints\}"),
    ("categories-number", _set("categories", 5), r"'categories' must be a list of category objects, got 5"),
    ("category-keypoints-number", _set("categories.0.keypoints", 17), r"category 0: 'keypoints' must be a list of names"),
    ("iscrowd-string", _set("annotations.0.iscrowd", "no"), r"'iscrowd' must be an integer"),
    ("category-string", _set("annotations.0.category_id", "person"), r"'category_id' must be an integer"),
]


@pytest.mark.parametrize("mutate,match", [c[1:] for c in ANNOTATION_CASES], ids=[c[0] for c in ANNOTATION_CASES])
def test_bad_annotation_file(tmp_path: Path, mutate: Callable[[dict], None], match: str) -> None:
    d = coco_doc()
    mutate(d)
    f = tmp_path / "ann.json"
    f.write_text(json.dumps(d))
    one_line_error(lambda: load_coco(f), match, names=f)


def test_valid_annotation_files_keep_working(shared: Path, tmp_path: Path) -> None:
    counts = {}
    for rel in ("coco/test_coco.json", "crowdpose/test_crowdpose.json", "exlpose/test_exlpose.json"):
        ds = load_coco(shared / "data" / rel)
        counts[rel] = sum(len(im.persons) for im in ds.images.values())
    assert counts == {"coco/test_coco.json": 14, "crowdpose/test_crowdpose.json": 5, "exlpose/test_exlpose.json": 6}
    d = coco_doc()
    d["annotations"][0].pop("keypoints")  # a box-only annotation: no keypoints, still a person
    d["images"][0]["id"] = 785.0
    f = tmp_path / "ann.json"
    f.write_text(json.dumps(d))
    ds = load_coco(f)
    assert ds.images[785].persons[0].keypoints.shape == (0, 3)


# -- engine manifests (dynpose.engines.manifest.Manifest.load) ------------------------------------------------------
def manifest_doc(tmp_path: Path) -> dict:
    (tmp_path / "small.onnx").write_bytes(b"onnx bytes")
    e = Entry(
        role="small",
        model="tiny",
        file="small.onnx",
        format="onnx",
        precision="fp32",
        card=ModelCard(name="tiny", input_width=96, input_height=128),
        sha256="0" * 64,
        size=10,
    )
    return Manifest(entries=[e]).to_dict()


MANIFEST_CASES = [
    ("entries-string", _set("entries", "abc"), r"'entries' must be a list of entry objects, got 'abc'"),
    ("entries-null", _set("entries", [None]), r"entry 0: expected an entry object"),
    ("entries-int", _set("entries", [3]), r"entry 0: expected an entry object .* got 3"),
    ("max-batch-zero", _set("entries.0.max_batch", 0), r"entry 0: 'max_batch' must be an integer >= 1, got 0"),
    ("max-batch-negative", _set("entries.0.max_batch", -8), r"'max_batch' must be an integer >= 1, got -8"),
    ("max-batch-float", _set("entries.0.max_batch", 2.5), r"'max_batch' must be an integer >= 1, got 2.5"),
    ("max-batch-string", _set("entries.0.max_batch", "64"), r"'max_batch' must be an integer >= 1, got '64'"),
    ("max-batch-bool", _set("entries.0.max_batch", True), r"'max_batch' must be an integer >= 1, got True"),
    ("min-batch-zero", _set("entries.0.min_batch", 0), r"'min_batch' must be an integer >= 1"),
    ("min-above-max", _set("entries.0.min_batch", 128), r"'min_batch' 128 is above 'max_batch' 64"),
    ("size-negative", _set("entries.0.size", -1), r"'size' must be a byte count"),
    ("size-string", _set("entries.0.size", "10"), r"'size' must be a byte count"),
    ("sha256-short", _set("entries.0.sha256", "abc"), r"'sha256' must be 64 hex digits"),
    ("sha256-null", _set("entries.0.sha256", None), r"'sha256' must be 64 hex digits"),
    ("file-climbs-out", _set("entries.0.file", "../small.onnx"), r"'file' '../small.onnx' points outside the engine dir"),
    ("file-absolute", _set("entries.0.file", "/etc/passwd"), r"points outside the engine dir"),
    ("file-empty", _set("entries.0.file", ""), r"'file' must be a non-empty string"),
    ("file-number", _set("entries.0.file", 7), r"'file' must be a non-empty string"),
    ("role-unknown", _set("entries.0.role", "medium"), r"role must be one of"),
    ("format-list", _set("entries.0.format", ["onnx"]), r"'format' must be a non-empty string"),
    ("card-string", _set("entries.0.card", "tiny"), r"card: expected a JSON object"),
    ("card-missing", _del("entries.0.card"), r"missing field 'card'"),
    # a card naming a zoo architecture is checked like any other (no field is guessed)
    ("card-arch-no-size", _del("entries.0.card.input_width"), r"missing required field\(s\) \['input_width'\]"),
    ("checks-string", _set("entries.0.checks", "ok"), r"'checks' must be an object"),
    ("tensorrt-string", _set("entries.0.tensorrt", "10.0"), r"'tensorrt' must be an object or null"),
    ("source-climbs-out", _set("entries.0.source", "../x.onnx"), r"'source' '../x.onnx' points outside"),
    ("data-files-list", _set("entries.0.data_files", ["a.data"]), r"'data_files' must be an object"),
    ("data-file-no-hash", _set("entries.0.data_files", {"a.data": {"size": 1}}), r"data file 'a.data': 'sha256' must"),
    ("data-file-climbs-out", _set("entries.0.data_files", {"../a.data": {}}), r"data file '../a.data' points outside"),
    ("unknown-field", _set("entries.0.speed", "fast"), r"unknown field\(s\) \['speed'\]"),
    ("route-number", _set("route", 0.6), r"'route' must be a policy string"),
    ("notes-list", _set("notes", []), r"'notes' must be an object"),
    ("schema-other", _set("schema", "other"), r"not a dynpose manifest"),
    ("version-other", _set("version", 99), r"manifest version 99"),
]


@pytest.mark.parametrize("mutate,match", [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_bad_manifest(tmp_path: Path, mutate: Callable[[dict], None], match: str) -> None:
    d = manifest_doc(tmp_path)
    mutate(d)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(d))
    one_line_error(lambda: Manifest.load(tmp_path, verify=False), match, names=tmp_path / MANIFEST_NAME)


def test_manifest_without_data_files_still_loads(tmp_path: Path) -> None:
    """Manifests written before `data_files` existed load; ones without external data are written as before."""
    d = manifest_doc(tmp_path)
    assert "data_files" not in d["entries"][0]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(d))
    m = Manifest.load(tmp_path, verify=False)
    assert m.entries[0].data_files == {} and m.entries[0].max_batch == 64


# -- results for dynpose-eval (dynpose.eval.coco.evaluate_results) ---------------------------------------------------
RES = {"image_id": 785, "category_id": 1, "keypoints": [100.0, 100.0, 1.0] * 17, "score": 0.9}
FRAME = {
    "frame": 0,
    "name": "000000000785.jpg",
    "image_id": 785,
    "persons": [{"score": 0.9, "keypoints": [[1, 2, 0.5]] * 17}],
}
RESULTS_CASES = [
    ("list-of-ints", json.dumps([1, 2, 3]), r"record 0 needs image_id, keypoints and score"),
    ("fractional-id", json.dumps([RES | {"image_id": 785.7}]), r"record 0: 'image_id' must be an integer"),
    ("string-keypoints", json.dumps([RES | {"keypoints": ["1"] * 51}]), r"'keypoints' must be a flat list of numbers"),
    ("string-score", json.dumps([RES | {"score": "x"}]), r"'score' must be a number"),
    ("crowdpose-on-coco", json.dumps([RES | {"keypoints": [1.0] * 42}]), r"42 keypoint values.*CrowdPose-14 results"),
    ("foreign-id", json.dumps([RES | {"image_id": 1}]), r"image id\(s\) not in the ground truth"),
    ("jsonl-bad-line", json.dumps(FRAME) + "\n{oops\n", r"line 2: not valid JSON"),
    ("jsonl-deep-line", json.dumps(FRAME) + "\n" + "[" * 100_000 + "]" * 100_000, r"line 2: JSON nested too deeply"),
    ("jsonl-object-not-frame", json.dumps({"results": []}), r"line 1: expected a dynpose-run frame"),
    ("jsonl-persons-not-list", json.dumps(FRAME | {"persons": "none"}), r"line 1: expected a dynpose-run frame"),
    ("jsonl-flat-keypoints", json.dumps(FRAME | {"persons": [{"score": 1, "keypoints": [1] * 51}]}), r"triples"),
    ("jsonl-person-no-score", json.dumps(FRAME | {"persons": [{"keypoints": []}]}), r"person 0: needs keypoints and score"),
    ("jsonl-fractional-id", json.dumps(FRAME | {"image_id": 1.5}), r"'image_id' must be an integer, got 1.5"),
]


@pytest.mark.parametrize("text,match", [c[1:] for c in RESULTS_CASES], ids=[c[0] for c in RESULTS_CASES])
def test_bad_results(tmp_path: Path, shared: Path, text: str, match: str) -> None:
    f = tmp_path / ("results.jsonl" if "jsonl" in match or text.lstrip().startswith("{") else "results.json")
    f.write_text(text)
    one_line_error(lambda: evaluate_results(f, shared / "data" / "coco" / "test_coco.json"), match, names=f)


GT_CASES = [
    ("annotation-no-id", _del("annotations.0.id"), r"annotation 0: lacks 'id'"),
    ("image-no-id", _del("images.0.id"), r"image 0: lacks 'id'"),
    ("categories-strings", _set("categories", ["person"]), r"category 0: expected an object"),
    ("categories-number", _set("categories", 5), r"'categories' must be a list of category objects, got 5"),
    ("keypoints-strings", _set("annotations.0.keypoints", ["1"] * 51), r"annotation 0: 'keypoints' must be a flat list"),
    ("keypoints-inf", _set("annotations.0.keypoints", [float("inf")] * 51), r"annotation 0: 'keypoints' holds inf"),
    ("bbox-1e308", _set("annotations.0.bbox", [0, 0, 1e308, 1]), r"'bbox' holds 1e\+308"),
    ("area-nan", _set("annotations.0.area", float("nan")), r"'area' must be a finite number, got nan"),
    ("annotation-list", _set("annotations.0", [1, 2]), r"annotation 0: expected an object"),
]


@pytest.mark.parametrize("mutate,match", [c[1:] for c in GT_CASES], ids=[c[0] for c in GT_CASES])
def test_bad_ground_truth_for_eval(tmp_path: Path, mutate: Callable[[dict], None], match: str) -> None:
    """What pycocotools would crash on (KeyError 'id' / 'num_keypoints' / 'area', AttributeError, TypeError) is one
    line naming the ground truth file and the field, for dynpose-eval and dynpose-run --eval alike."""
    d = coco_doc()
    d["annotations"][0]["num_keypoints"] = 17
    mutate(d)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(d))
    one_line_error(lambda: evaluate_results([RES], gt), match, names=gt)


def test_ground_truth_without_area_or_num_keypoints_is_filled_as_xtcocotools_does(tmp_path: Path, caplog) -> None:
    """pycocotools would raise KeyError 'area' / 'num_keypoints'; eval fills them as xtcocotools does (the labelled
    joints; bbox w*h*0.53) and says so, rather than refusing a file the reference tools score."""
    import logging

    d = coco_doc()
    del d["annotations"][0]["area"]
    d["annotations"][0].pop("num_keypoints", None)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING, logger="dynpose"):
        res = evaluate_results([RES | {"keypoints": [100.0, 100.0, 1.0] * 17}], gt)
    assert res["kind"] == "coco" and res["AP"] == pytest.approx(1.0)
    assert any("area" in r.getMessage() for r in caplog.records)


def test_valid_ground_truth_still_evaluates(tmp_path: Path) -> None:
    d = coco_doc()
    d["annotations"][0]["num_keypoints"] = 17
    d["annotations"][0]["segmentation"] = [[[[[1]]]]]  # fields eval does not read are dropped, not checked
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(d))
    res = evaluate_results([RES | {"keypoints": [100.0, 100.0, 1.0] * 17}], gt)
    assert res["kind"] == "coco" and res["AP"] == pytest.approx(1.0)


# -- MPII annotations and predictions (dynpose.eval.mpii) -----------------------------------------------------------
def _mpii_doc() -> list[dict]:
    return [{"image": "a.jpg", "joints": [[10.0, 20.0]] * 16, "joints_vis": [1] * 16, "center": [5, 5], "scale": 1.0}]


MPII_CASES = [
    ("joints-strings", lambda d: d[0].update(joints=[["a", "b"]] * 16), r"record 0: 'joints' must be 16 \[x, y\] pairs"),
    ("joints-ragged", lambda d: d[0].update(joints=[[1, 2]] * 15 + [[1]]), r"'joints' must be 16"),
    ("joints-nan", lambda d: d[0].update(joints=[[float("nan"), 1]] * 16), r"'joints' must be 16"),
    ("scale-negative", lambda d: d[0].update(scale=-1), r"'scale' must be a number > 0"),
    ("headbox-short", lambda d: d[0].update(headbox=[1, 2, 3]), r"'headbox' must be"),
    ("no-joints-vis", lambda d: d[0].pop("joints_vis"), r"record 0 lacks joints_vis"),
]


@pytest.mark.parametrize("mutate", [c[1] for c in MPII_CASES], ids=[c[0] for c in MPII_CASES])
def test_bad_mpii_annotations(tmp_path: Path, mutate: Callable[[list], None]) -> None:
    from dynpose.eval.mpii import pckh

    match = dict((c[0], c[2]) for c in MPII_CASES)[next(c[0] for c in MPII_CASES if c[1] is mutate)]
    d = _mpii_doc()
    mutate(d)
    gt = tmp_path / "mpii.json"
    gt.write_text(json.dumps(d))
    one_line_error(lambda: pckh(np.zeros((1, 16, 2)), gt), match, names=gt)


@pytest.mark.parametrize(
    "array,match",
    [
        (np.array([["a"] * 2] * 16), r"dtype <U1, expected float"),
        (np.zeros((1, 16, 2), np.complex64), r"dtype complex64, expected float"),
        (np.zeros((1, 5, 2)), r"shape \(1, 5, 2\), expected \(N,16,2\)"),
        (np.array([{"a": 1}], dtype=object), r"not a readable .npy array"),
    ],
    ids=["strings", "complex", "shape", "object-pickle"],
)
def test_bad_mpii_npy_predictions(tmp_path: Path, array: np.ndarray, match: str) -> None:
    from dynpose.eval.mpii import pckh

    gt = tmp_path / "mpii.json"
    gt.write_text(json.dumps(_mpii_doc()))
    preds = tmp_path / "preds.npy"
    np.save(preds, array, allow_pickle=True)
    one_line_error(lambda: pckh(preds, gt), match, names=preds)


# -- frame sources and images (dynpose.io.sources) -------------------------------------------------------------
# -- frame sources and images (dynpose.io.sources) -------------------------------------------------------------
def tiny_jpeg_claiming(width: int, height: int) -> bytes:
    """A real 8x8 JPEG (629 bytes) whose frame header (SOF0) is patched to claim width x height."""
    ok, buf = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
    b = bytearray(buf.tobytes())
    i = b.index(b"\xff\xc0")
    b[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(b)


def tiny_png_claiming(width: int, height: int) -> bytes:
    """A real 4x4 PNG whose IHDR claims width x height (CRC fixed, so the file is well-formed)."""
    ok, buf = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
    b = bytearray(buf.tobytes())
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def tiny_gif_claiming(width: int, height: int) -> bytes:
    """A 29-byte GIF: a logical screen and one image of width x height, an LZW stream of a single code."""
    screen = struct.pack("<HH", width, height) + b"\x00\x00\x00"
    image = b"," + struct.pack("<HHHH", 0, 0, width, height) + b"\x00" + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + image + b";"


def bigtiff_claiming(width: int, height: int) -> bytes:
    """A 212-byte BigTIFF (version 43, 64-bit offsets) whose one strip claims width x height 8-bit pixels."""
    tags = [(256, 16, width), (257, 16, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 16, 0), (277, 3, 1)]
    tags += [(278, 16, height), (279, 16, width * height)]
    ifd = struct.pack("<Q", len(tags)) + b"".join(struct.pack("<HHQQ", t, typ, 1, v) for t, typ, v in tags)
    return b"II" + struct.pack("<HHHQ", 43, 8, 0, 16) + ifd + struct.pack("<Q", 0)


IMAGE_CASES = [
    ("gif-24000-squared", "bomb.gif", tiny_gif_claiming(24000, 24000), {}, r"24000 x 24000 pixels .* 50,000,000"),
    ("gif-named-jpg", "bomb.jpg", tiny_gif_claiming(30000, 30000), {}, r"30000 x 30000 pixels .* 50,000,000"),
    ("bigtiff-20000-squared", "big.tif", bigtiff_claiming(20000, 20000), {}, r"20000 x 20000 pixels .* 50,000,000"),
    (
        "hdr-unsized",
        "a.hdr",
        b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 30000 +X 30000\n",
        {},
        r"Radiance HDR .* --max-pixels 0",
    ),
    ("pam-unsized", "a.pam", b"P7\nWIDTH 30000\nHEIGHT 30000\n", {}, r"PAM image, a format whose size dynpose cannot read"),
    ("not-an-image", "a.png", b"hello, I am text", {}, r"not a readable image"),
    ("jpeg-65000-squared", "big.jpg", tiny_jpeg_claiming(65000, 65000), {}, r"65000 x 65000 pixels .* 50,000,000"),
    ("png-20000-squared", "big.png", tiny_png_claiming(20000, 20000), {}, r"20000 x 20000 pixels .* limit of 50,000,000"),
    ("jpeg-over-own-limit", "a.jpg", tiny_jpeg_claiming(300, 200), {"max_pixels": 50_000}, r"300 x 200 .* 50,000 "),
    ("jpeg-65000-no-limit", "big.jpg", tiny_jpeg_claiming(65000, 65000), {"max_pixels": None}, r"not a readable image"),
    ("empty-file", "empty.png", b"", {}, r"empty file"),
    ("garbage", "bad.jpg", b"\xff\xd8 not really a jpeg", {}, r"not a readable image"),
]


@pytest.mark.parametrize("name,data,kw,match", [c[1:] for c in IMAGE_CASES], ids=[c[0] for c in IMAGE_CASES])
def test_bad_image(tmp_path: Path, name: str, data: bytes, kw: dict, match: str) -> None:
    f = tmp_path / name
    f.write_bytes(data)
    one_line_error(lambda: decode_image(f, **kw), match, names=f)


SOURCE_CASES = [
    ("empty-string", {"source": ""}, r"source is empty"),
    ("blank-string", {"source": "   "}, r"source is empty"),
    ("max-pixels-zero", {"source": ".", "max_pixels": 0}, r"max_pixels 0: must be a positive integer"),
    ("max-pixels-float", {"source": ".", "max_pixels": 2.5e7}, r"max_pixels 25000000.0: must be a positive integer"),
    ("missing-path", {"source": "/nonexistent/dynpose/x.jpg"}, r"no such file or folder"),
]


@pytest.mark.parametrize("kw,match", [c[1:] for c in SOURCE_CASES], ids=[c[0] for c in SOURCE_CASES])
def test_bad_source(kw: dict, match: str) -> None:
    one_line_error(lambda: open_source(**kw), match)
    one_line_error(lambda: FrameSource(**kw), match)


# -- atomic writes (dynpose.fileio) --------------------------------------------------------------------------------
def _fifo(tmp_path: Path) -> Path:
    p = tmp_path / "pipe.json"
    os.mkfifo(p)
    return p


def _dir(tmp_path: Path) -> Path:
    p = tmp_path / "folder.json"
    p.mkdir()
    return p


def _under_file(tmp_path: Path) -> Path:
    (tmp_path / "plain").write_text("x")
    return tmp_path / "plain" / "out.json"


WRITE_CASES = [
    ("device", lambda tmp: Path("/dev/full"), {"a": 1}, r"it is a device, not a regular file; refusing to replace it"),
    ("fifo", _fifo, {"a": 1}, r"it is a FIFO \(named pipe\), not a regular file"),
    ("directory", _dir, {"a": 1}, r"it is a directory, not a regular file"),
    ("parent-is-a-file", _under_file, {"a": 1}, r"exists and is not a folder"),
    ("grandparent-is-a-file", lambda tmp: _under_file(tmp) / "x.json", {"a": 1}, r"exists and is not a folder"),
    ("nan", lambda tmp: tmp / "r.json", [{"keypoints": [1.0, float("nan")]}], r"\[0\]\['keypoints'\]\[1\] is nan"),
    ("infinity", lambda tmp: tmp / "r.json", {"AP": float("inf")}, r"\['AP'\] is inf, which JSON cannot hold"),
]


@pytest.mark.parametrize("make,obj,match", [c[1:] for c in WRITE_CASES], ids=[c[0] for c in WRITE_CASES])
def test_bad_write_destination(tmp_path: Path, make: Callable[[Path], Path], obj: Any, match: str) -> None:
    dest = make(tmp_path)
    if str(dest) == "/dev/full" and not dest.exists():
        pytest.skip("no /dev/full here")
    before = dest.lstat() if dest.exists() else None
    one_line_error(lambda: write_json_atomic(dest, copy.deepcopy(obj)), match, names=dest)
    after = dest.lstat() if dest.exists() else None
    assert (before is None) == (after is None) and (before is None or before.st_mode == after.st_mode)  # untouched
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_the_service_answers_image_bombs_413_before_decoding() -> None:
    """The service's image decoding (`decode_request_image`) uses the same header check as files: 413 for a GIF or
    BigTIFF bomb (not a decode of GBs and HTTP 200), 400 for what is not an image."""
    from dynpose.serve.http import HttpError, decode_request_image

    for data, status, match in [
        (tiny_gif_claiming(24000, 24000), 413, r"image: 24000 x 24000 pixels by its header, over the service's limit"),
        (bigtiff_claiming(20000, 20000), 413, r"image: 20000 x 20000 pixels"),
        (b"#?RADIANCE\n\n-Y 9 +X 9\n", 400, r"Radiance HDR .* send a JPEG or PNG file"),
        (b"plain text", 400, r"not a readable image"),
    ]:
        with pytest.raises(HttpError) as e:
            decode_request_image(data, 50_000_000)
        assert e.value.status == status and re.search(match, e.value.message), e.value.message
    ok, png = cv2.imencode(".png", np.zeros((20, 30, 3), np.uint8))
    assert decode_request_image(png.tobytes(), 50_000_000).shape == (20, 30, 3)


def test_the_service_parser_answers_json_bombs_400() -> None:
    """The service's request parser reads JSON with the one reader: nesting 100,000 deep, a 5000-digit integer or a
    malformed `boxes` field is a one-line 400, not a RecursionError / ValueError and HTTP 500."""
    from dynpose.serve.http import HttpError, parse_boxes, parse_json_request

    for body, match in [
        (b"[" * 100_000 + b"]" * 100_000, r"request body: JSON nested too deeply"),
        (b'{"image": "aGk=", "boxes": [[1, 2, 3, ' + b"9" * 5000 + b"]]}", r"request body: a number .* too long"),
        (b"{image:", r"request body: not valid JSON"),
    ]:
        with pytest.raises(HttpError) as e:
            parse_json_request(body, 100)
        assert e.value.status == 400 and re.search(match, e.value.message), e.value.message
    with pytest.raises(HttpError) as e:
        parse_boxes("[" * 100_000, 100)
    assert e.value.status == 400 and "boxes: " in e.value.message
