"""Model cards: everything the runtime must know about a model, as plain data (JSON round-trip).

A card travels with the model everywhere: the zoo attaches one to each PyTorch model, the exporter writes it into
the ONNX `metadata_props` and the engine manifest, and the runtime reads preprocessing and decoding from it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dynpose.errors import DynPoseError
from dynpose.fileio import read_json
from dynpose.keypoints import KEYPOINT_SETS, KeypointSet, get_keypoint_set
from dynpose.roles import Role

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)

# "detector": a person detector in an engine dir; only its input size matters here (it preprocesses itself).
TASKS = ("pose", Role.ROUTER.value, Role.DETECTOR.value)  # a router card is the router role's model
COLOR_ORDERS = ("rgb", "bgr")
# msra/dark/udp read heatmaps; simdr reads SimDR's two 1-D outputs (x and y bins, `simdr_split_ratio` per pixel).
DECODERS = ("msra", "dark", "udp", "simdr")
# How SimDR/SimCC vectors score and flip (`decode.decode_simdr`, `decode.average_flip_outputs`): "official" as the
# SimDR authors' `validate_simdr` (softmax; score the larger of the two maxima; flip test: softmax average, x shifted
# one bin), "mmpose" as MMPose's `SimCCLabel.decode` / `RTMCCHead.predict` (raw logits; score the smaller maximum,
# position -1 bin where it is <= 0; flip test: logits averaged, no shift).
SIMDR_RULES = ("official", "mmpose")
# The UDP refinement's blur: "zero" as MMPose 1.x `refine_keypoints_dark_udp` (zero padding, each map's maximum
# kept), "reflect" as MMPose 0.x `post_dark_udp`, which the official ViTPose evaluates with (OpenCV's reflecting
# border, no rescaling). They agree for peaks inside the map and part within a few pixels of its edge.
BLUR_BORDERS = ("zero", "reflect")


@dataclass
class ModelCard:
    """Input geometry, normalisation, keypoints and decoder of one model.

    `mean`/`std` are on the 0-255 scale and listed in the channel order the model is fed (`color_order`): the
    official SimpleBaseline code feeds BGR but normalises with the RGB ImageNet mean as listed, and reproducing
    that exactly is what keeps its accuracy.
    """

    name: str
    input_width: int = 192
    input_height: int = 256
    color_order: str = "rgb"
    mean: tuple[float, float, float] = IMAGENET_MEAN_255
    std: tuple[float, float, float] = IMAGENET_STD_255
    keypoints: str = "coco17"
    decoder: str = "msra"
    task: str = "pose"
    arch: str = "onnx"
    # Box padding around the person before cropping (official HRNet and MMPose use 1.25).
    padding: float = 1.25
    # DARK / UDP only: the Gaussian kernel that modulates the heatmaps before the Taylor step, as the model's
    # reference config sets it (docs/runtime.md, "Decoding fidelity"); None: 11, the default of MMPose and DarkPose.
    blur_kernel: int | None = None
    # The Gaussian sigma (heatmap pixels) of the training targets that kernel was chosen for; recorded, not read.
    heatmap_sigma: float | None = None
    # SimDR only: classification bins per input pixel (the x output has input_width * ratio bins).
    simdr_split_ratio: float = 2.0
    # SimDR only: whose scoring and flip-test rule decodes the vectors (SIMDR_RULES).
    simdr_rule: str = "official"
    # UDP only: the border the modulating blur assumes (BLUR_BORDERS); set from the checkpoint's source on load.
    blur_border: str = "zero"
    # Known checkpoint sources: alias -> {"url": ..., "color_order": ..., "sha256_prefix": ..., "card": {field: value}}
    # ("card": settings that follow the weights' origin, applied when that source is loaded).
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        self.validate()

    # -- derived -------------------------------------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height), the order OpenCV wants."""
        return (self.input_width, self.input_height)

    @property
    def aspect_ratio(self) -> float:
        return self.input_width / self.input_height

    @property
    def keypoint_set(self) -> KeypointSet:
        return get_keypoint_set(self.keypoints)

    # -- checks and (de)serialisation ----------------------------------------------------------------------------
    def validate(self, where: str = "model card") -> None:
        def bad(msg: str) -> DynPoseError:
            return DynPoseError(f"{where} {self.name!r}: {msg}")

        if not isinstance(self.name, str) or not self.name:
            raise DynPoseError(f"{where}: 'name' must be a non-empty string")
        for key in ("input_width", "input_height"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % 4:
                raise bad(f"'{key}' must be a positive multiple of 4, got {v!r}")
        if self.color_order not in COLOR_ORDERS:
            raise bad(f"'color_order' must be one of {COLOR_ORDERS}, got {self.color_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise bad("'mean' and 'std' must have 3 values (0-255 scale)")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):  # else every crop is NaN, blamed on the model
            raise bad(f"'mean' and 'std' must be finite numbers, got mean {list(self.mean)}, std {list(self.std)}")
        if any(s <= 0 for s in self.std):
            raise bad(f"'std' values must be > 0, got {self.std}")
        if max(self.mean) <= 1.0 and max(self.std) <= 1.0:
            raise bad(f"'mean'/'std' look like the 0-1 scale ({self.mean}); give them on the 0-255 scale")
        if self.task not in TASKS:
            raise bad(f"'task' must be one of {TASKS}, got {self.task!r}")
        if self.task == "pose":
            if self.keypoints not in KEYPOINT_SETS:
                raise bad(f"'keypoints' must be one of {sorted(KEYPOINT_SETS)}, got {self.keypoints!r}")
            if self.decoder not in DECODERS:
                raise bad(f"'decoder' must be one of {DECODERS}, got {self.decoder!r}")
        blur_problem = _heatmap_blur_problem(self)
        if blur_problem:
            raise bad(blur_problem)
        ratio = self.simdr_split_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
            raise bad(f"'simdr_split_ratio' must be a finite number > 0, got {ratio!r}")
        if not self.padding > 0:
            raise bad(f"'padding' must be > 0, got {self.padding!r}")
        _check_decoder_settings(self, bad)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model card") -> ModelCard:
        if not isinstance(d, dict):
            raise DynPoseError(f"{where}: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DynPoseError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        missing = [k for k in ("name", "input_width", "input_height", "color_order", "mean", "std") if k not in d]
        if missing:  # the geometry and normalisation a model is fed are never guessed
            raise DynPoseError(f"{where}: missing required field(s) {missing}")
        try:
            card = cls(**d)
        except DynPoseError as e:  # checked before it knew `where`: name the file too
            msg = str(e).removeprefix("model card")
            raise DynPoseError(f"{where}{'' if msg.startswith(':') else ' '}{msg.lstrip()}") from None
        except (TypeError, ValueError) as e:
            raise DynPoseError(f"{where}: {e}") from None
        card.validate(where)
        return card

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelCard:
        p = Path(path)
        return cls.from_dict(read_json(p, "model card"), where=f"model card {p}")

    def with_(self, **changes: Any) -> ModelCard:
        """A copy with some fields changed (cards are shared; never mutate one in place)."""
        return replace(self, **changes)


def _heatmap_blur_problem(card: ModelCard) -> str | None:
    """What is wrong with `blur_kernel` / `heatmap_sigma`, or None. The kernel: an odd int >= 3 (OpenCV's GaussianBlur
    needs odd sides; the references' zero-padded blur needs a border of at least one pixel); the sigma: a finite
    number > 0. Both may be None (not given)."""
    k = card.blur_kernel
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 3 or k % 2 == 0):
        return f"'blur_kernel' must be an odd integer >= 3 (11 in most reference configs), got {k!r}"
    sigma = card.heatmap_sigma
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf):
        return f"'heatmap_sigma' must be a finite number > 0 (heatmap pixels), got {sigma!r}"
    return None


def _check_decoder_settings(card: ModelCard, bad: Callable[[str], DynPoseError]) -> None:
    if card.simdr_rule not in SIMDR_RULES:
        raise bad(f"'simdr_rule' must be one of {SIMDR_RULES}, got {card.simdr_rule!r}")
    if card.blur_border not in BLUR_BORDERS:
        raise bad(f"'blur_border' must be one of {BLUR_BORDERS}, got {card.blur_border!r}")
