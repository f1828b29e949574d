"""Small file helpers shared by every part that writes: atomic writes, strict JSON and content hashes.

An atomic write goes to a temp file beside the destination and is renamed onto it, so readers see the old file or
the new one, never half of one. Around that rename this module decides the cases a plain `os.replace` gets wrong:
  - a destination that is not a regular file (a device such as /dev/full, a FIFO, a folder) is refused: renaming a
    regular file onto it would silently replace the device node or the pipe;
  - a symlink is kept: the new content is renamed onto the link's target, so the link still points at it;
  - the new file gets the mode any other file gets (0666 less the process umask, or the mode of the file it
    replaces), not mkstemp's 0600;
  - disk full, a read-only filesystem, a file-size limit or a permission error become one-line `DynPoseError`s,
    and the temp file is removed, so nothing partial is left.

Before any of that, a command asks `OutputGuard` whether an output may go where the user pointed it: never onto a
file the command reads (the same file after symlinks and hard links), never inside an engine dir it reads, and
drawings never into the folder their images come from.

Every JSON input is parsed by `parse_json` / `read_json`: a document nested deeper than the parser's recursion
allows or an integer longer than Python converts (4300 digits) is a one-line error, as malformed JSON is.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynpose.errors import DynPoseError

# OSErrors that mean "this destination cannot take the write"; anything else raised while writing stays as it is.
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device (disk full); free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.EFBIG: "file too large for this filesystem or the process's file-size limit (ulimit -f)",
    errno.EROFS: "read-only filesystem; write elsewhere",
    errno.EACCES: "permission denied; write to a folder you can write to",
    errno.EPERM: "operation not permitted; write to a folder you can write to",
}
# Raised while the caller fills the temp file these can only come from the write; permission errors there may come
# from something the caller reads, so only the steps this module does itself turn those into DynPoseErrors.
_BODY_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB plans do not sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def write_error(e: OSError, dest: str | os.PathLike) -> DynPoseError | None:
    """The one-line DynPoseError for an OSError that means `dest` cannot be written, else None."""
    why = _WRITE_ERRORS.get(e.errno or 0)
    return DynPoseError(f"cannot write {dest}: {why}; nothing was written") if why else None


def _existing_mode(target: Path, dest: Path) -> int | None:
    """Permission bits of the regular file at `target`, None if there is none; refuse anything else."""
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):  # nothing there yet (a file in the folder path: mkdir says so)
        return None
    except OSError as e:
        raise write_error(e, dest) or e from None
    if not stat.S_ISREG(st.st_mode):
        raise DynPoseError(
            f"cannot write {dest}: it is {_kind(st.st_mode)}, not a regular file; refusing to replace it "
            "(give the path of a file)"
        )
    return stat.S_IMODE(st.st_mode)


def resolve_target(dest: str | os.PathLike) -> Path:
    """The file a write to `dest` should replace: `dest` itself, or the final target when it is a symlink."""
    p = Path(dest)
    return Path(os.path.realpath(p)) if p.is_symlink() else p


def make_temp_beside(dest: str | os.PathLike, suffix: str = ".tmp") -> tuple[Path, Path]:
    """(temp file, target): an empty temp file in the target's folder, created with the umask's mode like any new
    file. `target` is `dest` or its symlink's target; refuses a target that exists and is not a regular file."""
    dest = Path(dest)
    target = resolve_target(dest)
    _existing_mode(target, dest)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DynPoseError(f"cannot write {dest}: {target.parent} or a folder above it exists and is not a folder") from None
    except OSError as e:
        raise write_error(e, dest) or e from None
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}{suffix}"
        try:
            # O_EXCL: never reuse someone else's file; mode 0o666 lets the kernel apply the umask as for any file.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise write_error(e, dest) or e from None
        os.close(fd)
        return tmp, target
    raise DynPoseError(f"cannot write {dest}: no free temp name in {target.parent}")  # pragma: no cover


def replace_into(tmp: Path, target: Path, dest: str | os.PathLike | None = None) -> None:
    """Rename a finished temp file onto `target` (from `make_temp_beside`), keeping the mode of a file it replaces."""
    dest = dest if dest is not None else target
    try:
        mode = _existing_mode(target, Path(dest))
        if mode is not None:
            os.chmod(tmp, mode)
        # the data on disk before the name: after a power cut a renamed-in file must not come back empty
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as e:
        raise write_error(e, dest) or e from None


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is renamed onto `dest`, on error removed.

    The temp file lives in the destination folder so the final `os.replace` is a same-filesystem rename, which
    is atomic. `suffix` ends the temp name (a writer that picks its format by suffix needs `.tmp.mp4`). See the
    module note for symlinks, non-regular destinations, modes and write errors.
    """
    tmp, target = make_temp_beside(dest, suffix)
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno in _BODY_ERRORS:
                raise write_error(e, dest) or e from None
            raise
        replace_into(tmp, target, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(dest: str | os.PathLike, data: bytes | memoryview) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def _nonfinite_at(obj: Any, where: str = "") -> tuple[str, float] | None:
    """Where the first NaN or infinity sits in a JSON-like object (as `[3]['keypoints'][7]`), else None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "the value", obj)
    if isinstance(obj, dict):
        items: Any = ((f"{where}[{k!r}]", v) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for w, v in items:
        found = _nonfinite_at(v, w)
        if found is not None:
            return found
    return None


def dumps_json(obj: Any, indent: int | None = None, what: str = "JSON") -> str:
    """json.dumps that refuses NaN and infinities (JSON has no such numbers; Python would write `NaN`, which
    other readers reject) with a DynPoseError naming where the value sits."""
    try:
        return json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError:
        found = _nonfinite_at(obj)
        if found is None:
            raise
        where, v = found
        raise DynPoseError(
            f"{what}: {where} is {v}, which JSON cannot hold; nothing was written (a non-finite value "
            "upstream: check the inputs that produced it)"
        ) from None


def write_json_atomic(dest: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically; refuses NaN/infinity (see `dumps_json`) before touching `dest`."""
    write_bytes_atomic(dest, (dumps_json(obj, indent=2, what=f"cannot write {dest}") + "\n").encode())


def parse_json(text: str | bytes, what: str, hint: str = "") -> Any:
    """Parse JSON text, or raise a one-line DynPoseError starting with `what` (the file or request it came from).

    Besides malformed text this refuses what makes Python's parser itself fail: nesting deeper than its recursion
    limit (`[[[[...` 100,000 levels: a RecursionError) and integers of more than 4300 digits (a ValueError);
    both would otherwise escape every reader as a traceback. Numbers past float range (`1e999`) parse as
    infinity, which each reader's validator refuses or drops like NaN."""
    tail = f"; {hint}" if hint else ""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" ({e.msg} at line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise DynPoseError(f"{what}: not valid JSON{where}{tail}") from None
    except RecursionError:
        raise DynPoseError(
            f"{what}: JSON nested too deeply (arrays/objects inside each other past the parser's limit){tail}"
        ) from None
    except ValueError as e:  # int() past sys.get_int_max_str_digits(); json raises no other ValueError
        why = str(e).split(":")[0] if "digits" in str(e) else str(e)
        raise DynPoseError(f"{what}: a number in the JSON is too long ({why}){tail}") from None


def read_json(path: str | os.PathLike, what: str, hint: str = "") -> Any:
    """Parse a JSON file (`parse_json`), or raise a one-line DynPoseError naming the kind of file (`what`), the file
    and where it broke."""
    p = Path(path)
    if not p.is_file():
        raise DynPoseError(f"{what} {p}: file not found")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DynPoseError(f"{what} {p}: cannot be read ({e.strerror or e})") from None
    return parse_json(data, f"{what} {p}", hint)


# -- where outputs may go -------------------------------------------------------------------------------------------
PathArg = str | os.PathLike | None


def _file_id(p: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what `p` names after symlinks; None when nothing is there."""
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _ancestors(p: Path) -> Iterator[Path]:
    """`p` after resolving the symlinks of its existing part, then each folder above it up to the root."""
    real = Path(os.path.realpath(p))
    yield real
    yield from real.parents


def _named(pairs: Mapping[str, PathArg | Iterable[PathArg]]) -> tuple[tuple[str, Path], ...]:
    out: list[tuple[str, Path]] = []
    for flag, value in pairs.items():
        values = [value] if value is None or isinstance(value, str | os.PathLike) else list(value)
        out += [(flag, Path(v)) for v in values if v is not None and str(v) != ""]
    return tuple(out)


@dataclass(frozen=True)
class OutputGuard:
    """What a command reads, so that none of its outputs destroys it. Each item is (the flag that named it, path).

    - `inputs`: files (or folders) the command reads; an output file may not be one of them, compared as the same
      file (st_dev/st_ino, after symlinks: a symlink or hard link to an input is that input).
    - `keep_out`: folders nothing is written into (an engine dir: a stray file there, or a replaced manifest,
      leaves it unloadable).
    - `sources`: what drawings are made of; a drawing folder may not be a source folder, lie inside one (the next
      run would read the drawings), or be the folder that holds a source file (a drawing keeps its image's name).
    """

    inputs: tuple[tuple[str, Path], ...] = ()
    keep_out: tuple[tuple[str, Path], ...] = ()
    sources: tuple[tuple[str, Path], ...] = ()

    @classmethod
    def of(
        cls,
        inputs: Mapping[str, PathArg | Iterable[PathArg]] | None = None,
        keep_out: Mapping[str, PathArg | Iterable[PathArg]] | None = None,
        sources: Mapping[str, PathArg | Iterable[PathArg]] | None = None,
    ) -> OutputGuard:
        """From flag -> path (or paths, or None for a flag not given). Sources count as inputs too."""
        src = _named(sources or {})
        return cls(_named(inputs or {}) + src, _named(keep_out or {}), src)

    def _inside(self, dest: Path, folders: Iterable[tuple[str, Path]]) -> tuple[str, Path] | None:
        ids = {fid: (flag, p) for flag, p in folders if (fid := _file_id(p)) is not None}
        if not ids:
            return None
        for a in _ancestors(dest):
            hit = ids.get(_file_id(a))  # type: ignore[arg-type]
            if hit is not None:
                return hit
        return None

    def check_file(self, dest: PathArg, flag: str) -> None:
        """Refuse writing the file `dest` (named by `flag`) when it is an input or lies inside a kept-out folder."""
        if dest is None:
            return
        d = Path(dest)
        did = _file_id(d)
        for iflag, p in self.inputs:
            if did is not None and _file_id(p) == did:
                raise DynPoseError(
                    f"{flag} {d}: that is the {iflag} file {p} (the same file); writing there would destroy the "
                    "input; pick another output file"
                )
        hit = self._inside(d, self.keep_out)
        if hit is not None:
            raise DynPoseError(
                f"{flag} {d}: it lies inside the {hit[0]} folder {hit[1]}, which dynpose owns; writing there would "
                "break it; pick a file outside it (e.g. runs/)"
            )

    def check_folder(self, dest: PathArg, flag: str) -> None:
        """Refuse a folder of drawings `dest` that is or lies inside a kept-out or source folder, or that holds a
        source file."""
        if dest is None:
            return
        d = Path(dest)
        hit = self._inside(d, self.keep_out)
        if hit is not None:
            raise DynPoseError(
                f"{flag} {d}: it lies inside the {hit[0]} folder {hit[1]}, which dynpose owns; pick a folder outside "
                "it (e.g. runs/vis)"
            )
        hit = self._inside(d, [(f, p) for f, p in self.sources if p.is_dir()])
        if hit is not None:
            raise DynPoseError(
                f"{flag} {d}: it is, or lies inside, the {hit[0]} folder {hit[1]}; drawings there would replace or "
                "join the images read; pick a folder outside it (e.g. runs/vis)"
            )
        did = _file_id(d)
        for sflag, p in self.sources:
            if did is not None and p.is_file() and _file_id(p.parent) == did:
                raise DynPoseError(
                    f"{flag} {d}: it is the folder of the {sflag} file {p}; a drawing keeps its input's name and would "
                    "replace it; pick another folder (e.g. runs/vis)"
                )
