"""Backends, one folder each (`ort/`, `tensorrt/`, `torch/`, `openvino/`): that runtime's loader (and builder) beside
its runner.

`LOADERS` is the whole table: backend name -> the module and function that turn a manifest entry into a runner.
Each backend's module is imported only when that backend is asked for, so `--backend ort` works on a machine
without tensorrt, CUDA or openvino.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from dynpose.errors import DynPoseError
from dynpose.runtime.backends.base import Runner, TensorMeta

if TYPE_CHECKING:
    from dynpose.engines.manifest import Entry

# backend -> (module, loader function, manifest format it runs)
LOADERS: dict[str, tuple[str, str, str]] = {
    "ort": ("dynpose.runtime.backends.ort", "load_ort", "onnx"),
    "tensorrt": ("dynpose.runtime.backends.tensorrt", "load_trt", "tensorrt"),
    "torch": ("dynpose.runtime.backends.torch", "load_torch", "torch"),
    "openvino": ("dynpose.runtime.backends.openvino", "load_openvino", "openvino"),
}
BACKENDS = tuple(LOADERS)
BACKEND_FORMAT = {name: fmt for name, (_, _, fmt) in LOADERS.items()}


def check_backend(backend: str) -> str:
    if backend not in LOADERS:
        raise DynPoseError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return backend


def load_runner(backend: str, engine_dir: str | os.PathLike, entry: Entry, device: str = "cpu", **opts: Any) -> Runner:
    """Turn a manifest entry into an (inactive) runner of the named backend; activate it with `with` or
    `.activate()`. `opts` go to that backend's loader (ort and openvino: intra_op_threads; torch: fp16,
    channels_last, cuda_graphs, compile; tensorrt: max_batch)."""
    module, func, _ = LOADERS[check_backend(backend)]
    loader = getattr(importlib.import_module(module), func)
    runner: Runner = loader(engine_dir, entry, device=device, **opts)
    return runner


__all__ = ["BACKENDS", "BACKEND_FORMAT", "LOADERS", "Runner", "TensorMeta", "check_backend", "load_runner"]
