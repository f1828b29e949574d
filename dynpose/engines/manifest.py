"""The engine directory's manifest: the only file `dynpose-run` needs.

`manifest.json` lists one entry per role (router, small, large, optionally detector). Each entry carries the model
card, the file's size and sha256, the export checks' figures and the tool versions. Loading re-hashes every file and
refuses a directory whose files are missing or altered, so a plan copied from elsewhere is checked before use.
An ONNX entry whose weights live in external data files (`*.onnx.data`, any `location` in its tensors) lists them
in `data_files` with their size and sha256, and they are checked the same way; so does an OpenVINO IR entry (its
`.xml` is the `file`, its `.bin` weights the one data file).

`commit_staged` changes the files and the manifest together: new files come in under new, content-derived names
(`large.<sha12>.onnx`), the manifest naming them is written atomically, and only then are the files nobody names
any more removed. A crash at any point leaves the old manifest with its old files, or the new one with its new
files; both load.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from dynpose.engines.lock import engine_dir_lock
from dynpose.errors import DynPoseError
from dynpose.fileio import read_json, sha256_file, write_bytes_atomic, write_json_atomic
from dynpose.models.card import ModelCard
from dynpose.roles import ROLE_NAMES, Role

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

SCHEMA = "dynpose.manifest"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ROLES = ROLE_NAMES
# "torch": a zoo model's state_dict (.pt) beside its ONNX, for the PyTorch backend (CPU or CUDA without TensorRT).
# "openvino": an OpenVINO IR, its `.xml` as `file` and its `.bin` weights in `data_files`.
FORMATS = ("onnx", "tensorrt", "torch", "openvino")
# bf16: OpenVINO IRs only (a CPU inference precision; the IR keeps f32 weights).
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# `Manifest.get(role)` without a format prefers them in this order.
FORMAT_PREFERENCE = ("tensorrt", "onnx", "openvino", "torch")
DEFAULT_ROUTE = "band:0.59,0.69"
# notes["costs"]["<backend>/<device>"]: per-crop costs measured on this machine (`dynpose.bench.costs`, written by
# `dynpose-bench --store-costs`); a role's figures hold only while its entry's sha256 is the one timed.
COSTS_NOTE = "costs"
# notes["router_calibration"]: how `dynpose-train-router --calibrate` chose the route (`RouteCalibration`).
CALIBRATION_NOTE = "router_calibration"
COST_PARTS = ("crop", "infer", "decode", "total")


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _short(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _check_rel(rel: object, what: str, where: str) -> str:
    """A path inside the engine dir: a non-empty relative path without `..` (an entry cannot name files elsewhere)."""
    if not isinstance(rel, str) or not rel:
        raise DynPoseError(f"{where}: {what} must be a non-empty relative path, got {_short(rel)}")
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or Path(rel).is_absolute():
        raise DynPoseError(f"{where}: {what} {rel!r} points outside the engine dir; refused")
    return rel


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_file_info(info: object, where: str) -> None:
    """{size, sha256} as `describe_file` writes them."""
    if not isinstance(info, dict) or not _is_int(info.get("size")) or info["size"] < 0:
        raise DynPoseError(f"{where}: needs {{'size': bytes, 'sha256': hex}}, got {_short(info)}")
    if not isinstance(info.get("sha256"), str) or not _SHA256.match(info["sha256"]):
        raise DynPoseError(f"{where}: 'sha256' must be 64 hex digits, got {_short(info.get('sha256'))}")


# Field -> type of the JSON value (None allowed where the dataclass default is None).
_STR_FIELDS = ("role", "model", "file", "format", "precision", "input_name", "output_name")
_DICT_FIELDS = ("checks", "versions", "data_files")
_OPTIONAL_FIELDS = {"checkpoint_sha256": str, "tensorrt": dict, "openvino": dict, "source": str}


def _check_fields(d: dict[str, Any], where: str) -> None:
    """Types and ranges of an entry's JSON fields, each a one-line error naming the field."""
    for k in _STR_FIELDS:
        if k in d and (not isinstance(d[k], str) or not d[k]):
            raise DynPoseError(f"{where}: {k!r} must be a non-empty string, got {_short(d[k])}")
    for k in _DICT_FIELDS:
        if k in d and not isinstance(d[k], dict):
            raise DynPoseError(f"{where}: {k!r} must be an object, got {_short(d[k])}")
    for k, t in _OPTIONAL_FIELDS.items():
        if d.get(k) is not None and not isinstance(d[k], t):
            kind = "a string" if t is str else "an object"
            raise DynPoseError(f"{where}: {k!r} must be {kind} or null, got {_short(d[k])}")
    for k in ("min_batch", "max_batch"):
        if k in d and (not _is_int(d[k]) or d[k] < 1):
            raise DynPoseError(f"{where}: {k!r} must be an integer >= 1, got {_short(d[k])}")
    if d.get("min_batch", 1) > d.get("max_batch", 64):
        raise DynPoseError(f"{where}: 'min_batch' {d.get('min_batch', 1)} is above 'max_batch' {d.get('max_batch', 64)}")
    if "size" in d and (not _is_int(d["size"]) or d["size"] < 0):
        raise DynPoseError(f"{where}: 'size' must be a byte count (integer >= 0), got {_short(d['size'])}")
    if "sha256" in d and (not isinstance(d["sha256"], str) or not _SHA256.match(d["sha256"])):
        raise DynPoseError(f"{where}: 'sha256' must be 64 hex digits, got {_short(d['sha256'])}")
    if "file" in d:
        _check_rel(d["file"], "'file'", where)
    if d.get("source") is not None:
        _check_rel(d["source"], "'source'", where)
    for name, info in d.get("data_files", {}).items():
        _check_rel(name, "data file", where)
        _check_file_info(info, f"{where} data file {name!r}")


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
    source: str | None = None  # the ONNX this plan or IR was made from (relative), for plans and IRs
    # ONNX external data, an IR's .bin: engine-dir-relative path -> {"size", "sha256"}; verified on load like `file`.
    data_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # IR only: OpenVINO version, CPU instruction set, inference precision, layers kept in f32, what the export timed
    openvino: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["card"] = self.card.to_dict()
        # manifests without external data or IRs stay as older dynpose versions wrote them
        if not self.data_files:
            del d["data_files"]
        if self.openvino is None:
            del d["openvino"]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Entry:
        if not isinstance(d, dict):
            raise DynPoseError(f"{where}: expected an entry object {{role, model, file, ...}}, got {_short(d)}")
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)}, key=str)
        if unknown:
            raise DynPoseError(f"{where}: unknown field(s) {unknown}; written by a newer dynpose? re-export the engine dir")
        _check_fields(d, where)
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

    def files(self) -> list[str]:
        """Every engine-dir file this entry needs: its `file` and its external data files."""
        return [self.file, *self.data_files]


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shaped a file; stored per entry so a mismatch can be explained later."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("dynpose", "torch", "onnx", "onnxruntime", "onnxslim", "tensorrt", "openvino", "nncf"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _positive_ms(v: object, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise DynPoseError(f"{where}: must be a finite number of ms >= 0, got {_short(v)}")
    return float(v)


@dataclass(frozen=True)
class RoleCosts:
    """One model's measured per-crop costs: per batch size, ms of each part (crop, infer, decode, total)."""

    file: str
    sha256: str
    precision: str
    ms: dict[int, dict[str, float]]
    threads: dict[int, int | None] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> RoleCosts:
        if not isinstance(d, dict) or not isinstance(d.get("ms"), dict) or not d["ms"]:
            raise DynPoseError(f"{where}: expected {{file, sha256, precision, ms: {{batch: parts}}}}, got {_short(d)}")
        ms: dict[int, dict[str, float]] = {}
        for b, parts in d["ms"].items():
            if not str(b).isdigit() or int(b) < 1 or not isinstance(parts, dict):
                raise DynPoseError(f"{where}: 'ms' must map batch sizes to part costs, got {_short(b)}: {_short(parts)}")
            ms[int(b)] = {k: _positive_ms(parts.get(k), f"{where} ms[{b}].{k}") for k in COST_PARTS}
            if ms[int(b)]["total"] <= 0:
                raise DynPoseError(f"{where}: ms[{b}].total must be > 0, got {ms[int(b)]['total']}")
        threads: dict[Any, Any] = d["threads"] if isinstance(d.get("threads"), dict) else {}
        return cls(
            str(d.get("file", "")),
            str(d.get("sha256", "")),
            str(d.get("precision", "")),
            ms,
            {int(b): t if isinstance(t, int) else None for b, t in threads.items() if str(b).isdigit()},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "precision": self.precision,
            "threads": {str(b): t for b, t in self.threads.items()},
            "ms": {str(b): dict(p) for b, p in self.ms.items()},
        }


@dataclass(frozen=True)
class CostRecord:
    """Per-crop costs of an engine dir's models measured on one machine and backend/device (`dynpose.bench.costs`
    measures them; the runtime and calibration read them to say what a route costs)."""

    backend: str
    device: str
    roles: dict[Role, RoleCosts]
    shared_crop: bool = False  # the router's crops serve the large model (its crop is then free)
    measured: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    repeats: int = 0

    def ms(self, role: Role, batch: int, part: str = "total") -> float | None:
        """A role's ms per crop at the measured batch nearest `batch`; None when the role was not measured."""
        r = self.roles.get(role)
        if r is None:
            return None
        nearest = min(r.ms, key=lambda b: abs(b - batch))
        return r.ms[nearest][part]

    @property
    def batches(self) -> list[int]:
        return sorted({b for r in self.roles.values() for b in r.ms})

    @classmethod
    def from_dict(cls, d: Any, where: str) -> CostRecord:
        if not isinstance(d, dict) or not isinstance(d.get("roles"), dict):
            raise DynPoseError(f"{where}: expected a cost record {{backend, device, roles}}, got {_short(d)}")
        roles = {}
        for name, rc in d["roles"].items():
            role = Role.parse(name, f"{where} roles")
            roles[role] = RoleCosts.from_dict(rc, f"{where} roles.{role.value}")
        return cls(
            str(d.get("backend", "")),
            str(d.get("device", "")),
            roles,
            bool(d.get("shared_crop", False)),
            str(d.get("measured", "")),
            d["machine"] if isinstance(d.get("machine"), dict) else {},
            d["repeats"] if _is_int(d.get("repeats")) else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "measured": self.measured,
            "machine": self.machine,
            "backend": self.backend,
            "device": self.device,
            "batches": self.batches,
            "repeats": self.repeats,
            "shared_crop": self.shared_crop,
            "roles": {r.value: c.to_dict() for r, c in self.roles.items()},
        }


@dataclass(frozen=True)
class RouteCalibration:
    """How a route was chosen: the policy, the share of persons it sends to the large model on the calibration
    data, and the figures of the calibration (target, AP or agreement, costs, per-family winners) as written."""

    policy: str
    fraction: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> RouteCalibration:
        if not isinstance(d, dict) or not isinstance(d.get("policy"), str) or not d["policy"]:
            raise DynPoseError(f"{where}: expected {{policy, fraction, ...}}, got {_short(d)}")
        f = d.get("fraction")
        ok = isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and 0.0 <= f <= 1.0
        if f is not None and not ok:
            raise DynPoseError(f"{where}: 'fraction' must be a share in [0, 1], got {_short(f)}")
        return cls(
            d["policy"], float(f) if f is not None else None, {k: v for k, v in d.items() if k not in ("policy", "fraction")}
        )

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "fraction": self.fraction, **self.figures}


@dataclass
class Manifest:
    """All entries of one engine directory plus the default routing policy."""

    entries: list[Entry] = field(default_factory=list)
    route: str = DEFAULT_ROUTE
    notes: dict[str, Any] = field(default_factory=dict)
    engine_dir: Path | None = field(default=None, compare=False)  # where it was loaded from (not written)

    # -- lookup --------------------------------------------------------------------------------------------------
    def get(self, role: str, fmt: str | None = None) -> Entry | None:
        """The entry for a role; with `fmt`, only one of that format. Prefers a plan over ONNX when fmt is None."""
        matches = [e for e in self.entries if e.role == role and (fmt is None or e.format == fmt)]
        if not matches:
            return None
        matches.sort(key=lambda e: FORMAT_PREFERENCE.index(e.format))
        return matches[0]

    def require(self, role: str, fmt: str | None = None, engine_dir: str | os.PathLike = "") -> Entry:
        e = self.get(role, fmt)
        if e is None:
            what = f"{fmt} '{role}' entry" if fmt else f"'{role}' entry"
            raise DynPoseError(
                f"engine dir {engine_dir}: manifest has no {what}; export one with "
                f"`dynpose-export --role {role} ... --engine-dir {engine_dir or 'engines/'}`"
            )
        return e

    def costs(self, backend: str, device: str) -> CostRecord | None:
        """The per-crop costs measured for backend/device (`notes.costs`), keeping only the roles whose entry is
        still the file that was timed (same sha256); None when nothing stored still applies. A record that is not
        what `dynpose-bench --store-costs` writes (zero, negative or non-numeric figures, another shape) is left
        out with a warning: a cost that is not a measurement is never printed as one."""
        stored = self.notes.get(COSTS_NOTE)
        raw = stored.get(f"{backend}/{device}") if isinstance(stored, dict) else None
        if raw is None:
            return None
        try:
            rec = CostRecord.from_dict(raw, f"manifest notes.costs[{backend}/{device}]")
        except DynPoseError as e:
            log.warning("%s; ignoring the stored costs (measure them again: dynpose-bench --store-costs)", e)
            return None
        current = {(e.role, e.sha256) for e in self.entries}
        roles = {r: c for r, c in rec.roles.items() if (r, c.sha256) in current}
        return replace(rec, roles=roles) if roles else None

    def set_costs(self, record: CostRecord) -> None:
        """Store measured costs for the record's backend/device (replacing earlier ones); `save` writes them."""
        stored = self.notes.get(COSTS_NOTE)
        key = f"{record.backend}/{record.device}"
        self.notes[COSTS_NOTE] = {**(stored if isinstance(stored, dict) else {}), key: record.to_dict()}

    @property
    def calibration(self) -> RouteCalibration | None:
        """How the stored route was chosen (`dynpose-train-router --calibrate`), or None."""
        raw = self.notes.get(CALIBRATION_NOTE)
        if not raw:
            return None
        try:
            return RouteCalibration.from_dict(raw, "manifest notes.router_calibration")
        except DynPoseError as e:
            log.warning("%s; ignoring it (calibrate again: dynpose-train-router --calibrate)", e)
            return None

    def set_calibration(self, cal: RouteCalibration) -> None:
        """Store a calibration and make its policy the engine dir's route; `save` writes them."""
        self.route = cal.policy
        self.notes[CALIBRATION_NOTE] = cal.to_dict()

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
        raw = d.get("entries", [])
        if not isinstance(raw, list):
            raise DynPoseError(f"{path}: 'entries' must be a list of entry objects, got {_short(raw)}; re-export it")
        route, notes = d.get("route", DEFAULT_ROUTE), d.get("notes", {})
        if not isinstance(route, str) or not route:
            raise DynPoseError(f"{path}: 'route' must be a policy string such as {DEFAULT_ROUTE!r}, got {_short(route)}")
        if not isinstance(notes, dict):
            raise DynPoseError(f"{path}: 'notes' must be an object, got {_short(notes)}")
        entries = [Entry.from_dict(e, where=f"{path} entry {i}") for i, e in enumerate(raw)]
        m = cls(entries=entries, route=route, notes=notes, engine_dir=engine_dir)
        if verify:
            m.verify(engine_dir)
        return m

    def verify(self, engine_dir: str | os.PathLike) -> None:
        """Check every named file (and external data file) by size, then sha256; an ONNX entry's file must not use
        external data the entry does not list (its weights would go unchecked)."""
        engine_dir = Path(engine_dir)
        for e in self.entries:
            where = f"engine dir {engine_dir}"
            _check_rel(e.file, f"entry {e.role} file", where)
            found_location = _verify_file(engine_dir, e.file, {"size": e.size, "sha256": e.sha256}, e.role)
            for name, info in e.data_files.items():
                _check_rel(name, f"entry {e.role} data file", where)
                _verify_file(engine_dir, name, info, f"{e.role} data")
            if e.format == "onnx" and found_location:
                undeclared = sorted(set(data_file_names(engine_dir, e.file)) - set(e.data_files))
                if undeclared:
                    raise DynPoseError(
                        f"{where}: {e.file} reads external data {undeclared} that the manifest does not list, so "
                        "its weights cannot be checked; re-export it with this dynpose"
                    )
            if e.format == "openvino" and not any(n.endswith(".bin") for n in e.data_files):
                raise DynPoseError(
                    f"{where}: the {e.role} IR {e.file} has no .bin weights file in the manifest, so its weights "
                    "cannot be checked; re-export it with dynpose-export --format openvino"
                )


# The bytes an ONNX file holds when a tensor names external data: the `location` key of a StringStringEntryProto
# (field 1, length 8). Seen while hashing, so only such files are parsed to list their data files.
_LOCATION_KEY = b"\x0a\x08location"


@contextmanager
def updating_manifest(engine_dir: str | os.PathLike, task: str, verify: bool = False) -> Iterator[Manifest]:
    """A read-modify-write of the manifest under the engine dir's write lock (`dynpose.engines.lock`): yields the
    manifest as it is now (another writer's changes included) and saves it, atomically, when the block ends without
    an exception. `task` names the change for a writer that has to wait."""
    with engine_dir_lock(engine_dir, task):
        manifest = Manifest.load(engine_dir, verify=verify)
        yield manifest
        manifest.save(engine_dir)


def _hash_and_find(path: Path, needle: bytes, chunk: int = 1 << 20) -> tuple[str, bool]:
    """sha256 of a file and whether `needle` occurs in it, in one read."""
    h = hashlib.sha256()
    found, tail = False, b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            found = found or needle in tail + block
            tail = block[-(len(needle) - 1) :]
    return h.hexdigest(), found


def _verify_file(engine_dir: Path, rel: str, info: dict[str, Any], what: str) -> bool:
    """Size then sha256 of one file against the manifest; returns whether it may name external data."""
    f = engine_dir / rel
    if not f.is_file():
        raise DynPoseError(f"engine dir {engine_dir}: {what} file {rel} is missing; re-export it")
    size = f.stat().st_size
    if size != info["size"]:
        raise DynPoseError(
            f"engine dir {engine_dir}: {rel} has {size} bytes, manifest says {info['size']}; the file was altered "
            "or replaced, re-export it"
        )
    digest, found = _hash_and_find(f, _LOCATION_KEY)
    if digest != info["sha256"]:
        raise DynPoseError(
            f"engine dir {engine_dir}: {rel} sha256 {digest[:12]}... does not match the manifest "
            f"({info['sha256'][:12]}...); the file was altered, re-export it"
        )
    return found


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph stores: initializers, sparse initializers, node attributes, subgraphs (If/Loop bodies)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Any) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _graph_tensors(a.g)
            for g in a.graphs:
                yield from _graph_tensors(g)


def _model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for fn in model.functions:
        yield from _node_tensors(fn.node)


def _load_proto(path: Path) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DynPoseError(f"ONNX model {path}: not a readable ONNX file ({first})") from None


def onnx_external_data(path: str | os.PathLike) -> list[str]:
    """The external data files an ONNX file reads, as its tensors' `location`s (relative to the file's folder).

    A location that is absolute or climbs out of the folder (`..`) is refused: an engine dir must be self-contained
    and every file in it hashed."""
    import onnx

    path = Path(path)
    out: set[str] = set()
    for t in _model_tensors(_load_proto(path)):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = {kv.key: kv.value for kv in t.external_data}.get("location", "")
        _check_rel(loc, f"external data location of tensor {t.name!r}", f"ONNX model {path}")
        out.add(loc)
    return sorted(out)


def data_file_names(base_dir: str | os.PathLike, rel: str) -> list[str]:
    """The external data files of the ONNX file `rel` (relative to `base_dir`), as `base_dir`-relative paths."""
    parent = PurePosixPath(rel).parent
    return [str(parent / loc) for loc in onnx_external_data(Path(base_dir) / rel)]


def describe_file(engine_dir: str | os.PathLike, rel: str) -> dict[str, Any]:
    """size and sha256 of a file in the engine dir, as the manifest stores them, plus `data_files` (name -> {size,
    sha256}) for an ONNX file whose weights are external data (empty otherwise). Set both on the entry:
    `e.size, e.sha256, e.data_files = info["size"], info["sha256"], info["data_files"]`."""
    engine_dir = Path(engine_dir)
    f = engine_dir / rel
    digest, found = _hash_and_find(f, _LOCATION_KEY)
    data: dict[str, dict[str, Any]] = {}
    if found and f.suffix.lower() == ".onnx":
        for name in data_file_names(engine_dir, rel):
            d = engine_dir / name
            if not d.is_file():
                raise DynPoseError(f"ONNX model {f}: its external data file {name} is missing; save it beside the model")
            data[name] = {"size": d.stat().st_size, "sha256": sha256_file(d)}
    return {"size": f.stat().st_size, "sha256": digest, "data_files": data}


# -- commit: files and manifest change together ---------------------------------------------------------------------
_TAG = re.compile(r"\.[0-9a-f]{12}$")
# Hook called before each step of `commit_staged`: ("move", name), ("manifest", "manifest.json"), ("remove", name).
StepHook = Callable[[str, str], None]


def content_name(rel: str, sha256: str) -> str:
    """`large.onnx` -> `large.<first 12 hex of sha256>.onnx` (`.onnx.data` counts as one suffix). Names that depend
    on the content never collide with a different file, so a commit never overwrites a file the old state uses."""
    p = PurePosixPath(rel)
    suffix = ".onnx.data" if p.name.endswith(".onnx.data") else p.suffix
    stem = p.name[: len(p.name) - len(suffix)] if suffix else p.name
    stem = _TAG.sub("", stem)  # a committed name re-staged keeps one tag
    return str(p.with_name(f"{stem}.{sha256[:12]}{suffix}"))


def _relocate(onnx_path: Path, renames: dict[str, str]) -> None:
    """Point the ONNX file's external-data `location`s at the renamed data files (rewritten in place, atomically)."""
    import onnx

    model = _load_proto(onnx_path)
    for t in _model_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location" and kv.value in renames:
                    kv.value = renames[kv.value]
    write_bytes_atomic(onnx_path, model.SerializeToString())


def _name_staged(stage: Path, e: Entry) -> list[tuple[str, str]]:
    """Give a staged entry its final names and hashes (data files first, then the file that reads them); returns the
    (staged name, final name) moves, data files first."""
    moves: list[tuple[str, str]] = []
    data: dict[str, dict[str, Any]] = {}
    if e.format == "openvino":
        moves, data = _name_ir_weights(stage, e.file)
    elif (stage / e.file).suffix.lower() == ".onnx":
        parent = PurePosixPath(e.file).parent
        renames = {}
        for loc in onnx_external_data(stage / e.file):
            staged = str(parent / loc)
            if not (stage / staged).is_file():
                raise DynPoseError(f"ONNX model {stage / e.file}: its external data file {loc} is missing beside it")
            digest = sha256_file(stage / staged)
            info = {"size": (stage / staged).stat().st_size, "sha256": digest}
            final = content_name(staged, digest)
            renames[loc] = str(PurePosixPath(loc).with_name(PurePosixPath(final).name))  # relative to the ONNX
            data[final] = info
            moves.append((staged, final))
        if any(k != v for k, v in renames.items()):
            _relocate(stage / e.file, renames)
    sha = sha256_file(stage / e.file)
    final = content_name(e.file, sha)
    moves.append((e.file, final))
    e.file, e.size, e.sha256, e.data_files = final, (stage / e.file).stat().st_size, sha, data
    return moves


def _name_ir_weights(stage: Path, xml: str) -> tuple[list[tuple[str, str]], dict[str, dict[str, Any]]]:
    """The staged IR's `.bin` (same stem as the `.xml`, as OpenVINO writes it) under its content name: the move and
    the `data_files` record. The `.xml` does not name its `.bin` (the runner passes both paths), so nothing is
    rewritten."""
    staged = str(PurePosixPath(xml).with_suffix(".bin"))
    if not (stage / staged).is_file():
        raise DynPoseError(f"OpenVINO IR {stage / xml}: its weights file {PurePosixPath(staged).name} is missing beside it")
    digest = sha256_file(stage / staged)
    final = content_name(staged, digest)
    return [(staged, final)], {final: {"size": (stage / staged).stat().st_size, "sha256": digest}}


def _named_files(engine_dir: Path) -> set[str]:
    """Files the engine dir's current manifest names (empty when there is none or it is unreadable: then nothing
    is known to be ours, and nothing is removed)."""
    try:
        return {f for e in Manifest.load(engine_dir, verify=False).entries for f in e.files()}
    except DynPoseError:
        return set()


def current_manifest(engine_dir: str | os.PathLike) -> Manifest:
    """The engine dir's manifest as it is (files not re-hashed); an empty one when there is none or it is
    unreadable (then replaced, with a warning): what a writer builds on."""
    engine_dir = Path(engine_dir)
    if not (engine_dir / MANIFEST_NAME).is_file():
        return Manifest()
    try:
        return Manifest.load(engine_dir, verify=False)
    except DynPoseError as err:
        log.warning("replacing an unreadable manifest (%s)", err)
        return Manifest()


def commit_staged(
    engine_dir: str | os.PathLike,
    stage: str | os.PathLike,
    entries: Sequence[Entry],
    manifest: Manifest | None = None,
    on_step: StepHook | None = None,
) -> Manifest:
    """Move staged files into the engine dir and switch the manifest to them, so any crash leaves a loadable dir.

    `entries` name their files relative to `stage` (a folder inside `engine_dir`: the moves are same-filesystem
    renames). Each file, and each external data file an ONNX reads, comes in under a new content name
    (`content_name`); the entries get those names, sizes, sha256s and `data_files`, and a plan's `source` follows
    a renamed ONNX. The entries are put into `manifest` (default: the engine dir's current one; same role+format
    replaced), it is written atomically, and only then are the files the previous manifest named and the new one
    does not removed. A failure before the manifest is written removes the files this call moved in, so the old
    state stays as it was; `on_step(step, name)` runs before every move, the manifest write and every removal
    (tests raise from it to stand for a crash there). Returns the manifest written.
    """
    # Under the engine dir's lock: another writer's commit between reading the manifest and writing it would be lost
    # (or would lose files this commit removes as no longer named).
    with engine_dir_lock(engine_dir, "commit " + ", ".join(sorted({str(e.role) for e in entries}))):
        return _commit_locked(Path(engine_dir), Path(stage), entries, manifest, on_step)


def _drop_other_models(manifest: Manifest, entries: Sequence[Entry], engine_dir: Path) -> None:
    """A role re-exported as another model drops that role's entries of the old model in other formats (its IR,
    plan or torch entry): every backend must run the same model for a role."""
    new = {e.role: e.model for e in entries}
    stale = [e for e in manifest.entries if e.role in new and e.model != new[e.role]]
    for e in stale:
        log.warning(
            "%s: the %s entry (%s) was %s, now %s is; removed it (export %s again in that format if you need it)",
            *(engine_dir, e.role, e.format, e.model, new[e.role], new[e.role]),
        )
    manifest.entries = [e for e in manifest.entries if e not in stale]


def _commit_locked(
    engine_dir: Path, stage: Path, entries: Sequence[Entry], manifest: Manifest | None, on_step: StepHook | None
) -> Manifest:
    hook = on_step or (lambda step, name: None)
    previous = _named_files(engine_dir)
    manifest = manifest if manifest is not None else current_manifest(engine_dir)
    staged_names = {e.file: e for e in entries}
    moves: list[tuple[str, str]] = []
    for e in entries:
        moves += _name_staged(stage, e)
    renamed = dict(moves)
    for e in entries:
        if e.source is not None and e.source in staged_names:
            e.source = renamed[e.source]
    moved: list[str] = []
    try:
        for src, dst in moves:
            hook("move", dst)
            (engine_dir / dst).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / src, engine_dir / dst)
            moved.append(dst)
        for e in entries:
            manifest.put(e)
        _drop_other_models(manifest, entries, engine_dir)
        hook("manifest", MANIFEST_NAME)
        manifest.save(engine_dir)
    except BaseException:
        for dst in moved:
            if dst not in previous:  # a same-content file the old manifest names stays
                (engine_dir / dst).unlink(missing_ok=True)
        raise
    still_named = {f for e in manifest.entries for f in e.files()}
    for f in sorted(previous - still_named):
        hook("remove", f)
        try:
            (engine_dir / f).unlink(missing_ok=True)
        except OSError as err:  # the new state is in place; a leftover file only takes space
            log.warning("could not remove %s, which the manifest no longer names: %s", engine_dir / f, err)
    return manifest
