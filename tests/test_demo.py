"""`dynpose-run --demo` on a clean cache, offline, with only the files the package ships (no ../shared): the printed
AP and drawings, the cache reused, rebuilt when dynpose's version or the shipped files change or the cache is
damaged, and the sha256 refusal of a damaged asset."""

from __future__ import annotations

import json
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner

from dynpose.cli.run import main
from dynpose.demo import DemoRequest, prepare_demo
from dynpose.demo import assets as demo_assets
from dynpose.demo.assets import AssetIndex, write_index
from dynpose.demo.engine import ROUTE, demo_engine_dir
from dynpose.demo.layout import CARD, COCO_IMAGES, PACKED
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.roles import Role


def run(*args: str | Path) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


@dataclass
class DemoRun:
    home: Path
    cwd: Path
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def offline() -> object:
    """No network for the demo: any socket connection is refused (the demo must not need one)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in this test: the demo must run offline")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def first_demo(tmp_path_factory: pytest.TempPathFactory, offline: object) -> DemoRun:
    """`dynpose-run --demo` with an empty DYNPOSE_HOME, run from an empty folder (default output folder)."""
    home, cwd = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("cwd")
    mp = pytest.MonkeyPatch()
    mp.setenv("DYNPOSE_HOME", str(home))
    mp.chdir(cwd)
    try:
        code, out, err = run("--demo", "--quiet")
    finally:
        mp.undo()
    return DemoRun(home, cwd, code, out, err)


def test_demo_on_a_clean_cache(first_demo: DemoRun) -> None:
    assert first_demo.code == 0, first_demo.stderr
    out, results = first_demo.stdout, first_demo.cwd / "dynpose-demo"
    assert "built now" in out and f"route {ROUTE}" in out
    # COCO samples: detector boxes, routed to both models, scored
    ap = float(re.search(r"Average Precision  \(AP\) @\[ IoU=0.50:0.95 \| area=   all \| maxDets= 20 \] = ([\d.]+)", out)[1])
    assert ap > 0.7, out  # 0.817 when written (large-only 0.816, small-only 0.586)
    m = re.search(r"frames 4, persons (\d+), crops small (\d+) / large (\d+)", out)
    assert m and int(m[2]) > 0 and int(m[3]) > 0, out  # the box rule sends crops to both models
    coco = json.loads((results / "coco" / "results.json").read_text())
    assert {r["image_id"] for r in coco} == {785, 40083, 196141, 197388}
    drawn = sorted(p.name for p in (results / "coco").glob("*.jpg"))
    assert drawn == sorted(Path(p).name for p in COCO_IMAGES)
    assert all(cv2.imread(str(results / "coco" / n)) is not None for n in drawn)
    # the sample video, tracked
    lines = (results / "video" / "street.jsonl").read_text().splitlines()
    assert len(lines) == 5 and any(p.get("track_id") is not None for ln in lines for p in json.loads(ln)["persons"])
    cap = cv2.VideoCapture(str(results / "video" / "street.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    cap.release()
    assert f"demo results in {Path('dynpose-demo')}/" in out and "dynpose-run --demo --source" in out
    # the engine dir sits in the cache, with the demo route and the router
    (engine,) = (first_demo.home / "demo").iterdir()
    manifest = Manifest.load(engine)
    assert manifest.route == ROUTE and {e.role for e in manifest.entries} >= {*Role}


def test_demo_reuses_its_cache_and_runs_user_sources(first_demo: DemoRun, tmp_path: Path, monkeypatch) -> None:
    (engine,) = (first_demo.home / "demo").iterdir()
    stamp = (engine / "manifest.json").stat().st_mtime_ns
    monkeypatch.setenv("DYNPOSE_HOME", str(first_demo.home))
    img = demo_assets.assets_dir() / COCO_IMAGES[0]
    code, out, err = run("--demo", "--source", img, "--out-dir", tmp_path / "mine", "--route", "fraction:0.5", "--quiet")
    assert code == 0, err
    assert "from the cache" in out and "route fraction:0.5" in out and "router router" in out
    assert (engine / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "mine" / "vis").iterdir()] == [img.name]
    (line,) = (tmp_path / "mine" / "results.jsonl").read_text().splitlines()
    assert json.loads(line)["persons"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine-dir", "engines/"], r"--demo brings its own engine dir"),
        (["--vis", "out/"], r"--vis: --demo alone runs the shipped samples"),
        (["--eval", "gt.json"], r"--eval: --demo alone runs the shipped samples"),
    ],
)
def test_demo_flag_conflicts_are_one_line(args: list[str], message: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DYNPOSE_HOME", str(tmp_path))
    code, out, err = run("--demo", *args)
    assert code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "demo").exists()  # refused before anything is built


def test_out_dir_needs_demo_and_a_run_needs_an_engine_dir() -> None:
    code, _, err = run("--engine-dir", "x", "--source", "y", "--out-dir", "z")
    assert code == 2 and "--out-dir is the demo's output folder" in err
    code, _, err = run("--source", "y")
    assert code == 2 and "--engine-dir is missing" in err and "--demo" in err


def _copy_assets(tmp_path: Path) -> Path:
    root = tmp_path / "assets"
    shutil.copytree(demo_assets.assets_dir(), root)
    return root


def test_rebuilt_when_the_version_changes_or_the_cache_is_damaged(tmp_path: Path, offline: object) -> None:
    index = AssetIndex.load()
    first = demo_engine_dir(index, tmp_path, version="0.1.0")
    again = demo_engine_dir(index, tmp_path, version="0.1.0")
    assert first.built and not again.built and again.path == first.path
    newer = demo_engine_dir(index, tmp_path, version="0.2.0")
    assert newer.built and newer.path != first.path
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [newer.path.name]  # the old version's dir is gone
    small = Manifest.load(newer.path).require(Role.SMALL)
    (newer.path / small.file).write_bytes(b"not a model")
    repaired = demo_engine_dir(index, tmp_path, version="0.2.0")
    assert repaired.built and repaired.path == newer.path
    Manifest.load(repaired.path)  # verifies every file's sha256 again


def test_rebuilt_when_the_shipped_files_change(tmp_path: Path, offline: object) -> None:
    root = _copy_assets(tmp_path)
    home = tmp_path / "home"
    first = demo_engine_dir(AssetIndex.load(root), home, version="0.1.0")
    card = root / CARD[Role.LARGE]
    card.write_text(json.dumps(json.loads(card.read_text()), indent=4))  # same card, other bytes: a new release
    write_index(root, AssetIndex.load(root).unpacked)
    second = demo_engine_dir(AssetIndex.load(root), home, version="0.1.0")
    assert first.built and second.built and second.path != first.path
    assert not first.path.exists()


def test_a_damaged_asset_is_refused_by_sha256(tmp_path: Path, monkeypatch) -> None:
    root = _copy_assets(tmp_path)
    img = root / COCO_IMAGES[1]
    data = bytearray(img.read_bytes())
    data[len(data) // 2] ^= 0xFF
    img.write_bytes(bytes(data))
    monkeypatch.setattr(demo_assets, "ASSETS_DIR", root)
    monkeypatch.setenv("DYNPOSE_HOME", str(tmp_path / "home"))
    code, out, err = run("--demo", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(rf"error: demo asset .*{img.name}: sha256 [0-9a-f]+\.\.\. .* reinstall dynpose", err), err
    assert not (tmp_path / "home" / "demo").exists()  # checked before anything was built


def test_a_packed_model_that_does_not_rebuild_exactly_is_refused(tmp_path: Path) -> None:
    index = AssetIndex.load()
    rel = PACKED[Role.SMALL]
    want = index.unpacked[rel].info
    wrong = demo_assets.FileInfo("0" * 64, want.size)
    dst = tmp_path / "small.onnx"
    with pytest.raises(DynPoseError, match=r"rebuilt as sha256 .* not the original 0000"):
        demo_assets.unpack_fp16(index.path(rel), dst, wrong)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    demo_assets.unpack_fp16(index.path(rel), dst, want)
    assert demo_assets.describe(dst) == want


def test_missing_index_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DynPoseError, match=r"demo assets: .*assets.json is missing; .*reinstall"):
        prepare_demo(DemoRequest(), assets=tmp_path, home=tmp_path)


def test_a_build_that_fails_half_way_leaves_no_engine_dir(tmp_path: Path) -> None:
    """The small model is registered, then the large model's card does not fit its ONNX: the build stops with the
    exporter's one-line error, and the cache holds no engine dir and no build folder."""
    root = _copy_assets(tmp_path)
    card = root / CARD[Role.LARGE]
    card.write_text(json.dumps({**json.loads(card.read_text()), "input_width": 160}))
    write_index(root, AssetIndex.load(root).unpacked)
    with pytest.raises(DynPoseError, match=r"does not match the card \(256x160"):
        demo_engine_dir(AssetIndex.load(root), tmp_path / "home", version="0.1.0")
    assert list((tmp_path / "home" / "demo").iterdir()) == []
