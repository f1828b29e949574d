"""Issue 23, the hardening cases not in the bad-input corpora: outputs that would destroy inputs (one guard for every
command), broken models at export and at load, misleading messages, and what a new user trips on (--version, the
policy list in --help, overlapping labels, the bench's batch bound).

Each case runs a real command (click's runner, in process) or the real function every entry point calls.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from dynpose.errors import DynPoseError
from dynpose.fileio import OutputGuard


def run_cli(main: object, *args: str | Path) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])  # type: ignore[arg-type]
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def one_error(main: object, match: str, *args: str | Path) -> str:
    code, out = run_cli(main, *args)
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in out, out
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
    return lines[0]


# -- the output guard ------------------------------------------------------------------------------------------------
def test_the_guard_compares_files_not_names(tmp_path: Path) -> None:
    dets = tmp_path / "dets.json"
    dets.write_text("[]")
    (tmp_path / "link.json").symlink_to(dets)
    os.link(dets, tmp_path / "hard.json")
    (tmp_path / "engines").mkdir()
    (tmp_path / "eng-link").symlink_to(tmp_path / "engines")
    g = OutputGuard.of({"--detections": dets, "--eval": None}, {"--engine-dir": tmp_path / "engines"})
    for same in (dets, tmp_path / "link.json", tmp_path / "hard.json", tmp_path / "engines" / ".." / "dets.json"):
        with pytest.raises(DynPoseError, match=r"that is the --detections file .*\(the same file\)"):
            g.check_file(same, "--out")
    for inside in (tmp_path / "engines" / "manifest.json", tmp_path / "eng-link" / "new" / "r.json"):
        with pytest.raises(DynPoseError, match=r"lies inside the --engine-dir folder"):
            g.check_file(inside, "--out")
    g.check_file(tmp_path / "results.json", "--out")  # anything else is fine
    g.check_file(None, "--out")


def test_the_guard_keeps_drawings_off_their_sources(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"x")
    g = OutputGuard.of(sources={"--source": [images, photo]})
    for bad, match in [(images, "is, or lies inside, the --source folder"), (images / "sub" / "vis", "lies inside")]:
        with pytest.raises(DynPoseError, match=match):
            g.check_folder(bad, "--vis")
    with pytest.raises(DynPoseError, match=r"it is the folder of the --source file .*photo.jpg"):
        g.check_folder(tmp_path, "--vis")
    g.check_folder(tmp_path / "runs" / "vis", "--vis")


@pytest.fixture
def run_inputs(tmp_path: Path, coco_dir: Path) -> dict[str, Path]:
    """Copies of the inputs a run reads, so a test can tell whether one was overwritten."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(coco_dir / "000000000785.jpg", images)
    dets = [r for r in json.loads((coco_dir / "test_coco_det_AP_H_56.json").read_text()) if r["image_id"] == 785]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    shutil.copy(coco_dir / "test_coco.json", tmp_path / "gt.json")
    return {"images": images, "dets": tmp_path / "dets.json", "gt": tmp_path / "gt.json"}


def test_run_outputs_never_replace_inputs(tinypose_engine_dir: Path, run_inputs: dict[str, Path], tmp_path: Path) -> None:
    from dynpose.cli.run import main

    base = ["--engine-dir", tinypose_engine_dir, "--source", run_inputs["images"], "--quiet"]
    before = {k: p.read_bytes() for k, p in run_inputs.items() if p.is_file()}
    manifest = (tinypose_engine_dir / "manifest.json").read_bytes()
    cases = [
        (
            ["--detections", run_inputs["dets"], "--out", run_inputs["dets"]],
            r"--out .*dets.json: that is the --detections file",
        ),
        (["--gt-boxes", run_inputs["gt"], "--out", run_inputs["gt"]], r"that is the --gt-boxes file"),
        (
            ["--detections", run_inputs["dets"], "--ann", run_inputs["gt"], "--out", run_inputs["gt"]],
            r"that is the --ann file",
        ),
        (["--detections", run_inputs["dets"], "--eval", run_inputs["gt"], "--out", run_inputs["gt"]], r"the --eval file"),
        (["--detections", run_inputs["dets"], "--out", tinypose_engine_dir / "manifest.json"], r"inside the --engine-dir"),
        (
            ["--detections", run_inputs["dets"], "--vis", run_inputs["images"]],
            r"--vis .*: it is, or lies inside, the --source",
        ),
        (["--detections", run_inputs["dets"], "--vis", tinypose_engine_dir / "vis"], r"inside the --engine-dir folder"),
    ]
    for extra, match in cases:
        one_error(main, match, *base, *extra)
    assert {k: p.read_bytes() for k, p in run_inputs.items() if p.is_file()} == before
    assert (tinypose_engine_dir / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in run_inputs["images"].iterdir()) == ["000000000785.jpg"]


def test_json_lines_keep_fifos_and_symlinks(tmp_path: Path) -> None:
    """The .jsonl writer does what every atomic writer does: refuses a FIFO, writes through a symlink."""
    from dynpose.io.sinks import JsonLinesSink

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DynPoseError, match=r"it is a FIFO \(named pipe\), not a regular file"):
        JsonLinesSink(fifo)
    assert fifo.is_fifo()
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    sink = JsonLinesSink(link)
    sink.close()
    assert link.is_symlink() and target.read_text() == "" and not list(tmp_path.glob(".*tmp"))


def test_eval_json_never_replaces_its_inputs(shared: Path, tmp_path: Path) -> None:
    from dynpose.cli.eval import main

    gt = tmp_path / "gt.json"
    shutil.copy(shared / "data" / "coco" / "test_coco.json", gt)
    res = tmp_path / "res.json"
    res.write_text("[]")
    for out, match in [(gt, r"--json .*gt.json: that is the --gt file"), (res, r"that is the --results file")]:
        one_error(main, match, "--gt", gt, "--results", res, "--json", out)
    assert gt.read_bytes() == (shared / "data" / "coco" / "test_coco.json").read_bytes() and res.read_text() == "[]"


def test_train_router_out_never_replaces_its_inputs(tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    from dynpose.cli.train_router import main

    ann = tmp_path / "ann.json"
    shutil.copy(coco_dir / "test_coco.json", ann)
    base = ["--engine-dir", tinypose_engine_dir, "--ann", ann, "--images", coco_dir, "--quiet", "--no-export"]
    one_error(main, r"--out .*ann.json: that is the --ann file", *base, "--out", ann)
    one_error(main, r"--out .*: it lies inside the --engine-dir", *base, "--out", tinypose_engine_dir / "router.pth")
    held_out = tmp_path / "val.json"
    shutil.copy(coco_dir / "test_coco.json", held_out)
    eval_args = ["--eval-ann", held_out, "--eval-images", coco_dir]
    one_error(main, r"that is the --eval-ann file", *base, *eval_args, "--out", held_out)
    assert ann.read_bytes() == (coco_dir / "test_coco.json").read_bytes()


def test_bench_outputs_never_replace_the_engine_dir(tinypose_engine_dir: Path) -> None:
    from dynpose.cli.bench import main

    one_error(
        main,
        r"--json .*manifest.json: that is the --engine-dir file",
        "--engine-dir",
        tinypose_engine_dir,
        "--json",
        tinypose_engine_dir / "manifest.json",
    )


def test_bench_batch_is_bounded(tinypose_engine_dir: Path) -> None:
    from dynpose.cli.bench import main

    one_error(
        main,
        r"--batch '100000': 100000 crops per call is over the limit of 1024",
        "--engine-dir",
        tinypose_engine_dir,
        "--batch",
        "100000",
    )


# -- broken models ---------------------------------------------------------------------------------------------------
def _model(path: Path, *nodes: onnx.NodeProto, out_shape: list, inits: list | None = None) -> Path:
    """A tiny ONNX pose model on a 256x192 NCHW input (dynamic batch)."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 256, 192])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)
    g = helper.make_graph(list(nodes), "broken", [x], [y], initializer=inits or [])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def heatmaps_model(path: Path, k: int) -> Path:
    w = helper.make_tensor("w", TensorProto.FLOAT, [k, 3, 1, 1], np.full(k * 3, 0.1, np.float32).tolist())
    pool = helper.make_node("AveragePool", ["input"], ["p"], kernel_shape=[4, 4], strides=[4, 4])
    conv = helper.make_node("Conv", ["p", "w"], ["output"])
    return _model(path, pool, conv, out_shape=["N", k, 64, 48], inits=[w])


def vector_model(path: Path) -> Path:
    gap = helper.make_node("GlobalAveragePool", ["input"], ["g"])
    flat = helper.make_node("Flatten", ["g"], ["output"])
    return _model(path, gap, flat, out_shape=["N", 3])


def failing_model(path: Path) -> Path:
    """Valid ONNX that ONNX Runtime loads but cannot run: 147456 values per crop do not reshape into rows of 7."""
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [-1, 7])
    return _model(path, helper.make_node("Reshape", ["input", "s"], ["output"]), out_shape=["N", 7], inits=[shape])


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda p: heatmaps_model(p, 14),
            r"large ONNX model .*m.onnx: model card .* expects heatmaps N x 17 x h x w, but the model gives heatmaps "
            r"N x 14 x 64 x 48 .*keypoint set \(14 keypoints\)",
        ),
        (vector_model, r"large ONNX model .*m.onnx: model card .* expects heatmaps N x 17 x h x w, but the model gives"),
        (failing_model, r"large ONNX model .*m.onnx: ONNX Runtime fails to run it on a crop \(.*Reshape"),
    ],
    ids=["14-heatmaps-17-keypoint-card", "vector-outputs", "fails-in-onnxruntime"],
)
def test_broken_models_are_refused_at_export(tmp_path: Path, make: object, match: str) -> None:
    from conftest import tinypose_card

    from dynpose.export.api import register_onnx

    model = make(tmp_path / "m.onnx")  # type: ignore[operator]
    with pytest.raises(DynPoseError, match=match):
        register_onnx(model, tinypose_card(192, 256), tmp_path / "engines", role="large", progress=False)
    assert not (tmp_path / "engines" / "manifest.json").exists()


def _engine_copy(src: Path, dst: Path) -> dict:
    shutil.copytree(src, dst)
    return json.loads((dst / "manifest.json").read_text())


def test_broken_models_are_refused_at_load(tinypose_engine_dir: Path, tmp_path: Path) -> None:
    """A card that does not match its model's outputs, and a model ONNX Runtime cannot run, name the role and the
    file when the engine dir is opened (not a traceback from the first batch)."""
    from dynpose.fileio import sha256_file
    from dynpose.runtime.engine_set import EngineSet

    eng = tmp_path / "a"
    doc = _engine_copy(tinypose_engine_dir, eng)
    large = next(e for e in doc["entries"] if e["role"] == "large")
    large["card"]["keypoints"] = "crowdpose14"  # the file gives 17 heatmaps
    (eng / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(
        DynPoseError, match=r"large entry .*: model card .* expects heatmaps N x 14 x h x w, but .*N x 17 x 64"
    ):
        EngineSet.load(eng, roles=["large"])

    eng = tmp_path / "b"
    doc = _engine_copy(tinypose_engine_dir, eng)
    small = next(e for e in doc["entries"] if e["role"] == "small" and e["format"] == "onnx")
    bad = failing_model(tmp_path / "bad.onnx")
    data = bad.read_bytes()
    (eng / small["file"]).write_bytes(data)
    small.update(sha256=sha256_file(bad), size=len(data))
    small["card"].update(input_width=192, input_height=256)
    (eng / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(
        DynPoseError,
        match=r"small entry .*: the model fails on a test crop \(.*ONNX Runtime failed on a batch of 1 \(.*Reshape",
    ):
        EngineSet.load(eng, roles=["small"])


def test_a_card_with_a_nan_mean_is_refused_as_the_card(tmp_path: Path) -> None:
    from dynpose.models.card import ModelCard

    card = json.loads((Path(__file__).parents[1] / "examples" / "cards" / "tinypose_256x192.json").read_text())
    card["mean"] = [float("nan"), 116.28, 103.53]
    f = tmp_path / "card.json"
    f.write_text(json.dumps(card))
    with pytest.raises(DynPoseError, match=rf"model card {re.escape(str(f))} .*'mean' and 'std' must be finite numbers"):
        ModelCard.from_json_file(f)


def test_calib_max_crops_zero_names_the_flag(tmp_path: Path, coco_dir: Path, tinypose_128: Path) -> None:
    from dynpose.cli.export import main

    card = Path(__file__).parents[1] / "examples" / "cards" / "tinypose_128x96.json"
    args = ["--onnx", tinypose_128, "--card", card, "--role", "small", "--precision", "int8", "--engine-dir", tmp_path / "e"]
    calib = ["--calib-ann", coco_dir / "test_coco.json", "--calib-images", coco_dir, "--calib-max-crops", "0", "--quiet"]
    one_error(main, r"--calib-max-crops 0: must be an integer >= 1", *args, *calib)


# -- what a new user trips on ----------------------------------------------------------------------------------------
def test_every_command_has_version() -> None:
    from dynpose import __version__
    from dynpose.cli import bench, eval, export, run, serve, train_router

    for mod, name in [(run, "run"), (eval, "eval"), (bench, "bench"), (export, "export"), (serve, "serve")]:
        code, out = run_cli(mod.main, "--version")
        assert code == 0 and f"dynpose {__version__}" in out, (name, out)
    assert run_cli(train_router.main, "--version")[0] == 0


def test_run_help_lists_every_routing_policy() -> None:
    from dynpose.cli.run import main
    from dynpose.runtime.policy import KINDS

    text = " ".join(run_cli(main, "--help")[1].split())
    missing = [k for k in KINDS if not re.search(rf"(^|[ ,(]){re.escape(k)}(:|,|\b)", text)]
    assert not missing, f"dynpose-run --help does not list {missing}"


def test_labels_of_people_standing_together_do_not_overlap() -> None:
    from dynpose.io.vis import place_labels

    anchors = [(100 + 3 * i, 200 + 2 * i) for i in range(6)] + [(0, 0), (630, 470)]
    sizes = [(80, 14)] * len(anchors)
    rects = place_labels(anchors, sizes, (480, 640, 3))
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] <= 640 and 0 <= a[1] and a[3] <= 480, a
        for b in rects[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    assert rects[0] == (100, 186, 180, 200)  # a label with room sits just above its box
