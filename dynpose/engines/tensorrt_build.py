"""Build a TensorRT plan from an ONNX file (TensorRT 10.x and 11.x Python API).

Precision lives in the ONNX, not in builder flags: an fp16 graph or explicit Q/DQ nodes. TensorRT 11 removed the
FP16/INT8 builder flags and always builds strongly typed networks; TensorRT >= 10.12 supports the same mode, so we
ask for it there. Older 10.x builds weakly typed networks, which only run an fp16 graph in fp16 (and a Q/DQ graph
in int8) when the matching builder flag is set, so for those versions the flags are derived from the ONNX itself.

One optimization profile covers batch 1..max_batch; the timing cache file is shared by all builds on one machine
(layer timings are reused, so the second model of the same family builds much faster).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from dynpose.errors import DynPoseError
from dynpose.fileio import write_bytes_atomic

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT is not installed: pip install --extra-index-url https://pypi.nvidia.com tensorrt "
    "(needs an NVIDIA GPU); or export --format onnx"
)
# Weak typing was deprecated in 10.12; from there on strongly typed networks are the supported path.
STRONG_TYPING_FROM = (10, 12)


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
        from dynpose.runtime.backends.tensorrt.cuda_utils import device_info

        name, cc = device_info(0)
    except DynPoseError as e:
        return False, f"tensorrt {trt.__version__} installed but no usable GPU: {e}"
    return True, f"tensorrt {trt.__version__} on {name} (sm_{cc.replace('.', '')})"


def version_tuple(version: str) -> tuple[int, int]:
    """'10.12.0.36' -> (10, 12)."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]]
    while len(parts) < 2:
        parts.append(0)
    return parts[0], parts[1]


def uses_strong_typing(version: str) -> bool:
    return version_tuple(version) >= STRONG_TYPING_FROM


def onnx_precisions(onnx_path: str | os.PathLike) -> set[str]:
    """Low precisions the graph asks for: 'fp16' (fp16 weights/tensors/casts), 'int8' (Q/DQ nodes).

    Only weakly typed builds (TensorRT < 10.12) need this: there each needs its builder flag.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    fp16 = onnx.TensorProto.FLOAT16
    found: set[str] = set()
    if any(t.data_type == fp16 for t in g.initializer):
        found.add("fp16")
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == fp16:
            found.add("fp16")
    for node in g.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            found.add("int8")
        elif node.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in node.attribute):
            found.add("fp16")
    return found


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


def _make_progress_monitor(trt: Any) -> Any | None:
    """A TensorRT IProgressMonitor that drives one tqdm bar per top-level build phase (None if unsupported)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None
    from tqdm import tqdm

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            # TensorRT calls back from its own threads.
            self._lock = threading.Lock()
            self._bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                if parent_phase is None:
                    self._bars[phase_name] = tqdm(total=num_steps, desc=f"TensorRT: {phase_name}", leave=False)

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

    return _Monitor()


def build_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    *,
    input_name: str,
    input_chw: tuple[int, int, int],
    max_batch: int,
    opt_batch: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    opt_level: int = 3,
    workspace_gb: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build `plan_path` from `onnx_path`; returns the metadata the manifest keeps in `entry.tensorrt`.

    The plan runs only with the same TensorRT version on a GPU of the same compute capability, which is why
    both are recorded: the runtime checks them before deserialising.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
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

    trt = import_tensorrt()
    from dynpose.runtime.backends.tensorrt.cuda_utils import device_info

    gpu_name, cc = device_info(0)
    version = trt.__version__
    strongly_typed = uses_strong_typing(version)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        # Ignored (always on) in 11.x, required to opt in on 10.12+.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so ONNX files with external weights beside them load too.
    if not parser.parse_from_file(str(onnx_path)):
        lines = [_parser_error_line(parser.get_error(i)) for i in range(parser.num_errors)]
        for line in lines:
            log.error("TensorRT ONNX parser: %s", line)
        first = lines[0] if lines else "no detail given"
        more = f" (+{len(lines) - 1} more, logged above)" if len(lines) > 1 else ""
        raise DynPoseError(
            f"ONNX model {onnx_path}: TensorRT {version} cannot parse it: {first}{more}; "
            "check the opset/ops or use --format onnx"
        )

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = [t.name for t in inputs]
    if input_name not in names:
        raise DynPoseError(f"ONNX model {onnx_path}: no input named {input_name!r}; its inputs are {names}")
    rank = len(inputs[names.index(input_name)].shape)
    if rank != 4:
        raise DynPoseError(f"ONNX model {onnx_path}: input {input_name!r} has rank {rank}, expected N x C x H x W")

    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    precision_flags: list[str] = []
    if not strongly_typed:
        wanted = onnx_precisions(onnx_path)
        if "fp16" in wanted:
            config.set_flag(trt.BuilderFlag.FP16)
            precision_flags.append("fp16")
        if "int8" in wanted:
            config.set_flag(trt.BuilderFlag.INT8)
            precision_flags.append("int8")

    chw = tuple(int(d) for d in input_chw)
    shapes = {"min": (1, *chw), "opt": (opt, *chw), "max": (max_batch, *chw)}
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache = None
    if cache_path is not None:
        data = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(data)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache %s does not match this TensorRT/GPU; starting a fresh one", cache_path)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=True)

    monitor = _make_progress_monitor(trt) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise DynPoseError(
            f"ONNX model {onnx_path}: TensorRT {version} could not build an engine (see its messages above); "
            "try a larger --workspace-gb, a smaller --max-batch, or --format onnx"
        )
    write_bytes_atomic(plan_path, memoryview(plan))

    if cache_path is not None:
        _save_timing_cache(config, cache_path)

    return {
        "tensorrt_version": version,
        "gpu_name": gpu_name,
        "compute_capability": cc,
        "profile": {"input": input_name, **{k: list(v) for k, v in shapes.items()}},
        "strongly_typed": strongly_typed,
        "precision_flags": precision_flags,
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
    write_bytes_atomic(cache_path, memoryview(cache.serialize()))
