"""The demo's shipped files (`dynpose/demo/assets/`): their sha256 index and the lossless fp16 packing of the models.

The ONNX models came from OpenVINO IR with FP16-compressed weights, so every fp32 weight they hold is exactly a
float16. They ship with those weights stored as float16 (half the size) and are rebuilt, byte for byte, as the
original fp32 files on first use (`unpack_fp16`): the rebuilt file's sha256 is checked against the original's,
recorded in the index when the assets were packed (`dynpose.demo.pack`).

`assets.json` lists every shipped file with its sha256 and size, and each packed model's fp32 sha256 and size.
`AssetIndex.verify` checks all of them before the demo uses any: a damaged or edited installation is a one-line
error, never a wrong result.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from dynpose.errors import DynPoseError
from dynpose.fileio import atomic_path, read_json, sha256_file, write_json_atomic

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
INDEX_NAME = "assets.json"
INDEX_FORMAT = 1
REINSTALL = "the installation is damaged or was edited: reinstall dynpose (pip install --force-reinstall dynpose)"


def assets_dir() -> Path:
    """The shipped assets folder, the package's `demo/assets/` (read at call time, so tests can point it at a copy)."""
    return ASSETS_DIR


@dataclass(frozen=True)
class FileInfo:
    sha256: str
    size: int

    def to_dict(self) -> dict[str, object]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class Unpacked:
    """What a packed model rebuilds into: the fp32 ONNX file's name, sha256 and size."""

    name: str
    info: FileInfo


def describe(path: Path) -> FileInfo:
    return FileInfo(sha256_file(path), path.stat().st_size)


def _file_info(d: object, where: str) -> FileInfo:
    if not isinstance(d, dict) or not isinstance(d.get("sha256"), str) or not isinstance(d.get("size"), int):
        raise DynPoseError(f"{where}: needs 'sha256' (hex) and 'size' (bytes); {REINSTALL}")
    return FileInfo(d["sha256"], d["size"])


@dataclass(frozen=True)
class AssetIndex:
    """The shipped files under `root` as `assets.json` lists them; `digest` (the index file's sha256) names this
    set of assets, so a cache built from them knows when they change."""

    root: Path
    files: dict[str, FileInfo]
    unpacked: dict[str, Unpacked]  # packed file (relative path) -> the fp32 ONNX it rebuilds
    digest: str

    @classmethod
    def load(cls, root: str | os.PathLike | None = None) -> AssetIndex:
        root = Path(root) if root is not None else assets_dir()
        path = root / INDEX_NAME
        if not path.is_file():
            raise DynPoseError(f"demo assets: {path} is missing; {REINSTALL}")
        d = read_json(path, "demo asset index", REINSTALL)
        if not isinstance(d, dict) or d.get("format") != INDEX_FORMAT or not isinstance(d.get("files"), dict):
            raise DynPoseError(f"demo asset index {path}: not format {INDEX_FORMAT} with a 'files' table; {REINSTALL}")
        files = {rel: _file_info(v, f"{path} files[{rel!r}]") for rel, v in d["files"].items()}
        unpacked = {}
        for rel, v in (d.get("unpacked") or {}).items():
            if rel not in files or not isinstance(v, dict) or not isinstance(v.get("name"), str):
                raise DynPoseError(f"{path} unpacked[{rel!r}]: names no shipped file or has no 'name'; {REINSTALL}")
            unpacked[rel] = Unpacked(v["name"], _file_info(v, f"{path} unpacked[{rel!r}]"))
        return cls(root, files, unpacked, hashlib.sha256(path.read_bytes()).hexdigest())

    def path(self, rel: str) -> Path:
        """The absolute path of a shipped file the index lists (a name it does not list is a bug here)."""
        if rel not in self.files:
            raise DynPoseError(f"demo asset {rel}: not in {self.root / INDEX_NAME}; {REINSTALL}")
        return self.root / rel

    def verify(self) -> None:
        """Every listed file exists with its size and sha256, or a one-line error naming the first that does not."""
        for rel, want in self.files.items():
            p = self.root / rel
            if not p.is_file():
                raise DynPoseError(f"demo asset {p}: missing; {REINSTALL}")
            got = describe(p)
            if got != want:
                raise DynPoseError(
                    f"demo asset {p}: sha256 {got.sha256[:16]}... ({got.size} bytes) is not the shipped "
                    f"{want.sha256[:16]}... ({want.size} bytes); {REINSTALL}"
                )

    def unpack(self, rel: str, dest_dir: str | os.PathLike) -> Path:
        """Rebuild packed model `rel` as its fp32 ONNX file in `dest_dir`; the result's sha256 is checked."""
        if rel not in self.unpacked:
            raise DynPoseError(f"demo asset {rel}: not a packed model in {self.root / INDEX_NAME}; {REINSTALL}")
        target = self.unpacked[rel]
        dst = Path(dest_dir) / target.name
        unpack_fp16(self.path(rel), dst, target.info)
        return dst


def _float_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]


def pack_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Unpacked:
    """Store an ONNX model's fp32 initializers as fp16, refusing unless that is lossless; returns what
    `unpack_fp16` must rebuild (the source's name, sha256 and size). The packed file is storage, not a runnable
    model (its graph still declares fp32 weights)."""
    src, dst = Path(src), Path(dst)
    data = src.read_bytes()
    model = onnx.load_from_string(data)
    if model.SerializeToString() != data:
        raise DynPoseError(f"{src}: its bytes are not what onnx writes back, so an unpacked copy could not be identical")
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        raise DynPoseError(f"{src}: already holds fp16 initializers; unpacking could not tell them from packed ones")
    for t in _float_initializers(model):
        a = onnx.numpy_helper.to_array(t)
        h = a.astype(np.float16)
        if not np.array_equal(h.astype(np.float32).view(np.uint32), a.view(np.uint32)):
            raise DynPoseError(f"{src}: initializer {t.name} has values float16 cannot hold exactly; ship it as fp32")
        t.ClearField("raw_data")
        t.data_type = onnx.TensorProto.FLOAT16
        t.raw_data = h.astype("<f2").tobytes()
    with atomic_path(dst) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return Unpacked(src.name, FileInfo(hashlib.sha256(data).hexdigest(), len(data)))


def unpack_fp16(packed: str | os.PathLike, dst: str | os.PathLike, want: FileInfo) -> None:
    """Rebuild the fp32 ONNX file `pack_fp16` packed, atomically at `dst`, and check it is the original byte for
    byte (`want`); a mismatch writes nothing and is a one-line error."""
    model = onnx.load(str(packed))
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT16:
            a = np.frombuffer(t.raw_data, dtype="<f2").astype("<f4")
            t.data_type = onnx.TensorProto.FLOAT
            t.raw_data = a.tobytes()
    data = model.SerializeToString()
    got = FileInfo(hashlib.sha256(data).hexdigest(), len(data))
    if got != want:
        raise DynPoseError(
            f"demo model {packed}: rebuilt as sha256 {got.sha256[:16]}... ({got.size} bytes), not the original "
            f"{want.sha256[:16]}... ({want.size} bytes); {REINSTALL}"
        )
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)


def write_index(root: str | os.PathLike, unpacked: dict[str, Unpacked]) -> Path:
    """Write `assets.json` for every file under `root` (but itself and the README), with the packed models' fp32
    targets; the maintainers' step after changing a shipped file (`python -m dynpose.demo.pack`)."""
    root = Path(root)
    skip = {INDEX_NAME, "README.md"}
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name not in skip)
    index = {
        "format": INDEX_FORMAT,
        "files": {rel: describe(root / rel).to_dict() for rel in rels},
        "unpacked": {rel: {"name": u.name, **u.info.to_dict()} for rel, u in sorted(unpacked.items())},
    }
    write_json_atomic(root / INDEX_NAME, index)
    return root / INDEX_NAME
