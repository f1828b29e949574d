"""TensorRT runner and loader (TensorRT 10/11 name-based IO API, memory through cuda-python).

Per runner: one execution context, one non-blocking CUDA stream, pinned host and device buffers sized for the
profile's max batch, and one event. A call sets the input shape, copies H2D, enqueues the engine and copies D2H,
all on that stream, then waits on the event recorded after the D2H copy; two runners therefore overlap on the GPU
while each Python thread blocks only on its own work.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.backends.base import Runner
from dynpose.runtime.backends.tensorrt import cuda_utils as cu

if TYPE_CHECKING:
    from dynpose.engines.manifest import Entry

REBUILD = "rebuild with dynpose-export --format tensorrt"


def sm(cc: str) -> str:
    """'8.9' -> 'sm_89'."""
    return "sm_" + str(cc).replace(".", "")


def check_plan_metadata(
    meta: dict[str, Any] | None,
    *,
    installed_version: str,
    compute_capability: str,
    gpu_name: str = "",
    where: str = "engine",
) -> None:
    """Refuse a plan built by another TensorRT version or for another GPU architecture.

    TensorRT plans are only portable to the exact TensorRT version and the same compute capability; loading one
    anyway fails deep inside deserialisation (or worse, runs slowly with wrong tactics), so check first.
    """
    if not meta:
        raise DynPoseError(f"{where}: the manifest entry has no 'tensorrt' build metadata; {REBUILD}")
    built_v = str(meta.get("tensorrt_version", "?"))
    built_cc = str(meta.get("compute_capability", "?"))
    if built_v != installed_version or built_cc != compute_capability:
        built_gpu = f" ({meta['gpu_name']})" if meta.get("gpu_name") else ""
        here_gpu = f" ({gpu_name})" if gpu_name else ""
        raise DynPoseError(
            f"{where}: engine built with TensorRT {built_v} for {sm(built_cc)}{built_gpu}; this machine has TensorRT "
            f"{installed_version} and {sm(compute_capability)}{here_gpu}; {REBUILD}"
        )


def _np_dtype(trt: Any, dt: Any) -> np.dtype | str:
    if dt == trt.DataType.BF16:
        return cu.BF16
    try:
        return np.dtype(trt.nptype(dt))
    except TypeError:
        raise DynPoseError(f"TensorRT IO dtype {dt} is not supported by dynpose (use fp32/fp16/bf16 IO)") from None


def _itemsize(dtype: np.dtype | str) -> int:
    return 2 if dtype == cu.BF16 else np.dtype(dtype).itemsize


def _host_dtype(dtype: np.dtype | str) -> np.dtype:
    return np.dtype(np.uint16) if dtype == cu.BF16 else np.dtype(dtype)


class TrtRunner(Runner):
    """One deserialised engine with its own context, stream and buffers."""

    def __init__(
        self,
        plan_path: str | os.PathLike,
        *,
        device: str = "cuda",
        max_batch: int | None = None,
        output_name: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        from dynpose.engines.tensorrt_build import import_tensorrt

        trt = import_tensorrt()
        self._rt = cu.cudart()
        self.device_index = cu.parse_device(device)
        self.path = Path(plan_path)
        self.name = name or self.path.stem
        self._host: dict[str, int] = {}
        self._dev: dict[str, int] = {}
        self._stream: Any = None
        self._event: Any = None
        self._set_device()

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        try:
            plan = self.path.read_bytes()
        except FileNotFoundError:
            raise DynPoseError(f"TensorRT plan {self.path}: file not found; {REBUILD}") from None
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise DynPoseError(f"TensorRT plan {self.path}: TensorRT {trt.__version__} cannot deserialise it; {REBUILD}")

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if len(self.inputs) != 1 or not self.outputs:
            raise DynPoseError(
                f"TensorRT plan {self.path}: expected one input and at least one output, got inputs {self.inputs} "
                f"and outputs {self.outputs}"
            )
        self.input_name = self.inputs[0]
        if output_name is None or (output_name not in self.outputs and len(self.outputs) == 1):
            output_name = self.outputs[0]  # a single output needs no name (ONNX files name it freely)
        if output_name not in self.outputs:
            raise DynPoseError(f"TensorRT plan {self.path}: no output named {output_name!r}; it has {self.outputs}")
        self.output_name = output_name
        self.dtypes = {n: _np_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

        pmin, _popt, pmax = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, profile_max = int(pmin[0]), int(pmax[0])
        self.input_chw = tuple(int(d) for d in pmax[1:])
        # Batches above the profile's max cannot run; the base class splits them.
        self.max_batch = min(max_batch, profile_max) if max_batch else profile_max

        try:
            self._allocate(names)
        except BaseException:
            self.close()
            raise

    def _allocate(self, names: list[str]) -> None:
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise DynPoseError(f"TensorRT plan {self.path}: cannot create an execution context (out of GPU memory?)")
        rt = self._rt
        self._stream = cu.check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self._event = cu.check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")

        # Size every buffer for the largest batch once, so a call never allocates.
        if not self.context.set_input_shape(self.input_name, (self.max_batch, *self.input_chw)):
            raise DynPoseError(f"TensorRT plan {self.path}: rejects input shape {(self.max_batch, *self.input_chw)}")
        self._views: dict[str, np.ndarray] = {}
        for n in names:
            shape = tuple(self.context.get_tensor_shape(n))
            nbytes = max(1, math.prod(shape)) * _itemsize(self.dtypes[n])
            self._host[n] = cu.check(rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})")
            self._dev[n] = cu.check(rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})")
            self._views[n] = cu.host_array(self._host[n], nbytes, _host_dtype(self.dtypes[n]))
            self.context.set_tensor_address(n, int(self._dev[n]))

    def _set_device(self) -> None:
        # The current device is per host thread; the dispatcher may call from a worker thread.
        cu.check(self._rt.cudaSetDevice(self.device_index), f"cudaSetDevice({self.device_index})")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        rt, n = self._rt, batch.shape[0]
        if tuple(batch.shape[1:]) != self.input_chw:
            raise DynPoseError(f"{self.name}: expected N x {' x '.join(map(str, self.input_chw))}, got {batch.shape}")
        if n < self.min_batch:
            raise DynPoseError(f"{self.name}: batch {n} is below the engine profile's minimum {self.min_batch}")
        with self._lock:
            self._set_device()
            if not self.context.set_input_shape(self.input_name, batch.shape):
                raise DynPoseError(f"{self.name}: engine rejects input shape {batch.shape}")
            x = cu.to_io_dtype(batch, self.dtypes[self.input_name]).reshape(-1)
            self._views[self.input_name][: x.size] = x
            h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            cu.check(
                rt.cudaMemcpyAsync(self._dev[self.input_name], self._host[self.input_name], x.nbytes, h2d, self._stream),
                "cudaMemcpyAsync H2D",
            )
            if not self.context.execute_async_v3(int(self._stream)):
                raise DynPoseError(f"{self.name}: TensorRT execute_async_v3 failed (see its messages above)")
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            count = math.prod(out_shape)
            nbytes = count * _itemsize(self.dtypes[self.output_name])
            cu.check(
                rt.cudaMemcpyAsync(self._host[self.output_name], self._dev[self.output_name], nbytes, d2h, self._stream),
                "cudaMemcpyAsync D2H",
            )
            cu.check(rt.cudaEventRecord(self._event, self._stream), "cudaEventRecord")
            cu.check(rt.cudaEventSynchronize(self._event), "cudaEventSynchronize")
            out = cu.from_io_dtype(self._views[self.output_name][:count], self.dtypes[self.output_name])
        return out.reshape(out_shape)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        rt = self._rt
        with self._lock:
            # Drop numpy views before their memory goes; free in reverse order of creation.
            self._views = {}
            for ptr in self._dev.values():
                rt.cudaFree(ptr)
            for ptr in self._host.values():
                rt.cudaFreeHost(ptr)
            self._dev, self._host = {}, {}
            if self._event is not None:
                rt.cudaEventDestroy(self._event)
            if self._stream is not None:
                rt.cudaStreamDestroy(self._stream)
            self._event = self._stream = None
            self.context = None
            self.engine = None
            self._runtime = None

    def __del__(self) -> None:
        try:
            if not self._closed and hasattr(self, "_host"):
                self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


def load_trt(engine_dir: str | os.PathLike, entry: Entry, device: str = "cuda", **kw: Any) -> TrtRunner:
    """Loader: a manifest entry (format tensorrt) -> runner, after checking the plan fits this machine."""
    if entry.format != "tensorrt":
        raise DynPoseError(f"{entry.role}: the tensorrt backend runs plans, this entry is {entry.format}")
    from dynpose.engines.tensorrt_build import import_tensorrt

    trt = import_tensorrt()
    index = cu.parse_device(device)
    gpu_name, cc = cu.device_info(index)
    check_plan_metadata(
        entry.tensorrt,
        installed_version=trt.__version__,
        compute_capability=cc,
        gpu_name=gpu_name,
        where=f"engine dir {engine_dir}: {entry.role} plan {entry.file}",
    )
    kw.setdefault("max_batch", entry.max_batch)
    kw.setdefault("output_name", entry.output_name)
    return TrtRunner(Path(engine_dir) / entry.file, device=device, name=f"{entry.role}:{entry.model}", **kw)
