"""Export: zoo model or user ONNX -> verified ONNX / fp16 / INT8 Q/DQ / TensorRT files + manifest entries."""

from dynpose.export.api import export_all, export_model, register_detector, register_onnx

__all__ = ["export_all", "export_model", "register_detector", "register_onnx"]
