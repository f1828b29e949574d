"""Short test videos made from the shared photos with OpenCV: slow pans, static scenes with noise, gaps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np


def write_clip(path: Path, frames: Sequence[np.ndarray], fps: float = 10.0) -> Path:
    """Frames (BGR, one size) into a video: .avi as MJPG (its header counts frames), else mp4v."""
    fourcc = "MJPG" if path.suffix.lower() == ".avi" else "mp4v"
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for f in frames:
        writer.write(np.ascontiguousarray(f))
    writer.release()
    return path


def pan(image: np.ndarray, n: int, window: tuple[int, int], x0: int, x1: int, y: int = 0) -> list[np.ndarray]:
    """A camera panning from x0 to x1 over `image`: `n` crops of `window` (w, h) pixels."""
    w, h = window
    xs = np.linspace(x0, x1, n).round().astype(int)
    return [image[y : y + h, x : x + w].copy() for x in xs]


def static(image: np.ndarray, n: int, sigma: float = 0.0, seed: int = 0) -> list[np.ndarray]:
    """The same frame `n` times, with fresh Gaussian pixel noise of `sigma` grey levels each time."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        noisy = image.astype(np.float32) + (rng.normal(0.0, sigma, image.shape) if sigma else 0.0)
        frames.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return frames


def blank(like: np.ndarray, n: int) -> list[np.ndarray]:
    """`n` black frames of the same size (everyone leaves the picture)."""
    return [np.zeros_like(like) for _ in range(n)]
