"""OpenVINO runner and loader (CPU).

Static batch buckets, not a dynamic batch: the IR's dynamic batch is reshaped to 1, 2, 4 and 8 and each shape is
compiled once; a call runs its crops as bucket-sized pieces (13 = 8 + 4 + 1; a remainder within a quarter of the
next bucket is padded up: 3 -> 4, 6 or 7 -> 8). Measured on the 2-core AVX-512 machine (OpenVINO 2026.4, f32, 2
threads, interleaved medians, machine under load so only the ratios count): one dynamic-batch compiled model was
1.18-1.25x slower than static shapes at batch 1 (HRNet-W32, TinyPose-256), on par at batch 8, and at batch 5 the
static 4 + 1 pieces beat the dynamic model by 1.15-1.20x (TinyPose-256 f32 and bf16) and padding to 8 by 1.5x: the
CPU plugin's dynamic path re-infers shapes and re-plans memory on every call and cannot pick kernels for a fixed
shape. Per-crop throughput hardly grows past batch 8 on a CPU, so four buckets cover every size; they cost four
compilations (once: the compiled-model cache keeps them) and four copies of the repacked weights in memory.

Threads: one stream per runner with `intra_op_threads` inference threads (0: OpenVINO's default, every core), not
pinned to cores. The engine set gives the small and the large model half of the cores each, as it does for ONNX
Runtime (`--threads` means the cores dynpose may use, whatever the backend); pinned, two compiled models (or two
service replicas) each place their threads from core 0 up and share cores while others idle.

The compiled-model cache lives in the engine dir (`openvino_cache/<release>-<isa>/`), so a second start loads the
compiled graphs instead of compiling them. OpenVINO recompiles a damaged or foreign cache entry by itself; the
runner says so in a warning, and a cache that cannot be used at all (unwritable folder, an import that raises)
is bypassed with a warning: never fatal.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.backends.base import Runner, TensorMeta
from dynpose.runtime.backends.openvino.builder import error_line, read_ir
from dynpose.runtime.backends.openvino.device import (
    INFERENCE_PRECISION,
    check_ir_metadata,
    cpu_info,
    import_openvino,
)

if TYPE_CHECKING:
    from dynpose.engines.manifest import Entry

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8)
CACHE_DIRNAME = "openvino_cache"
_HINTS = ("f32", "bf16", "f16")


def split_batch(n: int, buckets: tuple[int, ...]) -> list[tuple[int, int]]:
    """[(crops, bucket), ...] covering n crops: the largest bucket that fits, and a remainder padded up to the next
    bucket when the padding is at most a quarter of that bucket (3 -> 4, 6 -> 8), else split further."""
    out: list[tuple[int, int]] = []
    top = max(buckets)
    while n > 0:
        if n >= top:
            out.append((top, top))
            n -= top
            continue
        up = min(b for b in buckets if b >= n)
        below = [b for b in buckets if b <= n]
        if up == n or (up - n) * 4 <= up or not below:
            out.append((n, up))
            return out
        down = max(below)
        out.append((down, down))
        n -= down
    return out


@dataclass(frozen=True)
class CompileOptions:
    """How an IR is compiled for the CPU: OpenVINO's inference precision (f32 | bf16 | f16), the inference threads
    (0: OpenVINO's default, every core; the same meaning as ONNX Runtime's intra-op threads), the compiled-model cache
    folder (None: none), and the batch buckets compiled."""

    inference_precision: str = "f32"
    intra_op_threads: int = 0
    cache_dir: Path | None = None
    buckets: tuple[int, ...] = BUCKETS

    def check(self, where: str) -> None:
        if self.inference_precision not in _HINTS:
            raise DynPoseError(f"{where}: inference precision {self.inference_precision!r}; use one of {_HINTS}")
        n = self.intra_op_threads
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DynPoseError(f"{where}: intra_op_threads must be an integer >= 0, got {n!r}")
        if not self.buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.buckets):
            raise DynPoseError(f"{where}: batch buckets must be integers >= 1, got {self.buckets!r}")


class OpenVinoRunner(Runner):
    """One IR compiled for the CPU at each batch bucket, one infer request per bucket (made on activate)."""

    def __init__(
        self,
        xml: str | os.PathLike,
        options: CompileOptions | None = None,
        *,
        weights: str | os.PathLike | None = None,
        max_batch: int = 64,
        name: str | None = None,
    ) -> None:
        xml = Path(xml)
        super().__init__(name or xml.stem, max_batch)
        options = options or CompileOptions()
        options.check(self.name)
        self.xml = xml
        self.weights = Path(weights) if weights is not None else xml.with_suffix(".bin")
        self.inference_precision = options.inference_precision
        self.intra_op_threads = options.intra_op_threads  # read by the benchmark's thread report, as ORT's runner's
        self.cache_dir = options.cache_dir
        buckets = options.buckets
        self.buckets = tuple(sorted({b for b in buckets if b <= max_batch})) or (min(buckets),)
        self._lock = threading.Lock()  # one stream: calls take turns, each on every thread the runner has
        self._requests: dict[int, Any] = {}
        self._input: TensorMeta | None = None
        self.start_s = 0.0  # seconds the last activate took (read + compile or cache load)
        self.loaded_from_cache = False

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "INFERENCE_PRECISION_HINT": self.inference_precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": self.intra_op_threads,
            "ENABLE_CPU_PINNING": False,
        }

    def _activate(self) -> None:
        ov = import_openvino()
        t0 = time.perf_counter()
        model = read_ir(self.xml, self.weights)
        if len(model.inputs) != 1:
            raise DynPoseError(f"OpenVINO IR {self.xml}: expected one input, found {len(model.inputs)}")
        shape = model.inputs[0].get_partial_shape()
        if shape.rank.get_length() != 4 or any(shape[i].is_dynamic for i in (1, 2, 3)):
            raise DynPoseError(f"OpenVINO IR {self.xml}: input must be N x C x H x W with fixed C, H, W, got {shape}")
        chw = [shape[i].get_length() for i in (1, 2, 3)]
        self._input = TensorMeta(model.inputs[0].get_any_name(), (None, *chw), "float32")
        core = ov.Core()
        cached = []
        for b in self.buckets:
            m = model.clone()
            m.reshape([b, *chw])
            compiled = self._compile(core, m, b)
            cached.append(_loaded_from_cache(compiled))
            self._requests[b] = compiled.create_infer_request()
        self.loaded_from_cache = all(cached)
        self.start_s = time.perf_counter() - t0

    def _compile(self, core: Any, model: Any, bucket: int) -> Any:
        config = self._config()
        cache = self._usable_cache()
        if cache is not None:
            before = _blobs(cache)
            try:
                compiled = core.compile_model(model, "CPU", {**config, "CACHE_DIR": str(cache)})
            except Exception as e:
                compiled = self._compile_without_cache(core, model, bucket)  # a model that cannot compile raises here
                # the model compiles, so the cache was the trouble: the folder (shared by the dir's models) goes
                log.warning(
                    "%s: the compiled-model cache %s cannot be used (%s); removed it, compiling without it",
                    *(self.name, cache, error_line(e)),
                )
                shutil.rmtree(cache, ignore_errors=True)
                self.cache_dir = None
                return compiled
            else:
                after = _blobs(cache)
                rebuilt = sorted(k for k in before if k in after and after[k] != before[k])
                if rebuilt and not _loaded_from_cache(compiled):
                    log.warning(
                        "%s: compiled-model cache entry %s was unreadable (damaged, or written by another build); "
                        "rebuilt it",
                        *(self.name, cache / rebuilt[0]),
                    )
                return compiled
        return self._compile_without_cache(core, model, bucket)

    def _compile_without_cache(self, core: Any, model: Any, bucket: int) -> Any:
        try:
            return core.compile_model(model, "CPU", self._config())
        except Exception as e:
            raise DynPoseError(
                f"OpenVINO IR {self.xml}: the CPU plugin cannot compile it at batch {bucket} ({error_line(e)})"
            ) from None

    def _usable_cache(self) -> Path | None:
        if self.cache_dir is None:
            return None
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning(
                "%s: cannot create the compiled-model cache %s (%s); every start compiles",
                self.name,
                self.cache_dir,
                e.strerror,
            )
            self.cache_dir = None
            return None
        if not os.access(self.cache_dir, os.W_OK):
            log.warning("%s: the compiled-model cache %s is not writable; every start compiles", self.name, self.cache_dir)
            self.cache_dir = None
            return None
        return self.cache_dir

    def _deactivate(self) -> None:
        with self._lock:
            self._requests = {}

    def _input_metadata(self) -> TensorMeta:
        assert self._input is not None
        return self._input

    def compiled_property(self, key: str) -> Any:
        """A property of the compiled models as OpenVINO set it (e.g. INFERENCE_NUM_THREADS, NUM_STREAMS,
        INFERENCE_PRECISION_HINT): what a run really uses, for checks and reports."""
        self._require_active()
        request = self._requests[self.buckets[-1]]
        return request.get_compiled_model().get_property(key)

    # -- one call --------------------------------------------------------------------------------------------------
    def _infer(self, batch: np.ndarray) -> list[np.ndarray]:
        assert self._input is not None
        chw = self._input.shape[1:]
        if tuple(batch.shape[1:]) != chw:
            raise DynPoseError(f"{self.name}: expected N x {' x '.join(map(str, chw))}, got {batch.shape}")
        parts: list[list[np.ndarray]] = []
        start = 0
        with self._lock:
            for n, bucket in split_batch(batch.shape[0], self.buckets):
                x = batch[start : start + n]
                if n < bucket:
                    x = np.concatenate([x, np.zeros((bucket - n, *x.shape[1:]), np.float32)])
                request = self._requests[bucket]
                try:
                    request.infer({0: np.ascontiguousarray(x)})
                except RuntimeError as e:  # OpenVINO's own failures: one line for the caller, not a C++ trace
                    raise DynPoseError(f"{self.name}: OpenVINO inference failed ({error_line(e)})") from None
                parts.append([np.array(request.get_output_tensor(i).data[:n], np.float32) for i in range(_n_out(request))])
                start += n
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def _n_out(request: Any) -> int:
    return len(request.model_outputs)


def _blobs(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.blob")}


def _loaded_from_cache(compiled: Any) -> bool:
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except Exception:  # an OpenVINO without the property: unknown, say no
        return False


def load_openvino(
    engine_dir: str | os.PathLike, entry: Entry, device: str = "cpu", intra_op_threads: int = 0
) -> OpenVinoRunner:
    """Loader: a manifest entry (format openvino) -> an inactive runner, after checking that the IR was exported for
    this OpenVINO release and this CPU's instruction set."""
    if entry.format != "openvino":
        raise DynPoseError(f"{entry.role}: the openvino backend runs OpenVINO IRs, this entry is {entry.format}")
    if device != "cpu":
        raise DynPoseError(
            f"--backend openvino runs on the CPU, not {device!r}; use --device cpu (GPUs: --backend tensorrt)"
        )
    info = cpu_info()
    where = f"engine dir {engine_dir}: {entry.role} IR {entry.file}"
    check_ir_metadata(entry.openvino, info, where)
    weights = [f for f in entry.data_files if f.endswith(".bin")]
    if len(weights) != 1:
        raise DynPoseError(
            f"{where}: the manifest must list the IR's one .bin weights file, it lists {sorted(entry.data_files)}"
        )
    meta = entry.openvino or {}
    options = CompileOptions(
        inference_precision=str(meta.get("inference_precision", INFERENCE_PRECISION[entry.precision])),
        intra_op_threads=intra_op_threads,
        cache_dir=Path(engine_dir) / CACHE_DIRNAME / f"{info.release}-{info.isa}",
    )
    return OpenVinoRunner(
        Path(engine_dir) / entry.file,
        options,
        weights=Path(engine_dir) / weights[0],
        max_batch=entry.max_batch,
        name=f"{entry.role}:{entry.model}",
    )
