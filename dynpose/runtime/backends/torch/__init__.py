"""PyTorch backend: a zoo model's state_dict on CPU or CUDA (each CUDA runner on its own stream)."""

from dynpose.runtime.backends.torch.runner import TorchRunner, load_torch

__all__ = ["TorchRunner", "load_torch"]
