"""Fixed inputs and weights for comparing RTMPose / ViTPose with the upstream code (`tests/data/zoo_reference.json`).

The frozen reference outputs were made by running MMPose's and the official ViTPose's own code on exactly these
inputs (see the JSON's "how"); the tests make the same inputs here and compare dynpose's outputs. Every array comes
from numpy's PCG64 generator, seeded per tensor by its name, so it is the same on every machine and torch version.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

# COCO-17 left/right swap (MMPose dataset meta `flip_indices`).
COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(name.encode()), seed])


def deterministic_state_dict(layout: dict[str, tuple[int, ...]], seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Weights with sane scales for each tensor of `layout` (name -> shape), keyed `prefix + name`: weights of
    conv/linear layers ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.2), biases and means ~ N(0, 0.2), variances in
    [0.5, 1.5]; `num_batches_tracked` 0."""
    out = {}
    for name, shape in layout.items():
        key = prefix + name
        rng = _rng(key, seed)
        if name.endswith("num_batches_tracked"):
            out[key] = torch.zeros(shape, dtype=torch.int64)
            continue
        if name.endswith("running_var"):
            v = rng.uniform(0.5, 1.5, shape)
        elif len(shape) >= 2:
            v = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[1:]))))
        else:
            v = rng.standard_normal(shape) * 0.2 + (0.0 if name.endswith(("bias", "running_mean")) else 1.0)
        out[key] = torch.from_numpy(np.asarray(v, dtype=np.float32))
    return out


def crops(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """A normalised-looking input batch: smooth random images (low-frequency noise) in about [-2, 2]."""
    rng = np.random.default_rng(seed)
    small = rng.standard_normal((n, 3, h // 16 + 1, w // 16 + 1))
    big = np.repeat(np.repeat(small, 16, axis=2), 16, axis=3)[:, :, :h, :w]
    return (big + 0.3 * rng.standard_normal((n, 3, h, w))).astype(np.float32)


def _peaks(rng: np.random.Generator, n: int, bins: int, lo: float, hi: float, sigma: float) -> np.ndarray:
    mu = rng.uniform(lo, hi, (n, 17, 1))
    amp = rng.uniform(0.5, 10.0, (n, 17, 1))
    i = np.arange(bins)[None, None, :]
    return amp * np.exp(-((i - mu) ** 2) / (2 * sigma**2))


def simcc_vectors(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, flipped x, flipped y) SimCC logits at 256x192, split ratio 2. "random": N(0, 9) logits; "realistic":
    a Gaussian peak per keypoint (the codec's sigma in bins) on small noise, a third of the keypoints shifted
    below zero (MMPose then gives them position -1), and a mirrored pass that sees each peak one bin off."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        x, y, fx, fy = (rng.standard_normal((n, 17, b)) * 3 for b in (384, 512, 384, 512))
    else:
        x = _peaks(rng, n, 384, 20, 364, 4.9 * 2) + 0.2 * rng.standard_normal((n, 17, 384))
        y = _peaks(rng, n, 512, 20, 492, 5.66 * 2) + 0.2 * rng.standard_normal((n, 17, 512))
        low = rng.random((n, 17, 1)) < 1 / 3
        x, y = x - 12.0 * low, y - 12.0 * low
        fx = np.roll(x[:, COCO_FLIP, ::-1], 1, axis=2) + 0.2 * rng.standard_normal(x.shape)
        fy = y[:, COCO_FLIP] + 0.2 * rng.standard_normal(y.shape)
    return tuple(a.astype(np.float32) for a in (x, y, fx, fy))  # type: ignore[return-value]


def heatmaps(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps, heatmaps of the mirrored crops) (n, 17, 64, 48). "random": uniform [0, 0.5); "realistic": a
    sigma-2 Gaussian per keypoint at a sub-pixel spot at least 8 pixels inside, on 0.01 noise; "border": the same
    with spots within 4 pixels of an edge (where blurs with different borders part ways)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return tuple((rng.random((n, 17, 64, 48)) * 0.5).astype(np.float32) for _ in range(2))  # type: ignore[return-value]
    if kind == "realistic":
        cx, cy = rng.uniform(8, 40, (n, 17, 1, 1)), rng.uniform(8, 56, (n, 17, 1, 1))
    else:
        cx, cy = rng.uniform(0, 4, (n, 17, 1, 1)), rng.uniform(0, 63, (n, 17, 1, 1))
        right = rng.random((n, 17, 1, 1)) < 0.5
        cx = np.where(right, 47 - cx, cx)
    yy, xx = np.mgrid[0:64, 0:48]
    amp = rng.uniform(0.3, 1.0, (n, 17, 1, 1))
    hm = amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 8.0) + 0.01 * rng.standard_normal((n, 17, 64, 48))
    flipped = hm[:, COCO_FLIP, :, ::-1] + 0.01 * rng.standard_normal(hm.shape)
    return hm.astype(np.float32), flipped.astype(np.float32)
