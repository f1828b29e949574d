"""The demo's shipped files: lossless fp16 packing, the same cards as examples/, package data in the wheel, and
(where ../shared is beside the checkout) the very files the project's fixtures hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dynpose.demo.assets import INDEX_NAME, AssetIndex, pack_fp16
from dynpose.demo.layout import CARD, PACKED
from dynpose.demo.pack import FROM_SHARED
from dynpose.errors import DynPoseError
from dynpose.roles import Role

REPO = Path(__file__).resolve().parents[1]


def test_index_lists_every_shipped_file_and_all_match() -> None:
    index = AssetIndex.load()
    index.verify()
    on_disk = {p.relative_to(index.root).as_posix() for p in index.root.rglob("*") if p.is_file()}
    assert on_disk - set(index.files) == {INDEX_NAME, "README.md"}
    assert set(index.unpacked) == set(PACKED.values())


def test_packing_round_trips_byte_for_byte(tmp_path: Path) -> None:
    """unpack(packed) is the fp32 file the index names, and packing it again gives the shipped file back."""
    index = AssetIndex.load()
    for rel in PACKED.values():
        fp32 = index.unpack(rel, tmp_path)
        assert fp32.stat().st_size == index.unpacked[rel].info.size
        model = onnx.load(str(fp32))
        assert {t.data_type for t in model.graph.initializer} <= {TensorProto.FLOAT, TensorProto.INT64}
        onnx.checker.check_model(model)
        again = pack_fp16(fp32, tmp_path / "again.f16")
        assert again == index.unpacked[rel]
        assert (tmp_path / "again.f16").read_bytes() == index.path(rel).read_bytes()


def _tiny_model(path: Path, weight: np.ndarray) -> None:
    w = numpy_helper.from_array(weight.astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [w],
    )
    onnx.save(helper.make_model(graph), str(path))


def test_packing_refuses_weights_fp16_cannot_hold(tmp_path: Path) -> None:
    _tiny_model(tmp_path / "exact.onnx", np.array([0.5, -3.0]))
    pack_fp16(tmp_path / "exact.onnx", tmp_path / "exact.f16")
    _tiny_model(tmp_path / "lossy.onnx", np.array([0.1, 1.0]))  # 0.1 is not a float16
    with pytest.raises(DynPoseError, match=r"initializer w has values float16 cannot hold exactly"):
        pack_fp16(tmp_path / "lossy.onnx", tmp_path / "lossy.f16")
    assert not (tmp_path / "lossy.f16").exists()


def test_shipped_cards_are_the_examples_cards() -> None:
    index = AssetIndex.load()
    for rel in CARD.values():
        assert index.path(rel).read_bytes() == (REPO / "examples" / rel).read_bytes()


def test_assets_are_the_shared_fixtures(shared: Path, tmp_path: Path) -> None:
    """Needs ../shared (skips without it): every shipped file, and every rebuilt model, is the fixture's file."""
    index = AssetIndex.load()
    for rel, src in FROM_SHARED.items():
        if rel in index.unpacked:
            assert index.unpack(rel, tmp_path).read_bytes() == (shared / src).read_bytes(), rel
        else:
            assert index.path(rel).read_bytes() == (shared / src).read_bytes(), rel
    assert PACKED[Role.DETECTOR].startswith("models/picodet_s_320")


@pytest.mark.slow
def test_the_wheel_carries_the_assets(tmp_path: Path) -> None:
    """pyproject's package data: a wheel built from the checkout holds every asset, its index and README."""
    src = tmp_path / "src"  # a copy: setuptools builds in the source tree (build/, *.egg-info), never in the checkout
    shutil.copytree(REPO / "dynpose", src / "dynpose", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, src / name)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("dynpose-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    index = AssetIndex.load()
    want = {f"dynpose/demo/assets/{rel}" for rel in [*index.files, INDEX_NAME, "README.md"]}
    assert want <= names, sorted(want - names)
