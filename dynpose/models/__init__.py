"""PyTorch model zoo: `create_model`, `list_models`, `load_weights`, and the model cards."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dynpose.models.card import ModelCard

if TYPE_CHECKING:
    from dynpose.models.flops import ModelCost, count_flops, model_cost
    from dynpose.models.weights import LoadedCheckpoint, cache_dir, download, load_weights
    from dynpose.models.zoo import create_model, get_card, list_models

# The runtime imports `dynpose.models.card` (which runs this file) on machines that may have no torch, and a
# deployed pipeline should not pay torch's import time: the zoo is imported on first use only.
_LAZY = {
    "LoadedCheckpoint": "weights",
    "cache_dir": "weights",
    "download": "weights",
    "load_weights": "weights",
    "create_model": "zoo",
    "get_card": "zoo",
    "list_models": "zoo",
    "ModelCost": "flops",
    "count_flops": "flops",
    "model_cost": "flops",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"dynpose.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dynpose.models' has no attribute {name!r}")


__all__ = [
    "LoadedCheckpoint",
    "ModelCard",
    "ModelCost",
    "cache_dir",
    "count_flops",
    "create_model",
    "download",
    "get_card",
    "list_models",
    "load_weights",
    "model_cost",
]
