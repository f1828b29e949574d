"""TensorRT runner and loader (TensorRT 10/11 name-based IO API, memory through cuda-python).

Per runner: one execution context, one non-blocking CUDA stream, pinned host and device buffers sized for the
profile's max batch, and one event. A call sets the input shape, copies H2D, enqueues the engine and copies D2H,
all on that stream, then waits on the event recorded after the D2H copy; two runners therefore overlap on the GPU
while each Python thread blocks only on its own work.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.backends.base import Runner, TensorMeta
from dynpose.runtime.backends.tensorrt import cuda_utils as cu
from dynpose.runtime.backends.tensorrt.builder import import_tensorrt

if TYPE_CHECKING:
    from dynpose.engines.manifest import Entry

log = logging.getLogger(__name__)

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


def buffer_nbytes(shape: tuple[int, ...], dtype: np.dtype | str, tensor: str, where: str) -> int:
    """Bytes of an IO buffer of `shape`; a dimension TensorRT left at -1 (a data-dependent output shape) cannot be
    sized before running, and dynpose's models have none, so it is refused here rather than reaching cudaMemcpy."""
    if any(int(d) < 0 for d in shape):
        raise DynPoseError(
            f"{where}: tensor {tensor!r} has a data-dependent shape {tuple(shape)} at the max batch; dynpose runs "
            "models whose output shapes follow from the input shape (export without data-dependent ops)"
        )
    return max(1, math.prod(int(d) for d in shape)) * _itemsize(dtype)


class TrtRunner(Runner):
    """One deserialised engine with its own context, stream, event and buffers (all made on activate)."""

    def __init__(
        self,
        plan_path: str | os.PathLike,
        *,
        device: str = "cuda",
        max_batch: int | None = None,
        output_name: str | None = None,
        name: str | None = None,
    ) -> None:
        path = Path(plan_path)
        super().__init__(name or path.stem, max_batch or 64)
        self.path = path
        self.device_index = cu.parse_device(device)
        self._requested_max_batch = max_batch
        self._output_name = output_name
        # One execution context per runner: calls into it are serialised (a context is not re-entrant).
        self._exec_lock = threading.Lock()
        self._host: dict[str, Any] = {}
        self._dev: dict[str, Any] = {}
        self._views: dict[str, np.ndarray] = {}
        self._stream: Any = None
        self._event: Any = None
        self.context: Any = None
        self.engine: Any = None
        self._runtime: Any = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def _activate(self) -> None:
        trt = import_tensorrt()
        self._rt = cu.cudart()
        problem = cu.cuda_python_problem(cu.cuda_python_version())
        if problem:
            log.warning("%s: %s", self.name, problem)
        self._set_device()
        try:
            plan = self.path.read_bytes()
        except FileNotFoundError:
            raise DynPoseError(f"TensorRT plan {self.path}: file not found; {REBUILD}") from None
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise DynPoseError(f"TensorRT plan {self.path}: TensorRT {trt.__version__} cannot deserialise it; {REBUILD}")
        try:
            self._describe(trt)
            self._allocate()
        except BaseException:
            self._deactivate()
            raise

    def _describe(self, trt: Any) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if len(self.inputs) != 1 or not self.outputs:
            raise DynPoseError(
                f"TensorRT plan {self.path}: expected one input and at least one output, got inputs {self.inputs} "
                f"and outputs {self.outputs}"
            )
        self.input_name = self.inputs[0]
        out = self._output_name
        if out is not None and out in self.outputs:
            # the manifest's named output first, the others after it in engine order
            self.outputs = [out] + [o for o in self.outputs if o != out]
        elif out is not None and len(self.outputs) > 1:
            raise DynPoseError(f"TensorRT plan {self.path}: no output named {out!r}; it has {self.outputs}")
        self.output_name = self.outputs[0]
        self.dtypes = {n: _np_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        pmin, _popt, pmax = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, profile_max = int(pmin[0]), int(pmax[0])
        self.input_chw = tuple(int(d) for d in pmax[1:])
        # Batches above the profile's max cannot run; the base class splits them.
        req = self._requested_max_batch
        self.max_batch = min(req, profile_max) if req else profile_max

    def _allocate(self) -> None:
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise DynPoseError(f"TensorRT plan {self.path}: cannot create an execution context (out of GPU memory?)")
        rt = self._rt
        self._stream = cu.check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        # BlockingSync: the waiting thread sleeps instead of spinning a core per worker; no timing needed.
        flags = rt.cudaEventDisableTiming | rt.cudaEventBlockingSync
        self._event = cu.check(rt.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")
        # Size every buffer for the largest batch once, so a call never allocates.
        if not self.context.set_input_shape(self.input_name, (self.max_batch, *self.input_chw)):
            raise DynPoseError(f"TensorRT plan {self.path}: rejects input shape {(self.max_batch, *self.input_chw)}")
        for n in [self.input_name, *self.outputs]:
            shape = tuple(self.context.get_tensor_shape(n))
            nbytes = buffer_nbytes(shape, self.dtypes[n], n, f"TensorRT plan {self.path}")
            self._host[n] = cu.check(rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})")
            self._dev[n] = cu.check(rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})")
            self._views[n] = cu.host_array(self._host[n], nbytes, _host_dtype(self.dtypes[n]))
            if not self.context.set_tensor_address(n, int(self._dev[n])):
                raise DynPoseError(f"TensorRT plan {self.path}: set_tensor_address({n!r}) was refused")

    def _deactivate(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is None:
            return
        with self._exec_lock:
            # Frees and destroys act on this runner's device, whichever thread closes it.
            rt.cudaSetDevice(self.device_index)
            if self._stream is not None:
                # Work still queued on the stream may read the pinned buffers: finish it before freeing them.
                rt.cudaStreamSynchronize(self._stream)
            self._views = {}  # drop numpy views before their memory goes; free in reverse order of creation
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
            self.context = self.engine = self._runtime = None

    def _set_device(self) -> None:
        # The current device is per host thread; the executor may call from a worker thread.
        cu.check(self._rt.cudaSetDevice(self.device_index), f"cudaSetDevice({self.device_index})")

    def _input_metadata(self) -> TensorMeta:
        dt = self.dtypes[self.input_name]
        return TensorMeta(self.input_name, (None, *self.input_chw), str(dt))

    # -- one call --------------------------------------------------------------------------------------------------
    def _infer(self, batch: np.ndarray) -> list[np.ndarray]:
        rt, n = self._rt, batch.shape[0]
        if tuple(batch.shape[1:]) != self.input_chw:
            raise DynPoseError(f"{self.name}: expected N x {' x '.join(map(str, self.input_chw))}, got {batch.shape}")
        if n < self.min_batch:
            raise DynPoseError(f"{self.name}: batch {n} is below the engine profile's minimum {self.min_batch}")
        with self._exec_lock:
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
            if not self.context.execute_async_v3(cu.native_handle(self._stream)):
                raise DynPoseError(f"{self.name}: TensorRT execute_async_v3 failed (see its messages above)")
            shapes = {o: tuple(self.context.get_tensor_shape(o)) for o in self.outputs}
            for o, shape in shapes.items():
                nbytes = buffer_nbytes(shape, self.dtypes[o], o, self.name)
                cu.check(rt.cudaMemcpyAsync(self._host[o], self._dev[o], nbytes, d2h, self._stream), "cudaMemcpyAsync D2H")
            cu.check(rt.cudaEventRecord(self._event, self._stream), "cudaEventRecord")
            cu.check(rt.cudaEventSynchronize(self._event), "cudaEventSynchronize")
            return [cu.from_io_dtype(self._views[o][: math.prod(s)], self.dtypes[o]).reshape(s) for o, s in shapes.items()]

    def __del__(self) -> None:
        try:
            if self.is_active:
                self.deactivate()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


def load_trt(engine_dir: str | os.PathLike, entry: Entry, device: str = "cuda", **kw: Any) -> TrtRunner:
    """Loader: a manifest entry (format tensorrt) -> an inactive runner, after checking the plan fits this machine."""
    if entry.format != "tensorrt":
        raise DynPoseError(f"{entry.role}: the tensorrt backend runs plans, this entry is {entry.format}")
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
