"""ONNX Runtime runner and loader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.backends.base import Runner

if TYPE_CHECKING:
    import onnxruntime as ort

    from dynpose.engines.manifest import Entry


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise DynPoseError(
                "ONNX Runtime has no CUDAExecutionProvider here; install onnxruntime-gpu (`pip install dynpose[gpu]`) "
                "or use --device cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "trt":
        if "TensorrtExecutionProvider" not in available:
            raise DynPoseError("ONNX Runtime has no TensorrtExecutionProvider here; use --device cuda or cpu")
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    raise DynPoseError(f"unknown device {device!r} for the ort backend; use cpu, cuda or trt")


def open_session(
    path: Path, device: str = "cpu", intra_op_threads: int = 0, what: str = "ONNX model"
) -> ort.InferenceSession:
    """An `onnxruntime.InferenceSession` for `device`; a file ORT rejects is a one-line DynPoseError naming `what`.

    intra_op_threads 0 lets ORT pick; the pipeline passes a share of the cores so the two pose models running at
    once do not oversubscribe the CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=_providers(device))
    except DynPoseError:
        raise
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DynPoseError(f"{what} {path}: ONNX Runtime cannot load it ({first})") from None


class OrtRunner(Runner):
    """One InferenceSession. ORT sessions are safe to call from several threads, so no lock is taken."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        max_batch: int = 64,
        intra_op_threads: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise DynPoseError(f"ONNX model {path}: file not found")
        self.session = open_session(path, device, intra_op_threads)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise DynPoseError(f"ONNX model {path}: expected one input, found {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_shape = inputs[0].shape
        self.max_batch = max_batch
        self.name = name or path.stem
        self.path = path

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        super().close()
        self.session = None  # type: ignore[assignment]


def load_ort(engine_dir: str | os.PathLike, entry: Entry, device: str = "cpu", intra_op_threads: int = 0) -> OrtRunner:
    """Loader: a manifest entry (format onnx) -> runner."""
    if entry.format != "onnx":
        raise DynPoseError(f"{entry.role}: the ort backend runs ONNX files, this entry is {entry.format}")
    return OrtRunner(
        Path(engine_dir) / entry.file,
        device=device,
        max_batch=entry.max_batch,
        intra_op_threads=intra_op_threads,
        name=f"{entry.role}:{entry.model}",
    )
