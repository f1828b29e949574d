"""Crop augmentation for label-free router training: many training crops from few persons.

Each person box gets `copies` variants; the first is the plain box (the exact crop the runtime makes), the others
draw, independently per copy: a box scale and centre shift (the detector's box jitter), a Gaussian blur (motion,
focus, low resolution), a brightness/contrast change (exposure), an occlusion patch (a grey or noise rectangle:
people behind poles, bags, other people) and a horizontal flip.

Every model must see the *same* variant, or the teacher's verdict would be about another crop than the router's:
the geometry is applied to the box before each model computes its own centre/scale and crops with the runtime's
primitive (`preprocess.crop`), and the photometric changes are defined in crop-relative units (blur sigma and patch
as fractions of the crop's size) and applied to each model's uint8 crop at its own resolution. A pose model fed a
flipped crop predicts in the mirrored frame; `unflip_keypoints` maps its keypoints back to the image (mirror about
the crop's axis, swap left/right joints), so the teacher's and the student's keypoints compare joint by joint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.runtime.preprocess import warp_matrix


@dataclass(frozen=True)
class AugmentConfig:
    """How many variants per person and how strong each change is (probabilities per variant)."""

    copies: int = 8  # variants per person, the first one plain
    scale: float = 0.2  # box scaled by a factor in [1 - scale, 1 + scale]
    shift: float = 0.1  # box centre moved by up to this fraction of its width / height
    flip: float = 0.5
    blur: float = 0.3
    blur_max: float = 0.03  # largest blur sigma as a fraction of the crop width
    brightness: float = 0.5  # probability of a brightness/contrast change
    brightness_max: float = 0.35  # gain in [1 - b, 1 + b], offset up to +-b*100 grey levels
    occlusion: float = 0.3
    occlusion_max: float = 0.45  # largest patch side as a fraction of the crop side
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.copies, int) or self.copies < 1:
            raise DynPoseError(f"--copies must be an integer >= 1 (variants per person), got {self.copies!r}")
        probs = {"flip": self.flip, "blur": self.blur, "brightness": self.brightness, "occlusion": self.occlusion}
        for k, v in probs.items():
            if not 0.0 <= v <= 1.0:
                raise DynPoseError(f"augmentation {k} probability must be in [0, 1], got {v}")
        if not (0.0 <= self.scale < 1.0 and 0.0 <= self.shift <= 0.5):
            raise DynPoseError(f"augmentation scale must be in [0, 1) and shift in [0, 0.5], got {self.scale}, {self.shift}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AugParams:
    """Per-variant parameters (arrays of length N = persons x copies); variant j belongs to person `person[j]`."""

    person: np.ndarray  # (N,) int
    copy: np.ndarray  # (N,) int, 0 = plain
    scale: np.ndarray  # (N,) box scale factor
    shift: np.ndarray  # (N,2) centre shift in box widths / heights
    flip: np.ndarray  # (N,) bool
    blur: np.ndarray  # (N,) sigma as a fraction of the crop width (0 = none)
    gain: np.ndarray  # (N,)
    bias: np.ndarray  # (N,) grey levels
    occ: np.ndarray  # (N,4) patch x0, y0, w, h as fractions of the crop (w = 0: none)
    occ_value: np.ndarray  # (N,) grey level of the patch, or -1 for noise

    def __len__(self) -> int:
        return len(self.person)

    def take(self, idx: np.ndarray) -> AugParams:
        return AugParams(**{k: v[idx] for k, v in vars(self).items()})


def sample_params(num_persons: int, cfg: AugmentConfig, rng: np.random.Generator) -> AugParams:
    """Variants for `num_persons` persons (copy 0 of each is the plain crop)."""
    n = num_persons * cfg.copies
    person = np.repeat(np.arange(num_persons), cfg.copies)
    copy = np.tile(np.arange(cfg.copies), num_persons)
    aug = copy > 0

    def maybe(p: float) -> np.ndarray:
        return aug & (rng.random(n) < p)

    b = maybe(cfg.brightness)
    o = maybe(cfg.occlusion)
    side = rng.uniform(0.15, max(0.15, cfg.occlusion_max), size=(n, 2))
    occ = np.concatenate([rng.uniform(0, 1, size=(n, 2)) * (1 - side), side], axis=1) * o[:, None]
    noise = rng.random(n) < 0.5
    return AugParams(
        person=person,
        copy=copy,
        scale=np.where(aug, rng.uniform(1 - cfg.scale, 1 + cfg.scale, n), 1.0),
        shift=np.where(aug[:, None], rng.uniform(-cfg.shift, cfg.shift, (n, 2)), 0.0),
        flip=maybe(cfg.flip),
        blur=np.where(maybe(cfg.blur), rng.uniform(0.2, 1.0, n) * cfg.blur_max, 0.0),
        gain=np.where(b, rng.uniform(1 - cfg.brightness_max, 1 + cfg.brightness_max, n), 1.0),
        bias=np.where(b, rng.uniform(-1, 1, n) * cfg.brightness_max * 100.0, 0.0),
        occ=occ,
        occ_value=np.where(noise, -1.0, rng.uniform(0, 255, n)),
    )


def jitter_boxes(boxes_xywh: np.ndarray, p: AugParams) -> np.ndarray:
    """(N,>=4) boxes -> (N,4) boxes scaled about their centre and shifted, as the variants say."""
    b = np.asarray(boxes_xywh, dtype=np.float64)[:, :4]
    w, h = b[:, 2] * p.scale, b[:, 3] * p.scale
    cx = b[:, 0] + b[:, 2] / 2 + p.shift[:, 0] * b[:, 2]
    cy = b[:, 1] + b[:, 3] / 2 + p.shift[:, 1] * b[:, 3]
    return np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)


def photometric(crops_u8: np.ndarray, p: AugParams, seed: int = 0) -> np.ndarray:
    """Blur, brightness/contrast, occlusion patch and flip of (N,H,W,3) uint8 crops (a new array). The units are
    fractions of each crop's own size, so crops of one variant at different resolutions get the same change;
    the noise of a noise patch is seeded per variant (the same for every model's crop up to resolution)."""
    out = np.empty_like(crops_u8)
    n, h, w = crops_u8.shape[:3]
    for j in range(n):
        x = crops_u8[j].astype(np.float32)
        if p.blur[j] > 0:
            x = cv2.GaussianBlur(x, (0, 0), sigmaX=float(p.blur[j] * w))
        if p.gain[j] != 1.0 or p.bias[j] != 0.0:
            x = (x - 128.0) * float(p.gain[j]) + 128.0 + float(p.bias[j])
        if p.occ[j, 2] > 0:
            x0, y0 = int(p.occ[j, 0] * w), int(p.occ[j, 1] * h)
            x1, y1 = max(x0 + 1, int((p.occ[j, 0] + p.occ[j, 2]) * w)), max(y0 + 1, int((p.occ[j, 1] + p.occ[j, 3]) * h))
            if p.occ_value[j] < 0:
                rng = np.random.default_rng((seed, int(p.person[j]), int(p.copy[j])))
                small = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.float32)
                x[y0:y1, x0:x1] = cv2.resize(small, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
            else:
                x[y0:y1, x0:x1] = float(p.occ_value[j])
        if p.flip[j]:
            x = x[:, ::-1]
        out[j] = np.clip(x, 0, 255).astype(np.uint8)
    return out


def unflip_keypoints(
    kps: np.ndarray, flipped: np.ndarray, centers: np.ndarray, scales: np.ndarray, card: ModelCard
) -> np.ndarray:
    """Keypoints decoded from mirrored crops -> the image frame: x mirrored about the crop's vertical axis (the
    image point the crop's middle column (W-1)/2 comes from) and left/right joints swapped."""
    out = np.array(kps, dtype=np.float32, copy=True)
    idx = np.flatnonzero(np.asarray(flipped, bool))
    if idx.size == 0:
        return out
    w = card.input_width
    flip_index = card.keypoint_set.flip_index()
    for j in idx:
        inv = cv2.invertAffineTransform(warp_matrix(centers[j], scales[j], card))
        axis_x = inv[0, 0] * (w - 1) / 2.0 + inv[0, 2]  # the crop's middle column in image x (no rotation)
        k = out[j, flip_index].copy()
        k[:, 0] = 2.0 * axis_x - k[:, 0]
        out[j] = k
    return out
