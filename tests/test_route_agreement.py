"""Routing you can check on your own footage (issue 20): the cascade's confidence statistics and the box-below policy,
label-free calibration against the large model on the real shared footage (images and street.mp4, the TinyPose
pair), its held-out interval as the runtime reproduces it, the stale-calibration warnings, bad input, and
`dynpose-bench` timing the calibrated policies with the cascade's escalated share."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dynpose.cli.train_router import main as train_router
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.roles import POSE_ROLES, Role
from dynpose.runtime.policy import BoxBelow, Cascade, Signals, parse_policy

FOOTAGE_PARTS = ("coco", "crowdpose", "mpii", "exlpose")


# -- policies on arrays ----------------------------------------------------------------------------------------------
def test_cascade_visible_and_box_below_parse_and_decide() -> None:
    for text, expected in (("cascade-visible:0.6,0.3", Cascade(0.6, 0.3)), ("box-below:9216", BoxBelow(9216.0))):
        p = parse_policy(text)
        assert p == expected and parse_policy(str(p)) == p
    assert parse_policy("cascade-visible:0.6,0.3").cascades and not parse_policy("box-below:1").needs_router
    kp = np.zeros((4, 3, 3))
    kp[0, :, 2] = [0.9, 0.8, 0.1]  # two joints seen: their mean, the unseen one left out
    kp[1, :, 2] = [0.2, 0.1, 0.25]  # none above 0.3: 0, the least confident
    kp[2, :, 2] = [0.9, np.nan, 0.9]  # a broken answer: NaN, which escalates
    kp[3, :, 2] = [0.4, 0.4, 0.4]
    c = Cascade(0.5, 0.3).confidence(kp)
    np.testing.assert_allclose(c[[0, 1, 3]], [0.85, 0.0, 0.4])
    assert np.isnan(c[2])
    assert Cascade(0.5).confidence(kp)[0] == pytest.approx(0.6)  # the plain cascade: every joint's mean
    d = Cascade(0.5, 0.3).decide(Signals(np.ones(4), confidence=c))
    assert d.large.tolist() == [False, True, True, True] and d.nan == 1
    areas = np.array([100.0, 5000.0, 20000.0])
    assert BoxBelow(5000).decide(Signals(areas)).large.tolist() == [True, False, False]
    for bad in ("cascade-visible:0.6", "cascade-visible:0.6,1.5", "box-below:-3"):
        with pytest.raises(DynPoseError):
            parse_policy(bad)


def test_clustered_interval_resamples_frames() -> None:
    from dynpose.bench.stats import clustered_mean_ci

    # 10 frames, each with 5 persons alike (a frame's crowd): the frame bootstrap sees 10 draws, not 50
    rng = np.random.default_rng(0)
    frame_means = rng.uniform(0.8, 1.0, 10)
    values = np.repeat(frame_means, 5)
    frames = np.repeat(np.arange(10), 5)
    ci = clustered_mean_ci(values, frames, seed=1)
    assert ci.lo < ci.value < ci.hi and ci.value == pytest.approx(values.mean())
    iid = clustered_mean_ci(values, np.arange(50), seed=1)  # as if each person were its own frame
    assert ci.hi - ci.lo > 1.5 * (iid.hi - iid.lo)
    one = clustered_mean_ci(values, np.zeros(50), seed=1)
    assert one.lo == one.value == one.hi


# -- label-free calibration on the shared footage ---------------------------------------------------------------------
def _spec_args(footage: Path, shared: Path) -> list[str]:
    args = []
    for part in FOOTAGE_PARTS:
        args += ["--unlabelled", str(footage / part)]
    args += ["--unlabelled", str(footage / "street.mp4")]
    args += ["--detections", str(footage / "coco" / "test_coco_det_AP_H_56.json")]
    args += ["--detections", str(footage / "crowdpose" / "test_crowdpose_det_AP_40.json")]
    return args + ["--detector", str(shared / "models" / "picodet_s_320_pedestrian.onnx"), "--det-score", "0.3"]


def _spec(footage: Path, shared: Path):  # noqa: ANN202 - the router's own spec type
    from dynpose.router.unlabelled import UnlabelledSpec

    return UnlabelledSpec(
        sources=(*(footage / p for p in FOOTAGE_PARTS), footage / "street.mp4"),
        detections=(
            footage / "coco" / "test_coco_det_AP_H_56.json",
            footage / "crowdpose" / "test_crowdpose_det_AP_40.json",
        ),
        detector=shared / "models" / "picodet_s_320_pedestrian.onnx",
        det_score=0.3,
    )


def _cli(*args: str):  # noqa: ANN202
    return CliRunner().invoke(train_router, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def calibrated(tinypose_engine_dir: Path, shared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(engine dir, footage, stdout): a copy of the shared footage (so a test can change it) and a copy of the TinyPose
    engine dir calibrated on it without labels (target 0.93)."""
    root = tmp_path_factory.mktemp("route_agreement")
    footage = root / "footage"
    for part in FOOTAGE_PARTS:
        shutil.copytree(shared / "data" / part, footage / part)
    shutil.copy(shared / "data" / "video" / "street.mp4", footage / "street.mp4")
    eng = Path(shutil.copytree(tinypose_engine_dir, root / "engines"))
    r = _cli("--calibrate", "--engine-dir", str(eng), *_spec_args(footage, shared), "--target-agreement", "0.93", "--quiet")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return eng, footage, r.stdout


def test_label_free_calibration_stores_the_policy_and_its_held_out_interval(calibrated: tuple[Path, Path, str]) -> None:
    from dynpose.bench.agreement import LabelFreeFigures

    eng, footage, out = calibrated
    m = Manifest.load(eng)
    cal = m.calibration
    assert cal is not None and m.route == cal.policy and f"policy {cal.policy} " in out
    f = LabelFreeFigures.from_figures(cal.figures)
    assert f is not None and f.target == 0.93
    assert 0.0 < f.agreement.lo <= f.agreement.value <= f.agreement.hi <= 1.0
    assert f.fit_agreement >= 0.93 and f.above.lo <= f.above.value <= f.above.hi
    assert f.persons.total == f.persons.fit + f.persons.heldout and min(f.persons.fit, f.persons.heldout) >= 30
    assert f.frames.total == f.frames.fit + f.frames.heldout and min(f.frames.fit, f.frames.heldout) >= 5
    # every person found is counted: with a large-model reference, or routed without one
    assert f.footage.persons == f.persons.total + f.no_reference and f.footage.frames >= f.frames.total
    assert len(f.footage.sha256) == 64 and {Path(s.path).name for s in f.footage.sources} >= set(FOOTAGE_PARTS)
    for role in POSE_ROLES:
        assert f.models[role].sha256 == m.require(role, "onnx").sha256
    # the route is the cheapest family winner by the measured costs, all-large always among them
    assert f.cost_ms == pytest.approx(min(w.cost_ms for w in f.per_family.values()))
    assert f.per_family["fixed"].agreement.value >= 0.93
    assert {"box", "box-below", "cascade", "cascade-visible"} <= set(f.per_family)
    assert "held-out agreement" in out and "95% frame bootstrap" in out
    assert cal.fraction is not None and 0.0 <= cal.fraction <= 1.0


def test_the_runtime_routes_the_held_out_persons_as_the_calibration_measured(
    calibrated: tuple[Path, Path, str], shared: Path
) -> None:
    """The policies the calibration stored, run by the runtime's planner (the cascade's confidence computed in the
    plan) on the held-out frames, agree with the large model exactly as the calibration reported."""
    from dynpose.bench.agreement import LabelFreeFigures
    from dynpose.keypoints import COCO17
    from dynpose.router.calibrate import agreement, small_large_oks
    from dynpose.router.footage import FootageOptions, footage_data
    from dynpose.router.labelfree import person_set, split
    from dynpose.router.unlabelled import _frame_boxes, _frames, _load_dets
    from dynpose.runtime.boxes import Boxes
    from dynpose.runtime.engine_set import EngineSet, LoadOptions
    from dynpose.runtime.execute import LocalExecutor, execute, run_both
    from dynpose.runtime.plan import LARGE, FrameInput, make_plan

    eng, footage, _ = calibrated
    cal = Manifest.load(eng).calibration
    assert cal is not None
    figures = LabelFreeFigures.from_figures(cal.figures)
    assert figures is not None
    spec = _spec(footage, shared)
    ps = person_set(footage_data(eng, spec, FootageOptions(progress=False)), COCO17.sigmas)
    held_frames = set(np.unique(ps.frame[split(ps, 0.5, 0)]).tolist())
    policies = {cal.policy: figures.agreement.value}
    policies |= {w.policy: w.agreement.value for k, w in figures.per_family.items() if k.startswith("cascade")}
    dets = _load_dets(spec)
    with EngineSet.load(eng, LoadOptions(detector=spec.detector, det_score=0.3), roles=POSE_ROLES) as es:
        models = {r: es.require(r) for r in POSE_ROLES}
        cards = {r: m.card for r, m in models.items()}
        frames = []
        for i, fr in enumerate(_frames(spec)):
            boxes = _frame_boxes(fr, dets, es.detector, spec)
            if i in held_frames and boxes is not None and len(boxes):
                frames.append(FrameInput(fr.image_bgr, Boxes.of(boxes, fr.image_bgr.shape)))
        with LocalExecutor(models) as ex:
            _, large = run_both(frames, cards, ex)
            boxes = np.concatenate([f.boxes.xywh for f in frames])
            for text, measured in policies.items():
                res = execute(make_plan(frames, parse_policy(text), cards), ex)
                oks = small_large_oks(res.keypoints, large.keypoints, boxes, COCO17.sigmas)
                # persons the policy sent large carry the large model's own keypoints: OKS 1 by construction
                a = agreement(oks, res.model == LARGE)
                assert a.mean() == pytest.approx(measured, abs=1e-6), text


def test_a_changed_footage_or_model_warns_at_load(calibrated: tuple[Path, Path, str], tmp_path: Path, shared: Path) -> None:
    from dynpose.bench.agreement import calibration_warnings

    eng, footage, _ = calibrated
    m = Manifest.load(eng)
    route = parse_policy(m.route)
    assert calibration_warnings(m, route) == []
    assert calibration_warnings(m, parse_policy("all-large")) == []  # not the calibrated route: nothing to say
    image = footage / "coco" / "000000000785.jpg"
    original = image.read_bytes()
    try:
        image.write_bytes(original)  # written again, same content: the stat moved, the hash did not
        os.utime(image, (1, 1))
        assert calibration_warnings(m, route) == []
        image.write_bytes(original + b"\0")
        (line,) = calibration_warnings(m, route, where="engine dir x")
        assert "footage that has changed" in line and str(footage / "coco") in line and "--calibrate" in line
        # as dynpose-run prints it when it opens the engine dir
        exe = Path(sys.executable).with_name("dynpose-run")
        r = subprocess.run(
            [str(exe), "--engine-dir", str(eng), "--source", str(shared / "data" / "coco" / "000000000785.jpg")]
            + [
                "--detections",
                str(shared / "data" / "coco" / "test_coco_det_AP_H_56.json"),
                "--out",
                str(tmp_path / "o.json"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        assert r.returncode == 0, r.stderr
        assert any(ln.startswith("warning:") and "footage that has changed" in ln for ln in r.stderr.splitlines()), r.stderr
    finally:
        image.write_bytes(original)
    assert calibration_warnings(m, route) == []
    # a re-exported small model: the figures were measured with another file
    from conftest import tinypose_card

    from dynpose.export.api import register_onnx

    other = Path(shutil.copytree(eng, tmp_path / "engines"))
    register_onnx(
        shared / "models" / "tinypose_256x192.onnx", tinypose_card(192, 256), other, role=Role.SMALL, progress=False
    )
    (line,) = calibration_warnings(Manifest.load(other), route)
    assert f"other {Role.SMALL.value} model" in line and "re-exported" in line


def test_dynpose_bench_times_the_calibrated_families_and_shows_the_escalated_share(
    calibrated: tuple[Path, Path, str], shared: Path, tmp_path: Path
) -> None:
    from dynpose.cli.bench import main as bench

    eng, _, _ = calibrated
    data = shared / "data" / "crowdpose"
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(
        bench,
        ["--engine-dir", str(eng), "--images", str(data), "--detections", str(data / "test_crowdpose_det_AP_40.json")]
        + ["--fractions", "", "--policies", "calibrated-families,cascade-visible:0.99,0.3", "--batch", "4"]
        + ["--repeats", "1", "--warmup", "0", "--no-save", "--json", str(out)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.stderr
    rows = json.loads(out.read_text())["crops"]
    cal = Manifest.load(eng).calibration
    assert cal is not None
    names = {row["config"] for row in rows}
    stored = {w["policy"] for w in cal.figures["per_family"].values()} - {"all-large", "all-small"}
    assert stored <= names and "cascade-visible:0.99,0.3" in names
    for row in rows:
        if parse_policy(row["policy"]).cascades:
            # every crop ran on the small model; the escalated ones end on the large one
            assert row["escalated_share"] == pytest.approx(row["large_share"]) and row["ratio_ci"] is None
        else:
            assert row["escalated_share"] is None
    assert "escal." in r.stdout


# -- bad input: one line, exit 2, the engine dir untouched --------------------------------------------------------------
@pytest.fixture()
def fresh(tinypose_engine_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tinypose_engine_dir, tmp_path / "engines"))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--target-agreement", "0"], "--target-agreement must be in (0, 1]"),
        (["--target-agreement", "1.5"], "--target-agreement must be in (0, 1]"),
        (["--target-agreement", "nan"], "--target-agreement"),
        (["--holdout", "1"], "--holdout"),
        (["--target-ap-drop", "0.01"], "need labels"),
        (["--ann", "{coco}/test_coco.json", "--images", "{coco}"], "not both"),
        (["--policies", "box,median"], "--policies"),
    ],
)
def test_label_free_calibration_errors(fresh: Path, coco_dir: Path, extra: list[str], needle: str) -> None:
    before = (fresh / "manifest.json").read_bytes()
    args = ["--calibrate", "--engine-dir", str(fresh), "--unlabelled", str(coco_dir)]
    args += ["--detections", str(coco_dir / "test_coco_det_AP_H_56.json"), "--quiet"]
    r = _cli(*args, *(a.replace("{coco}", str(coco_dir)) for a in extra))
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert (fresh / "manifest.json").read_bytes() == before


def test_footage_too_small_or_empty_and_no_large_model(fresh: Path, coco_dir: Path, shared: Path, tmp_path: Path) -> None:
    before = (fresh / "manifest.json").read_bytes()
    # the COCO sample alone: 33 persons in 4 images, too few for a held-out interval
    r = _cli(
        "--calibrate", "--engine-dir", str(fresh), "--unlabelled", str(coco_dir),
        "--detections", str(coco_dir / "test_coco_det_AP_H_56.json"), "--quiet",
    )  # fmt: skip
    assert r.exit_code == 2 and "footage too small for a held-out check" in r.stderr, r.stderr
    assert "add footage" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # no box scores 1.0 or more: no person at all
    r = _cli(
        "--calibrate", "--engine-dir", str(fresh), "--unlabelled", str(shared / "data" / "exlpose"),
        "--detector", str(shared / "models" / "picodet_s_320_pedestrian.onnx"), "--det-score", "1", "--quiet",
    )  # fmt: skip
    assert r.exit_code == 2 and "no person found" in r.stderr, r.stderr
    assert (fresh / "manifest.json").read_bytes() == before
    # an engine dir with only the small model
    from conftest import tinypose_card

    from dynpose.export.api import register_onnx

    only_small = tmp_path / "only_small"
    register_onnx(
        shared / "models" / "tinypose_128x96.onnx", tinypose_card(96, 128), only_small, role=Role.SMALL, progress=False
    )
    before = (only_small / "manifest.json").read_bytes()
    r = _cli("--calibrate", "--engine-dir", str(only_small), "--unlabelled", str(coco_dir), "--quiet")
    assert r.exit_code == 2 and f"no '{Role.LARGE.value}' entry" in r.stderr and "dynpose-export" in r.stderr, r.stderr
    assert (only_small / "manifest.json").read_bytes() == before
