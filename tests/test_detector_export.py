"""A person detector registered into an engine dir is what `dynpose-run` / `Pipeline` use when no boxes are given."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
from click.testing import CliRunner

from dynpose.cli.export import main as export_main
from dynpose.engines.manifest import Manifest
from dynpose.runtime.pipeline import Pipeline


def test_registered_detector_feeds_the_pipeline(
    tinypose_engine_dir: Path, shared: Path, coco_dir: Path, tmp_path: Path
) -> None:
    engines = tmp_path / "engines"
    shutil.copytree(tinypose_engine_dir, engines)
    r = CliRunner().invoke(
        export_main,
        ["--detector", str(shared / "models" / "picodet_s_192_pedestrian.onnx"), "--engine-dir", str(engines), "--quiet"],
    )
    assert r.exit_code == 0, r.output
    m = Manifest.load(engines)
    det = m.require("detector")
    assert det.checks["layout"] == "picodet" and (det.card.input_width, det.card.input_height) == (192, 192)
    before = Manifest.load(tinypose_engine_dir)
    assert m.require("large").file == before.require("large").file  # the other entries are untouched

    with Pipeline.from_engine_dir(engines, route="all-large") as pipe:
        persons = pipe(cv2.imread(str(coco_dir / "000000000785.jpg")))
    assert persons and all(p.model == "large" for p in persons)


def test_bad_detector_is_one_line_and_leaves_dir(tinypose_engine_dir: Path, tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    shutil.copytree(tinypose_engine_dir, engines)
    before = (engines / "manifest.json").read_bytes()
    bad = tmp_path / "det.onnx"
    bad.write_bytes(b"not an onnx file")
    r = CliRunner().invoke(export_main, ["--detector", str(bad), "--engine-dir", str(engines)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "error:" in r.stderr
    assert (engines / "manifest.json").read_bytes() == before
