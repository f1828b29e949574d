"""The engine directory's manifest: the only file `dynpose-run` needs.

`manifest.json` lists one entry per role (router, small, large, optionally detector). Each entry carries the model
card, the file's size and sha256, the export checks' figures and the tool versions. Loading re-hashes every file and
refuses a directory whose files are missing or altered, so a plan copied from elsewhere is checked before use.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dynpose.errors import DynPoseError
from dynpose.fileio import read_json, sha256_file, write_json_atomic
from dynpose.models.card import ModelCard

SCHEMA = "dynpose.manifest"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ROLES = ("router", "small", "large", "detector")
# "torch": a zoo model's state_dict (.pt) beside its ONNX, for the PyTorch backend (CPU or CUDA without TensorRT).
FORMATS = ("onnx", "tensorrt", "torch")
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_ROUTE = "band:0.59,0.69"


@dataclass
class Entry:
    """One deployable model file in the engine directory."""

    role: str
    model: str
    file: str  # relative to the engine dir
    format: str
    precision: str
    card: ModelCard
    input_name: str = "input"
    output_name: str = "output"
    min_batch: int = 1
    max_batch: int = 64
    sha256: str = ""
    size: int = 0
    checkpoint_sha256: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)  # e.g. {"fp32_rel_l2": 3e-7, "int8_oks": 0.97}
    versions: dict[str, str] = field(default_factory=dict)
    tensorrt: dict[str, Any] | None = None  # plan only: version, gpu, compute capability, profile shapes
    source: str | None = None  # the ONNX this plan was built from (relative), for plans

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["card"] = self.card.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Entry:
        d = dict(d)
        try:
            card = ModelCard.from_dict(d.pop("card"), where=f"{where} card")
            e = cls(card=card, **d)
        except KeyError as k:
            raise DynPoseError(f"{where}: missing field {k}") from None
        except TypeError as err:
            raise DynPoseError(f"{where}: {err}") from None
        if e.role not in ROLES:
            raise DynPoseError(f"{where}: role must be one of {ROLES}, got {e.role!r}")
        if e.format not in FORMATS:
            raise DynPoseError(f"{where}: format must be one of {FORMATS}, got {e.format!r}")
        if e.precision not in PRECISIONS:
            raise DynPoseError(f"{where}: precision must be one of {PRECISIONS}, got {e.precision!r}")
        return e


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shaped a file; stored per entry so a mismatch can be explained later."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("dynpose", "torch", "onnx", "onnxruntime", "onnxslim", "tensorrt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass
class Manifest:
    """All entries of one engine directory plus the default routing policy."""

    entries: list[Entry] = field(default_factory=list)
    route: str = DEFAULT_ROUTE
    notes: dict[str, Any] = field(default_factory=dict)

    # -- lookup --------------------------------------------------------------------------------------------------
    def get(self, role: str, fmt: str | None = None) -> Entry | None:
        """The entry for a role; with `fmt`, only one of that format. Prefers a plan over ONNX when fmt is None."""
        matches = [e for e in self.entries if e.role == role and (fmt is None or e.format == fmt)]
        if not matches:
            return None
        matches.sort(key=lambda e: ("tensorrt", "onnx", "torch").index(e.format))
        return matches[0]

    def require(self, role: str, fmt: str | None = None, engine_dir: str | os.PathLike = "") -> Entry:
        e = self.get(role, fmt)
        if e is None:
            what = f"a {fmt} '{role}' entry" if fmt else f"a '{role}' entry"
            raise DynPoseError(
                f"engine dir {engine_dir}: manifest has no {what}; export one with "
                f"`dynpose-export --role {role} ... --engine-dir {engine_dir or 'engines/'}`"
            )
        return e

    def put(self, entry: Entry) -> None:
        """Add or replace the entry with the same role and format."""
        self.entries = [e for e in self.entries if not (e.role == entry.role and e.format == entry.format)]
        self.entries.append(entry)
        self.entries.sort(key=lambda e: (ROLES.index(e.role), e.format))

    # -- disk ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "route": self.route,
            "notes": self.notes,
            "entries": [e.to_dict() for e in self.entries],
        }

    def save(self, engine_dir: str | os.PathLike) -> Path:
        """Write manifest.json atomically (after the files it names are in place)."""
        path = Path(engine_dir) / MANIFEST_NAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, engine_dir: str | os.PathLike, verify: bool = True) -> Manifest:
        """Read and check a manifest. `verify` re-hashes every file (size first, then sha256)."""
        engine_dir = Path(engine_dir)
        path = engine_dir / MANIFEST_NAME
        if not engine_dir.is_dir():
            raise DynPoseError(
                f"engine dir {engine_dir}: not a directory; create one with `dynpose-export --engine-dir {engine_dir}`"
            )
        if not path.is_file():
            raise DynPoseError(
                f"engine dir {engine_dir}: no {MANIFEST_NAME}; create one with `dynpose-export --engine-dir {engine_dir}`"
            )
        d = read_json(path, "manifest", hint="re-export the engine dir")
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise DynPoseError(f"{path}: not a dynpose manifest (schema {SCHEMA!r} expected)")
        if d.get("version") != SCHEMA_VERSION:
            raise DynPoseError(
                f"{path}: manifest version {d.get('version')!r}, this dynpose reads version {SCHEMA_VERSION}; "
                "re-export with this version"
            )
        entries = [Entry.from_dict(e, where=f"{path} entry {i}") for i, e in enumerate(d.get("entries", []))]
        m = cls(entries=entries, route=d.get("route", DEFAULT_ROUTE), notes=d.get("notes", {}))
        if verify:
            m.verify(engine_dir)
        return m

    def verify(self, engine_dir: str | os.PathLike) -> None:
        engine_dir = Path(engine_dir)
        for e in self.entries:
            f = engine_dir / e.file
            if Path(e.file).is_absolute() or ".." in Path(e.file).parts:
                raise DynPoseError(f"engine dir {engine_dir}: entry {e.role} names {e.file!r} outside the dir; refused")
            if not f.is_file():
                raise DynPoseError(f"engine dir {engine_dir}: {e.role} file {e.file} is missing; re-export it")
            size = f.stat().st_size
            if size != e.size:
                raise DynPoseError(
                    f"engine dir {engine_dir}: {e.file} has {size} bytes, manifest says {e.size}; the file was altered "
                    "or replaced, re-export it"
                )
            digest = sha256_file(f)
            if digest != e.sha256:
                raise DynPoseError(
                    f"engine dir {engine_dir}: {e.file} sha256 {digest[:12]}... does not match the manifest "
                    f"({e.sha256[:12]}...); the file was altered, re-export it"
                )


def describe_file(engine_dir: str | os.PathLike, rel: str) -> dict[str, Any]:
    """size and sha256 of a file in the engine dir, as the manifest stores them."""
    f = Path(engine_dir) / rel
    return {"size": f.stat().st_size, "sha256": sha256_file(f)}
