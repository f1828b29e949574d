"""Export: zoo model or user ONNX -> verified ONNX / fp16 / INT8 Q/DQ / TensorRT files + manifest entries.

`api` (the entry points) composes `steps` (to_onnx / adopt_onnx -> to_fp16 | to_int8 -> to_plan, each returning its
file and a `dynpose.export.judges.Check`) inside `commit.staging`, and `commit.commit` moves the files into the
engine dir; `options.ExportOptions` says how (one frozen object from the CLI down); `verify` holds the fp32
checks, `route` the engine dir's default route.
"""

from dynpose.export.api import export_all, export_model, register_detector, register_onnx
from dynpose.export.options import ExportOptions

__all__ = ["ExportOptions", "export_all", "export_model", "register_detector", "register_onnx"]
