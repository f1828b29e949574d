"""Closed-form heatmaps for the reference-fidelity tests (no RNG, so the frozen expected values cannot drift with a
numpy release): per keypoint one or two sub-pixel Gaussians, a low ripple, the cases where the blur kernel matters."""

from __future__ import annotations

import numpy as np

# (x1, y1, a1, x2, y2, a2, ripple) with positions as fractions of the map's width / height
PEAKS = (
    (0.43, 0.37, 1.0, 0.0, 0.0, 0.0, 0.0),  # one clean peak between pixels
    (0.52, 0.61, 0.8, 0.0, 0.0, 0.0, 0.03),  # one peak on a ripple
    (0.40, 0.50, 0.9, 0.47, 0.55, 0.7, 0.0),  # two close peaks: the blur merges them more or less
    (0.25, 0.30, 0.6, 0.75, 0.70, 0.55, 0.02),  # two far peaks of near-equal height
    (0.07, 0.91, 0.7, 0.0, 0.0, 0.0, 0.0),  # near the border
    (0.61, 0.28, 0.15, 0.64, 0.33, 0.12, 0.01),  # weak, flat-ish response
)


def fidelity_maps(width: int, height: int) -> np.ndarray:
    """(1, len(PEAKS), height, width) float32 maps; the Gaussians' sigma is width / 24 (1 at 24, 2 at 48, 3 at 72,
    the sigma the references train each heatmap width with)."""
    sigma = width / 24.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    maps = []
    for x1, y1, a1, x2, y2, a2, ripple in PEAKS:
        m = np.zeros((height, width))
        for fx, fy, a in ((x1, y1, a1), (x2, y2, a2)):
            if a:
                cx, cy = fx * (width - 1), fy * (height - 1)
                m += a * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
        m += ripple * np.sin(0.9 * xx + 0.4 * yy) * np.cos(0.3 * xx - 0.8 * yy)
        maps.append(m)
    return np.stack(maps)[None].astype(np.float32)


def tie_candidates() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OKS-NMS candidates with tied scores: (6, 17, 3) keypoints, scores, areas. 0 and 1 are one person scored
    alike, 2 and 3 another, 4 a third that ties with 0 and 1, 5 a weaker duplicate of 0."""
    j = np.arange(17, dtype=np.float64)
    pose = np.stack([100 + 30 * np.cos(j), 200 + 40 * np.sin(1.7 * j), np.full(17, 0.9)], axis=1)
    shifts = (0.0, 0.5, 40.0, 40.3, 200.0, 1.0)
    kps = np.stack([pose + np.array([dx, 0.7 * dx, 0.0]) for dx in shifts])
    scores = np.array([0.8, 0.8, 0.6, 0.6, 0.8, 0.3])
    areas = np.full(6, 10000.0)
    return kps, scores, areas
