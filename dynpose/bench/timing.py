"""What every benchmark part shares: argument parsing, machine facts, inputs, and round-robin timing.

Measuring on a shared, noisy machine: every configuration gets its warm-up calls first, then the configurations
take turns (round-robin, the order rotated each round) so a slow spell on the machine hits all of them alike;
rounds are added until every speed ratio's 95% interval is within +-5% or a time limit is hit (`stats`), and other
processes' CPU use is sampled around each round (`load`). Figures are medians (crops/s = crops / median time).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynpose.bench.stats import TARGET_HALF_WIDTH, RatioCI, converged, paired_ratio_ci
from dynpose.errors import DynPoseError
from dynpose.roles import Role

if TYPE_CHECKING:
    from dynpose.runtime.engine_set import EngineSet
    from dynpose.runtime.model import CropModel


# -- arguments ---------------------------------------------------------------------------------------------------------
MAX_BATCH = 1024  # largest --batch timed: above it a call's input alone passes 600 MB and a round takes minutes


def parse_batches(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; each a positive integer."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise DynPoseError(f"--batch {text!r}: not a comma-separated list of integers (e.g. 1,8,32)") from None
    if not vals or any(v < 1 for v in vals):
        raise DynPoseError(f"--batch {text!r}: batch sizes must be integers >= 1 (e.g. 1,8,32)")
    if max(vals) > MAX_BATCH:
        raise DynPoseError(
            f"--batch {text!r}: {max(vals)} crops per call is over the limit of {MAX_BATCH} (a batch of 1024 "
            "256x192 crops is 600 MB of input before the model's own memory); time batches up to the engine's max_batch"
        )
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


@dataclass(frozen=True)
class RoundSpec:
    """How long to time: at least `min_rounds` rounds, then until every ratio's 95% interval is within
    +-`target` (or `max_rounds` rounds, or `time_limit_s` seconds of timing). min_rounds == max_rounds: fixed."""

    min_rounds: int = 5
    max_rounds: int = 1000
    time_limit_s: float = 240.0
    warmup: int = 1
    target: float = TARGET_HALF_WIDTH

    def validate(self) -> None:
        if self.min_rounds < 1 or self.max_rounds < self.min_rounds:
            raise DynPoseError(
                f"rounds: need 1 <= min rounds <= max rounds, got {self.min_rounds} and {self.max_rounds} "
                "(--min-rounds / --max-rounds / --repeats)"
            )
        if self.warmup < 0 or not (self.time_limit_s > 0) or not (self.target > 0):
            raise DynPoseError(
                f"--warmup must be >= 0, --time-limit and --ci-target > 0 (got {self.warmup}, {self.time_limit_s}, "
                f"{self.target})"
            )


@dataclass
class Rounds:
    """Per-configuration seconds per round (round i of every configuration ran back to back), and why timing
    stopped: "converged" (every interval within the target), "time limit", "max rounds" or "fixed"."""

    samples: dict[str, list[float]]
    stopped: str
    elapsed_s: float
    others_cores: list[float | None] = field(default_factory=list)  # other processes' CPU use per round

    @property
    def rounds(self) -> int:
        return len(next(iter(self.samples.values()), []))

    def ci(self, name: str, ref: str, seed: int = 0) -> RatioCI:
        return paired_ratio_ci(self.samples[ref], self.samples[name], seed=seed)


def _one_round(configs: dict[str, Callable[[], Any]], r: int, samples: dict[str, list[float]]) -> None:
    names = list(configs)
    k = r % len(names)  # rotate the order each round, so no configuration always runs right after another
    for name in names[k:] + names[:k]:
        t0 = time.perf_counter()
        configs[name]()
        samples[name].append(time.perf_counter() - t0)


def fastest(samples: dict[str, list[float]], names: Sequence[str]) -> str:
    """The configuration among `names` with the lowest median time so far (the reference ratios are taken to)."""
    have = [n for n in names if samples.get(n)]
    return min(have, key=lambda n: float(np.median(samples[n]))) if have else names[0]


def timed_rounds(
    configs: dict[str, Callable[[], Any]],
    ref: str | Sequence[str],
    spec: RoundSpec,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Rounds:
    """Time each configuration once per round, interleaved, until `spec` says stop (see `RoundSpec`); `warmup`
    untimed calls each first. Ratios are against the configuration named `ref`, or against the fastest of several
    (e.g. large-only on every core and on half of them: whichever this machine runs faster)."""
    refs = [ref] if isinstance(ref, str) else list(ref)
    from dynpose.bench.load import others_cores, sample

    spec.validate()
    for _ in range(spec.warmup):
        for fn in configs.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in configs}
    load: list[float | None] = []
    fixed = spec.min_rounds == spec.max_rounds
    start = time.perf_counter()
    stopped = "fixed" if fixed else "max rounds"
    for r in range(spec.max_rounds):
        before = sample()
        _one_round(configs, r, samples)
        load.append(others_cores(before, sample()))
        done = r + 1
        if fixed or done < spec.min_rounds:
            continue
        best = fastest(samples, refs)
        cis = [paired_ratio_ci(samples[best], s, seed=seed) for n, s in samples.items() if n != best]
        worst = max((ci.half_width for ci in cis), default=0.0)
        if progress is not None:
            progress(f"round {done}: widest interval +-{worst:.1%}")
        if converged(cis, spec.target):
            stopped = "converged"
            break
        if time.perf_counter() - start >= spec.time_limit_s:
            stopped = "time limit"
            break
    return Rounds(samples, stopped, time.perf_counter() - start, load)


# -- solo models: a baseline gets every core -----------------------------------------------------------------------------
@contextmanager
def solo_models(engines: EngineSet, threads: int | None = None) -> Iterator[dict[Role, CropModel]]:
    """Each opened model of the engine set as it runs *alone*: on ONNX Runtime CPU a fresh session with every core
    dynpose may use (`threads`, default all), since `EngineSet.load` gives each pose model half of them so the two
    workers do not fight; a large-only baseline with half the cores would flatter DynPose. Other backends (one GPU
    stream each) reuse the engine set's handles. The fresh sessions are closed on exit."""
    out: dict[Role, CropModel] = {}
    made: list[CropModel] = []
    try:
        for role in engines.entries:
            out[Role(role)] = engines.solo_model(role, threads)
            if out[role] is not getattr(engines, role):
                made.append(out[role])
        yield out
    finally:
        for m in made:
            m.runner.deactivate()


def threads_of(model: CropModel) -> int | None:
    """ONNX Runtime intra-op threads of a handle's runner (None: not an ORT CPU runner)."""
    n = getattr(model.runner, "intra_op_threads", None)
    return int(n) if isinstance(n, int) and n > 0 else None
