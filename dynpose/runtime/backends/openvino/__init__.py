"""OpenVINO backend (CPU): the IR builder (ONNX -> `.xml` + `.bin`, layers kept in f32 marked in the IR), the runner
(static batch buckets, a compiled-model cache in the engine dir) and the machine checks (OpenVINO's version, the CPU's
instruction set, bf16/fp16 support). Needs `pip install 'dynpose[openvino]'`; importing this package does not import
openvino."""

from dynpose.runtime.backends.openvino.builder import convert_onnx, kept_f32, read_ir, save_ir, weighted_layers
from dynpose.runtime.backends.openvino.device import (
    INFERENCE_PRECISION,
    CpuInfo,
    check_ir_metadata,
    cpu_info,
    import_openvino,
    openvino_available,
    require_precision,
)
from dynpose.runtime.backends.openvino.runner import (
    CACHE_DIRNAME,
    CompileOptions,
    OpenVinoRunner,
    load_openvino,
    split_batch,
)

__all__ = [
    "CACHE_DIRNAME",
    "CompileOptions",
    "INFERENCE_PRECISION",
    "CpuInfo",
    "OpenVinoRunner",
    "check_ir_metadata",
    "convert_onnx",
    "cpu_info",
    "import_openvino",
    "kept_f32",
    "load_openvino",
    "openvino_available",
    "read_ir",
    "require_precision",
    "save_ir",
    "split_batch",
    "weighted_layers",
]
