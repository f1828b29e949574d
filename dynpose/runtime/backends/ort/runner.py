"""ONNX Runtime runner and loader.

On a GPU the loader gives each session provider options made from the manifest entry (`ort_provider_options`):
the CUDA provider picks cuDNN algorithms heuristically (its default exhaustive search re-runs for every new batch
size, and the crop count changes every frame), and the TensorRT provider gets one profile over the batch axis,
engine + timing caches inside the engine dir, and fp16/int8 kernels only for graphs exported in that precision.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.onnx_utils import ORT_TRT_CACHE_DIR, cuda_ep_options, open_session, tensorrt_ep_options
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
        provider_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        path = Path(path)
        super().__init__(name or path.stem, max_batch)
        if not path.is_file():
            raise DynPoseError(f"ONNX model {path}: file not found")
        self.path = path
        self.device = device
        self.intra_op_threads = intra_op_threads
        self.provider_options = {k: dict(v) for k, v in (provider_options or {}).items()}
        self.session: ort.InferenceSession | None = None

    def _activate(self) -> None:
        cache = self.provider_options.get("TensorrtExecutionProvider", {}).get("trt_engine_cache_path")
        if cache:
            try:
                Path(cache).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DynPoseError(
                    f"ONNX model {self.path}: cannot create the TensorRT EP cache folder {cache} ({e.strerror}); make "
                    "the engine dir writable or pass another trt_engine_cache_path"
                ) from None
        sess = open_session(self.path, self.device, self.intra_op_threads, provider_options=self.provider_options)
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
        try:
            outs = self.session.run(self._outputs, {self._input: batch})
        except Exception as e:  # ONNX Runtime's own error types: a model that cannot run this batch
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise DynPoseError(f"ONNX model {self.path}: ONNX Runtime failed on a batch of {len(batch)} ({first})") from None
        return [np.asarray(o, dtype=np.float32) for o in outs]


def ort_provider_options(device: str, entry: Entry, engine_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Provider name -> options for running `entry` on `device` (cpu | cuda | trt). Pure: nothing is opened."""
    if device == "cpu":
        return {}
    opts: dict[str, dict[str, Any]] = {"CUDAExecutionProvider": cuda_ep_options("HEURISTIC")}
    if device == "trt":
        chw = (3, entry.card.input_height, entry.card.input_width)
        cache = Path(engine_dir) / ORT_TRT_CACHE_DIR
        opts["TensorrtExecutionProvider"] = tensorrt_ep_options(
            entry.input_name, chw, entry.max_batch, cache, precision=entry.precision
        )
    return opts


def load_ort(engine_dir: str | os.PathLike, entry: Entry, device: str = "cpu", intra_op_threads: int = 0) -> OrtRunner:
    """Loader: a manifest entry (format onnx) -> an inactive runner, with `ort_provider_options` for `device`."""
    if entry.format != "onnx":
        raise DynPoseError(f"{entry.role}: the ort backend runs ONNX files, this entry is {entry.format}")
    return OrtRunner(
        Path(engine_dir) / entry.file,
        device=device,
        max_batch=entry.max_batch,
        intra_op_threads=intra_op_threads,
        name=f"{entry.role}:{entry.model}",
        provider_options=ort_provider_options(device, entry, engine_dir),
    )
