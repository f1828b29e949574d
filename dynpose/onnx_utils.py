"""ONNX and ONNX Runtime helpers every layer shares: the one session opener, running a session, and the ONNX file
utilities (reading, checking, IO names, the model card in `metadata_props`).

This is a low-level module on purpose: the runtime's ONNX Runtime runner and detector, the exporters and the INT8
calibration all import it, and it imports nothing of theirs, so none of them has to import another.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.fileio import parse_json

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

    from dynpose.models.card import ModelCard

CARD_KEY = "dynpose.card"
DEVICES = ("cpu", "cuda", "trt")
_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# cuDNN's EXHAUSTIVE search (ORT's default) benchmarks every convolution again for each new input shape, and the
# number of person crops changes every frame, so each new batch size would stall for the search.
CONV_ALGO_SEARCH = ("HEURISTIC", "DEFAULT", "EXHAUSTIVE")
DEFAULT_PROVIDER_OPTIONS: dict[str, dict[str, Any]] = {"CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"}}
# ORT's TensorRT EP engine + timing caches, inside the engine dir (the manifest does not list or hash them).
ORT_TRT_CACHE_DIR = "ort_trt_cache"


def cuda_ep_options(conv_algo_search: str = "HEURISTIC", device_id: int = 0) -> dict[str, Any]:
    """CUDAExecutionProvider options: cuDNN's heuristic algorithm choice (no per-shape search) on one device."""
    if conv_algo_search not in CONV_ALGO_SEARCH:
        raise DynPoseError(f"cudnn_conv_algo_search {conv_algo_search!r}: use one of {', '.join(CONV_ALGO_SEARCH)}")
    return {"device_id": int(device_id), "cudnn_conv_algo_search": conv_algo_search}


def tensorrt_ep_options(
    input_name: str,
    input_chw: tuple[int, int, int],
    max_batch: int,
    cache_dir: str | os.PathLike,
    precision: str = "fp32",
    device_id: int = 0,
) -> dict[str, Any]:
    """TensorrtExecutionProvider options: one profile over the batch axis (1, max_batch // 2, max_batch), so ORT
    builds one engine instead of one per batch size it meets; engine and timing caches in `cache_dir`, so the next
    session loads the engine instead of building it; fp16 / int8 kernels only for graphs exported in that precision
    (an int8 graph carries its own Q/DQ scales, so no calibration table is involved)."""
    if not input_name or any(c in input_name for c in ":,"):
        raise DynPoseError(
            f"input name {input_name!r}: ORT's TensorRT profile options cannot name it (empty, or has ':' or ','); "
            "rename the model's input"
        )
    if len(input_chw) != 3 or any(int(d) <= 0 for d in input_chw):
        raise DynPoseError(f"TensorRT EP options: input_chw must be three positive sizes, got {input_chw}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise DynPoseError(f"TensorRT EP options: max_batch must be an integer >= 1, got {max_batch!r}")
    if precision not in ("fp32", "fp16", "int8"):
        raise DynPoseError(f"TensorRT EP options: precision {precision!r}: use fp32, fp16 or int8")
    chw = "x".join(str(int(d)) for d in input_chw)

    def shape(n: int) -> str:
        return f"{input_name}:{n}x{chw}"

    cache = str(cache_dir)
    return {
        "device_id": int(device_id),
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(max(1, max_batch // 2)),
        "trt_profile_max_shapes": shape(max_batch),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
        "trt_fp16_enable": precision == "fp16",
        "trt_int8_enable": precision == "int8",
    }


def provider_chain(device: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> list[Any]:
    """The execution-provider list for `device` (cpu | cuda | trt), each accelerator backed by the ones below it,
    with `options` (provider name -> options) over `DEFAULT_PROVIDER_OPTIONS`. Pure: availability is not checked."""
    if device not in DEVICES:
        raise DynPoseError(f"unknown device {device!r} for ONNX Runtime; use {', '.join(DEVICES)}")
    chain = {"cpu": ["cpu"], "cuda": ["cuda", "cpu"], "trt": ["trt", "cuda", "cpu"]}[device]
    given = options or {}
    out: list[Any] = []
    for d in chain:
        name = _PROVIDER[d]
        opts = {**DEFAULT_PROVIDER_OPTIONS.get(name, {}), **dict(given.get(name, {}))}
        out.append((name, opts) if opts else name)
    return out


def ort_install_problem(dists: Collection[str]) -> str | None:
    """Why this set of installed ONNX Runtime distributions hides the GPU providers (None when it does not).
    onnxruntime and onnxruntime-gpu install the same `onnxruntime` module; whichever was installed last wins, and
    with the CPU wheel on top the CUDA and TensorRT providers are gone."""
    names = {d.lower().replace("_", "-") for d in dists}
    if "onnxruntime" in names and "onnxruntime-gpu" in names:
        return (
            "both onnxruntime and onnxruntime-gpu are installed (one module, the CPU wheel can hide the GPU "
            "providers): pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
        )
    return None


def installed_ort_dists() -> list[str]:
    """Installed distributions that provide the `onnxruntime` module."""
    import importlib.metadata as md

    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            md.version(dist)
        except md.PackageNotFoundError:
            continue
        found.append(dist)
    return found


ORT_MISSING = (
    "ONNX Runtime is not installed: pip install 'dynpose[cpu]' (CPU), or 'dynpose[gpu-cu12]' / 'dynpose[gpu-cu13]' "
    "on an NVIDIA machine (docs/gpu.md says which)"
)


def import_ort() -> Any:
    """The `onnxruntime` module (CPU or GPU wheel: an extra brings one of them), or the install hint as one line."""
    try:
        import onnxruntime
    except ImportError:
        raise DynPoseError(ORT_MISSING) from None
    return onnxruntime


def providers_for(device: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> list[Any]:
    """`provider_chain`, after checking this ONNX Runtime has the provider `device` needs (a one-line error
    otherwise, naming a CPU/GPU wheel clash when that is the cause)."""
    ort = import_ort()

    chain = provider_chain(device, options)
    wanted = _PROVIDER[device]
    if wanted not in ort.get_available_providers():
        hint = "use --device cpu" if device == "cuda" else "use --device cuda or cpu"
        clash = ort_install_problem(installed_ort_dists())
        fix = clash if clash else "install onnxruntime-gpu in place of onnxruntime (see docs/gpu.md)"
        raise DynPoseError(
            f"ONNX Runtime has no {wanted} here (installed: {', '.join(ort.get_available_providers())}); {fix}, or {hint}"
        )
    return chain


def open_session(
    path: str | os.PathLike,
    device: str = "cpu",
    threads: int = 0,
    what: str = "ONNX model",
    provider_options: Mapping[str, Mapping[str, Any]] | None = None,
    optimized_model_path: str | os.PathLike | None = None,
    level: str = "all",
) -> ort.InferenceSession:
    """An `onnxruntime.InferenceSession` for `device`; a file ONNX Runtime rejects is a one-line DynPoseError naming
    `what`. threads: intra-op threads (0 lets ORT pick; the runtime gives each concurrently running model a share
    of the cores). level: graph optimisations, "all" or "basic" (what the INT8 quantizer wants to see)."""
    ort = import_ort()

    p = Path(path)
    if not p.is_file():
        raise DynPoseError(f"{what} {p}: file not found")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if level == "basic" else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    providers = providers_for(device, provider_options)
    try:
        sess = ort.InferenceSession(str(p), sess_options=so, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise DynPoseError(f"{what} {p}: ONNX Runtime cannot load it ({_first_line(e)})") from None
    wanted = _PROVIDER[device]
    got = sess.get_providers()[0] if sess.get_providers() else "none"
    if got != wanted:  # ORT falls back to the next provider silently (e.g. a CUDA library missing)
        raise DynPoseError(
            f"{what} {p}: ONNX Runtime fell back to {got} instead of {wanted} (a CUDA/TensorRT library may be "
            "missing; see its log above); fix the install or use --device cpu"
        )
    return sess


def run_session(sess: ort.InferenceSession, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """First output of `sess` on `x`, fed `batch` items at a time (memory stays one batch deep)."""
    return run_session_all(sess, x, batch, first_only=True)[0]


def run_session_all(sess: ort.InferenceSession, x: np.ndarray, batch: int = 8, first_only: bool = False) -> list[np.ndarray]:
    """Every output of `sess` (graph order, fp32) on `x`, fed `batch` items at a time (memory stays one batch deep);
    `first_only`: just the first (the others are not computed where the graph allows)."""
    name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()][: 1 if first_only else None]
    parts = [
        sess.run(out_names, {name: np.ascontiguousarray(x[i : i + batch], np.float32)}) for i in range(0, len(x), batch)
    ]
    return [np.concatenate([p[k] for p in parts]).astype(np.float32) for k in range(len(out_names))]


def rel_l2(test: np.ndarray, ref: np.ndarray) -> float:
    """||test - ref|| / ||ref|| (the absolute norm when ref is zero)."""
    r = np.asarray(ref, np.float64)
    num = float(np.linalg.norm(np.asarray(test, np.float64) - r))
    den = float(np.linalg.norm(r))
    return num / den if den > 0 else num


# -- ONNX files --------------------------------------------------------------------------------------------------------
def load_onnx(path: str | os.PathLike, what: str = "ONNX model", external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file, turning every protobuf/IO failure into one line."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise DynPoseError(f"{what} {p}: file not found")
    try:
        return onnx.load(str(p), load_external_data=external_data)
    except Exception as e:  # protobuf DecodeError and friends
        raise DynPoseError(
            f"{what} {p}: not a readable ONNX file ({_first_line(e)}); re-export it or pass the right file"
        ) from None


def check_onnx(model: onnx.ModelProto, where: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise DynPoseError(f"{where}: onnx.checker rejects the graph ({_first_line(e)})") from None


def io_names(model: onnx.ModelProto, where: str = "ONNX model") -> tuple[str, list[str]]:
    """(input name, output names) of a single-input model; initializers listed as inputs are skipped."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    outputs = [o.name for o in model.graph.output]
    if len(inputs) != 1:
        raise DynPoseError(f"{where}: expected exactly one input, found {inputs}; dynpose runs single-input models")
    if not outputs:
        raise DynPoseError(f"{where}: the graph has no outputs")
    return inputs[0], outputs


def input_shape(model: onnx.ModelProto) -> list[int | str]:
    name, _ = io_names(model)
    (vi,) = [i for i in model.graph.input if i.name == name]
    return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]


def opset_of(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def set_card(model: onnx.ModelProto, card: ModelCard) -> onnx.ModelProto:
    """Store the card as JSON under `dynpose.card`, replacing an older one."""
    keep = [p for p in model.metadata_props if p.key != CARD_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=CARD_KEY, value=card.to_json())
    return model


def read_card(path: str | os.PathLike) -> ModelCard | None:
    """The card stored in an ONNX file by dynpose, or None."""
    from dynpose.models.card import ModelCard

    m = load_onnx(path, external_data=False)
    for p in m.metadata_props:
        if p.key == CARD_KEY:
            where = f"{path} metadata card"
            return ModelCard.from_dict(parse_json(p.value, where), where=where)
    return None


def copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto) -> onnx.ModelProto:
    """Replace `dst`'s metadata_props with `src`'s (converters and quantizers drop them; our card lives there)."""
    props = [(p.key, p.value) for p in src.metadata_props]
    del dst.metadata_props[:]
    for k, v in props:
        dst.metadata_props.add(key=k, value=v)
    return dst


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node the name `<op>_<index>`: fp16 block lists and INT8 exclusions refer to nodes by name,
    so every tool that reads the graph must see the same names."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return model
