"""The one small interface every backend implements (after Polygraphy's runners).

A *loader* turns a manifest entry into a `Runner`; a runner takes an fp32 NCHW batch and returns the model's single
output (heatmaps N x K x h x w, or router scores N x 3) as fp32 numpy. Runners know nothing about routing; the
dispatcher knows nothing about ONNX Runtime, TensorRT or torch.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from types import TracebackType

import numpy as np

from dynpose.errors import DynPoseError


class Runner(ABC):
    """Runs one model. Thread-safety: `infer` may be called from several threads; backends that cannot run
    concurrently on one instance serialise with `self._lock` (the dispatcher gives each model its own runner, so
    this only matters when users share one)."""

    name: str = "runner"
    max_batch: int = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch of at most `max_batch` items."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """fp32 NCHW in, fp32 out. Batches larger than `max_batch` are split and concatenated."""
        if self._closed:
            raise DynPoseError(f"{self.name}: runner is closed")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise DynPoseError(f"{self.name}: expected an N x C x H x W batch, got shape {batch.shape}")
        if batch.shape[0] == 0:
            raise DynPoseError(f"{self.name}: empty batch")
        if batch.shape[0] <= self.max_batch:
            return self._infer(batch)
        parts = [self._infer(batch[i : i + self.max_batch]) for i in range(0, batch.shape[0], self.max_batch)]
        return np.concatenate(parts, axis=0)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
