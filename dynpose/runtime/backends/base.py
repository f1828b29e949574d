"""The one small interface every backend implements (after Polygraphy's runners).

A *loader* turns a manifest entry into a `Runner`. A runner has an explicit lifecycle: the constructor only checks
its arguments; `activate()` (or `with runner:`) makes the resources (an ONNX Runtime session, a TensorRT context and
its CUDA buffers, a module on the device); `deactivate()` frees them. While active it takes an fp32 NCHW batch and
returns the model's outputs as fp32 numpy (`infer`: the first output, e.g. heatmaps N x K x h x w or router scores N x
3; `infer_all`: every output in graph order, e.g. SimDR's x and y vectors), reports its input metadata, and times its
own last inference. Runners know nothing about routing; the planner and executor know nothing about ONNX Runtime,
TensorRT or torch.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from dynpose.errors import DynPoseError


@dataclass(frozen=True)
class TensorMeta:
    """A tensor's name, shape (None for a dynamic dimension) and numpy dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"


def check_max_batch(max_batch: object, where: str) -> int:
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise DynPoseError(f"{where}: max_batch must be an integer >= 1, got {max_batch!r}")
    return max_batch


class Runner(ABC):
    """Runs one model.

    Thread-safety: `infer` may be called from several threads. Backends whose execution state cannot be shared
    (a TensorRT context, pinned staging buffers) serialise inside `_infer`. `deactivate` waits for calls in flight
    and makes later calls fail with a `DynPoseError`, so closing a runner under load never crashes a caller.
    """

    def __init__(self, name: str, max_batch: int = 64) -> None:
        self.name = name
        self.max_batch = check_max_batch(max_batch, f"runner {name}")
        self._state = threading.Condition()
        self._active = False
        self._in_flight = 0
        self._last: tuple[float, float] | None = None

    # -- what a backend implements -------------------------------------------------------------------------------
    @abstractmethod
    def _activate(self) -> None:
        """Make the resources inference needs."""

    @abstractmethod
    def _deactivate(self) -> None:
        """Free them (called with no inference in flight)."""

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run a contiguous fp32 batch of 1..max_batch items; every output as fp32, in graph order."""

    @abstractmethod
    def _input_metadata(self) -> TensorMeta:
        """The input tensor, as the active model declares it."""

    # -- lifecycle -------------------------------------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> Runner:
        """Make the runner's resources; a no-op when already active. Returns the runner."""
        with self._state:
            if not self._active:
                self._activate()
                self._active = True
        return self

    def deactivate(self) -> None:
        """Wait for calls in flight, then free the resources; later calls raise `DynPoseError`."""
        with self._state:
            if not self._active:
                return
            self._active = False
            while self._in_flight:
                self._state.wait()
            self._deactivate()

    close = deactivate

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.deactivate()

    # -- inference -------------------------------------------------------------------------------------------------
    def input_metadata(self) -> TensorMeta:
        self._require_active()
        return self._input_metadata()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """fp32 NCHW in, the first output out (fp32). Batches larger than `max_batch` are split and concatenated."""
        return self.infer_all(batch)[0]

    def infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        """fp32 NCHW in, every output (fp32, graph order) out; batches over `max_batch` are split."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise DynPoseError(f"{self.name}: expected an N x C x H x W batch, got shape {batch.shape}")
        if batch.shape[0] == 0:
            raise DynPoseError(f"{self.name}: empty batch")
        with self._state:
            self._require_active()
            self._in_flight += 1
        try:
            t0 = time.perf_counter()
            if batch.shape[0] <= self.max_batch:
                outs = self._infer(batch)
            else:
                parts = [self._infer(batch[i : i + self.max_batch]) for i in range(0, batch.shape[0], self.max_batch)]
                outs = [np.concatenate([p[k] for p in parts], axis=0) for k in range(len(parts[0]))]
            self._last = (t0, time.perf_counter())
            return outs
        finally:
            with self._state:
                self._in_flight -= 1
                self._state.notify_all()

    @property
    def last_inference(self) -> tuple[float, float] | None:
        """(start, end) `time.perf_counter()` seconds of the last completed `infer` call, None before the first."""
        return self._last

    def last_inference_time(self) -> float:
        """Seconds the last completed `infer` call took (0.0 before the first)."""
        return 0.0 if self._last is None else self._last[1] - self._last[0]

    def _require_active(self) -> None:
        if not self._active:
            raise DynPoseError(
                f"{self.name}: runner is not active (closed, or never activated); use `with runner:` or "
                "runner.activate() first"
            )
