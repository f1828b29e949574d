"""Shared fixtures: the real models and data in ../shared (beside the repo, in CI too; tests that need them skip
with the reason where it is absent, as on a fresh clone; the demo's tests use the package's own assets)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynpose.models.card import ModelCard

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"needs the shared fixtures at {SHARED} (models and data beside the checkout), which are absent")
    return SHARED


@pytest.fixture(scope="session")
def tinypose_256(shared: Path) -> Path:
    return shared / "models" / "tinypose_256x192.onnx"


@pytest.fixture(scope="session")
def tinypose_128(shared: Path) -> Path:
    return shared / "models" / "tinypose_128x96.onnx"


@pytest.fixture(scope="session")
def coco_dir(shared: Path) -> Path:
    return shared / "data" / "coco"


CARDS = REPO / "examples" / "cards"


def tinypose_card(width: int, height: int) -> ModelCard:
    """The card of a PP-TinyPose fixture as users get it: `examples/cards/tinypose_<h>x<w>.json` (RGB, ImageNet
    mean/std on the 0-255 scale, COCO-17, MSRA decoding)."""
    return ModelCard.from_json_file(CARDS / f"tinypose_{height}x{width}.json")


@pytest.fixture(scope="session")
def tinypose_engine_dir(tmp_path_factory: pytest.TempPathFactory, tinypose_256: Path, tinypose_128: Path) -> Path:
    """An engine dir: TinyPose 128x96 as small, 256x192 as large, the DynPose router with random weights (seed 0),
    built with the export API as a user would."""
    import warnings

    import torch

    from dynpose.export.api import export_model, register_onnx

    engine_dir = tmp_path_factory.mktemp("tinypose_engines")
    register_onnx(tinypose_128, tinypose_card(96, 128), engine_dir, role="small", progress=False)
    register_onnx(tinypose_256, tinypose_card(192, 256), engine_dir, role="large", progress=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random router weights (on purpose) and torch's exporter notices
        export_model("router", engine_dir, weights="random", progress=False)
    return engine_dir


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """CI and dev boxes share few cores; torch's intra-op threads then contend with each other and run many times
    slower than a single thread. Restored afterwards so other test modules keep their setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a filesystem that really fills up (and can be remounted read-only). Needs root with
    CAP_SYS_ADMIN (the dev and CI containers); skips with the reason elsewhere."""
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def plan_and_run(engines, images, boxes, policy: str, flip: bool = False):
    """The runtime's way for the given boxes of `images` through an opened engine set: (the plan, its result).
    Tests read the plan's crops and geometry to check the answers against a model run by hand."""
    from dynpose.roles import MODEL_ROLES
    from dynpose.runtime.boxes import Boxes
    from dynpose.runtime.execute import LocalExecutor, execute
    from dynpose.runtime.plan import FrameInput, make_plan
    from dynpose.runtime.policy import parse_policy

    models = {r: m for r in MODEL_ROLES if (m := getattr(engines, r)) is not None}
    frames = [FrameInput(im, Boxes.of(b, im.shape)) for im, b in zip(images, boxes, strict=True)]
    plan = make_plan(frames, parse_policy(policy), {r: m.card for r, m in models.items()})
    with LocalExecutor(models, flip) as ex:
        return plan, execute(plan, ex)
