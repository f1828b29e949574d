"""torch -> ONNX, graph simplification, checking, and the model card inside the file.

Every ONNX file dynpose writes is opset >= 17, has a symbolic batch axis, passes `onnx.checker`, and carries its
model card in `metadata_props["dynpose.card"]` so a file copied out of an engine dir still says how to feed it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import onnx

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard

CARD_KEY = "dynpose.card"
OPSET = 17


def load_onnx(path: str | os.PathLike, what: str = "ONNX model") -> onnx.ModelProto:
    """Read an ONNX file, turning every protobuf/IO failure into one line."""
    p = Path(path)
    if not p.is_file():
        raise DynPoseError(f"{what} {p}: file not found")
    try:
        return onnx.load(str(p))
    except Exception as e:  # protobuf DecodeError and friends
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DynPoseError(f"{what} {p}: not a readable ONNX file ({first}); re-export it or pass the right file") from None


def check_onnx(model: onnx.ModelProto, where: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DynPoseError(f"{where}: onnx.checker rejects the graph ({first})") from None


def io_names(model: onnx.ModelProto, where: str = "ONNX model") -> tuple[str, str]:
    """(input name, output name) of a single-input heatmap model; initializers listed as inputs are skipped."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    outputs = [o.name for o in model.graph.output]
    if len(inputs) != 1:
        raise DynPoseError(f"{where}: expected exactly one input, found {inputs}; dynpose runs single-input models")
    if not outputs:
        raise DynPoseError(f"{where}: the graph has no outputs")
    return inputs[0], outputs[0]


def input_shape(model: onnx.ModelProto) -> list[int | str]:
    name, _ = io_names(model)
    (vi,) = [i for i in model.graph.input if i.name == name]
    return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]


def set_card(model: onnx.ModelProto, card: ModelCard) -> onnx.ModelProto:
    """Store the card as JSON under `dynpose.card`, replacing an older one."""
    keep = [p for p in model.metadata_props if p.key != CARD_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=CARD_KEY, value=card.to_json())
    return model


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node the name `<op>_<index>`: fp16 block lists and INT8 exclusions refer to nodes by name,
    so every tool that reads the graph must see the same names."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return model


def copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto) -> onnx.ModelProto:
    """Replace `dst`'s metadata_props with `src`'s (converters and quantizers drop them; our card lives there)."""
    props = [(p.key, p.value) for p in src.metadata_props]
    del dst.metadata_props[:]
    for k, v in props:
        dst.metadata_props.add(key=k, value=v)
    return dst


def read_card(path: str | os.PathLike) -> ModelCard | None:
    """The card stored in an ONNX file by dynpose, or None."""
    import json

    m = onnx.load(str(path), load_external_data=False)
    for p in m.metadata_props:
        if p.key == CARD_KEY:
            return ModelCard.from_dict(json.loads(p.value), where=f"{path} metadata card")
    return None


def opset_of(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def slim(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding + dead-node removal with onnxslim; metadata (our card) is carried over by hand."""
    import onnxslim

    try:
        out = onnxslim.slim(model)
    except Exception as e:  # a graph onnxslim cannot handle is still a valid graph: keep it as is
        warnings.warn(f"onnxslim could not simplify the graph ({type(e).__name__}: {e}); kept unsimplified", stacklevel=2)
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
