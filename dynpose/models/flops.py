"""Counted model cost: parameters and multiply-adds at the card's input size, by running the model once.

`torch.utils.flop_counter.FlopCounterMode` counts the FLOPs of convolutions (also transposed), matrix products and
attention, two per multiply-add; pose papers' "GFLOPs" (HRNet-W32 7.1, ResNet-50 8.9 at 256x192) are multiply-adds
of the same layers, so `gmacs` = FLOPs / 2 / 1e9 is the figure to compare with them. Element-wise work (BN, ReLU,
pooling, softmax, resizing) is not counted, as in those papers' tools.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynpose.errors import DynPoseError


@dataclass(frozen=True)
class ModelCost:
    """What one crop costs a model: parameters and counted FLOPs (2 per multiply-add) at `input_size` (w, h)."""

    name: str
    params: int
    flops: int
    input_size: tuple[int, int]

    @property
    def gmacs(self) -> float:
        """Multiply-adds in billions (the "GFLOPs" of pose papers)."""
        return self.flops / 2e9

    @property
    def mparams(self) -> float:
        return self.params / 1e6


def count_flops(model: nn.Module, input_size: tuple[int, int], batch: int = 1) -> int:
    """FLOPs of one eval-mode forward of `model` on a batch x 3 x h x w input (`input_size` is (w, h)). A model built
    on the meta device (`with torch.device("meta"): create_model(...)`) is counted without memory or compute, which
    is how ViTPose-L/H are counted cheaply."""
    w, h = input_size
    if batch < 1 or w < 1 or h < 1:
        raise DynPoseError(f"count_flops: batch and input size must be positive, got batch {batch}, size {input_size}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(batch, 3, h, w, device=next(model.parameters(), torch.zeros(0)).device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def model_cost(name: str, model: nn.Module | None = None) -> ModelCost:
    """Parameters and FLOPs of zoo model `name` for one crop at its card's input size (builds it if not given)."""
    from dynpose.models.zoo import create_model, get_card

    card = get_card(name)
    model = create_model(name) if model is None else model
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(name=name, params=params, flops=count_flops(model, card.input_size), input_size=card.input_size)
