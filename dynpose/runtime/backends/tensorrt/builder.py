"""Build a TensorRT plan from an ONNX file (TensorRT 10.x and 11.x Python API).

Precision lives in the ONNX, not in builder flags: an fp16 graph or explicit Q/DQ nodes. The network is always
created STRONGLY_TYPED (the flag exists since 10.0; 11.x ignores it and is always strongly typed): every tensor keeps
the type the ONNX gives it, so the plan runs exactly the precision mix that `dynpose-export` verified. A weakly typed
10.x build with the FP16 flag may run in fp16 the layers our converter kept in fp32 on purpose.

One optimization profile covers batch 1..max_batch; the timing cache file is shared by all builds on one machine
(layer timings are reused, so the second model of the same family builds much faster).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from dynpose.errors import DynPoseError
from dynpose.fileio import write_bytes_atomic
from dynpose.runtime.backends.tensorrt.cuda_utils import device_info

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed: pip install --extra-index-url https://pypi.nvidia.com 'dynpose[gpu-cu12]' "
    "(or gpu-cu13 on a CUDA 13 / R580+ driver; see docs/tensorrt.md; needs an NVIDIA GPU); or export --format onnx"
)


def import_tensorrt() -> Any:
    """The `tensorrt` module, or the one-line install hint as a DynPoseError."""
    try:
        import tensorrt as trt
    except ImportError:
        raise DynPoseError(INSTALL_HINT) from None
    except OSError as e:  # the wheel is there but libnvinfer cannot load (no driver / wrong CUDA)
        raise DynPoseError(f"TensorRT is installed but cannot load ({str(e).splitlines()[0]}); {INSTALL_HINT}") from None
    return trt


def tensorrt_available() -> tuple[bool, str]:
    """(True, 'tensorrt X on GPU (sm_YZ)') when a plan can be built and run here; else (False, why)."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "tensorrt not installed (NVIDIA index only)"
    except OSError as e:
        return False, f"tensorrt cannot load: {str(e).splitlines()[0]}"
    try:
        name, cc = device_info(0)
    except DynPoseError as e:
        return False, f"tensorrt {trt.__version__} installed but no usable GPU: {e}"
    return True, f"tensorrt {trt.__version__} on {name} (sm_{cc.replace('.', '')})"


def _parser_error_line(err: Any) -> str:
    """One line per ONNX parser error: node index, op and name where TensorRT gives them."""
    desc = err.desc() if hasattr(err, "desc") else str(err)
    where = []
    node = err.node() if hasattr(err, "node") else -1
    if node is not None and node >= 0:
        where.append(f"node {node}")
    for attr in ("node_operator", "node_name"):
        v = getattr(err, attr, None)
        v = v() if callable(v) else v
        if v:
            where.append(str(v))
    return (" ".join(where) + ": " if where else "") + " ".join(str(desc).split())


class PhaseBars:
    """One tqdm bar per top-level TensorRT build phase; the logic behind the IProgressMonitor (TensorRT calls it
    from its own builder threads, hence the lock). Nested phases only advance their parent's bar implicitly."""

    def __init__(self, file: Any = None) -> None:
        self._lock = threading.Lock()
        self._bars: dict[str, Any] = {}
        self._file = file

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        from tqdm import tqdm

        with self._lock:
            if parent_phase is None:
                self._bars[phase_name] = tqdm(total=num_steps, desc=f"TensorRT: {phase_name}", leave=False, file=self._file)

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(1)
        return True  # False would cancel the build

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    @property
    def open_phases(self) -> list[str]:
        with self._lock:
            return sorted(self._bars)


def _make_progress_monitor(trt: Any) -> Any | None:
    """A TensorRT IProgressMonitor forwarding to `PhaseBars` (None if this TensorRT has no IProgressMonitor)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.bars = PhaseBars()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.bars.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return self.bars.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            self.bars.phase_finish(phase_name)

    return _Monitor()


def _check_build_args(
    onnx_path: Path, input_chw: tuple[int, int, int], max_batch: int, opt_batch: int | None, opt_level: int
) -> int:
    """Validate before TensorRT is imported (so a bad call fails the same way on every machine); returns opt."""
    if not onnx_path.is_file():
        raise DynPoseError(f"ONNX model {onnx_path}: file not found; export it first with dynpose-export --format onnx")
    if len(input_chw) != 3 or any(int(d) <= 0 for d in input_chw):
        raise DynPoseError(f"build_engine: input_chw must be three positive sizes (C, H, W), got {input_chw}")
    if max_batch < 1:
        raise DynPoseError(f"build_engine: max_batch must be >= 1, got {max_batch}")
    opt = opt_batch if opt_batch is not None else max(1, max_batch // 2)
    if not 1 <= opt <= max_batch:
        raise DynPoseError(f"build_engine: opt_batch must be in 1..{max_batch}, got {opt_batch}")
    if not 0 <= opt_level <= 5:
        raise DynPoseError(f"build_engine: opt_level must be 0..5 (TensorRT builder optimization level), got {opt_level}")
    return opt


def _parse_network(trt: Any, builder: Any, logger: Any, onnx_path: Path, input_name: str) -> tuple[Any, Any]:
    """(network, parser): a strongly typed network parsed from the file, its input checked; parser errors become one
    line. The parser is returned so the caller keeps it alive while building (the network refers to its weights)."""
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so ONNX files with external weights beside them load too.
    if not parser.parse_from_file(str(onnx_path)):
        lines = [_parser_error_line(parser.get_error(i)) for i in range(parser.num_errors)]
        for line in lines:
            log.error("TensorRT ONNX parser: %s", line)
        first = lines[0] if lines else "no detail given"
        more = f" (+{len(lines) - 1} more, logged above)" if len(lines) > 1 else ""
        raise DynPoseError(
            f"ONNX model {onnx_path}: TensorRT {trt.__version__} cannot parse it: {first}{more}; "
            "check the opset/ops or use --format onnx"
        )
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = [t.name for t in inputs]
    if input_name not in names:
        raise DynPoseError(f"ONNX model {onnx_path}: no input named {input_name!r}; its inputs are {names}")
    rank = len(inputs[names.index(input_name)].shape)
    if rank != 4:
        raise DynPoseError(f"ONNX model {onnx_path}: input {input_name!r} has rank {rank}, expected N x C x H x W")
    return network, parser


def _attach_timing_cache(config: Any, cache_path: Path | None) -> None:
    if cache_path is None:
        return
    data = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting a fresh one", cache_path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)


@dataclass(frozen=True)
class BuildOptions:
    """A plan's input profile (the input's name and C x H x W, batches 1..max_batch with `opt_batch` the one tuned
    for) and how the builder works (timing cache file, optimisation level, workspace, a progress display)."""

    input_name: str
    input_chw: tuple[int, int, int]
    max_batch: int
    opt_batch: int | None = None
    timing_cache: str | os.PathLike | None = None
    opt_level: int = 3
    workspace_gb: float | None = None
    progress: bool = True


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Build `plan_path` from `onnx_path` (`options`: `BuildOptions` fields); returns the metadata the manifest
    keeps in `entry.tensorrt`.

    The plan runs only with the same TensorRT version on a GPU of the same compute capability, which is why
    both are recorded: the runtime checks them before deserialising.
    """
    try:
        o = BuildOptions(**options)
    except TypeError as e:  # a misspelled or missing option
        raise DynPoseError(f"build_engine: {e}; the options are BuildOptions' fields") from None
    input_name, input_chw, max_batch, opt_batch = o.input_name, o.input_chw, o.max_batch, o.opt_batch
    timing_cache, opt_level, workspace_gb, progress = o.timing_cache, o.opt_level, o.workspace_gb, o.progress
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    opt = _check_build_args(onnx_path, input_chw, max_batch, opt_batch, opt_level)
    trt = import_tensorrt()
    gpu_name, cc = device_info(0)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse_network(trt, builder, logger, onnx_path, input_name)

    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    chw = tuple(int(d) for d in input_chw)
    shapes = {"min": (1, *chw), "opt": (opt, *chw), "max": (max_batch, *chw)}
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
    if config.add_optimization_profile(profile) < 0:
        raise DynPoseError(f"ONNX model {onnx_path}: TensorRT refused the optimization profile {shapes}")
    cache_path = Path(timing_cache) if timing_cache is not None else None
    _attach_timing_cache(config, cache_path)
    monitor = _make_progress_monitor(trt) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise DynPoseError(
            f"ONNX model {onnx_path}: TensorRT {trt.__version__} could not build an engine (see its messages above); "
            "try a larger --workspace-gb, a smaller --max-batch, or --format onnx"
        )
    write_bytes_atomic(plan_path, cast(bytes, memoryview(plan)))  # any buffer writes; no copy
    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu_name,
        "compute_capability": cc,
        "profile": {"input": input_name, **{k: list(v) for k, v in shapes.items()}},
        "strongly_typed": True,
        "opt_level": opt_level,
        "workspace_gb": workspace_gb,
        "build_s": round(build_s, 2),
    }


def _save_timing_cache(config: Any, cache_path: Path) -> None:
    """Write the builder's timing cache atomically, merged with whatever another build saved meanwhile."""
    cache = config.get_timing_cache()
    if cache is None:
        return
    if cache_path.is_file():
        # Two exports may share one cache file; combine so neither build's timings are lost.
        other = config.create_timing_cache(cache_path.read_bytes())
        if other is not None:
            cache.combine(other, False)  # False: never merge timings from another GPU
    write_bytes_atomic(cache_path, cast(bytes, memoryview(cache.serialize())))
