"""PyTorch model zoo: `create_model`, `list_models`, `load_weights`, and the model cards."""

from dynpose.models.card import ModelCard

__all__ = ["ModelCard"]
