"""`dynpose-run` end to end: real engine dir, COCO images and detections, a real (tiny) video."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from dynpose.cli.run import main


def run(*args: str | Path) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def test_help_has_examples() -> None:
    code, out, _ = run("--help")
    assert code == 0 and "Examples:" in out and "--detections" in out and "fraction:F" in out


def test_coco_folder_with_detections(tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    out, vis = tmp_path / "results.json", tmp_path / "vis"
    code, stdout, stderr = run(
        "--engine-dir",
        tinypose_engine_dir,
        "--source",
        coco_dir,
        "--detections",
        coco_dir / "test_coco_det_AP_H_56.json",
        "--ann",
        coco_dir / "test_coco.json",
        "--det-score",
        "0.3",
        "--route",
        "fraction:0.5",
        "--max-batch",
        "16",
        "--out",
        out,
        "--vis",
        vis,
        "--eval",
        coco_dir / "test_coco.json",
    )
    assert code == 0, stderr
    results = json.loads(out.read_text())
    assert results and {r["image_id"] for r in results} == {785, 40083, 196141, 197388}
    assert all(len(r["keypoints"]) == 51 and r["category_id"] == 1 for r in results)
    assert "frames 4" in stdout and "crops small" in stdout and "route fraction:0.5" in stdout
    assert "Average Precision" in stdout  # --eval summary
    assert sorted(p.name for p in vis.iterdir()) == sorted(p.name for p in coco_dir.glob("*.jpg"))


def test_gt_boxes_isolate_pose_accuracy(tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    """--gt-boxes crops the 12 annotated persons (no detector, no OKS-NMS): one result each, and the printed AP is
    the large TinyPose's pose accuracy alone (its mean OKS on these persons is 0.89, models/README.md)."""
    from dynpose.eval.coco import evaluate_results

    out = tmp_path / "gt.json"
    code, stdout, stderr = run(
        "--engine-dir",
        tinypose_engine_dir,
        "--source",
        coco_dir,
        "--gt-boxes",
        coco_dir / "test_coco.json",
        "--route",
        "all-large",
        "--out",
        out,
        "--eval",
        coco_dir / "test_coco.json",
    )
    assert code == 0, stderr
    results = json.loads(out.read_text())
    assert len(results) == 12 and "crops small 0 / large 12" in stdout
    ap = evaluate_results(out, coco_dir / "test_coco.json")["AP"]
    assert ap > 0.75 and f"= {ap:.3f}" in stdout
    code, _, stderr = run(
        "--engine-dir",
        tinypose_engine_dir,
        "--source",
        coco_dir,
        "--gt-boxes",
        coco_dir / "test_coco.json",
        "--detections",
        coco_dir / "test_coco_det_AP_H_56.json",
    )
    assert code == 2 and "one box source" in stderr


@pytest.fixture(scope="module")
def tiny_video(coco_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = cv2.imread(str(coco_dir / "000000000785.jpg"))
    img = cv2.resize(img, (320, 240))
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (320, 240))
    for k in range(3):
        w.write(np.roll(img, 4 * k, axis=1))
    w.release()
    return path


def test_video_with_detector_jsonl_and_mp4(
    tinypose_engine_dir: Path, shared: Path, tiny_video: Path, tmp_path: Path
) -> None:
    out, vis = tmp_path / "clip.jsonl", tmp_path / "vis"
    code, stdout, stderr = run(
        "--engine-dir",
        tinypose_engine_dir,
        "--source",
        tiny_video,
        "--detector",
        shared / "models" / "picodet_s_320_pedestrian.onnx",
        "--route",
        "all-small",
        "--max-batch",
        "8",
        "--max-latency-ms",
        "0",
        "--out",
        out,
        "--vis",
        vis,
    )
    assert code == 0, stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["frame"] for x in lines] == [0, 1, 2]
    assert all(x["persons"] and x["persons"][0]["model"] == "small" for x in lines)
    assert len(lines[0]["persons"][0]["keypoints"]) == 17
    assert (vis / "clip.mp4").stat().st_size > 0
    assert "frames 3" in stdout
    code, _, stderr = run(
        "--engine-dir",
        tinypose_engine_dir,
        "--source",
        tiny_video,
        "--detector",
        shared / "models" / "picodet_s_320_pedestrian.onnx",
        "--out",
        tmp_path / "clip.json",
    )
    assert code == 2 and ".jsonl" in stderr  # video frames have no COCO image ids


@pytest.mark.parametrize(
    "case,match",
    [
        ("no_engine_dir", "engine dir"),
        ("bad_source", "no such file"),
        ("bad_policy", "routing policy"),
        ("empty_detections", "no person boxes"),
        ("both_box_sources", "one box source"),
        ("no_boxes", "no person boxes"),
        ("bad_out", "--out"),
        ("tampered", "altered"),
    ],
)
def test_errors_are_one_line_exit_2(
    case: str, match: str, tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path, shared: Path
) -> None:
    dets = coco_dir / "test_coco_det_AP_H_56.json"
    args: list[str | Path] = ["--engine-dir", tinypose_engine_dir, "--source", coco_dir, "--detections", dets]
    if case == "no_engine_dir":
        args[1] = tmp_path / "missing"
    elif case == "bad_source":
        args[3] = tmp_path / "nothing.jpg"
    elif case == "bad_policy":
        args += ["--route", "band:0.9"]
    elif case == "empty_detections":
        (tmp_path / "d.json").write_text("[]")
        args[5] = tmp_path / "d.json"
    elif case == "both_box_sources":
        args += ["--detector", shared / "models" / "picodet_s_192_pedestrian.onnx"]
    elif case == "no_boxes":
        args = args[:4]
    elif case == "bad_out":
        args += ["--out", tmp_path / "r.csv"]
    elif case == "tampered":
        import shutil

        bad = tmp_path / "engines"
        shutil.copytree(tinypose_engine_dir, bad)
        from dynpose.engines.manifest import Manifest

        with open(bad / Manifest.load(bad).require("router").file, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))
        args[1] = bad
    code, _, stderr = run(*args)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], stderr


def test_console_script_unreadable_image(tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    """The installed entry point, as a user runs it: a corrupt image gives one line, no traceback."""
    bad = tmp_path / "000000000785.jpg"
    bad.write_bytes(b"not a jpeg")
    exe = Path(sys.executable).with_name("dynpose-run")
    r = subprocess.run(
        [
            str(exe),
            "--engine-dir",
            str(tinypose_engine_dir),
            "--source",
            str(bad),
            "--detections",
            str(coco_dir / "test_coco_det_AP_H_56.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "no readable image" in r.stderr
