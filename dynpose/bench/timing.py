"""What every benchmark part shares: argument parsing, machine facts, inputs, and round-robin timing.

Measuring on a shared, noisy machine: every configuration gets its warm-up calls first, then the configurations
take turns (round-robin) for `repeats` rounds, so a slow spell on the machine hits all of them alike; figures are
medians (crops/s = batch / median latency) with p50/p95 latency.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError


# -- arguments ---------------------------------------------------------------------------------------------------------
def parse_batches(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; each a positive integer."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise DynPoseError(f"--batch {text!r}: not a comma-separated list of integers (e.g. 1,8,32)") from None
    if not vals or any(v < 1 for v in vals):
        raise DynPoseError(f"--batch {text!r}: batch sizes must be integers >= 1 (e.g. 1,8,32)")
    return sorted(set(vals))


def parse_fractions(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; each in [0, 1] (the share of crops sent to the large model)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise DynPoseError(f"--fractions {text!r}: not a comma-separated list of numbers (e.g. 0,0.5,1)") from None
    if not vals or any(not (0.0 <= v <= 1.0) for v in vals):
        raise DynPoseError(f"--fractions {text!r}: each fraction must be in [0, 1] (share of crops sent to the large model)")
    return sorted(set(vals))


# -- machine and versions ------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "device": device,
    }
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("dynpose", "numpy", "onnxruntime", "onnxruntime-gpu", "opencv-python-headless", "torch", "tensorrt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# -- inputs ------------------------------------------------------------------------------------------------------------
def synthetic_frame(seed: int = 0, size: tuple[int, int] = (480, 640)) -> np.ndarray:
    """A textured BGR frame (smoothed noise) for crop benchmarks when no images are given: model cost does not depend
    on the pixels, and real-image runs are the pipeline part's job."""
    import cv2

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    return cv2.GaussianBlur(img, (7, 7), 0)


def boxes_for_batch(batch: int, frame_hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """`batch` person-shaped boxes (x,y,w,h) inside the frame, seeded."""
    h, w = frame_hw
    rng = np.random.default_rng(seed)
    bw = rng.uniform(0.15, 0.35, batch) * w
    bh = np.minimum(bw * rng.uniform(1.6, 2.6, batch), 0.95 * h)
    x = rng.uniform(0, 1, batch) * (w - bw)
    y = rng.uniform(0, 1, batch) * (h - bh)
    return np.stack([x, y, bw, bh], axis=1)


def real_inputs(
    images: str | os.PathLike,
    detections: str | os.PathLike,
    score_thr: float = 0.0,
    ann: str | os.PathLike | None = None,
) -> list[tuple[Path, np.ndarray]]:
    """(image file, boxes (M,5) x,y,w,h,score) for each image of the folder that has detections."""
    from dynpose.data import image_id_map, load_coco, load_detections

    images = Path(images)
    if not images.is_dir():
        raise DynPoseError(f"--images {images}: not a directory; pass the folder holding the images")
    dets = load_detections(detections, score_thr)
    files = image_id_map(images, load_coco(ann) if ann else None)
    out = [(files[i], dets[i]) for i in sorted(dets) if i in files]
    if not out:
        raise DynPoseError(
            f"--images {images}: no image matches an image_id in {detections}; file names must be the numeric ids "
            "(COCO: 000000000785.jpg)"
        )
    return out


# -- timing ------------------------------------------------------------------------------------------------------------
def percentile_ms(samples_s: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples_s, dtype=np.float64), q) * 1e3)


def round_robin(
    configs: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Time each config `repeats` times, taking turns; `warmup` untimed calls each first. -> name -> seconds."""
    for _ in range(warmup):
        for fn in configs.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(repeats):
        for name, fn in configs.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        if progress is not None:
            progress(f"round {r + 1}/{repeats}")
    return samples
