"""ONNX Runtime runner and loader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.onnx_utils import open_session
from dynpose.runtime.backends.base import Runner, TensorMeta

if TYPE_CHECKING:
    import onnxruntime as ort

    from dynpose.engines.manifest import Entry

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def _meta(arg: Any) -> TensorMeta:
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
    return TensorMeta(arg.name, shape, _ORT_DTYPES.get(arg.type, arg.type))


class OrtRunner(Runner):
    """One InferenceSession (made on activate). ORT sessions are safe to call from several threads."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        max_batch: int = 64,
        intra_op_threads: int = 0,
        name: str | None = None,
    ) -> None:
        path = Path(path)
        super().__init__(name or path.stem, max_batch)
        if not path.is_file():
            raise DynPoseError(f"ONNX model {path}: file not found")
        self.path = path
        self.device = device
        self.intra_op_threads = intra_op_threads
        self.session: ort.InferenceSession | None = None

    def _activate(self) -> None:
        sess = open_session(self.path, self.device, self.intra_op_threads)
        if len(sess.get_inputs()) != 1:
            raise DynPoseError(f"ONNX model {self.path}: expected one input, found {[i.name for i in sess.get_inputs()]}")
        self.session = sess
        self._input = sess.get_inputs()[0].name
        self._outputs = [o.name for o in sess.get_outputs()]

    def _deactivate(self) -> None:
        self.session = None

    def _input_metadata(self) -> TensorMeta:
        assert self.session is not None
        return _meta(self.session.get_inputs()[0])

    def _infer(self, batch: np.ndarray) -> list[np.ndarray]:
        assert self.session is not None
        outs = self.session.run(self._outputs, {self._input: batch})
        return [np.asarray(o, dtype=np.float32) for o in outs]


def load_ort(engine_dir: str | os.PathLike, entry: Entry, device: str = "cpu", intra_op_threads: int = 0) -> OrtRunner:
    """Loader: a manifest entry (format onnx) -> an inactive runner."""
    if entry.format != "onnx":
        raise DynPoseError(f"{entry.role}: the ort backend runs ONNX files, this entry is {entry.format}")
    return OrtRunner(
        Path(engine_dir) / entry.file,
        device=device,
        max_batch=entry.max_batch,
        intra_op_threads=intra_op_threads,
        name=f"{entry.role}:{entry.model}",
    )
