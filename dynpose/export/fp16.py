"""fp32 ONNX -> fp16 ONNX with fp32 inputs/outputs, keeping overflowing layers in fp32.

onnxconverter-common does the conversion; what it cannot know is which activations leave the fp16 range on real
inputs, so the fp32 model is run once on real crops with every node output exposed, and nodes whose outputs reach
beyond `OVERFLOW` are blocked (kept fp32).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from dynpose.onnx_utils import copy_metadata, load_onnx, name_nodes, open_session

# Half of fp16's largest finite value: leaves room for the next op (an Add of two such tensors) not to overflow.
OVERFLOW = 32000.0
# Ops that onnxconverter-common keeps fp32 anyway plus reductions whose sums overflow easily in fp16.
OP_BLOCK_LIST = [
    "Resize",
    "Upsample",
    "TopK",
    "NonMaxSuppression",
    "RoiAlign",
    "Range",
    "CumSum",
    "ReduceSum",
    "ReduceMean",
    # RTMPose's ScaleNorm: the sum of squares inside the L2 norm overflows fp16 long before the norm does.
    "ReduceL2",
    "Softmax",
    "Exp",
    "Pow",
]


def overflowing_nodes(model: onnx.ModelProto, x: np.ndarray, limit: float = OVERFLOW) -> list[str]:
    """Names of nodes whose float outputs exceed `limit` in magnitude on the input batch `x`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    name_nodes(m)
    existing = {o.name for o in m.graph.output}
    producer: dict[str, str] = {}
    for node in m.graph.node:
        for out in node.output:
            producer[out] = node.name
            if out and out not in existing:
                m.graph.output.add(name=out)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "all_outputs.onnx"
        onnx.save(m, str(p))
        sess = open_session(p)
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, {sess.get_inputs()[0].name: x.astype(np.float32)})
    bad = set()
    for name, val in zip(names, outs, strict=True):
        val = np.asarray(val)
        if val.dtype.kind == "f" and val.size and float(np.abs(val).max()) > limit and name in producer:
            bad.add(producer[name])
    return sorted(bad)


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike, sample: np.ndarray | None = None) -> dict[str, object]:
    """Write the fp16 model to `dst`; returns what was kept in fp32. `sample`: real crops for the overflow scan."""
    from onnxconverter_common import float16

    # Named before the overflow scan, so its block list names the nodes the converter sees.
    model = name_nodes(load_onnx(src))
    blocked = overflowing_nodes(model, sample) if sample is not None and len(sample) else []
    half = float16.convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=OP_BLOCK_LIST,
        node_block_list=blocked or None,
        # Values past fp16 range are clamped rather than turned into inf.
        max_finite_val=65504.0,
        min_positive_val=1e-7,
    )
    # The converter leaves a stale fp32 value_info on the output of a Cast it inserts after a blocked node that reads
    # the graph input (the router's first ReduceMean); ONNX Runtime then refuses the model. A Cast's output type is
    # its `to`, so set it from there.
    cast_to = {n.output[0]: a.i for n in half.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    for vi in half.graph.value_info:
        if vi.name in cast_to:
            vi.type.tensor_type.elem_type = cast_to[vi.name]
    onnx.save(copy_metadata(model, half), str(dst))
    return {"fp16_fp32_nodes": blocked}
