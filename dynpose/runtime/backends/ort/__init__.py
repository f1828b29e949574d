"""ONNX Runtime backend: the default, CPU; CUDA / TensorRT execution providers when the installed ORT has them."""

from dynpose.runtime.backends.ort.runner import OrtRunner, load_ort, ort_provider_options

__all__ = ["OrtRunner", "load_ort", "ort_provider_options"]
