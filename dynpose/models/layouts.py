"""Checkpoint layouts (tensor name -> shape): the first tensor where two differ, and which zoo model a checkpoint is.

A refused checkpoint's message names what was expected, what was found and the first differing tensor. "What was
found" is read by matching the file's tensors against every zoo model's layout, built on the meta device (no memory,
no weights: names and shapes only), in each checkpoint format the model reads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

Layout = dict[str, tuple[int, ...]]
StateDict = dict[str, torch.Tensor]
NBT = "num_batches_tracked"


@runtime_checkable
class ReadsCheckpointFormats(Protocol):
    """A model whose own state_dict is one released checkpoint format and that reads others (RTMPose, ViTPose)."""

    def checkpoint_formats(self) -> dict[str, Layout]:
        """format name (`weights.FORMATS`) -> the tensors a checkpoint in that format holds, prefixes included."""
        ...

    def from_checkpoint(self, sd: StateDict, fmt: str) -> StateDict:
        """A checkpoint's tensors in `fmt`, already checked against its layout -> this model's state_dict."""
        ...


def layout_of(sd: Mapping[str, Any]) -> Layout:
    return {k: tuple(v.shape) for k, v in sd.items()}


def fits(expected: Layout, found: Layout) -> bool:
    """`found` holds exactly the expected tensors (a missing `num_batches_tracked` is fine: old releases lack them)."""
    return first_difference(expected, found) is None


def first_difference(expected: Layout, found: Layout) -> str | None:
    """The first tensor, in the expected order, that is missing or shaped differently, else the first unexpected one
    in the checkpoint's order; None when the layouts agree (missing `num_batches_tracked` buffers aside)."""
    for k, shape in expected.items():
        if k not in found:
            if not k.endswith(NBT):
                return f"{k} (missing from the checkpoint)"
        elif found[k] != shape:
            return f"{k} (checkpoint {list(found[k])}, expected {list(shape)})"
    for k in found:
        if k not in expected:
            return f"{k} (in the checkpoint, not expected)"
    return None


def best_format(formats: dict[str, Layout], found: Layout) -> str:
    """The format whose tensor names the checkpoint shares most of (the first on a tie)."""
    return max(formats, key=lambda f: len(formats[f].keys() & found.keys()))


@functools.cache
def zoo_layouts(name: str) -> tuple[tuple[str, Layout], ...]:
    """(format, layout) pairs of zoo model `name` as checkpoints hold it, built on the meta device. Models without
    formats of their own give their state_dict as the loader sees it after removing the known prefixes ("zoo")."""
    from dynpose.models.zoo import create_model

    with torch.device("meta"):
        model = create_model(name)
    if isinstance(model, ReadsCheckpointFormats):
        return tuple(model.checkpoint_formats().items())
    return (("zoo", layout_of(model.state_dict())),)


def identify(sd: StateDict, convert: Callable[[StateDict], StateDict]) -> str | None:
    """Which zoo model (and format) `sd` is a checkpoint of, or None. `convert` maps a file's names the way the loader
    does for models without formats of their own (prefix removal)."""
    from dynpose.models.zoo import list_models

    raw = layout_of(sd)
    plain = layout_of(convert(sd))
    for name in list_models():
        for fmt, layout in zoo_layouts(name):
            if fits(layout, plain if fmt == "zoo" else raw):
                return name if fmt == "zoo" else f"{name} ({fmt})"
    return None
