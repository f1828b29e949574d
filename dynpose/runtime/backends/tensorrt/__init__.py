"""TensorRT backend: serialized plans run with one context and one CUDA stream per runner (needs tensorrt + GPU)."""

from dynpose.runtime.backends.tensorrt.runner import TrtRunner, check_plan_metadata, load_trt

__all__ = ["TrtRunner", "check_plan_metadata", "load_trt"]
