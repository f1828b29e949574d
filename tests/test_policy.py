"""Routing policies: parsing and decisions (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from dynpose.errors import DynPoseError
from dynpose.runtime.policy import (
    AllLarge,
    AllSmall,
    Band,
    BoxArea,
    BoxThreshold,
    Cascade,
    Fraction,
    ModelCosts,
    Policy,
    Signals,
    Threshold,
    parse_policy,
)

BOXES = np.array([[0, 0, 10, 10], [0, 0, 100, 100], [5, 5, 30, 40], [1, 1, 2, 3]], dtype=float)
AREAS = BOXES[:, 2] * BOXES[:, 3]  # 100, 10000, 1200, 6


def scores(col1: list[float]) -> Signals:
    return Signals(AREAS[: len(col1)], router=np.asarray(col1, dtype=np.float64))


def no_signal() -> Signals:
    return Signals(AREAS)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("band:0.59,0.69", Band(0.59, 0.69)),
        (" BAND: 0.5 , 0.6 ", Band(0.5, 0.6)),
        ("threshold:0.4", Threshold(0.4)),
        ("fraction:0.5", Fraction(0.5)),
        ("all-small", AllSmall()),
        ("all-large", AllLarge()),
        ("box:9216", BoxArea(9216.0)),
        ("box-threshold:9216,0.4", BoxThreshold(9216.0, 0.4)),
        ("cascade:0.6", Cascade(0.6)),
    ],
)
def test_parse(text: str, expected: Policy) -> None:
    p = parse_policy(text)
    assert p == expected
    assert parse_policy(str(p)) == p  # str() is the round-trippable form the summary prints


@pytest.mark.parametrize(
    "text",
    [
        "",
        "band",
        "band:0.7,0.6",
        "band:0.5",
        "band:a,b",
        "threshold:",
        "fraction:1.5",
        "fraction:-0.1",
        "box:-1",
        "all-small:3",
        "median:0.5",
        "threshold:nan",
        "threshold:0.1,0.2",
        "box-threshold:100",
        "box-threshold:-1,0.5",
        "cascade:1.5",
        "cascade:",
    ],
)
def test_parse_errors_are_one_line(text: str) -> None:
    with pytest.raises(DynPoseError) as e:
        parse_policy(text)
    msg = str(e.value)
    assert "\n" not in msg and "routing policy" in msg and "band:LO,HI" in msg


def test_band_inclusive_edges_and_nan_goes_large() -> None:
    d = parse_policy("band:0.59,0.69").decide(scores([0.59, 0.69, 0.7, float("nan")]))
    assert d.large.tolist() == [True, True, False, True]
    assert d.nan == 1 and int(d.large.sum()) == 3


def test_threshold() -> None:
    d = parse_policy("threshold:0.5").decide(scores([0.49, 0.5, 0.9, 0.1]))
    assert d.large.tolist() == [False, True, True, False] and d.nan == 0


def test_fraction_takes_top_scores_per_call() -> None:
    p = parse_policy("fraction:0.5")
    assert p.decide(scores([0.1, 0.9, 0.5, 0.7])).large.tolist() == [False, True, False, True]
    # ties keep input order
    assert p.decide(scores([0.3, 0.3, 0.3, 0.3])).large.tolist() == [True, True, False, False]
    assert parse_policy("fraction:0").decide(scores([0.1, 0.9, 0.5, 0.7])).large.sum() == 0
    assert parse_policy("fraction:1").decide(scores([0.1, 0.9, 0.5, 0.7])).large.sum() == 4
    d = p.decide(scores([0.1, float("nan"), 0.5, 0.7]))
    assert d.large.tolist() == [False, True, False, True] and d.nan == 1


def test_router_free_policies() -> None:
    for text in ("all-small", "all-large", "box:100", "cascade:0.5"):
        assert not parse_policy(text).needs_router
    for text in ("band:0.1,0.2", "threshold:0.5", "fraction:0.3", "box-threshold:1,0.5"):
        assert parse_policy(text).needs_router and not parse_policy(text).cascades
    assert parse_policy("cascade:0.5").cascades
    assert parse_policy("all-small").decide(no_signal()).large.sum() == 0
    assert parse_policy("all-large").decide(no_signal()).large.sum() == 4
    # areas 100, 10000, 1200, 6: below 1000 px² -> small
    assert parse_policy("box:1000").decide(no_signal()).large.tolist() == [False, True, True, False]


def test_policies_without_their_signal_or_of_another_length() -> None:
    with pytest.raises(DynPoseError, match="needs router scores"):
        parse_policy("threshold:0.5").decide(no_signal())
    with pytest.raises(DynPoseError, match="3 router scores for 4 persons"):
        parse_policy("threshold:0.5").decide(Signals(AREAS, router=np.zeros(3)))
    with pytest.raises(DynPoseError, match="needs small-model confidences"):
        parse_policy("cascade:0.5").decide(no_signal())


def test_cascade_escalates_low_confidence_and_nan() -> None:
    d = parse_policy("cascade:0.5").decide(Signals(AREAS, confidence=np.array([0.49, 0.5, np.nan, 0.9])))
    assert d.large.tolist() == [True, False, True, False] and d.nan == 1


def test_empty_call() -> None:
    d = parse_policy("fraction:0.5").decide(Signals(np.zeros(0), router=np.zeros(0)))
    assert d.large.shape == (0,) and d.nan == 0


def test_box_threshold_trusts_the_router_only_on_big_boxes() -> None:
    p = parse_policy("box-threshold:1000,0.5")
    assert p.needs_router
    # areas 100, 10000, 1200, 6
    d = p.decide(scores([0.9, 0.9, 0.4, float("nan")]))
    assert d.large.tolist() == [False, True, False, False]  # small boxes go small whatever the score (NaN too)
    assert d.nan == 1
    assert p.decide(scores([0.1, float("nan"), 0.6, 0.9])).large.tolist() == [False, True, True, False]


# -- cost model (dynpose.bench.costs: where costs are measured) ---------------------------------------------------------
def test_policy_costs_break_even_and_speedup() -> None:
    from dynpose.bench.costs import break_even, speedup

    c = ModelCosts(small=2.0, large=10.0, router=1.0)
    routed, box, cascade = parse_policy("fraction:0.5"), parse_policy("box:100"), parse_policy("cascade:0.5")
    assert routed.cost(c, 0.0) == 3.0 and routed.cost(c, 1.0) == 11.0 and box.cost(c, 0.5) == 6.0
    # 3 + 8 f = 10 -> f = 7/8
    assert break_even(routed, c) == pytest.approx(7 / 8) and routed.cost(c, 7 / 8) == pytest.approx(10.0)
    assert speedup(routed, c, 0.0) == pytest.approx(10 / 3) and break_even(box, c) == 1.0
    # the cascade runs the small model on everyone, the large one on the escalated share: 2 + 10 f = 10 -> 0.8
    assert cascade.cost(c, 0.3) == pytest.approx(5.0) and break_even(cascade, c) == pytest.approx(0.8)
    # the router's crop serves the large model: its crop share is saved on large crops
    shared = ModelCosts(small=2.0, large=10.0, router=1.0, large_crop=1.0, shared_crop=True)
    assert routed.cost(shared, 1.0) == pytest.approx(10.0) and break_even(routed, shared) == 1.0
    assert break_even(routed, ModelCosts(small=6.0, large=8.0, router=2.5)) is None  # small + router >= large
    assert AllLarge().fixed_share() == 1.0 and Fraction(0.3).fixed_share() == 0.3 and Cascade(0.5).fixed_share() is None
    assert isinstance(parse_policy(Band(0.1, 0.2)), Policy)  # a policy passes through unparsed


def test_cost_lines_say_when_a_route_cannot_pay(tmp_path) -> None:
    import logging

    from dynpose.bench.costs import cost_line, known_share
    from dynpose.engines.manifest import Manifest, RouteCalibration

    c = ModelCosts(small=2.0, large=10.0, router=1.0)
    level, line = cost_line(c, parse_policy("fraction:0.3"), 0.3, "engine dir e")
    assert level == logging.INFO and "faster than large-only" in line and "break-even 88%" in line and "\n" not in line
    level, line = cost_line(c, parse_policy("fraction:0.95"), 0.95)
    assert level == logging.WARNING and "slower than large-only" in line
    level, line = cost_line(ModelCosts(small=6.0, large=8.0, router=2.5), parse_policy("threshold:0.5"), None)
    assert level == logging.WARNING and "cannot pay" in line
    level, line = cost_line(c, parse_policy("threshold:0.5"), None)
    assert level == logging.INFO and "under 88%" in line
    m = Manifest()
    m.set_calibration(RouteCalibration("threshold:0.5", 0.25))
    assert known_share(parse_policy("threshold:0.5"), m) == 0.25 and m.route == "threshold:0.5"
    assert known_share(parse_policy("threshold:0.6"), m) is None
    assert known_share(parse_policy("fraction:0.4"), Manifest()) == 0.4


def _role(sha: dict, r: str, total: float) -> dict:
    return {"sha256": sha[r], "ms": {"8": {"crop": 0.5, "infer": total - 0.5, "decode": 0.0, "total": total}}}


def test_dynpose_run_prints_one_cost_line(tinypose_engine_dir, tmp_path, coco_dir) -> None:
    import shutil
    import subprocess
    import sys

    from dynpose.engines.manifest import COSTS_NOTE, Manifest

    eng = shutil.copytree(tinypose_engine_dir, tmp_path / "eng")
    img = coco_dir / "000000000785.jpg"
    dets = coco_dir / "test_coco_det_AP_H_56.json"

    def run(route: str) -> str:
        cmd = [sys.executable, "-m", "dynpose.cli.run", "--engine-dir", str(eng), "--source", str(img), "--detections"]
        r = subprocess.run([*cmd, str(dets), "--route", route], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stderr

    assert "large-only" not in run("fraction:0.5")  # no costs stored: nothing said
    m = Manifest.load(eng)
    sha = {e.role: e.sha256 for e in m.entries if e.format == "onnx"}
    roles = {"small": _role(sha, "small", 6.0), "large": _role(sha, "large", 8.0), "router": _role(sha, "router", 2.5)}
    m.notes[COSTS_NOTE] = {"ort/cpu": {"backend": "ort", "device": "cpu", "roles": roles}}
    m.save(eng)
    err = run("fraction:0.5")
    assert err.count("per crop at batch 8") == 1 and "cannot pay" in err
    assert "per crop" not in run("all-large")


@pytest.mark.parametrize(
    "bad",
    [
        {"roles": {"small": {"ms": {"8": {"crop": 0, "infer": 0, "decode": 0, "total": 0}}}}},
        {"roles": {"small": {"ms": {"8": {"crop": -5, "infer": 1, "decode": 0, "total": -5}}}}},
        {"roles": {"small": {"ms": {"8": {"crop": "fast", "infer": 1, "decode": 0, "total": 1}}}}},
        {"roles": {"small": {"ms": [1, 2]}}},
        {"roles": {"tiny": {"ms": {"8": {"crop": 1, "infer": 1, "decode": 0, "total": 2}}}}},
        {"roles": 5},
        "costs",
    ],
)
def test_malformed_stored_costs_are_ignored_with_a_warning(bad, caplog) -> None:
    import logging

    from dynpose.engines.manifest import COSTS_NOTE, Manifest

    m = Manifest(notes={COSTS_NOTE: {"ort/cpu": bad}})
    with caplog.at_level(logging.WARNING, logger="dynpose"):
        assert m.costs("ort", "cpu") is None
    assert any("ignoring the stored costs" in r.getMessage() for r in caplog.records)
