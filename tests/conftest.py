"""Shared fixtures: the real models and data in ../shared (beside the repo, in CI too)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared fixtures not found at {SHARED}; clone the repo beside ../shared")
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
