"""Thin, checked access to the CUDA runtime through cuda-python (`cuda.bindings.runtime`).

cuda-python returns `(err, value...)` tuples instead of raising; `check` turns a failed call into a one-line
`DynPoseError` naming the CUDA error, so a missing driver or an out-of-memory reads the same as every other user
error. Also here: pinned host views as numpy arrays and the fp16/bf16 conversions the TensorRT runner needs.

cuda-python must be >= 12.9.1: older bindings hold the GIL inside every CUDA call, so one runner waiting in
`cudaEventSynchronize` blocks the other runner's thread and the main thread, and the two engines serialise.
"""

from __future__ import annotations

import ctypes
import importlib.metadata as md
import re
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError

CUDA_PYTHON_HINT = (
    "cuda-python is not installed: pip install 'dynpose[gpu-cu12]' (CUDA 12 driver) or 'dynpose[gpu-cu13]' "
    "(CUDA 13 driver, R580+); see docs/tensorrt.md"
)
# The first release whose bindings release the GIL around every CUDA call (cuda-bindings 12.9.1 release notes).
MIN_CUDA_PYTHON = (12, 9, 1)


def cudart() -> Any:
    """The `cuda.bindings.runtime` module (cuda-python >= 12.6), or the older `cuda.cudart` alias."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6 layout
        except ImportError:
            raise DynPoseError(CUDA_PYTHON_HINT) from None
    return runtime


def cuda_python_version() -> str | None:
    """The installed cuda-bindings (or, for the old single-package layout, cuda-python) version, None if neither."""
    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def cuda_python_problem(version: str | None) -> str | None:
    """Why this cuda-python version defeats concurrent runners (None when it is fine or unknown)."""
    if version is None:
        return None
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        return None
    got = tuple(int(g or 0) for g in m.groups())
    if got >= MIN_CUDA_PYTHON:
        return None
    return (
        f"cuda-python {version} holds the GIL inside every CUDA call, so the small and the large engine serialise; "
        "install cuda-python>=12.9.1 (pip install 'dynpose[gpu-cu12]' or 'dynpose[gpu-cu13]')"
    )


def native_handle(obj: Any) -> int:
    """The address behind a cuda-python object (a cudaStream_t for TensorRT's execute_async_v3). `int(obj)` is
    deprecated since cuda-bindings 12.9.1 in favour of `cuda.bindings.utils.get_cuda_native_handle`."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:  # older bindings: int() is the only way
        return int(obj)
    return int(get_cuda_native_handle(obj))


def error_name(err: Any) -> str:
    """`cudaErrorNoDevice`-style name of a cudaError_t (falls back to the enum's repr)."""
    rt = cudart()
    try:
        res = rt.cudaGetErrorName(err)
        name = res[1] if isinstance(res, tuple) else res
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the name lookup must never hide the original failure
        return getattr(err, "name", str(err))


def check(result: Any, what: str = "CUDA call") -> Any:
    """Unpack a cuda-python result tuple: raise on error, return the value (None, one value, or a tuple)."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if int(err) != 0:
        name = error_name(err)
        hint = ""
        if name in ("cudaErrorInsufficientDriver", "cudaErrorNoDevice"):
            hint = "; this needs an NVIDIA GPU with a recent driver (or run with --backend ort --device cpu)"
        elif name == "cudaErrorMemoryAllocation":
            hint = "; lower the max batch or free GPU memory"
        raise DynPoseError(f"{what} failed: {name}{hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def parse_device(device: str) -> int:
    """'cuda' -> 0, 'cuda:1' -> 1; anything else is a user error."""
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise DynPoseError(f"the tensorrt backend runs on a GPU: device must be 'cuda' or 'cuda:N', got {device!r}")


def device_info(index: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of one device; DynPoseError when there is none."""
    rt = cudart()
    count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if index >= count:
        raise DynPoseError(f"CUDA device {index} does not exist; this machine has {count} GPU(s)")
    prop = check(rt.cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    name = prop.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return str(name), f"{prop.major}.{prop.minor}"


def host_array(ptr: int, nbytes: int, dtype: np.dtype) -> np.ndarray:
    """A flat numpy view of `nbytes` of host memory at `ptr` (pinned memory from cudaMallocHost).

    The view does not own the memory: the runner frees it in close() and drops its views first.
    """
    buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return np.ctypeslib.as_array(buf).view(dtype)


# numpy has no bfloat16: TensorRT bf16 tensors travel as uint16 bit patterns (the top half of an fp32).
BF16 = "bfloat16"


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN (sign kept, quiet), inf stays inf.

    The rounding add must not see a NaN: its low mantissa bits would carry into the exponent (0x7F800001 -> inf)
    or, for a negative NaN, wrap the uint32 past the sign (0xFFFFFFFF -> +0)."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    bits = rounded.astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        bits[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return bits


def to_io_dtype(x: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    """fp32 batch -> the engine's input dtype (fp32, fp16, or bf16 as uint16 bits, rounded to nearest even)."""
    if dtype == BF16:
        return to_bf16_bits(x)
    return np.asarray(x, dtype=dtype)


def from_io_dtype(x: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    """An engine output buffer (fp32, fp16, or bf16 bits) -> a new fp32 array."""
    if dtype == BF16:
        return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.array(x, dtype=np.float32, copy=True)
