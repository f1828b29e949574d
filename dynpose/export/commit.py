"""Staging and the commit: how an export's files enter an engine dir.

Every export writes into a staging folder inside the engine dir (`staging`), and only once every file is written
and checked does `commit` move them in and write the manifest, last. Anything failing before leaves the directory
as it was; the staging folder is removed either way. `commit` is the one place files enter an engine dir.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dynpose.engines.manifest import Entry, Manifest, describe_file
from dynpose.errors import DynPoseError
from dynpose.export.route import default_route

log = logging.getLogger(__name__)


@contextmanager
def staging(engine_dir: str | os.PathLike) -> Iterator[Path]:
    """A temp folder inside the engine dir (same filesystem, so the final moves are atomic renames)."""
    engine_dir = Path(engine_dir)
    if engine_dir.exists() and not engine_dir.is_dir():
        raise DynPoseError(f"engine dir {engine_dir}: exists and is not a directory")
    engine_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=engine_dir))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def existing_manifest(engine_dir: str | os.PathLike) -> Manifest:
    """The engine dir's manifest as it is (files not re-hashed); an empty one when there is none or it is
    unreadable (then replaced, with a warning)."""
    engine_dir = Path(engine_dir)
    if not (engine_dir / "manifest.json").is_file():
        return Manifest()
    try:
        return Manifest.load(engine_dir, verify=False)
    except DynPoseError as e:
        log.warning("replacing an unreadable manifest (%s)", e)
        return Manifest()


def commit(
    stage: Path, engine_dir: str | os.PathLike, entries: list[Entry], router_weights: str | None = None
) -> list[Entry]:
    """Hash the staged files, move them in, merge into the manifest (same role+format replaced), write it last.

    When a router entry is among `entries` and `router_weights` (a `ROUTER_WEIGHTS` kind) is given, the manifest's
    route becomes `default_route(manifest, router_weights)` and its reason is logged."""
    engine_dir = Path(engine_dir)
    files = {e.file for e in entries}
    for e in entries:
        info = describe_file(stage, e.file)
        e.size, e.sha256 = info["size"], info["sha256"]
    manifest = existing_manifest(engine_dir)
    replaced = {old.file for e in entries for old in manifest.entries if old.role == e.role and old.format == e.format}
    for f in sorted(files):
        os.replace(stage / f, engine_dir / f)
    for e in entries:
        manifest.put(e)
    if router_weights is not None and any(e.role == "router" for e in entries):
        manifest.route, why = default_route(manifest, router_weights)
        log.info(why)
    manifest.save(engine_dir)
    still_used = {e.file for e in manifest.entries}
    for f in replaced - still_used:
        (engine_dir / f).unlink(missing_ok=True)  # a replaced entry's old file would otherwise linger unlisted
    return entries
