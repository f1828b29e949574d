"""Person detectors: the real PicoDet models on the COCO sample, and YOLOv5/v8 output layouts through tiny real ONNX
graphs that emit a known tensor."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dynpose.data import load_coco
from dynpose.errors import DynPoseError
from dynpose.runtime.detector import OnnxDetector, nms


def iou_xywh(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def brute_nms(boxes, scores, thr):
    """Textbook greedy NMS, written out pair by pair."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        xywh_i = [boxes[i][0], boxes[i][1], boxes[i][2] - boxes[i][0], boxes[i][3] - boxes[i][1]]
        if all(
            iou_xywh(xywh_i, [boxes[k][0], boxes[k][1], boxes[k][2] - boxes[k][0], boxes[k][3] - boxes[k][1]]) <= thr
            for k in keep
        ):
            keep.append(i)
    return keep


@pytest.mark.parametrize("size,expected", [(192, 10), (320, 11)])
def test_picodet_matches_coco_persons(shared, coco_dir, size, expected):
    det = OnnxDetector(
        shared / "models" / f"picodet_s_{size}_pedestrian.onnx", score_thr=0.5, iou_thr=0.5, intra_op_threads=1
    )
    assert det.layout == "picodet" and det.input_hw == (size, size)
    ds = load_coco(coco_dir / "test_coco.json")
    matched, total = 0, 0
    for iid, im in ds.images.items():
        img = cv2.imread(str(ds.image_path(coco_dir, iid)))
        boxes = det(img)
        assert boxes.ndim == 2 and boxes.shape[1] == 5
        assert np.all(boxes[:, 4] >= 0.5) and np.all(np.diff(boxes[:, 4]) <= 0)
        assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 0] + boxes[:, 2] <= img.shape[1] + 1e-6)
        assert np.all(boxes[:, 1] + boxes[:, 3] <= img.shape[0] + 1e-6)
        for p in im.persons:
            if p.bbox[2] * p.bbox[3] <= 5000:
                continue
            total += 1
            matched += max((iou_xywh(p.bbox, b) for b in boxes), default=0.0) >= 0.5
    assert total == 11
    assert matched == expected


def test_nms_matches_greedy_reference():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (60, 2))
    wh = rng.uniform(5, 60, (60, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, 60)
    for thr in (0.3, 0.5, 0.7):
        assert nms(boxes, scores, thr).tolist() == brute_nms(boxes, scores, thr)
    bad = boxes.copy()
    bad[3, 0] = np.nan
    assert 3 not in nms(bad, scores, 0.5).tolist()
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def const_model(path: Path, out: np.ndarray, input_hw=(64, 64), names=("output0",)) -> Path:
    """A real ONNX model: `image` -> the constant tensor(s) `out` (plus 0 x mean(image), so the input is used)."""
    outs = out if isinstance(out, tuple) else (out,)
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], keepdims=0), helper.make_node("Mul", ["m", "zero"], ["z"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    outputs = []
    for i, (arr, name) in enumerate(zip(outs, names, strict=True)):
        inits.append(numpy_helper.from_array(arr.astype(np.float32), f"c{i}"))
        nodes.append(helper.make_node("Add", [f"c{i}", "z"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arr.shape)))
    graph = helper.make_graph(
        nodes, "const", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, *input_hw])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


# A 128x64 (w x h) image letterboxed into 64x64: ratio 0.5, 16 px of padding above. Boxes given in image pixels.
IMG = np.full((64, 128, 3), 90, np.uint8)
R, TOP = 0.5, 16.0
TRUE = np.array([[10.0, 20.0, 40.0, 30.0], [70.0, 4.0, 50.0, 56.0]])  # x,y,w,h in the image


def to_input_cxcywh(b):
    return np.array([(b[0] + b[2] / 2) * R, (b[1] + b[3] / 2) * R + TOP, b[2] * R, b[3] * R])


def test_yolov5_layout(tmp_path):
    rows = []
    for b, (obj, person, other) in zip(TRUE, [(0.9, 0.95, 0.1), (0.8, 0.9, 0.2)], strict=True):
        rows.append([*to_input_cxcywh(b), obj, person, other])
    rows.append([*to_input_cxcywh(TRUE[0] + [1, 1, 0, 0]), 0.7, 0.9, 0.0])  # duplicate of the first: NMS drops it
    rows.append([*to_input_cxcywh(TRUE[1]), 0.9, 0.1, 0.9])  # another class: not a person
    rows.append([np.nan, 20, 10, 10, 0.9, 0.9, 0.0])  # NaN box
    rows.append([20, 30, 0, 10, 0.9, 0.9, 0.0])  # zero width
    rows.append([-500, -500, 10, 10, 0.9, 0.9, 0.0])  # entirely outside the image
    path = const_model(tmp_path / "yolov5.onnx", np.array(rows)[None])
    det = OnnxDetector(path, score_thr=0.5, iou_thr=0.5)
    assert det.layout == "yolo"
    out = det(IMG)
    assert out.shape == (2, 5)
    np.testing.assert_allclose(out[:, :4], TRUE, atol=1e-3)
    np.testing.assert_allclose(out[:, 4], [0.9 * 0.95, 0.8 * 0.9], atol=1e-6)


def test_yolov8_layout_and_clipping(tmp_path):
    cols = [[*to_input_cxcywh(TRUE[0]), 0.85, 0.05], [*to_input_cxcywh(TRUE[1]), 0.6, 0.0]]
    over = np.array([100.0, 40.0, 60.0, 30.0])  # runs past the right edge of the image
    cols.append([*to_input_cxcywh(over), 0.7, 0.0])
    cols.append([*to_input_cxcywh(TRUE[1]), 0.3, 0.0])  # below the score threshold
    cols += [[0, 0, 0, 0, 0, 0]] * 12  # empty anchors: real models have many more anchors than channels
    path = const_model(tmp_path / "yolov8.onnx", np.array(cols).T[None])
    out = OnnxDetector(path, score_thr=0.5)(IMG)
    assert out.shape == (3, 5)
    np.testing.assert_allclose(out[:, 4], [0.85, 0.7, 0.6], atol=1e-6)
    np.testing.assert_allclose(out[0, :4], TRUE[0], atol=1e-3)
    np.testing.assert_allclose(out[1, :4], [100.0, 40.0, 28.0, 24.0], atol=1e-3)  # clipped to 128 x 64
    np.testing.assert_allclose(out[2, :4], TRUE[1], atol=1e-3)


def test_picodet_layout_from_a_graph(tmp_path):
    boxes = np.array([[[0, 0, 32, 32], [16, 16, 48, 48], [np.inf, 0, 10, 10]]], np.float32)  # x1y1x2y2, 64x64 input
    scores = np.array([[[0.9, 0.6, 0.9]]], np.float32)
    path = const_model(tmp_path / "pico.onnx", (boxes, scores), names=("boxes", "scores"))
    det = OnnxDetector(path)
    assert det.layout == "picodet"
    out = det(IMG)  # plain resize: x scaled by 128/64, y by 64/64
    np.testing.assert_allclose(out, [[0, 0, 64, 32, 0.9], [32, 16, 64, 32, 0.6]], atol=1e-4)


def test_detector_errors(tmp_path):
    with pytest.raises(DynPoseError, match="file not found"):
        OnnxDetector(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(DynPoseError, match="cannot load"):
        OnnxDetector(tmp_path / "junk.onnx")
    path = const_model(tmp_path / "flat.onnx", np.zeros((1, 10)))
    with pytest.raises(DynPoseError, match="output layout"):
        OnnxDetector(path)
    with pytest.raises(DynPoseError, match="channels"):
        OnnxDetector(const_model(tmp_path / "narrow.onnx", np.zeros((1, 3, 30))))(IMG)
    det = OnnxDetector(const_model(tmp_path / "y.onnx", np.zeros((1, 30, 6))))
    with pytest.raises(DynPoseError, match="H x W x 3"):
        det(np.zeros((10, 10), np.uint8))
    assert det(IMG).shape == (0, 5)  # no score above the threshold: an empty (0,5) array


def test_dynamic_input_size_needs_the_argument(tmp_path):
    path = const_model(tmp_path / "dyn.onnx", np.zeros((1, 30, 6)))
    model = onnx.load(path)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    onnx.save(model, path)
    with pytest.raises(DynPoseError, match="input_size"):
        OnnxDetector(path)
    assert OnnxDetector(path, input_size=(48, 96)).input_hw == (48, 96)
    assert OnnxDetector(path, input_size=64).input_hw == (64, 64)
