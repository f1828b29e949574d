"""`EngineSet.load`: the one way to open an engine dir.

It checks the manifest (every file's size and sha256), picks each role's entry for the backend, loads and activates
the router, small and large runners and the detector once, checks each model's input against its card, and closes
all of them together. The Pipeline, the benchmark, router training and calibration (and the service) all start here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from dynpose.engines.manifest import Entry, Manifest
from dynpose.errors import DynPoseError
from dynpose.roles import MODEL_ROLES, Role
from dynpose.runtime.backends import BACKEND_FORMAT, check_backend, load_runner
from dynpose.runtime.backends.base import Runner
from dynpose.runtime.model import CropModel, PoseModel, Router, check_outputs

if TYPE_CHECKING:
    from dynpose.runtime.detector import OnnxDetector

log = logging.getLogger(__name__)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ort_device(device: str) -> str:
    """Where ONNX Runtime can run a helper model (router fallback, detector): the GPU if this ORT has CUDA."""
    if device == "cpu":
        return "cpu"
    from dynpose.onnx_utils import import_ort

    return "cuda" if "CUDAExecutionProvider" in import_ort().get_available_providers() else "cpu"


def pick_entry(manifest: Manifest, engine_dir: Path, role: Role, backend: str, device: str) -> tuple[Entry, str, str]:
    """(entry, backend, device) for a role: the entry in the backend's own format. Only the router, which is cheap,
    may fall back to its ONNX run by ONNX Runtime (a TensorRT engine dir whose router has no plan still runs), on
    the GPU when ORT has CUDA, else on the CPU; a pose model missing in the asked format is an error."""
    fmt = BACKEND_FORMAT[backend]
    entry = manifest.get(role, fmt)
    if entry is not None:
        return entry, backend, device
    onnx_entry = manifest.get(role, "onnx")
    if role != Role.ROUTER or onnx_entry is None:
        have = sorted({e.format for e in manifest.entries if e.role == role})
        raise DynPoseError(
            f"engine dir {engine_dir}: no {fmt} '{role}' entry for --backend {backend} (it has: "
            f"{', '.join(have) or 'none'}); export the {role} model for that backend with dynpose-export, or pick the "
            "backend that runs what is there (onnx: --backend ort, tensorrt: --backend tensorrt, torch: --backend torch, "
            "openvino: --backend openvino)"
        )
    dev = ort_device(device)
    log.warning("router: no %s entry in %s; running its ONNX with ONNX Runtime on %s", fmt, engine_dir, dev)
    return onnx_entry, "ort", dev


def resolve_threads(threads: int | None, flag: str = "threads") -> int | None:
    """CPU cores dynpose may use: None (all), or an integer >= 1; above the usable cores it is capped with a
    warning (oversubscribed ONNX Runtime thread pools crawl: 1000 threads on 2 cores all but hang)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise DynPoseError(f"{flag} {threads}: must be an integer >= 1 (CPU cores to use)")
    cores = usable_cores()
    if threads > cores:
        log.warning("%s %d: this machine has %d usable cores; using %d", flag, threads, cores, cores)
        return cores
    return threads


# The CPU backends: their loaders take `intra_op_threads`, the inference threads of one model.
CPU_THREADED = ("ort", "openvino")


def thread_share(role: Role, backend: str, device: str, threads: int | None) -> dict[str, Any]:
    """CPU inference threads for a role (ONNX Runtime and OpenVINO alike). `threads` is the number of CPU cores
    dynpose may use (default: all): small and large run at the same time, so each gets half; the router runs alone
    before them and gets all."""
    if backend not in CPU_THREADED or device != "cpu":
        return {}
    cores = threads or usable_cores()
    return {"intra_op_threads": cores if role == Role.ROUTER else max(1, cores // 2)}


def check_input(model: CropModel, where: str) -> None:
    """The active runner's input must be what the card crops: N x 3 x H x W (dynamic dims pass)."""
    meta = model.runner.input_metadata()
    want = (3, model.card.input_height, model.card.input_width)
    got = meta.shape[1:]
    if len(meta.shape) != 4 or any(g is not None and g != w for g, w in zip(got, want, strict=True)):
        raise DynPoseError(
            f"{where}: the model's input {meta.name!r} is {list(meta.shape)} but its card says N x 3 x "
            f"{model.card.input_height} x {model.card.input_width}; fix the card's input_width/input_height or "
            "re-export the model"
        )


@dataclass(frozen=True)
class LoadOptions:
    """How an engine dir's models are opened.

    backend: "ort" | "openvino" | "tensorrt" | "torch" (the manifest format it runs); device: "cpu" | "cuda";
    threads: CPU cores dynpose may use (None: all); detector: an ONNX detector file to use instead of the manifest's
    detector entry (which is opened when present), with its score and IoU thresholds; backend_options: keyword
    options for the backend's loader, given to every model it loads (torch: fp16, channels_last, cuda_graphs, compile;
    a router that falls back to ONNX Runtime does not get them); with_detector: False opens no detector at all (a
    process that only runs pose models, e.g. a service replica)."""

    backend: str = "ort"
    device: str = "cpu"
    threads: int | None = None
    detector: str | os.PathLike | None = None
    det_score: float = 0.5
    det_iou: float = 0.5
    backend_options: Mapping[str, Any] | None = None
    with_detector: bool = True


@dataclass
class EngineSet:
    """The opened models of one engine dir (runners active until `close`)."""

    engine_dir: Path
    manifest: Manifest
    small: PoseModel | None = None
    large: PoseModel | None = None
    router: Router | None = None
    detector: OnnxDetector | None = None
    backend: str = "ort"
    device: str = "cpu"
    loaded: dict[Role, str] = field(default_factory=dict)  # what was loaded, for summaries
    entries: dict[Role, Entry] = field(default_factory=dict)
    backend_options: dict[str, Any] = field(default_factory=dict)  # to the backend's loader (torch: fp16, ...)

    @classmethod
    def load(
        cls, engine_dir: str | os.PathLike, opts: LoadOptions | None = None, roles: Sequence[Role] | None = None
    ) -> EngineSet:
        """Open the engine dir's models (`roles`: which of router / small / large; default: those the manifest
        has) as `opts` says, after checking the manifest (every file's size and sha256)."""
        if engine_dir is None or str(engine_dir) == "":
            raise DynPoseError("engine dir: none given; pass the folder dynpose-export wrote (e.g. engines/)")
        return cls.open(Manifest.load(Path(engine_dir), verify=True), opts, roles)

    @classmethod
    def open(cls, manifest: Manifest, opts: LoadOptions | None = None, roles: Sequence[Role] | None = None) -> EngineSet:
        """`load` for a manifest already read (and verified) by the caller: the engine dir is not read again."""
        o = opts or LoadOptions()
        check_backend(o.backend)
        threads = resolve_threads(o.threads)
        if o.backend_options and o.backend != "torch":
            raise DynPoseError(
                f"backend options {sorted(o.backend_options)} are torch backend options; --backend {o.backend} takes "
                "its precision and layout from the exported files"
            )
        if manifest.engine_dir is None:
            raise DynPoseError("EngineSet.open: the manifest was not loaded from an engine dir (Manifest.load)")
        wanted = [r for r in MODEL_ROLES if manifest.get(r) is not None] if roles is None else list(roles)
        unknown = sorted(str(r) for r in wanted if r not in MODEL_ROLES)
        if unknown:
            raise DynPoseError(f"EngineSet.load: unknown role(s) {unknown}; use {', '.join(map(str, MODEL_ROLES))}")
        es = cls(
            manifest.engine_dir, manifest, backend=o.backend, device=o.device, backend_options=dict(o.backend_options or {})
        )
        try:
            for role in wanted:
                es._open_model(Role(role), threads)
            if o.with_detector:
                es._open_detector(o.detector, o.det_score, o.det_iou)
        except BaseException:
            es.close()
            raise
        return es

    def _open_model(self, role: Role, threads: int | None) -> None:
        entry, be, dev = pick_entry(self.manifest, self.engine_dir, role, self.backend, self.device)
        opts = {**thread_share(role, be, dev, threads), **(self.backend_options if be == self.backend else {})}
        runner: Runner = load_runner(be, self.engine_dir, entry, dev, **opts)
        handle: CropModel = Router(runner, entry.card) if role == Role.ROUTER else PoseModel(runner, entry.card)
        setattr(self, role, handle)  # set before activating, so a failure below still closes it
        runner.activate()
        where = f"engine dir {self.engine_dir}: {role} entry {entry.file}"
        check_input(handle, where)
        check_outputs(handle, where)
        self.entries[role] = entry
        self.loaded[role] = f"{entry.model} ({entry.format}, {entry.precision}, {be} on {dev})"

    def solo_model(self, role: Role, threads: int | None = None) -> CropModel:
        """An opened role's model as it runs *alone*: a second, active handle whose CPU runner (ONNX Runtime or
        OpenVINO) has every core dynpose may use (`threads`, default all) instead of the half a pose model gets beside
        the other one, for a baseline timed on its own; the caller deactivates its runner. Other backends (one GPU
        stream per runner, no thread split) and the router (it already gets every core) return the opened handle."""
        handle = self.require(role)
        entry = self.entries[role]
        backend = {"onnx": "ort", "openvino": "openvino"}.get(entry.format)
        if role == Role.ROUTER or backend is None or getattr(handle.runner, "device", "cpu") != "cpu":
            return handle
        cores = resolve_threads(threads) or usable_cores()
        runner = load_runner(backend, self.engine_dir, entry, "cpu", intra_op_threads=cores).activate()
        return PoseModel(runner, entry.card)

    def _open_detector(self, path: str | os.PathLike | None, det_score: float, det_iou: float) -> None:
        det_path = Path(path) if path is not None else None
        if det_path is None and self.manifest.get(Role.DETECTOR) is not None:
            det_path = self.engine_dir / self.manifest.require(Role.DETECTOR).file
        if det_path is None:
            return
        from dynpose.runtime.detector import OnnxDetector

        dev = ort_device(self.device)
        self.detector = OnnxDetector(det_path, score_thr=det_score, iou_thr=det_iou, device=dev)
        self.loaded[Role.DETECTOR] = f"{det_path} (ort on {dev})"

    # -- use -------------------------------------------------------------------------------------------------------
    def require(self, role: Role) -> CropModel:
        """The opened handle of a role, or a one-line error saying it is not there."""
        handle = getattr(self, role, None) if role in MODEL_ROLES else None
        if handle is None:
            raise DynPoseError(
                f"engine dir {self.engine_dir}: no {role} model opened; export one (`dynpose-export --role {role}`)"
            )
        return handle

    @property
    def pose_models(self) -> tuple[PoseModel, PoseModel]:
        """(small, large), both required."""
        small, large = self.require(Role.SMALL), self.require(Role.LARGE)
        assert isinstance(small, PoseModel) and isinstance(large, PoseModel)
        return small, large

    def close(self) -> None:
        for role in MODEL_ROLES:
            handle = getattr(self, role)
            if handle is not None:
                handle.runner.deactivate()
        if self.detector is not None:
            self.detector.close()

    def __enter__(self) -> EngineSet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
