"""PyTorch runner and loader: a zoo model's state_dict, on CPU or one CUDA device.

On CUDA each runner owns a `torch.cuda.Stream`: the input is staged in pinned memory, copied non-blocking on that
stream, the model runs there, the outputs are copied back into pinned memory and only that stream is waited on.
Two runners called from two threads therefore overlap on the GPU (the small and the large model of one frame).

Options (`TorchOptions`, each a runner flag and a `dynpose-bench` flag):

- `fp16`: the module in half precision (weights and activations; outputs returned as fp32).
- `channels_last`: NHWC memory layout for the module and its input (cuDNN's fast fp16 convolutions want it).
- `cuda_graphs`: one CUDA graph per batch-size bucket (1, 2, 4, ... max_batch), captured on activate. A batch is
  padded with zero rows up to its bucket, the graph replayed, the outputs sliced back. HRNet launches hundreds of
  small kernels per call; a replay launches them all at once. The zoo models treat every crop on its own (eval
  BatchNorm, per-crop pooling), so padding rows never change the real rows' outputs.
- `compile`: `torch.compile` (inductor, default mode: it does not add CUDA graphs of its own) before capture.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.backends.base import Runner, TensorMeta

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dynpose.engines.manifest import Entry

log = logging.getLogger(__name__)

# Eager runs before a capture: the first call picks cuDNN algorithms and allocates workspaces, which must not
# happen inside the capture.
GRAPH_WARMUP = 3


@dataclass(frozen=True)
class TorchOptions:
    """How a TorchRunner runs its module (see the module docstring)."""

    fp16: bool = False
    channels_last: bool = False
    cuda_graphs: bool = False
    compile: bool = False

    @classmethod
    def from_flags(cls, flags: dict[str, Any], where: str) -> TorchOptions:
        """Options from keyword flags; an unknown or non-boolean flag is a one-line error naming `where`."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(flags) - set(names))
        if unknown:
            raise DynPoseError(f"{where}: unknown torch backend option(s) {unknown}; use {', '.join(names)}")
        bad = {k: v for k, v in flags.items() if not isinstance(v, bool)}
        if bad:
            raise DynPoseError(f"{where}: torch backend options are on/off flags, got {bad}")
        return cls(**flags)

    def enabled(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a CUDA graph is captured for: powers of two below `max_batch`, then `max_batch`."""
    if not isinstance(max_batch, int) or max_batch < 1:
        raise DynPoseError(f"batch buckets: max_batch must be an integer >= 1, got {max_batch!r}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return tuple(out)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `n` items."""
    for b in buckets:
        if n <= b:
            return b
    raise DynPoseError(f"batch of {n} is larger than the largest captured batch {max(buckets)}")


def stage_padded(dest: np.ndarray, batch: np.ndarray, size: int) -> np.ndarray:
    """Write `batch` (n items) into the first `size` items of the flat buffer `dest`, zero the `size - n` padding
    items after it, and return that (size, *item) view."""
    n = batch.shape[0]
    if not 1 <= n <= size:
        raise DynPoseError(f"cannot pad a batch of {n} to {size} items")
    item = int(np.prod(batch.shape[1:]))
    if dest.size < size * item:
        raise DynPoseError(f"staging buffer holds {dest.size // max(1, item)} items, {size} needed")
    view = dest[: size * item].reshape(size, *batch.shape[1:])
    view[:n] = batch
    view[n:] = 0
    return view


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


def output_tensors(out: Any) -> list[torch.Tensor]:
    """A module's outputs as a list of tensors (one tensor, or a tuple/list of them)."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise DynPoseError(f"torch model returned {type(out).__name__}; the torch backend expects tensors")


@dataclass
class _Graph:
    """One captured batch bucket: the static input the graph reads and the fp32 outputs it writes."""

    graph: Any
    input: Any
    outputs: list[Any]


class TorchRunner(Runner):
    """Runs an `nn.Module` in eval mode under `torch.inference_mode` (outputs always fp32). The module moves to the
    device, the CUDA stream is made and the CUDA graphs are captured on activate.

    `options` are `TorchOptions` flags as keywords: fp16, channels_last, cuda_graphs (CUDA only; needs
    `input_chw`), compile.
    """

    def __init__(
        self,
        module: nn.Module,
        device: str = "cpu",
        max_batch: int = 64,
        name: str | None = None,
        input_chw: tuple[int, int, int] | None = None,
        **options: bool,
    ) -> None:
        super().__init__(name or type(module).__name__, max_batch)
        import torch

        self.options = TorchOptions.from_flags(options, f"runner {self.name}")
        self.device = resolve_device(device)  # a CUDA request without CUDA fails here, before any work
        self.cuda = self.device.type == "cuda"
        if self.options.cuda_graphs and not self.cuda:
            raise DynPoseError(f"runner {self.name}: CUDA graphs need a CUDA device (--device cuda), not {device!r}")
        if self.options.cuda_graphs and input_chw is None:
            raise DynPoseError(f"runner {self.name}: CUDA graphs are captured for a known input size; pass input_chw")
        if self.options.compile and not hasattr(torch, "compile"):
            raise DynPoseError(f"runner {self.name}: this torch {torch.__version__} has no torch.compile")
        self.fp16 = self.options.fp16
        self.dtype = torch.float16 if self.fp16 else torch.float32
        self.memory_format = torch.channels_last if self.options.channels_last else torch.contiguous_format
        self.module = module
        self.input_chw = input_chw
        self.buckets = batch_buckets(self.max_batch) if self.options.cuda_graphs else ()
        self.stream: torch.cuda.Stream | None = None
        self._forward: Any = None
        self._graphs: dict[int, _Graph] = {}
        # One set of pinned staging buffers per runner: calls are serialised around them.
        self._exec_lock = threading.Lock()
        self._pinned_in: torch.Tensor | None = None
        self._pinned_out: list[torch.Tensor | None] = []
        self._gpu_spans: list[tuple[Any, Any]] | None = None

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        device: str = "cpu",
        max_batch: int = 64,
        name: str | None = None,
        input_chw: tuple[int, int, int] | None = None,
        **options: bool,
    ) -> TorchRunner:
        """Run a module you already have (a zoo model, a fine-tuned one) without a manifest. A zoo model's card
        gives `input_chw` when not passed (CUDA graphs need it)."""
        card = getattr(module, "card", None)
        if input_chw is None and card is not None:
            input_chw = (3, card.input_height, card.input_width)
        return cls(module, device=device, max_batch=max_batch, name=name, input_chw=input_chw, **options)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def _activate(self) -> None:
        import torch

        module = self.module.to(self.device, dtype=self.dtype).eval()
        if self.options.channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.module = module
        self._forward = torch.compile(module) if self.options.compile else module
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        if self.options.cuda_graphs:
            try:
                with torch.inference_mode():
                    for b in sorted(self.buckets, reverse=True):  # the largest first: out-of-memory shows at once
                        self._graphs[b] = self._capture(b)
            except BaseException:
                self._deactivate()
                raise
            log.info("%s: captured CUDA graphs for batch sizes %s", self.name, list(self.buckets))

    def _deactivate(self) -> None:
        with self._exec_lock:
            if self.stream is not None:
                self.stream.synchronize()
            self._graphs = {}
            self._pinned_in, self._pinned_out = None, []
            self.stream = None
            self._forward = None

    def _input_metadata(self) -> TensorMeta:
        chw = self.input_chw or (None, None, None)
        return TensorMeta("input", (None, *chw), "float16" if self.fp16 else "float32")

    def record_gpu_spans(self, spans: list[tuple[Any, Any]] | None) -> None:
        """Benchmarks: append (start, end) timing `torch.cuda.Event`s recorded around each call's stream work
        (H2D copy, model, D2H copy; not the host staging) to `spans`; None stops recording."""
        self._gpu_spans = spans

    # -- CUDA graphs -----------------------------------------------------------------------------------------------
    def _capture(self, size: int) -> _Graph:
        import torch

        assert self.input_chw is not None and self.stream is not None
        static_in = torch.zeros((size, *self.input_chw), device=self.device, dtype=self.dtype)
        static_in = static_in.contiguous(memory_format=self.memory_format)
        # Warm up on the runner's own stream (the capture stream), never the default one.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for _ in range(GRAPH_WARMUP):
                self._forward(static_in)
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another runner's thread may allocate while this one captures.
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            outs = [t.float().contiguous() for t in output_tensors(self._forward(static_in))]
        return _Graph(graph, static_in, outs)

    # -- one call --------------------------------------------------------------------------------------------------
    def _pinned(self, current: torch.Tensor | None, numel: int) -> torch.Tensor:
        import torch

        if current is None or current.numel() < numel:
            current = torch.empty(numel, dtype=torch.float32, pin_memory=True)
        return current

    def _infer(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        with self._exec_lock, torch.inference_mode():
            if not self.cuda:
                x = torch.from_numpy(batch).to(self.dtype).contiguous(memory_format=self.memory_format)
                return [np.ascontiguousarray(t.float().numpy()) for t in output_tensors(self._forward(x))]
            return self._infer_cuda(batch)

    def _infer_cuda(self, batch: np.ndarray) -> list[np.ndarray]:
        import torch

        assert self.stream is not None
        n = batch.shape[0]
        if self.options.cuda_graphs and tuple(batch.shape[1:]) != self.input_chw:
            raise DynPoseError(
                f"{self.name}: CUDA graphs were captured for N x {' x '.join(map(str, self.input_chw or ()))} inputs, "
                f"got {batch.shape}"
            )
        size = bucket_for(n, self.buckets) if self.options.cuda_graphs else n
        item = int(np.prod(batch.shape[1:]))
        # Sized for max_batch on first use so later (smaller or equal) batches reuse the same buffer. The padding
        # is written through a numpy view; the copy reads the pinned tensor itself (so it can be non-blocking).
        self._pinned_in = self._pinned(self._pinned_in, self.max_batch * item)
        stage_padded(self._pinned_in.numpy(), batch, size)
        host_in = self._pinned_in[: size * item].view(size, *batch.shape[1:])
        spans = self._gpu_spans
        with torch.cuda.stream(self.stream):
            start = torch.cuda.Event(enable_timing=True) if spans is not None else None
            if start is not None:
                start.record(self.stream)
            x = host_in.to(self.device, non_blocking=True)
            if self.options.cuda_graphs:
                g = self._graphs[size]
                g.input.copy_(x)  # fp32 NCHW -> the graph's dtype and layout
                g.graph.replay()
                outs = [o[:n] for o in g.outputs]
            else:
                x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
                outs = [t.float().contiguous() for t in output_tensors(self._forward(x))]
            hosts = []
            for k, o in enumerate(outs):
                if k == len(self._pinned_out):
                    self._pinned_out.append(None)
                buf = self._pinned_out[k] = self._pinned(self._pinned_out[k], self.max_batch * (o.numel() // n))
                h = buf[: o.numel()].view(o.shape)
                h.copy_(o, non_blocking=True)
                hosts.append(h)
            if start is not None and spans is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record(self.stream)
                spans.append((start, end))
        # Waiting on this runner's stream only: the other model's stream keeps running.
        self.stream.synchronize()
        return [h.numpy().copy() for h in hosts]


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


def load_torch(engine_dir: str | os.PathLike, entry: Entry, device: str = "cpu", **options: bool) -> TorchRunner:
    """Loader: a manifest entry (format torch: a zoo model's state_dict) -> an inactive runner. `options`: the
    `TorchOptions` flags (fp16, channels_last, cuda_graphs, compile)."""
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
        model, device=device, max_batch=entry.max_batch, name=f"{entry.role}:{entry.model}", input_chw=chw, **options
    )


def _key_diff(expected: dict[str, Any], got: dict[str, Any]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
