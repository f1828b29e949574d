"""torch -> ONNX and graph simplification (the ONNX file helpers live in `dynpose.onnx_utils`).

Every ONNX file dynpose writes is opset >= 17, has a symbolic batch axis, passes `onnx.checker`, and carries its
model card in `metadata_props["dynpose.card"]` so a file copied out of an engine dir still says how to feed it.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import onnx

from dynpose.models.card import ModelCard
from dynpose.onnx_utils import check_onnx, copy_metadata, set_card

log = logging.getLogger(__name__)

OPSET = 17


def slim(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding + dead-node removal with onnxslim; metadata (our card) is carried over by hand."""
    import onnxslim

    try:
        out = onnxslim.slim(model)
    except Exception as e:  # a graph onnxslim cannot handle is still a valid graph: keep it as is
        log.warning("onnxslim could not simplify the graph (%s: %s); kept unsimplified", type(e).__name__, e)
        return model
    return copy_metadata(model, out)


def export_torch(
    model: Any,
    path: str | os.PathLike,
    card: ModelCard,
    *,
    opset: int = OPSET,
    input_name: str = "input",
    output_name: str = "output",
) -> Path:
    """Trace `model` (eval mode, CPU) at the card's input size with a symbolic batch axis; slim, check, save."""
    import torch

    path = Path(path)
    model = model.eval().cpu()
    dummy = torch.randn(2, 3, card.input_height, card.input_width)
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
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    proto = slim(proto)
    set_card(proto, card)
    check_onnx(proto, f"export of {card.name}")
    onnx.save(proto, str(path))
    return path
