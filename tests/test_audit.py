"""The live audit (`dynpose/runtime/audit.py`): the auditor's statistics, the policies' steps, the steering, the audit
riding off the hot path, the Pipeline and `dynpose-run --audit`. Real TinyPose models (128x96 small, 256x192 large)
on the COCO sample's images and detections."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tinypose_card
from scipy import stats

from dynpose.cli.run import main as run_main
from dynpose.data import load_detections
from dynpose.engines.manifest import Manifest, RouteCalibration
from dynpose.errors import DynPoseError
from dynpose.roles import Role
from dynpose.runtime.audit import GOOD_OKS, AuditOptions, Auditor, Calibrated, person_oks
from dynpose.runtime.backends.ort import OrtRunner
from dynpose.runtime.boxes import Boxes
from dynpose.runtime.execute import Audit, LocalExecutor, execute, run_both
from dynpose.runtime.model import PoseModel
from dynpose.runtime.pipeline import Pipeline
from dynpose.runtime.plan import AuditSample, FrameInput, make_plan
from dynpose.runtime.policy import parse_policy
from dynpose.video.agreement import pose_agreement

SIGMAS = tinypose_card(96, 128).keypoint_set.sigmas
DETS = "test_coco_det_AP_H_56.json"


def _open(shared: Path, small: str, large: str) -> dict[Role, PoseModel]:
    files = {"128": ("tinypose_128x96.onnx", (96, 128)), "256": ("tinypose_256x192.onnx", (192, 256))}
    out = {}
    for role, which in ((Role.SMALL, small), (Role.LARGE, large)):
        name, (w, h) = files[which]
        runner = OrtRunner(shared / "models" / name, intra_op_threads=1, name=role.value).activate()
        out[role] = PoseModel(runner, tinypose_card(w, h))
    return out


@pytest.fixture(scope="module")
def pair(shared: Path):
    models = _open(shared, "128", "256")
    yield models
    for m in models.values():
        m.runner.deactivate()


@pytest.fixture(scope="module")
def coco(coco_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The four COCO images and their detections (118 boxes)."""
    dets = load_detections(coco_dir / DETS)
    ids = sorted(dets)
    return [cv2.imread(str(coco_dir / f"{i:012d}.jpg")) for i in ids], [dets[i] for i in ids]


@pytest.fixture(scope="module")
def likely(coco) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The same images with the 33 detections scoring at least 0.3: quicker where the numbers do not matter."""
    images, boxes = coco
    return images, [b[b[:, 4] >= 0.3] for b in boxes]


def _frames(images, boxes) -> list[FrameInput]:
    return [FrameInput(im, Boxes.of(b, im.shape)) for im, b in zip(images, boxes, strict=True)]


@pytest.fixture(scope="module")
def both(pair, coco):
    """Both models on every detected person: the small model's and the large model's keypoints, areas, frames."""
    frames = _frames(*coco)
    with LocalExecutor(pair) as ex:
        small, large = run_both(frames, {r: m.card for r, m in pair.items()}, ex)
    areas = np.concatenate([f.boxes.xywh[:, 2] * f.boxes.xywh[:, 3] for f in frames])
    return small.keypoints, large.keypoints, areas, small.frame_index


def _sample(small, large, areas, frames, policy, persons=None, answered_small=None) -> AuditSample:
    n = len(small)
    return AuditSample(
        small,
        large,
        areas,
        frames,
        n if persons is None else persons,
        n if answered_small is None else answered_small,
        policy,
    )


# -- statistics ----------------------------------------------------------------------------------------------------
def test_person_oks_is_the_agreement_the_video_tools_measure(both) -> None:
    """Per person, the audit's OKS equals `pose_agreement` with the large model as the reference (a separate code
    path through `oks_matrix`, the same conventions: joints >= 0.3 labelled, box area the scale)."""
    small, large, areas, _ = both
    values = person_oks(small, large, areas, SIGMAS)
    assert values.shape == (len(small),) and np.isfinite(values).sum() > 60

    class P:
        def __init__(self, kp, area) -> None:
            self.keypoints, self.box, self.score = kp, np.array([0.0, 0.0, area, 1.0]), 1.0

    for i in range(0, len(small), 7):
        want = pose_agreement([[P(large[i], areas[i])]], [[P(small[i], areas[i])]], SIGMAS)
        assert values[i] == pytest.approx(want, abs=1e-9, nan_ok=True)
    assert person_oks(large, large, areas, SIGMAS)[np.isfinite(values)] == pytest.approx(1.0)
    broken = small.copy()
    broken[0, :, :2] = np.nan  # a NaN joint is a miss
    assert person_oks(broken[:1], large[:1], areas[:1], SIGMAS)[0] == pytest.approx(0.0, abs=1e-12)


def test_auditor_figures_and_interval_on_known_inputs(both) -> None:
    """One person per frame: the mean, the textbook normal interval m +- z * s / sqrt(n) (scipy), the share at
    OKS >= 0.9, and the routed agreement when the large model answered some persons; one person of several per frame:
    the interval clustered by frame, computed the long way."""
    small, large, areas, _ = both
    values = person_oks(small, large, areas, SIGMAS)
    ok = np.isfinite(values)
    aud = Auditor(AuditOptions(1.0), SIGMAS, parse_policy("all-small"))
    for i in range(len(small)):  # each person its own frame (its own sample)
        aud.add(_sample(small[i : i + 1], large[i : i + 1], areas[i : i + 1], np.zeros(1, np.int64), aud.policy))
    f = aud.figures()
    v = values[ok]
    lo, hi = stats.norm.interval(0.95, loc=v.mean(), scale=stats.sem(v))
    assert (f.audited, f.undefined, f.frames) == (len(small), int((~ok).sum()), len(v))
    assert f.small_agreement.mean == pytest.approx(v.mean()) and f.small_agreement.ci == pytest.approx((lo, hi))
    assert f.agreement.mean == pytest.approx(v.mean())  # every person was the small model's
    assert f.small_good.mean == pytest.approx(np.mean(v >= GOOD_OKS))

    # the same persons in their four frames, the large model having answered as many persons again (p = 1/2)
    _, _, _, frame_index = both
    clustered = Auditor(AuditOptions(1.0), SIGMAS, parse_policy("all-small"))
    for _ in range(2):  # twice: 8 frames
        clustered.add(_sample(small, large, areas, frame_index, clustered.policy, 2 * len(small), len(small)))
    g = clustered.figures()
    y = np.array([values[ok & (frame_index == k)].sum() for k in range(4)] * 2)
    n = np.array([(ok & (frame_index == k)).sum() for k in range(4)] * 2, dtype=float)
    m = y.sum() / n.sum()
    half = 1.959963984540054 * math.sqrt(len(y) / (len(y) - 1) * ((y - m * n) ** 2).sum()) / n.sum()
    assert g.small_agreement.mean == pytest.approx(m) and g.small_agreement.ci == pytest.approx((m - half, m + half))
    assert g.agreement.mean == pytest.approx(1 - 0.5 * (1 - m))
    assert g.agreement.ci == pytest.approx((1 - 0.5 * (1 - m + half), 1 - 0.5 * (1 - m - half)))
    assert g.good.mean == pytest.approx(0.5 + 0.5 * np.mean(v >= GOOD_OKS))
    few = Auditor(AuditOptions(1.0), SIGMAS, parse_policy("all-small"))
    few.add(_sample(small[:10], large[:10], areas[:10], np.arange(10), few.policy))
    assert few.figures().small_agreement.ci is None  # under 30 persons: no interval


# -- policies ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "larger", "smaller"),
    [
        ("box:15000", "box:10000", "box:22500"),
        ("threshold:0.6", "threshold:0.55", "threshold:0.65"),
        ("fraction:0.3", "fraction:0.35", "fraction:0.25"),
        ("band:0.59,0.69", "band:0.54,0.74", "band:0.64,0.64"),
        ("box-threshold:15000,0.6", "box-threshold:10000,0.55", "box-threshold:22500,0.65"),
        ("cascade:0.5", "cascade:0.55", "cascade:0.45"),
        ("cascade-visible:0.5,0.3", "cascade-visible:0.55,0.3", "cascade-visible:0.45,0.3"),
        ("box-below:15000", "box-below:22500", "box-below:10000"),
        ("all-small", "all-small", "all-small"),
        ("all-large", "all-large", "all-large"),
        ("fraction:1", "fraction:1", "fraction:0.95"),
        ("cascade:0", "cascade:0.05", "cascade:0"),
    ],
)
def test_policy_steps(text: str, larger: str, smaller: str) -> None:
    p = parse_policy(text)
    assert str(p.toward_large(0.05)) == larger and str(p.toward_small(0.05)) == smaller
    if larger != text and not text.startswith("band"):
        assert str(p.toward_large(0.05).toward_small(0.05)) == text  # a step and its way back
    for bad in (0.0, float("nan"), 1.5):
        with pytest.raises(DynPoseError, match="step"):
            p.toward_large(bad)


# -- steering ------------------------------------------------------------------------------------------------------
def test_steering_moves_toward_large_and_back(both, caplog) -> None:
    """The small model's real answers (agreement about 0.86) under a target of 0.97: the route steps toward the
    large model every 30 audited persons; then answers that match the large model's (the large model's own
    keypoints): back step by step to the route it started with, and no further."""
    small, large, areas, frame_index = both
    seen: list[str] = []
    opts = AuditOptions(1.0, target=0.97, every=30, margin=0.02, step=0.05)
    aud = Auditor(opts, SIGMAS, parse_policy("box:40000"), on_move=lambda p: seen.append(str(p)))
    caplog.set_level(logging.WARNING, logger="dynpose.runtime.audit")
    for _ in range(3):
        aud.add(_sample(small, large, areas, frame_index, aud.policy))
        aud.add(_sample(small, large, areas, frame_index, aud.policy))
    assert seen == ["box:26666.7", "box:17777.8", "box:11851.9"]
    move = aud.moves[0]
    assert move.toward is Role.LARGE and move.evidence.agreement.ci[1] < 0.97
    assert "below the target 0.97" in caplog.text and "box:40000 -> box:26666.7" in caplog.text
    aud.add(_sample(small, large, areas, frame_index, parse_policy("box:40000")))  # an old plan: not evidence
    assert len(seen) == 3
    for _ in range(8):
        aud.add(_sample(large, large, areas, frame_index, aud.policy))
    assert seen[3:] == ["box:17777.8", "box:26666.7", "box:40000"]  # back, never past where it started
    assert str(aud.policy) == "box:40000" and [m.toward for m in aud.moves[3:]] == [Role.SMALL] * 3
    snap = aud.snapshot()
    assert snap["route"] == "box:40000" and len(snap["moves"]) == 6 and snap["by_route"]["box:40000"]["audited"]


def test_fixed_policy_does_not_move(both, caplog) -> None:
    small, large, areas, frame_index = both
    aud = Auditor(AuditOptions(1.0, target=0.97, every=30), SIGMAS, parse_policy("all-small"))
    caplog.set_level(logging.WARNING, logger="dynpose.runtime.audit")
    for _ in range(4):
        aud.add(_sample(small, large, areas, frame_index, aud.policy))
    assert not aud.moves and str(aud.policy) == "all-small"
    assert caplog.text.count("cannot move toward the large model") == 1


def test_drift_from_the_calibrated_agreement(both, caplog) -> None:
    """A calibration that promised 0.97 [0.96, 0.98] for this route: the live 0.86 is drift, warned once."""
    small, large, areas, frame_index = both
    cal = Calibrated.of(RouteCalibration("box:40000", 0.3, {"agreement": 0.97, "agreement_ci": [0.96, 0.98]}))
    assert cal is not None and cal.ci == (0.96, 0.98)
    # the label-free calibration stores its held-out agreement as an interval record (`bench.stats.Interval`)
    from dynpose.bench.stats import Interval

    record = {"method": "label-free", "agreement": Interval(0.943, 0.924, 0.962).to_dict()}
    free = Calibrated.of(RouteCalibration("box-below:20697", 0.5, record))
    assert free is not None and (free.agreement, free.ci) == (0.943, (0.924, 0.962))
    aud = Auditor(AuditOptions(1.0, calibrated=cal), SIGMAS, parse_policy("box:40000"))
    caplog.set_level(logging.WARNING, logger="dynpose.runtime.audit")
    for _ in range(3):
        aud.add(_sample(small, large, areas, frame_index, aud.policy))
    assert aud.drift is not None and caplog.text.count("departs from the calibrated 0.970 [0.960, 0.980]") == 1
    assert aud.snapshot()["drift"] == aud.drift and aud.drift in aud.summary()
    assert Calibrated.of(RouteCalibration("box:1", None, {"ap": 0.7})) is None  # calibrated on AP alone


# -- off the hot path ----------------------------------------------------------------------------------------------
def test_the_answer_does_not_wait_for_the_audit(pair, likely) -> None:
    """With the large model's worker held busy, an all-small plan is answered while its audit still waits for the
    large model; once the worker is free, an answer's work queued after the audit runs first, then the audit."""
    frames = _frames(*likely)
    got: list[AuditSample] = []
    gate = threading.Event()
    cards = {r: m.card for r, m in pair.items()}
    arrived: list[float] = []
    with LocalExecutor(pair) as ex:
        ex._workers[Role.LARGE].submit(0, gate.wait, 60)  # the large model's worker, busy until the gate opens
        plan = make_plan(frames, parse_policy("all-small"), cards)
        audit = Audit(1.0, lambda s: (got.append(s), arrived.append(time.perf_counter())), seed=0, max_pending=len(plan))
        result = execute(plan, ex, audit)
        assert len(result.model) == len(plan) and not got and audit.pending == len(plan)
        again = make_plan(frames[:2], parse_policy("all-small"), cards)
        execute(again, ex, audit)  # its audit would pass max_pending: skipped and counted, not queued
        assert audit.skipped == len(again) and audit.pending == len(plan)
        # an answer's large-model work submitted after the audit still runs before it
        later = make_plan(frames[:1], parse_policy("all-large"), cards)
        answer = ex.submit(later, later.next_work())
        gate.set()
        spans = [f.result().span for f in answer]
    assert len(got) == 1 and audit.pending == 0
    assert got[0].persons == got[0].answered_small == len(plan) and len(got[0].large) == len(plan)
    assert max(end for _, end in spans) <= arrived[0]


def test_small_equal_to_large_agrees_fully(shared: Path, coco) -> None:
    """The same model as small and large, every answer audited: agreement 1 with a zero-width interval, and the
    audit's crops counted apart from the answers' crops."""
    images, boxes = coco
    models = _open(shared, "128", "128")
    try:
        with Pipeline(models, "all-small", audit=1.0) as pipe:
            for _ in range(2):
                pipe.run_batch(images, boxes)
        f = pipe.auditor.figures()
        assert f.agreement.mean == pytest.approx(1.0) and f.agreement.ci == pytest.approx((1.0, 1.0))
        assert f.good.mean == 1.0 and f.audited == 2 * sum(map(len, boxes)) == pipe.stats.audit_crops
        assert pipe.stats.crops[Role.LARGE] == 0 and pipe.stats.as_dict()["audit_crops"] == f.audited
        assert "agreement with the large model 1.000 [1.000, 1.000]" in pipe.auditor.summary()[0]
    finally:
        for m in models.values():
            m.runner.deactivate()


def test_pipeline_steers_its_own_policy(tinypose_engine_dir: Path, likely) -> None:
    """A route that leaves everyone on the small model and a target it cannot meet: the Pipeline's policy steps
    toward the large model and the plans made after the step send the largest persons there."""
    images, boxes = likely
    start = 1.2 * max(float((b[:, 2] * b[:, 3]).max()) for b in boxes)
    opts = AuditOptions(1.0, target=0.97, every=30, seed=0)
    with Pipeline.from_engine_dir(tinypose_engine_dir, route=f"box:{start:g}", audit=opts, threads=2) as pipe:
        assert pipe.auditor.options.calibrated is None  # the fixture's engine dir was never calibrated
        for _ in range(8):  # one plan per frame; the audit's samples come in while the next frames run
            for _ in pipe.run_frames([[f] for f in _frames(images, boxes)]):
                pass
            if pipe.auditor.moves:
                break
        assert pipe.auditor.moves
        moved = str(pipe.policy)
        assert moved == pipe.auditor.moves[0].new == pipe.info["route"] and moved != f"box:{start:g}"
        pipe.run_batch(images, boxes)  # planned under the new policy: the largest persons go large
        assert pipe.stats.answered[Role.LARGE] > 0
    assert pipe.stats.audit_crops == pipe.auditor.figures().audited


# -- bad input -----------------------------------------------------------------------------------------------------
def test_bad_audit_options_are_one_line_errors(tmp_path: Path, tinypose_128: Path) -> None:
    for opts, words in [
        (AuditOptions(1.5), "--audit 1.5: the audit share must be a number in [0, 1]"),
        (AuditOptions(-0.1), "[0, 1]"),
        (AuditOptions(float("nan")), "[0, 1]"),
        (AuditOptions(0.1, target=0.0), "--audit-target 0.0: must be an agreement (mean OKS) in (0, 1]"),
        (AuditOptions(0.1, target=1.2), "(0, 1]"),
        (AuditOptions(0.0, target=0.9), "give --audit F with F > 0"),
    ]:
        with pytest.raises(DynPoseError, match=None) as e:
            AuditOptions.of(opts)
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DynPoseError, match="audit share"):
        Audit(2.0, print)
    assert AuditOptions.of(0.0) is None and AuditOptions.of(None) is None
    from dynpose.export.api import register_onnx

    only_small = tmp_path / "engines"
    register_onnx(tinypose_128, tinypose_card(96, 128), only_small, role="small", progress=False)
    with pytest.raises(DynPoseError, match=r"no onnx 'large' entry"):  # every pipeline needs both pose models
        Pipeline.from_engine_dir(only_small, route="all-small", audit=0.1)


def _run(*args: str | Path) -> tuple[int, str, str]:
    r = CliRunner().invoke(run_main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--audit-target", "0.9"], "--audit-target steers by the audit's figures; give --audit F"),
        (["--audit", "1.5"], "--audit 1.5: the audit share must be a number in [0, 1]"),
        (["--audit", "0.1", "--audit-target", "0"], "--audit-target 0.0: must be an agreement"),
    ],
)
def test_cli_refuses_bad_audit_flags(tinypose_engine_dir: Path, coco_dir: Path, flags, words) -> None:
    code, _, err = _run(
        "--engine-dir", tinypose_engine_dir, "--source", coco_dir, "--gt-boxes", coco_dir / "test_coco.json", *flags
    )
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_cli_prints_and_writes_the_audit(tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    code, stdout, stderr = _run(
        "--engine-dir", tinypose_engine_dir, "--source", coco_dir, "--detections", coco_dir / DETS,
        "--ann", coco_dir / "test_coco.json", "--route", "box:30000", "--audit", "1", "--max-batch", "16",
        "--out", out, "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    side = json.loads((tmp_path / "results.audit.json").read_text())
    small = side["answered_small"]
    assert side["share"] == 1.0 and side["route"] == "box:30000" and side["audited"] == small == side["large_crops"]
    assert 0.5 < side["agreement"] < 1.0 and side["frames"] == 4
    assert side["agreement_ci"] is None  # four images are too few frames for an interval
    assert f"(+{small} audit)" in stdout
    line = next(x for x in stdout.splitlines() if x.startswith("audit: "))
    assert f"audit: {small} of the small model's {small} answers re-run on the large model" in line
    assert f"agreement with the large model {side['agreement']:.3f} [too few persons or frames for an interval]" in line
    assert f"wrote {tmp_path / 'results.audit.json'}" in stdout
    assert Manifest.load(tinypose_engine_dir).calibration is None  # nothing written into the engine dir
