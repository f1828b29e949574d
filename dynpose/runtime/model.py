"""Model handles: a runner plus its card, owning a crop's way through one model once it is cut.

    uint8 crop (`plan.Plan.crop`) -> normalise (`inputs`) -> infer (+ flip) -> decode to image pixels
        (`PoseModel.run`) | router scores (`Router.run`)

A pose model's outputs are all of its runner's outputs in graph order (one heatmap tensor, or SimDR's x and y
vectors); the card's decoder says how they flip and decode (`decode.average_flip_outputs`, `decode.decode_outputs`).
Cutting crops is the planner's job (`dynpose.runtime.plan`), so every executor (local workers, Ray Serve replicas),
router training, calibration and the benchmarks feed a handle the same pixels. A handle does not own its runner's
lifetime: whoever loaded the runner activates and deactivates it (an `EngineSet`, or a `with` block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.roles import Role
from dynpose.runtime.backends.base import Runner
from dynpose.runtime.decode import average_flip_outputs, decode_outputs, output_layout_problem
from dynpose.runtime.preprocess import normalize


@dataclass
class CropModel:
    """A runner and the card that says how to crop and normalise for it."""

    runner: Runner
    card: ModelCard

    @property
    def name(self) -> str:
        return self.card.name

    def inputs(self, crops_u8: np.ndarray) -> np.ndarray:
        """uint8 crops -> the normalised fp32 NCHW batch the runner takes."""
        return normalize(crops_u8, self.card)

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

    def run(self, crops_u8: np.ndarray, centers: np.ndarray, scales: np.ndarray, flip: bool = False) -> np.ndarray:
        """uint8 crops cut at (centre, scale) -> keypoints (N,K,3) in image pixels: normalise, infer, decode."""
        return self.decode(self.infer(self.inputs(crops_u8), flip), centers, scales)


class Router(CropModel):
    """The DynPose router: crops -> scores (N,3); score[1] is what the routing policies read."""

    def __post_init__(self) -> None:
        if self.card.task != Role.ROUTER:
            raise DynPoseError(f"model {self.card.name!r}: a Router needs a router card, this one is {self.card.task}")

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N,>=2) fp32 router scores of a normalised batch."""
        s = self.runner.infer(x)
        if s.ndim != 2 or s.shape[1] < 2:
            raise DynPoseError(f"router {self.card.name!r}: output has shape {s.shape}, expected (N,3) scores")
        return s

    def run(self, crops_u8: np.ndarray) -> np.ndarray:
        """uint8 crops -> scores (N,>=2)."""
        return self.scores(self.inputs(crops_u8))


def check_output_shapes(shapes: Sequence[tuple[int, ...]], card: ModelCard, where: str) -> None:
    """A model's outputs (shapes of one batch, N first) must be what its card reads, else a one-line DynPoseError
    starting with `where` (the role and the file): a router's (N, >=2) scores; a heatmap model's N x K x h x w
    with K the card's keypoints; a SimDR model's two N x K x bins vectors (`decode.output_layout_problem`, the rule
    the decoder itself applies). Checked at export and at load, so a
    14-heatmap model under a 17-keypoint card, or one with vector outputs, is refused before it runs."""
    if card.task == Role.ROUTER:
        if not shapes or len(shapes[0]) != 2 or shapes[0][1] < 2:
            got = ", ".join(" x ".join(["N", *map(str, s[1:])]) for s in shapes) or "none"
            raise DynPoseError(f"{where}: outputs {got}, but a router gives N x 3 scores; is this a router model?")
        return
    problem = output_layout_problem(shapes, card) if card.task == "pose" else None
    if problem:
        raise DynPoseError(f"{where}: {problem}")


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
