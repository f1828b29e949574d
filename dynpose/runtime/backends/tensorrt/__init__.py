"""TensorRT backend: the builder (ONNX -> plan) and the runner (one context and one CUDA stream per runner), side by
side. Needs tensorrt + an NVIDIA GPU; importing this package does not import tensorrt."""

from dynpose.runtime.backends.tensorrt.builder import build_engine, import_tensorrt, tensorrt_available
from dynpose.runtime.backends.tensorrt.runner import TrtRunner, check_plan_metadata, load_trt

__all__ = ["TrtRunner", "build_engine", "check_plan_metadata", "import_tensorrt", "load_trt", "tensorrt_available"]
