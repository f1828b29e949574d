"""Person detectors from ONNX: PP-PicoDet (pre-NMS boxes + scores), YOLOv5 and YOLOv8 output layouts.

The layout is read from the model's outputs, never configured: two outputs (boxes [N,A,4] x1,y1,x2,y2 and scores
[N,C,A]) are PicoDet as PaddleDetection exports it with `export.nms=False`; one output [N,A,5+C] (cx,cy,w,h,
objectness, classes) is YOLOv5; one output [N,4+C,A] (cx,cy,w,h, classes) is YOLOv8. Person is class 0 in all.

Preprocessing follows each family: PicoDet takes the whole image resized (bicubic) to the input size, RGB,
ImageNet mean/std; YOLO takes a letterboxed RGB image scaled to [0,1] (Ultralytics' grey padding 114).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from dynpose.errors import DynPoseError
from dynpose.models.card import IMAGENET_MEAN_255, IMAGENET_STD_255
from dynpose.onnx_utils import open_session
from dynpose.roles import Role

if TYPE_CHECKING:
    import onnxruntime as ort

IMAGENET_MEAN = np.array(IMAGENET_MEAN_255, dtype=np.float32)
IMAGENET_STD = np.array(IMAGENET_STD_255, dtype=np.float32)


def nms(boxes_xyxy: np.ndarray, scores: np.ndarray, iou_thr: float) -> np.ndarray:
    """Greedy NMS: indices kept, highest score first; a box is dropped when its IoU with a kept one exceeds
    `iou_thr`. Non-finite boxes/scores are dropped. (OpenCV's `NMSBoxes` refuses negative scores, hence numpy.)"""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(b) != len(s):
        raise DynPoseError(f"nms: {len(b)} boxes but {len(s)} scores")
    valid = np.flatnonzero(np.isfinite(b).all(axis=1) & np.isfinite(s))
    order = valid[np.argsort(-s[valid], kind="stable")]
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    keep: list[int] = []
    while order.size > 0:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        iw = np.clip(np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]), 0, None)
        ih = np.clip(np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]), 0, None)
        inter = iw * ih
        union = area[i] + area[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_thr]
    return np.asarray(keep, dtype=np.int64)


def _letterbox(image: np.ndarray, size_hw: tuple[int, int]) -> tuple[np.ndarray, float, float, float]:
    h, w = image.shape[:2]
    r = min(size_hw[0] / h, size_hw[1] / w)
    nh, nw = max(1, round(h * r)), max(1, round(w * r))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = (size_hw[0] - nh) // 2, (size_hw[1] - nw) // 2
    out = np.full((size_hw[0], size_hw[1], 3), 114, dtype=np.uint8)
    out[top : top + nh, left : left + nw] = resized
    return out, r, float(left), float(top)


class OnnxDetector:
    """A person detector: BGR image in, (M,5) x,y,w,h,score boxes in image pixels out (after threshold + NMS)."""

    def __init__(
        self,
        path: str | os.PathLike,
        score_thr: float = 0.5,
        iou_thr: float = 0.5,
        device: str = "cpu",
        input_size: int | tuple[int, int] | None = None,
        intra_op_threads: int = 0,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DynPoseError(f"detector {self.path}: file not found; pass an ONNX person detector (e.g. PicoDet)")
        self.score_thr = float(score_thr)
        self.iou_thr = float(iou_thr)
        self.session = open_session(self.path, device, intra_op_threads, what=Role.DETECTOR.value)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise DynPoseError(f"detector {self.path}: expected one N x 3 x H x W image input")
        self.input_name = inputs[0].name
        self.input_hw = self._input_hw(inputs[0].shape, input_size)
        self.layout = self._layout()

    def _input_hw(self, shape: list, input_size: int | tuple[int, int] | None) -> tuple[int, int]:
        h, w = shape[2], shape[3]
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            return (h, w)
        if input_size is None:
            raise DynPoseError(
                f"detector {self.path}: input size is dynamic ({shape}); pass input_size (e.g. 320 or (384, 640))"
            )
        if isinstance(input_size, int):
            return (input_size, input_size)
        return (int(input_size[0]), int(input_size[1]))

    def _layout(self) -> str:
        outs = self.session.get_outputs()
        if len(outs) == 2 and all(len(o.shape) == 3 for o in outs):
            if outs[0].shape[2] == 4 or outs[0].name == "boxes":
                self._box_out, self._score_out = outs[0].name, outs[1].name
            elif outs[1].shape[2] == 4 or outs[1].name == "boxes":
                self._box_out, self._score_out = outs[1].name, outs[0].name
            else:
                raise DynPoseError(f"detector {self.path}: two outputs but neither is boxes [N,A,4]")
            return "picodet"
        if len(outs) >= 1 and len(outs[0].shape) == 3:
            self._out = outs[0].name
            return "yolo"  # v5 or v8 is told apart by the actual output shape
        shapes = [(o.name, o.shape) for o in outs]
        raise DynPoseError(
            f"detector {self.path}: unknown output layout {shapes}; expected PicoDet boxes+scores or a YOLOv5/v8 "
            "[N,A,5+C] / [N,4+C,A] tensor"
        )

    def preprocess(self, image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image -> (1,3,H,W) fp32 input, and the per-axis scale and offset mapping input pixels back to image."""
        ih, iw = self.input_hw
        h, w = image_bgr.shape[:2]
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
        if self.layout == "picodet":
            x = cv2.resize(rgb, (iw, ih), interpolation=cv2.INTER_CUBIC).astype(np.float32)
            x = (x - IMAGENET_MEAN) / IMAGENET_STD
            scale = np.array([w / iw, h / ih, w / iw, h / ih])
            offset = np.zeros(4)
        else:
            lb, r, left, top = _letterbox(rgb, (ih, iw))
            x = lb.astype(np.float32) / 255.0
            scale = np.full(4, 1.0 / r)
            offset = np.array([left, top, left, top])
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), scale, offset

    def _raw(self, session: ort.InferenceSession, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the model -> candidate boxes (A,4) x1,y1,x2,y2 in input pixels and person scores (A,)."""
        if self.layout == "picodet":
            boxes, scores = session.run([self._box_out, self._score_out], {self.input_name: x})
            return boxes[0].astype(np.float64), scores[0, 0].astype(np.float64)
        (out,) = session.run([self._out], {self.input_name: x})
        out = out[0].astype(np.float64)
        # real models have far more anchors than channels, which tells the two layouts apart
        if out.shape[0] < out.shape[1]:  # YOLOv8: (4+C, A), class scores already sigmoid, no objectness
            if out.shape[0] < 5:
                raise DynPoseError(f"detector {self.path}: YOLO output {out.shape} has fewer than 4+1 channels")
            out = out.T
            cxcywh, score = out[:, :4], out[:, 4]
        else:  # YOLOv5: (A, 5+C): objectness x class probability
            if out.shape[1] < 5:
                raise DynPoseError(f"detector {self.path}: YOLO output {out.shape} has fewer than 5 channels")
            cxcywh = out[:, :4]
            score = out[:, 4] * out[:, 5] if out.shape[1] > 5 else out[:, 4]
        half = cxcywh[:, 2:4] * 0.5
        return np.concatenate([cxcywh[:, :2] - half, cxcywh[:, :2] + half], axis=1), score

    def __call__(self, image_bgr: np.ndarray) -> np.ndarray:
        """(M,5) x,y,w,h,score person boxes in image pixels, highest score first; boxes clipped to the image."""
        img = np.asarray(image_bgr)
        if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
            raise DynPoseError(f"detector: expected an H x W x 3 BGR image, got shape {img.shape}")
        if img.dtype != np.uint8:
            img = np.clip(img, 0, 255).astype(np.uint8)
        session = self.session  # one read: `close()` on another thread must not leave None between check and run
        if session is None:
            raise DynPoseError(f"detector {self.path}: closed")
        x, scale, offset = self.preprocess(img)
        boxes, scores = self._raw(session, x)
        boxes = (boxes - offset) * scale
        h, w = img.shape[:2]
        keep = np.isfinite(boxes).all(axis=1) & np.isfinite(scores) & (scores >= self.score_thr)
        boxes, scores = boxes[keep], scores[keep]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores = boxes[ok], scores[ok]
        idx = nms(boxes, scores, self.iou_thr)
        b = boxes[idx]
        return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2], scores[idx, None]], axis=1).reshape(-1, 5)

    def close(self) -> None:
        """Release the ONNX Runtime session (later calls fail with a DynPoseError)."""
        self.session = None
