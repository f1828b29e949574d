"""What the service is started with: one frozen `ServeConfig`, checked before Ray starts (no Ray import here).

`check_config` refuses every mistake that can be seen from the flags and the engine dir's manifest (a missing role
for the backend, a route that needs a router the manifest lacks, bad replica counts), so a typo ends in one line
at the prompt instead of Serve retrying a failing replica constructor for minutes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dynpose.errors import DynPoseError
from dynpose.io.sources import MAX_PIXELS
from dynpose.roles import POSE_ROLES, Role

APP_NAME = "dynpose"
DEPLOYMENTS = ("ingress", Role.DETECTOR.value, Role.SMALL.value, Role.LARGE.value)
# Boxes one request may carry: memory per request stays bounded (crops are made all at once) and one client
# cannot hold the pose replicas for seconds. COCO's most crowded image has under 100 persons.
MAX_BOXES = 512
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Replicas:
    """A deployment's replica count: fixed (`min == max`) or autoscaled between `min` and `max`."""

    min: int
    max: int

    @property
    def autoscaled(self) -> bool:
        return self.max != self.min

    def options(self, target_ongoing: float) -> dict[str, Any]:
        """The `serve.deployment(...)` options for this count."""
        if not self.autoscaled:
            return {"num_replicas": self.min}
        return {
            "num_replicas": "auto",
            "autoscaling_config": {
                "min_replicas": self.min,
                "max_replicas": self.max,
                "target_ongoing_requests": target_ongoing,
            },
        }

    def __str__(self) -> str:
        return f"{self.min}-{self.max}" if self.autoscaled else str(self.min)


def parse_replicas(text: str | int, flag: str) -> Replicas:
    """'2' -> 2 replicas; '1-4' -> autoscaled from 1 to 4 (`--small-replicas 1-4`)."""
    s = str(text).strip()
    m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", s)
    if m is None:
        raise DynPoseError(f"{flag} {text!r}: give a replica count N or an autoscaling range MIN-MAX (e.g. 2 or 1-4)")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if hi < 1 or lo > hi or (lo < 1 and not m.group(2)):
        raise DynPoseError(f"{flag} {text!r}: need N >= 1, or 0 <= MIN <= MAX with MAX >= 1")
    return Replicas(lo, hi)


@dataclass(frozen=True)
class ServeConfig:
    """Everything the deployments need; pickled into each replica by `build_app` (paths are absolute)."""

    engine_dir: str
    backend: str = "ort"
    device: str = "cpu"
    threads: int | None = None
    route: str | None = None  # None: the manifest's policy
    flip: bool = False
    detector: str | None = None  # an ONNX detector instead of the engine dir's detector entry
    max_batch: int = 16  # crops per pose-model run, gathered across concurrent requests
    batch_wait_ms: float = 5.0  # how long a pose replica waits for a batch to fill
    max_body_mb: float = 20.0
    max_pixels: int = MAX_PIXELS
    max_boxes: int = MAX_BOXES
    replicas: dict[str, Replicas] = field(default_factory=lambda: {k: Replicas(1, 1) for k in DEPLOYMENTS})
    replica_cpus: float = 0.5  # Ray CPUs per replica, as the CLI (four fit two cores); scheduling only, --threads sets ORT
    replica_gpus: float = 0.0  # GPU fraction of each model replica (--device cuda)
    max_ongoing: int = 64  # concurrent requests per ingress replica
    body_timeout_s: float = 30.0  # a request body must be complete this long after the request reached the ingress
    request_timeout_s: float | None = 120.0  # Serve's proxy answers 408 past this, end to end (None: no limit)
    drain_timeout_s: float = 30.0  # stopping waits at most this long for the requests in flight
    log_level: str = "info"  # dynpose's lines from this level; Ray's own only at debug (module note of service.py)
    audit: float = 0.0  # share of the small model's answers the ingress also sends to the large model (live audit)
    audit_target: float | None = None  # steer the default route by the audit (see dynpose/runtime/audit.py)
    app_name: str = APP_NAME
    drain_actor: str | None = None  # set by `Service.start`: the drain's control actor (`dynpose.serve.drain`)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    @property
    def slow_bodies(self) -> int:
        """Uploads an ingress replica lets arrive slowly at once (`dynpose.serve.uploads`): a quarter of its slots."""
        return max(1, self.max_ongoing // 4)

    def with_(self, **changes: Any) -> ServeConfig:
        return replace(self, **changes)


def _check_numbers(cfg: ServeConfig) -> None:
    if cfg.max_batch < 1:
        raise DynPoseError(f"--max-batch {cfg.max_batch}: must be >= 1 (crops per pose-model run)")
    if not math.isfinite(cfg.batch_wait_ms) or cfg.batch_wait_ms < 0:
        raise DynPoseError(f"--batch-wait-ms {cfg.batch_wait_ms}: must be a finite number >= 0")
    if not math.isfinite(cfg.max_body_mb) or cfg.max_body_mb <= 0:
        raise DynPoseError(f"--max-body-mb {cfg.max_body_mb}: must be a finite number > 0")
    if not math.isfinite(cfg.replica_cpus) or cfg.replica_cpus < 0:
        raise DynPoseError(f"--replica-cpus {cfg.replica_cpus}: must be a finite number >= 0")
    if not math.isfinite(cfg.replica_gpus) or cfg.replica_gpus < 0:
        raise DynPoseError(f"--replica-gpus {cfg.replica_gpus}: must be a finite number >= 0")
    if cfg.replica_gpus > 0 and cfg.device != "cuda":
        raise DynPoseError(f"--replica-gpus {cfg.replica_gpus}: GPU replicas need --device cuda")
    if cfg.max_ongoing < 1:
        raise DynPoseError(f"--max-ongoing {cfg.max_ongoing}: must be >= 1")
    for flag, v in (("--body-timeout-s", cfg.body_timeout_s), ("--request-timeout-s", cfg.request_timeout_s)):
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise DynPoseError(f"{flag} {v}: must be a finite number of seconds > 0")
    if not math.isfinite(cfg.drain_timeout_s) or cfg.drain_timeout_s < 0:
        raise DynPoseError(f"--drain-timeout-s {cfg.drain_timeout_s}: must be a finite number of seconds >= 0")
    if cfg.log_level not in LOG_LEVELS:
        raise DynPoseError(f"--log-level {cfg.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
    if cfg.max_pixels < 1 or cfg.max_boxes < 1:
        raise DynPoseError("max_pixels and max_boxes must be >= 1")


def check_config(cfg: ServeConfig) -> ServeConfig:
    """The config with absolute paths, or a one-line DynPoseError naming the flag to fix. Reads the manifest (no
    hashing: every replica verifies the files when it opens them)."""
    from dynpose.engines.manifest import Manifest
    from dynpose.runtime.audit import AuditOptions
    from dynpose.runtime.backends import check_backend
    from dynpose.runtime.engine_set import pick_entry
    from dynpose.runtime.policy import parse_policy

    _check_numbers(cfg)
    AuditOptions.of(AuditOptions(cfg.audit, cfg.audit_target))  # a bad share or target fails before Ray starts
    check_backend(cfg.backend)
    if cfg.device not in ("cpu", "cuda"):
        raise DynPoseError(f"--device {cfg.device}: use cpu or cuda")
    root = Path(cfg.engine_dir).expanduser().resolve()
    manifest = Manifest.load(root, verify=False)
    policy = parse_policy(cfg.route if cfg.route is not None else manifest.route)
    for role in POSE_ROLES + ((Role.ROUTER,) if policy.needs_router else ()):
        if role is Role.ROUTER and manifest.get(Role.ROUTER) is None:
            raise DynPoseError(
                f"engine dir {root}: routing policy {policy} needs a router but the manifest has none; export one "
                "(`dynpose-export --model router`) or pick --route all-large / all-small / box:AREA / cascade:T"
            )
        pick_entry(manifest, root, role, cfg.backend, cfg.device)
    detector = str(Path(cfg.detector).expanduser().resolve()) if cfg.detector else None
    if detector is not None and not Path(detector).is_file():
        raise DynPoseError(f"--detector {cfg.detector}: file not found; pass an ONNX person detector (e.g. PicoDet)")
    return cfg.with_(engine_dir=str(root), detector=detector, route=str(policy))


def has_detector(cfg: ServeConfig) -> bool:
    """Whether the service runs a detector (requests without boxes are then answered)."""
    from dynpose.engines.manifest import Manifest

    return cfg.detector is not None or Manifest.load(cfg.engine_dir, verify=False).get(Role.DETECTOR) is not None
