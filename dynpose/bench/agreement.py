"""What a routing calibration stores about its data, and the check that a stored calibration still applies.

`dynpose-train-router --calibrate` measures a policy on some footage with some models; its figures mean nothing once
either changes. The calibration therefore stores, beside the policy (`Manifest.set_calibration`):

- `ModelStamp`s: the format and sha256 of each model the figures were measured with (small, large, and the router
  when one was read). An entry re-exported since has another sha256.
- a `FootageRecord` (label-free calibration): every source (image folder, image, video), detections file and the
  detector, each as a `FileStamp` (a cheap stat signature and the content's sha256), the sampling settings, the
  frames and persons counted, and one sha256 over all of it (the footage hash).
- the label-free figures themselves (`LabelFreeFigures`): target, held-out agreement with its interval, persons and
  frames on each side of the split, costs, each family's cheapest policy.

`calibration_warnings` is what `dynpose-run` prints at load (through `costs.log_route_costs`) when the route in use is
the calibrated one and a model or the footage no longer matches: the stat signature is re-read (cheap: one `stat`
per file), and only where it moved is the content hashed again, so a file merely touched raises no warning. Footage
that is not there any more (an engine dir copied to another machine) is not a change: nothing is said.

These records sit in `bench` beside the measured costs (`costs.py`): both are measurements stored in the manifest
that the runtime's callers print lines about; `dynpose.router` writes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynpose.bench.stats import Interval
from dynpose.data import IMAGE_SUFFIXES
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.fileio import sha256_file
from dynpose.roles import Role
from dynpose.runtime.policy import Policy

LABEL_FREE = "label-free"  # figures["method"] of a calibration against the large model


def _files(path: Path) -> list[Path]:
    """The files a source is made of: a folder's images (sub-folders too, sorted), or the file itself."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [path]


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's images (their paths relative to it and their own sha256s)."""
    p = Path(path)
    if not p.is_dir():
        return sha256_file(p)
    files = {f.relative_to(p).as_posix(): sha256_file(f) for f in _files(p)}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def stat_signature(path: str | os.PathLike) -> str:
    """sha256 over (relative path, size, mtime) of every file of a source: changes when a file is written."""
    p = Path(path)
    rows = []
    for f in _files(p):
        st = f.stat()
        rows.append([f.relative_to(p).as_posix() if p.is_dir() else f.name, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@dataclass(frozen=True)
class FileStamp:
    """One source, detections file or detector as it was when measured."""

    path: str  # absolute
    stat: str  # `stat_signature`
    sha256: str  # `content_digest`

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileStamp:
        p = Path(path).resolve()
        return cls(str(p), stat_signature(p), content_digest(p))

    def changed(self) -> bool:
        """True when the source is there but its content is not what was measured (missing: False, see module)."""
        p = Path(self.path)
        if not p.exists():
            return False
        try:
            if stat_signature(p) == self.stat:
                return False
            return content_digest(p) != self.sha256
        except OSError:
            return False

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "stat": self.stat, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Any) -> FileStamp:
        return cls(str(d["path"]), str(d["stat"]), str(d["sha256"]))


@dataclass(frozen=True)
class FootageRecord:
    """The footage a label-free calibration ran on (see the module doc); `sha256` is the footage hash."""

    sources: tuple[FileStamp, ...]
    detections: tuple[FileStamp, ...]
    detector: str | None  # sha256 of the detector that found the boxes (a file, or the engine dir's entry)
    sampling: Mapping[str, float]  # det_score, min_box, max_frames, frame_step
    frames: int  # frames read
    persons: int  # persons found (boxes kept)
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", self._hash())

    def _hash(self) -> str:
        d = {
            "sources": [s.sha256 for s in self.sources],
            "detections": [s.sha256 for s in self.detections],
            Role.DETECTOR.value: self.detector,
            "sampling": dict(sorted(self.sampling.items())),
        }
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def changed(self) -> list[str]:
        """Paths of the sources and detections files whose content is no longer what was measured."""
        return [s.path for s in (*self.sources, *self.detections) if s.changed()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "sources": [s.to_dict() for s in self.sources],
            "detections": [s.to_dict() for s in self.detections],
            Role.DETECTOR.value: self.detector,
            "sampling": dict(self.sampling),
            "frames": self.frames,
            "persons": self.persons,
        }

    @classmethod
    def from_dict(cls, d: Any) -> FootageRecord:
        return cls(
            sources=tuple(FileStamp.from_dict(s) for s in d["sources"]),
            detections=tuple(FileStamp.from_dict(s) for s in d["detections"]),
            detector=d.get(Role.DETECTOR.value),
            sampling={str(k): float(v) for k, v in d["sampling"].items()},
            frames=int(d["frames"]),
            persons=int(d["persons"]),
            sha256=str(d["sha256"]),
        )


@dataclass(frozen=True)
class ModelStamp:
    """The entry a calibration measured a role with."""

    format: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"format": self.format, "sha256": self.sha256}


def model_stamps(manifest: Manifest, roles: tuple[Role, ...], fmt: str) -> dict[Role, ModelStamp]:
    """The stamps of `roles` in `fmt` as the manifest holds them now (roles without such an entry left out); the
    router without one is run from its ONNX (`runtime.engine_set.pick_entry`), so that entry stamps it."""
    out = {}
    for role in roles:
        e = manifest.get(role, fmt)
        if e is None and role is Role.ROUTER:
            e = manifest.get(role, "onnx")
        if e is not None:
            out[role] = ModelStamp(e.format, e.sha256)
    return out


def stamps_to_dict(stamps: Mapping[Role, ModelStamp]) -> dict[str, dict[str, str]]:
    return {r.value: s.to_dict() for r, s in stamps.items()}


def _stamps_from_dict(d: Any) -> dict[Role, ModelStamp]:
    return {Role.parse(r, "calibration models"): ModelStamp(str(s["format"]), str(s["sha256"])) for r, s in d.items()}


@dataclass(frozen=True)
class Counts:
    """Persons or frames on each side of the held-out split."""

    total: int
    fit: int
    heldout: int

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "fit": self.fit, "heldout": self.heldout}

    @classmethod
    def from_dict(cls, d: Any) -> Counts:
        return cls(int(d["total"]), int(d["fit"]), int(d["heldout"]))


@dataclass(frozen=True)
class FamilyFigures:
    """The cheapest policy of one family that meets the target on the fit part, and how it does held out."""

    policy: str
    share: float  # of the held-out persons sent to the large model
    fit_agreement: float
    agreement: Interval  # held out
    cost_ms: float
    speedup: float  # large-only cost / this policy's, by the measured costs

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "share": self.share,
            "fit_agreement": self.fit_agreement,
            "agreement": self.agreement.to_dict(),
            "cost_ms": self.cost_ms,
            "speedup": self.speedup,
        }

    @classmethod
    def from_dict(cls, d: Any) -> FamilyFigures:
        return cls(
            str(d["policy"]), float(d["share"]), float(d["fit_agreement"]), Interval.from_dict(d["agreement"]),
            float(d["cost_ms"]), float(d["speedup"]),
        )  # fmt: skip


@dataclass(frozen=True)
class LabelFreeFigures:
    """A label-free calibration's figures as stored in the manifest (`RouteCalibration.figures`)."""

    target: float  # mean OKS with the large model the policy had to reach on the fit part
    agreement: Interval  # held-out mean OKS of the routed keypoints against the large model's
    above: Interval  # held-out share of persons at OKS >= ABOVE
    share: float  # held-out share of persons sent to the large model
    fit_agreement: float
    persons: Counts  # with a reference (the large model sees at least one joint)
    frames: Counts
    no_reference: int  # persons the large model sees no joint of (routed, not scored)
    footage: FootageRecord
    models: Mapping[Role, ModelStamp]
    cost_ms: float
    large_ms: float
    per_family: Mapping[str, FamilyFigures] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)  # holdout share, seed, backend, device, cost batch, ...

    @property
    def holds(self) -> bool:
        """The target is not above the held-out interval (it held, within what the footage can tell)."""
        return self.agreement.hi >= self.target

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": LABEL_FREE,
            "reference": "the large model's keypoints (OKS over the joints it scores above 0.3)",
            "target_agreement": self.target,
            "agreement": self.agreement.to_dict(),
            "above_0.9": self.above.to_dict(),
            "share": self.share,
            "fit_agreement": self.fit_agreement,
            "holds": self.holds,
            "persons": self.persons.to_dict(),
            "frames": self.frames.to_dict(),
            "no_reference": self.no_reference,
            "footage": self.footage.to_dict(),
            "models": stamps_to_dict(self.models),
            "cost_ms": self.cost_ms,
            "large_ms": self.large_ms,
            "speedup_by_costs": self.large_ms / self.cost_ms if self.cost_ms > 0 else None,
            "per_family": {k: v.to_dict() for k, v in self.per_family.items()},
            "settings": dict(self.settings),
        }

    @classmethod
    def from_figures(cls, d: Mapping[str, Any]) -> LabelFreeFigures | None:
        """The figures of a label-free calibration (None for another method); a malformed record is an error."""
        if d.get("method") != LABEL_FREE:
            return None
        try:
            return cls(
                target=float(d["target_agreement"]),
                agreement=Interval.from_dict(d["agreement"]),
                above=Interval.from_dict(d["above_0.9"]),
                share=float(d["share"]),
                fit_agreement=float(d["fit_agreement"]),
                persons=Counts.from_dict(d["persons"]),
                frames=Counts.from_dict(d["frames"]),
                no_reference=int(d["no_reference"]),
                footage=FootageRecord.from_dict(d["footage"]),
                models=_stamps_from_dict(d["models"]),
                cost_ms=float(d["cost_ms"]),
                large_ms=float(d["large_ms"]),
                per_family={k: FamilyFigures.from_dict(v) for k, v in d.get("per_family", {}).items()},
                settings=dict(d.get("settings", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError, DynPoseError) as e:
            raise DynPoseError(f"manifest notes.router_calibration: not a label-free calibration record ({e})") from None


def calibration_warnings(manifest: Manifest, policy: Policy, where: str = "") -> list[str]:
    """Lines saying why the calibrated route in use no longer has the figures it was stored with (module doc);
    [] when `policy` is not the calibrated one or nothing changed."""
    cal = manifest.calibration
    if cal is None or cal.policy != str(policy):
        return []
    head = f"{where}: " if where else ""
    again = "calibrate again (`dynpose-train-router --calibrate`, see docs/router.md)"
    lines = []
    try:
        stamps = _stamps_from_dict(cal.figures.get("models") or {})
        footage = cal.figures.get("footage")
        record = FootageRecord.from_dict(footage) if footage else None
    except (KeyError, TypeError, ValueError, AttributeError, DynPoseError):
        return [f"{head}route {policy}: the stored calibration's models/footage record is unreadable; {again}"]
    moved = [r.value for r, s in stamps.items() if (e := manifest.get(r, s.format)) is None or e.sha256 != s.sha256]
    if moved:
        lines.append(
            f"{head}route {policy} was calibrated with other {' and '.join(moved)} model file(s) than the engine dir "
            f"holds now (re-exported since), so its figures no longer apply; {again}"
        )
    changed = record.changed() if record is not None else []
    if changed:
        lines.append(
            f"{head}route {policy} was calibrated on footage that has changed since ({', '.join(changed)}; footage "
            f"hash {record.sha256[:12] if record else ''}), so its agreement figures may no longer hold; {again}"
        )
    return lines
