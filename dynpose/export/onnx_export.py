"""torch -> ONNX and graph simplification (the ONNX file helpers live in `dynpose.onnx_utils`).

Every ONNX file dynpose writes is opset >= 17, has a symbolic batch axis, passes `onnx.checker`, and carries its
model card in `metadata_props["dynpose.card"]` so a file copied out of an engine dir still says how to feed it. A
model with several outputs keeps them all, in its forward's order (SimDR: `simdr_x`, `simdr_y`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import check_onnx, copy_metadata, set_card

log = logging.getLogger(__name__)

OPSET = 17
# protobuf's limit on one serialized message: an ONNX file holding its weights inline must stay under it.
PROTOBUF_LIMIT = 2**31


def slim(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding + dead-node removal with onnxslim; metadata (our card) is carried over by hand."""
    import onnxslim

    try:
        out = onnxslim.slim(model)
    except Exception as e:  # a graph onnxslim cannot handle is still a valid graph: keep it as is
        log.warning("onnxslim could not simplify the graph (%s: %s); kept unsimplified", type(e).__name__, e)
        return model
    return copy_metadata(model, out)


def output_names(card: ModelCard, n: int) -> list[str]:
    """The names a model's `n` outputs get: `output` for one, `simdr_x`, `simdr_y` for SimDR's two vectors,
    `output_0`, `output_1`, ... otherwise."""
    if n == 1:
        return ["output"]
    if card.decoder == "simdr" and n == 2:
        return ["simdr_x", "simdr_y"]
    return [f"output_{i}" for i in range(n)]


def export_torch(
    model: Any,
    path: str | os.PathLike,
    card: ModelCard,
    *,
    opset: int = OPSET,
    input_name: str = "input",
    output_name: str | Sequence[str] | None = None,
) -> Path:
    """Trace `model` (eval mode, CPU) at the card's input size with a symbolic batch axis on the input and every
    output (their other axes static, as the forward pass gives them); slim, check, save. output_name: one name per
    output (a string for a single-output model); default `output_names(card, n)`."""
    import torch

    path = Path(path)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weight_bytes >= PROTOBUF_LIMIT * 0.95:
        raise DynPoseError(
            f"export of {card.name}: {weight_bytes / 1e9:.2f} GB of fp32 weights do not fit one ONNX file (protobuf's "
            "2 GB limit) and dynpose writes no external-data ONNX yet; export a smaller model (ViTPose-L and below)"
        )
    model = model.eval().cpu()
    dummy = torch.randn(2, 3, card.input_height, card.input_width)
    with torch.no_grad():
        out = model(dummy)
    shapes = [tuple(o.shape) for o in (out if isinstance(out, (tuple, list)) else [out])]
    if output_name is None:
        names = output_names(card, len(shapes))
    else:
        names = [output_name] if isinstance(output_name, str) else list(output_name)
    tmp = path.with_suffix(".raw.onnx")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # dynamo=False: the TorchScript exporter needs no onnxscript and gives plain opset-17 graphs; its
            # deprecation notice is not the user's concern.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[input_name],
                output_names=names,
                dynamic_axes={n: {0: "batch"} for n in (input_name, *names)},
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    proto = slim(proto)
    _static_output_axes(proto, shapes)
    set_card(proto, card)
    check_onnx(proto, f"export of {card.name}")
    onnx.save(proto, str(path))
    return path


def _static_output_axes(proto: onnx.ModelProto, shapes: list[tuple[int, ...]]) -> None:
    """Give the outputs' non-batch axes their traced sizes: the exporter's shape inference leaves some symbolic
    (SimDR's keypoint axis after a Flatten), which tells a reader of the graph less than it knows."""
    if len(proto.graph.output) != len(shapes):
        return
    for out, shape in zip(proto.graph.output, shapes, strict=True):
        dims = out.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        for d, size in zip(list(dims)[1:], shape[1:], strict=True):
            if not d.dim_value:
                d.dim_value = int(size)
