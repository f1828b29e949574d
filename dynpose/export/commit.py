"""Staging and the commit: how an export's files enter an engine dir.

Every export writes into a staging folder inside the engine dir (`staging`), and only once every file is written
and checked does `commit` move them in and write the manifest, last. Anything failing before leaves the directory
as it was; the staging folder is removed either way. `commit` is the one place files enter an engine dir.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dynpose.engines.lock import engine_dir_lock
from dynpose.engines.manifest import Entry, commit_staged, current_manifest
from dynpose.errors import DynPoseError
from dynpose.export.route import default_route
from dynpose.roles import Role

log = logging.getLogger(__name__)


STAGING_PREFIX = ".staging-"
# Writing into a full or read-only engine dir: these mean "the disk", not a bug, and get one line.
STALE_AFTER_S = 24 * 3600  # another host's staging folder untouched this long is a killed export's
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _host_tag() -> str:
    """This machine (or container: its own pid namespace), as a staging name part: a pid means something only here."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _stale(p: Path, host: str, now: float) -> bool:
    """A staging folder of a killed export: this host's with a pid that no longer runs, or anybody's untouched for
    a day (another host's export, on a shared filesystem, cannot be asked whether it still runs)."""
    tag, _, rest = p.name[len(STAGING_PREFIX) :].partition("-")
    pid = rest.split("-", 1)[0]
    if tag == host and pid.isdigit():
        return not _pid_alive(int(pid))
    try:
        return now - p.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def remove_stale_staging(engine_dir: Path) -> list[Path]:
    """Remove staging folders an earlier export left behind when it was killed (SIGKILL, power loss). A live
    export's folder (its host and pid are in the name) is left alone."""
    removed = []
    host, now = _host_tag(), time.time()
    for p in engine_dir.glob(f"{STAGING_PREFIX}*"):
        if p.is_dir() and _stale(p, host, now):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info("removed %d staging folder(s) left by an interrupted export in %s", len(removed), engine_dir)
    return removed


@contextmanager
def staging(engine_dir: str | os.PathLike) -> Iterator[Path]:
    """A temp folder inside the engine dir (same filesystem, so the final moves are atomic renames), named with
    this host's tag and process's pid so a later export can tell a killed export's leftovers from a running one's. A full or
    read-only disk during the export is one line, and the engine dir is left as it was."""
    engine_dir = Path(engine_dir)
    if engine_dir.exists() and not engine_dir.is_dir():
        raise DynPoseError(f"engine dir {engine_dir}: exists and is not a directory")
    try:
        engine_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(engine_dir)
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_host_tag()}-{os.getpid()}-", dir=engine_dir))
    except OSError as e:
        raise DynPoseError(f"engine dir {engine_dir}: cannot write there ({e.strerror}); pick a writable folder") from None
    try:
        yield stage
    except OSError as e:
        if e.errno not in _DISK_ERRORS:
            raise
        raise DynPoseError(
            f"engine dir {engine_dir}: {e.strerror} while exporting ({e.filename or 'a staged file'}); the engine dir "
            "was left as it was"
        ) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def commit(
    stage: Path, engine_dir: str | os.PathLike, entries: list[Entry], router_weights: str | None = None
) -> list[Entry]:
    """Move the staged files in and switch the manifest to them (`manifest.commit_staged`: new files under new
    content names, the manifest written atomically, only then the replaced files removed, so a crash at any point
    leaves the old engine dir or the new one, both loadable). Same role+format entries are replaced. Another process
    committing into the same engine dir at the same time waits for this commit and then builds on its manifest.

    When a router entry is among `entries` and `router_weights` (a `ROUTER_WEIGHTS` kind) is given, the manifest's
    route becomes `default_route(manifest, router_weights)` and its reason is logged."""
    engine_dir = Path(engine_dir)
    roles = ", ".join(sorted({str(e.role) for e in entries}))
    # Locked from reading the manifest to writing it: a concurrent export (another process) waits, then builds on
    # this one's manifest instead of overwriting it (`dynpose.engines.lock`).
    with engine_dir_lock(engine_dir, f"export {roles}"):
        manifest = current_manifest(engine_dir)
        if router_weights is not None and any(e.role == Role.ROUTER for e in entries):
            manifest.route, why = default_route(manifest, router_weights)
            log.info(why)
        commit_staged(engine_dir, stage, entries, manifest)
    return entries
