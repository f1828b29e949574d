"""PyTorch runner and loader: a zoo model's state_dict, on CPU or one CUDA device.

On CUDA each runner owns a `torch.cuda.Stream`: the input is staged in pinned memory, copied non-blocking on that
stream, the model runs there, the output is copied back into pinned memory and only that stream is waited on. Two
runners called from two threads therefore overlap on the GPU (the small and the large model of one frame).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.backends.base import Runner, TensorMeta

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dynpose.engines.manifest import Entry


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' -> torch.device; a CUDA request without CUDA is a one-line user error."""
    import torch

    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} but no usable GPU"
            raise DynPoseError(
                f"device {device!r} requested but this torch {torch.__version__} has {build}; use --device cpu or "
                "install the CUDA build of torch on a GPU machine"
            )
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DynPoseError(f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    raise DynPoseError(f"unknown device {device!r} for the torch backend; use cpu, cuda or cuda:N")


def _first_tensor(out: Any) -> torch.Tensor:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DynPoseError(f"torch model returned {type(out).__name__}; the torch backend expects one tensor")


class TorchRunner(Runner):
    """Runs an `nn.Module` in eval mode under `torch.inference_mode`, fp32 or fp16 (output always fp32). The module
    moves to the device, and the CUDA stream and pinned buffers are made, on activate."""

    def __init__(
        self,
        module: nn.Module,
        device: str = "cpu",
        fp16: bool = False,
        max_batch: int = 64,
        name: str | None = None,
        input_chw: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__(name or type(module).__name__, max_batch)
        import torch

        self.device = resolve_device(device)  # a CUDA request without CUDA fails here, before any work
        self.fp16 = fp16
        self.dtype = torch.float16 if fp16 else torch.float32
        self.module = module
        self.input_chw = input_chw
        self.cuda = self.device.type == "cuda"
        self.stream: torch.cuda.Stream | None = None
        # One set of pinned staging buffers per runner: calls are serialised around them.
        self._exec_lock = threading.Lock()
        self._pinned_in: torch.Tensor | None = None
        self._pinned_out: torch.Tensor | None = None

    @classmethod
    def from_module(
        cls, module: nn.Module, device: str = "cpu", fp16: bool = False, max_batch: int = 64, name: str | None = None
    ) -> TorchRunner:
        """Run a module you already have (a zoo model, a fine-tuned one) without a manifest."""
        return cls(module, device=device, fp16=fp16, max_batch=max_batch, name=name)

    def _activate(self) -> None:
        import torch

        self.module = self.module.to(self.device, dtype=self.dtype).eval()
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None

    def _deactivate(self) -> None:
        with self._exec_lock:
            if self.stream is not None:
                self.stream.synchronize()
            self._pinned_in = self._pinned_out = None
            self.stream = None

    def _input_metadata(self) -> TensorMeta:
        chw = self.input_chw or (None, None, None)
        return TensorMeta("input", (None, *chw), "float16" if self.fp16 else "float32")

    def _staging(self, current: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        if current is None or current.numel() < int(np.prod(shape)):
            current = torch.empty(int(np.prod(shape)), dtype=torch.float32, pin_memory=True)
        return current

    def _infer(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        with self._exec_lock, torch.inference_mode():
            if not self.cuda:
                out = _first_tensor(self.module(torch.from_numpy(batch).to(self.dtype)))
                return [out.float().numpy().copy()]
            assert self.stream is not None
            # Sized for max_batch on first use so later (smaller or equal) batches reuse the same buffer.
            self._pinned_in = self._staging(self._pinned_in, (self.max_batch, *batch.shape[1:]))
            host_in = self._pinned_in[: batch.size].view(batch.shape)
            host_in.copy_(torch.from_numpy(batch))
            with torch.cuda.stream(self.stream):
                x = host_in.to(self.device, non_blocking=True).to(self.dtype)
                out = _first_tensor(self.module(x)).float()
                self._pinned_out = self._staging(self._pinned_out, (self.max_batch, *out.shape[1:]))
                host_out = self._pinned_out[: out.numel()].view(out.shape)
                host_out.copy_(out, non_blocking=True)
            # Waiting on this runner's stream only: the other model's stream keeps running.
            self.stream.synchronize()
            return [host_out.numpy().copy()]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Any]:
    """A `.pt` state_dict saved by the exporter, loaded safely (weights_only: no pickled code runs)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise DynPoseError(f"torch weights {path}: file not found; re-export with dynpose-export --format torch")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DynPoseError(f"torch weights {path}: cannot load it as a state_dict ({first}); re-export it") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DynPoseError(f"torch weights {path}: expected a state_dict (name -> tensor), got {type(sd).__name__}")
    return sd


def load_torch(engine_dir: str | os.PathLike, entry: Entry, device: str = "cpu", fp16: bool = False) -> TorchRunner:
    """Loader: a manifest entry (format torch: a zoo model's state_dict) -> an inactive runner."""
    if entry.format != "torch":
        raise DynPoseError(f"{entry.role}: the torch backend runs state_dict (.pt) entries, this entry is {entry.format}")
    from dynpose.models.zoo import create_model

    path = Path(engine_dir) / entry.file
    sd = load_state_dict_file(path)
    kw: dict[str, Any] = {"keypoints": entry.card.keypoints} if entry.card.task == "pose" else {}
    model = create_model(entry.card.arch, **kw)
    missing, unexpected = _key_diff(model.state_dict(), sd)
    if missing or unexpected:
        raise DynPoseError(
            f"torch weights {path}: do not fit model {entry.card.arch!r} ({len(missing)} missing e.g. {missing[:2]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:2]}); re-export it from the right model"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # same keys, different shapes
        detail = " ".join(str(e).split())[:300]
        raise DynPoseError(f"torch weights {path}: do not fit model {entry.card.arch!r} ({detail})") from None
    chw = (3, entry.card.input_height, entry.card.input_width)
    return TorchRunner(
        model, device=device, fp16=fp16, max_batch=entry.max_batch, name=f"{entry.role}:{entry.model}", input_chw=chw
    )


def _key_diff(expected: dict[str, Any], got: dict[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
