"""The demo's engine dir, built once from the shipped files into the user's cache and reused.

It lives at `$DYNPOSE_HOME/demo/engines-<key>/` (default `~/.cache/dynpose/demo/`), where the key hashes the asset
index, dynpose's version and the recipe's version (`RECIPE`), so a change of any of them builds a fresh dir. A build
happens in a hidden `.build-*` folder beside it and is renamed into place only when complete, so an interrupted
build never leaves a dir that looks usable; a dir whose files no longer match its manifest is rebuilt.

What is built: TinyPose 128x96 as the small model and 256x192 as the large (checked on the shipped COCO persons),
the zoo `router` with random weights (the zoo's fixed seed) exported by the same code path as `dynpose-export
--model router --weights random`, so `--route` can try router policies, and the PicoDet detector. The stored route
is `ROUTE` (below).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dynpose
from dynpose.demo.assets import AssetIndex
from dynpose.demo.layout import CARD, COCO_ANN, PACKED
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.paths import dynpose_home
from dynpose.roles import POSE_ROLES, Role

log = logging.getLogger(__name__)

# The route calibrated for this very pair on these COCO samples (`dynpose-train-router --calibrate
# --target-ap-drop 0.02`, benchmarks/README.md): boxes of at least 17734 px² go to the large model. It needs no
# router, and with the demo's detector boxes it keeps large-only's AP (0.817 vs 0.816 on the 12 persons found; all
# small 0.586) while about a quarter of the crops take the small model. The random router could only route by chance.
ROUTE = "box:17734"
# Bumped when the build below changes what it makes, so caches built by the old recipe are rebuilt.
RECIPE = 1
_STALE_BUILD_S = 3600.0  # a .build-* folder this old is a build that was killed; removed by the next build


@dataclass(frozen=True)
class DemoEngine:
    """The demo engine dir and whether this call built it (else it was found in the cache)."""

    path: Path
    built: bool


def cache_root(home: str | os.PathLike | None = None) -> Path:
    return (Path(home) if home is not None else dynpose_home()) / "demo"


def cache_key(index: AssetIndex, version: str) -> str:
    return hashlib.sha256(f"{RECIPE}\n{version}\n{index.digest}".encode()).hexdigest()[:16]


def _stamp(index: AssetIndex, version: str) -> dict[str, object]:
    return {"dynpose": version, "assets": index.digest, "recipe": RECIPE, "route": ROUTE}


def _usable(path: Path, stamp: dict[str, object]) -> bool:
    """A dir this recipe built from these assets with this version, every file matching its manifest."""
    try:
        return Manifest.load(path, verify=True).notes.get("demo") == stamp
    except DynPoseError as e:
        log.warning("demo engine dir %s is damaged (%s); building it again", path, e)
        return False


def _remove(path: Path) -> None:
    """Rename out of the way first (atomic), then delete: a reader never sees a half-deleted engine dir."""
    with contextlib.suppress(FileNotFoundError):
        gone = path.with_name(f".gone-{secrets.token_hex(4)}")
        os.rename(path, gone)
        shutil.rmtree(gone, ignore_errors=True)


def _sweep(root: Path, keep: str) -> None:
    """Remove engine dirs of other versions/assets and builds that were killed long ago. Another run sweeping at
    the same time is no error."""
    for p in root.iterdir():
        if p.name.startswith("engines-") and p.name != keep:
            _remove(p)
            continue
        try:
            old = time.time() - p.stat().st_mtime > _STALE_BUILD_S
        except FileNotFoundError:  # removed by a concurrent run
            continue
        if p.name.startswith((".build-", ".gone-")) and old:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The exporter's notes (random router weights, checks passed) are for people exporting; the demo says its own."""
    logger = logging.getLogger("dynpose.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the zoo's random-weights warning and torch's exporter notices
            yield
    finally:
        logger.setLevel(level)


def _build(index: AssetIndex, work: Path, stamp: dict[str, object]) -> Path:
    from dynpose.export.api import export_model, register_detector, register_onnx
    from dynpose.export.calibration.crops import CalibSpec
    from dynpose.models.card import ModelCard

    src, engine = work / "src", work / "engine"
    src.mkdir()
    # The shipped COCO persons check the pose models and the router, with or without ../shared beside a checkout.
    gate = CalibSpec(gate_ann=index.path(COCO_ANN))
    with _quiet_export():
        for role in POSE_ROLES:
            card = ModelCard.from_json_file(index.path(CARD[role]))
            register_onnx(index.unpack(PACKED[role], src), card, engine, role=role, calib=gate, progress=False)
        # the zoo names its DynPose router after the role
        export_model(Role.ROUTER.value, engine, role=Role.ROUTER, weights="random", calib=gate, progress=False)
        register_detector(index.unpack(PACKED[Role.DETECTOR], src), engine, progress=False)
    manifest = Manifest.load(engine, verify=False)
    manifest.route = ROUTE
    manifest.notes["demo"] = stamp
    manifest.save(engine)
    return engine


def demo_engine_dir(
    index: AssetIndex, home: str | os.PathLike | None = None, version: str = dynpose.__version__
) -> DemoEngine:
    """The demo engine dir for these (verified) assets and this version: found in the cache, or built into it."""
    root = cache_root(home)
    key = cache_key(index, version)
    final, stamp = root / f"engines-{key}", _stamp(index, version)
    if final.is_dir():
        if _usable(final, stamp):
            return DemoEngine(final, built=False)
        _remove(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root, keep=final.name)
        work = root / f".build-{secrets.token_hex(4)}"
        work.mkdir()
    except OSError as e:
        why = f"{e.strerror}; set DYNPOSE_HOME to a writable folder"
        raise DynPoseError(f"cannot build the demo engine dir in {root}: {why}") from None
    try:
        log.info("building the demo engine dir from the shipped files (a few seconds, once) in %s", final)
        engine = _build(index, work, stamp)
        try:
            os.rename(engine, final)
        except OSError as e:
            if final.is_dir() and _usable(final, stamp):  # another run built it meanwhile: use theirs
                return DemoEngine(final, built=False)
            raise DynPoseError(f"cannot move the demo engine dir into {final}: {e.strerror}; remove {root}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DemoEngine(final, built=True)
