"""dynpose-bench: argument errors are one line with exit 2; a tiny real run on the TinyPose engine dir writes the
JSON and the PNG. Speed figures are printed by the benchmark, never asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dynpose import bench
from dynpose.cli.bench import main as bench_main
from dynpose.errors import DynPoseError


def one_line_error(args: list[str]) -> str:
    run = CliRunner().invoke(bench_main, args)
    assert run.exit_code == 2, run.output
    msg = run.stderr.strip()
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--batch", "1,x"], "--batch"),
        (["--batch", "0,8"], ">= 1"),
        (["--fractions", "0,1.5"], "[0, 1]"),
        (["--fractions", "a"], "--fractions"),
        (["--route", "bogus:1"], "routing policy"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_arguments(tinypose_engine_dir: Path, extra: list[str], needle: str) -> None:
    assert needle in one_line_error(["--engine-dir", str(tinypose_engine_dir), *extra])


def test_missing_engine_dir_and_half_pipeline_args(tmp_path: Path, tinypose_engine_dir: Path, coco_dir: Path) -> None:
    assert "not a directory" in one_line_error(["--engine-dir", str(tmp_path / "nope"), "--batch", "1"])
    assert "go together" in one_line_error(["--engine-dir", str(tinypose_engine_dir), "--images", str(coco_dir)])
    msg = one_line_error(["--engine-dir", str(tinypose_engine_dir), "--backend", "torch", "--batch", "1"])
    assert "torch" in msg


def test_parsers() -> None:
    assert bench.parse_batches("8, 1,8") == [1, 8]
    assert bench.parse_fractions("1,0,0.5") == [0.0, 0.5, 1.0]
    with pytest.raises(DynPoseError):
        bench.parse_fractions("-0.1")


def test_tiny_real_run(tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    # a few confident detections on two images keep the pipeline part short
    dets = json.loads((coco_dir / "test_coco_det_AP_H_56.json").read_text())
    keep: dict[int, list] = {}
    for d in sorted(dets, key=lambda d: -d["score"]):
        if d["image_id"] in (785, 40083) and len(keep.setdefault(d["image_id"], [])) < 2:
            keep[d["image_id"]].append(d)
    (tmp_path / "dets.json").write_text(json.dumps([d for v in keep.values() for d in v]))
    out, png = tmp_path / "out" / "bench.json", tmp_path / "out" / "bench.png"
    run = CliRunner().invoke(
        bench_main,
        [
            "--engine-dir",
            str(tinypose_engine_dir),
            "--batch",
            "1,2",
            "--fractions",
            "0,1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--images",
            str(coco_dir),
            "--detections",
            str(tmp_path / "dets.json"),
            "--route",
            "fraction:0.5",
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
    )
    assert run.exit_code == 0, run.output
    print(run.stdout)
    r = json.loads(out.read_text())
    assert r["schema"] == "dynpose.bench"
    for key in ("created", "machine", "versions", "config", "crops", "ratio_vs_large", "pipeline", "wall_s"):
        assert key in r
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]
    assert "onnxruntime" in r["versions"]
    assert set(r["config"]["models"]) == {"router", "small", "large"}
    configs = {(row["batch"], row["config"], row["fraction"]) for row in r["crops"]}
    assert configs == {
        (b, c, f)
        for b in (1, 2)
        for c, f in (("large-only", None), ("small-only", None), ("dynpose", 0.0), ("dynpose", 1.0))
    }
    for row in r["crops"]:
        assert row["crops_per_s"] > 0 and row["latency_ms_p95"] >= row["latency_ms_p50"] > 0
        assert len(row["samples_ms"]) == 1
        want_large = {"large-only": row["batch"], "small-only": 0}.get(row["config"])
        if row["config"] == "dynpose":
            want_large = round(row["fraction"] * row["batch"])
        assert row["num_large"] == want_large
    assert set(r["ratio_vs_large"]) == {"1", "2"} and set(r["ratio_vs_large"]["2"]) == {"0", "1"}
    p = r["pipeline"]
    assert p["images"] == 2 and p["persons"] == 4 and p["fps"] > 0 and p["route"] == "fraction:0.5"
    assert set(p["breakdown_ms_per_frame"]) == {
        "decode_image",
        "crop",
        "router",
        "small",
        "large",
        "decode_keypoints",
        "rescore_nms",
    }
    assert 1 <= p["persons_after_nms"] <= 4
    assert p["routed_sequential"] == {"small": 2, "large": 2}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dynpose@1" in run.stdout and "pipeline:" in run.stdout
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_help() -> None:
    run = CliRunner().invoke(bench_main, ["--help"])
    assert run.exit_code == 0 and "Examples" in run.output and "--fractions" in run.output


def test_accuracy_table_markdown_and_readme_section(tmp_path: Path) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_table.py"
    spec = importlib.util.spec_from_file_location("dynpose_accuracy_table", path)
    assert spec is not None and spec.loader is not None
    acc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acc)
    md = acc.markdown({"fp32": {"large only": 0.8, "small only": 0.6}, "int8": {}}, ["fp32", "int8"])
    assert md.splitlines()[2] == "| large only | 0.800 | n/a |"
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## INT8\ntext kept\n")
    acc.write_readme("## Accuracy\nv1", readme)
    acc.write_readme("## Accuracy\nv2", readme)
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\n## INT8\ntext kept\n") and "v2" in text and "v1" not in text
    assert text.count(acc.START) == 1
