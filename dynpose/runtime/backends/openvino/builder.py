"""ONNX -> OpenVINO IR (`.xml` graph + `.bin` weights), with chosen layers marked to stay in f32.

The IR keeps f32 weights (compressing them to f16 saves disk, not time, on a CPU) and the ONNX graph's names. A float
precision lower than f32 is a run-time hint (`INFERENCE_PRECISION_HINT`), applied by OpenVINO's CPU plugin to every
layer except those whose runtime info disables precision conversion: `keep_f32` writes that mark into the IR
(Python's key `precise_0`, serialised as `DisablePrecisionConversion`), so the precision mix the export judged and
timed is the one every later run gets, as a TensorRT plan's strong typing does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dynpose.errors import DynPoseError
from dynpose.runtime.backends.openvino.device import import_openvino

# The layers whose arithmetic a float precision changes and whose time counts: the per-layer f32 fallbacks are
# chosen among them (in graph order).
WEIGHTED_OPS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul")
# Runtime-info key of OpenVINO's DisableFP16Compression attribute as Python sets it (`precise`, version 0).
KEEP_F32_KEY = "precise_0"
_REEXPORT = "re-export it with dynpose-export --format openvino"


def error_line(e: BaseException) -> str:
    """The message of an OpenVINO exception without its C++ trace lines."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return lines[-1] if lines else type(e).__name__


def convert_onnx(src: str | os.PathLike) -> Any:
    """An ONNX file -> an `ov.Model` (dynamic batch kept), checked for one N x C x H x W input."""
    ov = import_openvino()
    src = Path(src)
    if not src.is_file():
        raise DynPoseError(f"ONNX model {src}: file not found; export it first with dynpose-export --format onnx")
    try:
        model = ov.convert_model(str(src))
    except Exception as e:  # OpenVINO's frontend errors are RuntimeErrors with a C++ trace
        raise DynPoseError(
            f"ONNX model {src}: OpenVINO {ov.__version__} cannot convert it ({error_line(e)}); use --format onnx"
        ) from None
    if len(model.inputs) != 1 or model.inputs[0].get_partial_shape().rank.get_length() != 4:
        shapes = [str(i.get_partial_shape()) for i in model.inputs]
        raise DynPoseError(f"ONNX model {src}: expected one N x C x H x W input, OpenVINO reads inputs {shapes}")
    return model


def read_ir(xml: str | os.PathLike, weights: str | os.PathLike | None = None) -> Any:
    """An IR from disk (`weights`: its `.bin`, default beside the `.xml` with the same stem); a missing, truncated
    or unreadable file is one line."""
    ov = import_openvino()
    xml = Path(xml)
    bin_path = Path(weights) if weights is not None else xml.with_suffix(".bin")
    for f in (xml, bin_path):
        if not f.is_file():
            raise DynPoseError(f"OpenVINO IR {xml}: {f.name} is missing; {_REEXPORT}")
    try:
        return ov.Core().read_model(str(xml), str(bin_path))
    except Exception as e:
        raise DynPoseError(
            f"OpenVINO IR {xml} (weights {bin_path.name}): OpenVINO {ov.__version__} cannot read it "
            f"({error_line(e)}); the files are damaged or from another version, {_REEXPORT}"
        ) from None


def weighted_layers(model: Any) -> list[str]:
    """Names of the model's `WEIGHTED_OPS` layers, in graph (topological) order."""
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in WEIGHTED_OPS]


# Element-wise ops the CPU plugin fuses into the convolution before them (bias, residual sum, activation): a layer
# kept in f32 takes them along. Marking a convolution but not its fused bias and residual adds made OpenVINO 2026.4
# fail to compile TinyPose in bf16 ("object is not initialized"): the fused sum then mixes f32 and bf16.
FUSED_TAIL_OPS = ("Add", "Multiply", "Subtract", "Relu", "Clamp", "PRelu", "Sigmoid", "Swish", "HSwish", "HSigmoid")


def with_fused_tails(model: Any, names: Iterable[str]) -> list[str]:
    """`names` plus, for each, the chain of element-wise ops after it that the CPU plugin fuses into it (while
    each has a single consumer; the last one may have several), in graph order: the unit a layer stays f32 as."""
    wanted = set(names)
    out = set(wanted)
    for op in model.get_ordered_ops():
        if op.get_friendly_name() not in wanted:
            continue
        node = op
        while True:
            consumers = list(node.output(0).get_target_inputs()) if node.get_output_size() == 1 else []
            if len(consumers) != 1 or consumers[0].get_node().get_type_name() not in FUSED_TAIL_OPS:
                break
            node = consumers[0].get_node()
            out.add(node.get_friendly_name())
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_friendly_name() in out]


def kept_f32(model: Any) -> list[str]:
    """Names of the layers an IR keeps in f32 under a lower float precision (in graph order)."""
    out = []
    for op in model.get_ordered_ops():
        rt = op.get_rt_info()
        if any(k in rt for k in (KEEP_F32_KEY, "DisablePrecisionConversion_0", "precise")):
            out.append(op.get_friendly_name())
    return out


def save_ir(model: Any, xml: str | os.PathLike, keep_f32: Iterable[str] = ()) -> Path:
    """Write `model` as `xml` + the `.bin` beside it (f32 weights), the layers named in `keep_f32` marked to stay in
    f32 whatever the inference precision. Returns the `.xml` path."""
    ov = import_openvino()
    xml = Path(xml)
    keep = set(keep_f32)
    found = set()
    for op in model.get_ordered_ops():
        rt = op.get_rt_info()
        if op.get_friendly_name() in keep:
            rt[KEEP_F32_KEY] = ""
            found.add(op.get_friendly_name())
        elif KEEP_F32_KEY in rt:
            del rt[KEEP_F32_KEY]
    missing = sorted(keep - found)
    if missing:
        raise DynPoseError(f"OpenVINO IR {xml}: no layer named {missing[:3]} to keep in f32")
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml
