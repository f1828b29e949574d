"""Model handles: a runner plus its card, owning a person crop's whole way through one model.

    box -> centre/scale (`geometry`) -> uint8 affine crop (`crop`) -> normalise (`inputs`) -> infer (+ flip)
        -> decode to image pixels (`PoseModel.decode`) | router scores (`Router.scores`)

A pose model's outputs are all of its runner's outputs in graph order (one heatmap tensor, or SimDR's x and y
vectors); the card's decoder says how they flip and decode (`decode.average_flip_outputs`, `decode.decode_outputs`).

Each step is one plain function of `dynpose.runtime.preprocess` / `decode`; the handle only binds them to a card
and a runner, so the Dispatcher, router training, calibration and the benchmarks all crop and decode the same way.
A handle does not own its runner's lifetime: whoever loaded the runner activates and deactivates it (an
`EngineSet`, or a `with` block around the handle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.runtime.backends.base import Runner
from dynpose.runtime.decode import average_flip_outputs, decode_outputs
from dynpose.runtime.preprocess import box_to_center_scale, crop, normalize


@dataclass
class CropModel:
    """A runner and the card that says how to crop and normalise for it."""

    runner: Runner
    card: ModelCard

    @property
    def name(self) -> str:
        return self.card.name

    def geometry(self, boxes_xywh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N,4) x,y,w,h boxes -> centres (N,2) and scales (N,2) in pixels for this model's aspect and padding."""
        return box_to_center_scale(boxes_xywh, self.card.aspect_ratio, self.card.padding)

    def crop(
        self, images: Sequence[np.ndarray], frame_index: np.ndarray, centers: np.ndarray, scales: np.ndarray
    ) -> np.ndarray:
        """uint8 (N,H,W,3) crops in this model's colour order (`preprocess.crop`)."""
        return crop(images, frame_index, centers, scales, self.card)

    def inputs(self, crops_u8: np.ndarray) -> np.ndarray:
        """uint8 crops -> the normalised fp32 NCHW batch the runner takes."""
        return normalize(crops_u8, self.card)

    def same_crop(self, other: CropModel) -> bool:
        """Both models see identical input tensors for a box, so one crop serves both."""
        return same_crop(self.card, other.card)

    def activate(self) -> None:
        self.runner.activate()

    def deactivate(self) -> None:
        self.runner.deactivate()

    def __enter__(self) -> CropModel:
        self.activate()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.deactivate()


class PoseModel(CropModel):
    """A pose model: its raw outputs (+ the flip test) decoded to keypoints (N,K,3) x, y in image pixels, score."""

    def __post_init__(self) -> None:
        if self.card.task != "pose":
            raise DynPoseError(f"model {self.card.name!r}: a PoseModel needs a pose card, this one is {self.card.task}")

    def infer(self, x: np.ndarray, flip: bool = False) -> list[np.ndarray]:
        """The runner's outputs (all, graph order) for a normalised batch; with `flip`, averaged with the mirrored
        batch's by the card's flip test (heatmaps: flipped back, shifted, averaged; SimDR: the official softmax
        average, as log-probabilities so `decode` reads them like raw logits). One runner call for both halves: a
        GPU gets one bigger batch, and the runner splits it past its max batch."""
        if not flip:
            return self.runner.infer_all(x)
        n = len(x)
        outs = self.runner.infer_all(np.concatenate([x, x[..., ::-1]]))
        return average_flip_outputs([o[:n] for o in outs], [o[n:] for o in outs], self.card)

    def decode(self, outputs: list[np.ndarray], centers: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Outputs of `infer` (or the runner's raw outputs) for crops made at (centre, scale) -> (N,K,3) float32
        x, y in image pixels, score, by the card's decoder (heatmaps: msra/dark/udp; simdr: both vectors)."""
        return np.asarray(decode_outputs(outputs, centers, scales, self.card), dtype=np.float32)

    def keypoints(
        self,
        images: Sequence[np.ndarray],
        frame_index: np.ndarray,
        centers: np.ndarray,
        scales: np.ndarray,
        flip: bool = False,
    ) -> np.ndarray:
        """The whole path for boxes already turned into this model's centre/scale."""
        x = self.inputs(self.crop(images, frame_index, centers, scales))
        return self.decode(self.infer(x, flip), centers, scales)

    def __call__(self, image_bgr: np.ndarray, boxes_xywh: np.ndarray, flip: bool = False) -> np.ndarray:
        """Keypoints (N,K,3) for the (N,>=4) x,y,w,h boxes of one BGR image."""
        boxes = _xywh(boxes_xywh)
        if len(boxes) == 0:
            return np.zeros((0, self.card.keypoint_set.num, 3), np.float32)
        c, s = self.geometry(boxes)
        return self.keypoints([image_bgr], np.zeros(len(boxes), np.int64), c, s, flip)


class Router(CropModel):
    """The DynPose router: crops -> scores (N,3); score[1] is what the routing policies read."""

    def __post_init__(self) -> None:
        if self.card.task != "router":
            raise DynPoseError(f"model {self.card.name!r}: a Router needs a router card, this one is {self.card.task}")

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N,>=2) fp32 router scores of a normalised batch."""
        s = self.runner.infer(x)
        if s.ndim != 2 or s.shape[1] < 2:
            raise DynPoseError(f"router {self.card.name!r}: output has shape {s.shape}, expected (N,3) scores")
        return s

    def __call__(self, image_bgr: np.ndarray, boxes_xywh: np.ndarray) -> np.ndarray:
        """Scores (N,3) for the (N,>=4) x,y,w,h boxes of one BGR image."""
        boxes = _xywh(boxes_xywh)
        c, s = self.geometry(boxes)
        return self.scores(self.inputs(self.crop([image_bgr], np.zeros(len(boxes), np.int64), c, s)))


def check_output_shapes(shapes: Sequence[tuple[int, ...]], card: ModelCard, where: str) -> None:
    """A model's outputs (shapes of one batch, N first) must be what its card reads, else a one-line DynPoseError
    starting with `where` (the role and the file): a router's (N, >=2) scores; a heatmap model's N x K x h x w
    with K the card's keypoints; a SimDR model's two N x K x bins vectors. Checked at export and at load, so a
    14-heatmap model under a 17-keypoint card, or one with vector outputs, is refused before it runs."""
    got = ", ".join(" x ".join(["N", *map(str, s[1:])]) for s in shapes) or "none"
    if card.task == "router":
        if not shapes or len(shapes[0]) != 2 or shapes[0][1] < 2:
            raise DynPoseError(f"{where}: outputs {got}, but a router gives N x 3 scores; is this a router model?")
        return
    if card.task != "pose":
        return
    k = card.keypoint_set.num
    simdr = card.decoder == "simdr"
    need, rank, what = (2, 3, f"two N x {k} x bins vectors (x, y)") if simdr else (1, 4, f"N x {k} x h x w heatmaps")
    if len(shapes) < need or any(len(s) != rank or s[1] != k for s in shapes[:need]):
        raise DynPoseError(
            f"{where}: outputs {got}, but its card ({card.keypoints}, {k} keypoints, decoder {card.decoder}) reads "
            f"{what}; give the card that matches the model (keypoints, decoder) or export the right model"
        )


def check_outputs(model: CropModel, where: str) -> None:
    """Run one blank crop through an opened model and check its outputs against the card (`check_output_shapes`);
    a model that fails inside its runtime is a one-line error here, naming `where`, not a traceback mid-run."""
    x = np.zeros((1, 3, model.card.input_height, model.card.input_width), np.float32)
    try:
        outs = model.runner.infer_all(x)
    except Exception as e:  # the runtime's own error types (ONNX Runtime, TensorRT, torch), or the runner's
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DynPoseError(f"{where}: the model fails on a test crop ({first}); re-export it or check the file") from None
    check_output_shapes([o.shape for o in outs], model.card, where)


def _xywh(boxes: np.ndarray) -> np.ndarray:
    """(M,4|5) or one (4|5,) box -> (M,4) float64 x,y,w,h."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4))
    b = b[None] if b.ndim == 1 else b
    if b.ndim != 2 or b.shape[1] < 4:
        raise DynPoseError(f"boxes must be (M,4) or (M,5) x,y,w,h[,score], got shape {b.shape}")
    return b[:, :4]


def same_crop(a: ModelCard, b: ModelCard) -> bool:
    """Two cards make identical input tensors for a box, so one crop serves both models."""
    return (
        a.input_size == b.input_size
        and a.color_order == b.color_order
        and a.mean == b.mean
        and a.std == b.std
        and a.padding == b.padding
        and (a.decoder == "udp") == (b.decoder == "udp")
    )
