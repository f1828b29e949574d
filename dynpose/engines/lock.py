"""One writer at a time per engine dir: an OS file lock (`fcntl.flock`) on `ENGINE_DIR/.dynpose-lock`.

Every change to an engine dir is a read-modify-write of its manifest (an export's commit, `dynpose-bench
--store-costs`, the router calibration storing its route, a trained router replacing the old one). Two processes
doing that at once both read the same manifest, and the second one to write drops the first one's entry, or removes
a file the first one has just committed (a 4-way concurrent export failed with "file not found" that way). Holding
`engine_dir_lock` across the read, the file moves and the manifest write makes the second writer wait, then read
the manifest the first one wrote and build on it.

The lock is the kernel's: it goes away with its process (a writer killed with SIGKILL holds nothing), and `flock`
also works on NFS (Linux emulates it with POSIX locks there). It is re-entrant within a thread (a commit inside a
locked read-modify-write does not wait for itself); other threads and processes wait. The lock file stays in the
engine dir (empty but for the holder's pid and task, for the waiting note); readers never take the lock.

Platforms without `fcntl` (Windows): there is no lock; the first locked write warns once that concurrent writers
of one engine dir are not serialised there, and each write still replaces the manifest atomically.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dynpose.errors import DynPoseError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".dynpose-lock"
_held = threading.local()  # per thread: {lock path: depth}, so nested locking in one thread does not deadlock
_warned = False


def _depths() -> dict[str, int]:
    if not hasattr(_held, "depths"):
        _held.depths = {}
    return _held.depths


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


@contextmanager
def engine_dir_lock(engine_dir: str | os.PathLike, task: str) -> Iterator[None]:
    """Hold the engine dir's write lock for the block; `task` (e.g. "export small") tells a waiting writer who
    holds it. Waits as long as another writer holds it (a commit takes seconds), with a note when it has to."""
    global _warned
    engine_dir = Path(engine_dir)
    path = str((engine_dir / LOCK_NAME).resolve())
    depths = _depths()
    if depths.get(path):
        depths[path] += 1
        try:
            yield
        finally:
            depths[path] -= 1
        return
    if fcntl is None:
        if not _warned:
            _warned = True
            log.warning("no file locking on this platform: run one export / cost measurement per engine dir at a time")
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise DynPoseError(f"engine dir {engine_dir}: cannot write there ({e.strerror}); pick a writable folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("engine dir %s: another process is writing it%s; waiting for it to finish", engine_dir, _holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {task}".encode(), 0)
        depths[path] = 1
        try:
            yield
        finally:
            del depths[path]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the lock
