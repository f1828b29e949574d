"""Backends: one loader per runtime, picked by a plain if/elif so a reader sees every option in one place.

Each backend's library is imported only when that backend is asked for, so `dynpose-run --backend ort` works on a
machine without tensorrt or CUDA.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from dynpose.errors import DynPoseError
from dynpose.runtime.backends.base import Runner

if TYPE_CHECKING:
    from dynpose.engines.manifest import Entry

BACKENDS = ("ort", "tensorrt", "torch")
# The manifest format each backend runs.
BACKEND_FORMAT = {"ort": "onnx", "tensorrt": "tensorrt", "torch": "torch"}


def load_runner(backend: str, engine_dir: str | os.PathLike, entry: Entry, device: str = "cpu", **opts: Any) -> Runner:
    """Turn a manifest entry into a runner of the named backend. `opts` go to that backend's loader
    (ort: intra_op_threads; torch: fp16; tensorrt: its own keywords)."""
    if backend == "ort":
        from dynpose.runtime.backends.ort import load_ort

        return load_ort(engine_dir, entry, device=device, **opts)
    elif backend == "tensorrt":
        try:
            from dynpose.runtime.backends.tensorrt import load_trt
        except ImportError as e:
            raise DynPoseError(
                f"the tensorrt backend is not available here ({e}); install dynpose[gpu] on a CUDA machine or use "
                "--backend ort"
            ) from None
        return load_trt(engine_dir, entry, device=device, **opts)
    elif backend == "torch":
        try:
            from dynpose.runtime.backends.torch import load_torch
        except ImportError as e:
            raise DynPoseError(f"the torch backend is not available here ({e}); use --backend ort") from None
        return load_torch(engine_dir, entry, device=device, **opts)
    raise DynPoseError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "BACKEND_FORMAT", "Runner", "load_runner"]
