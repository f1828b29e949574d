"""Routing policies: parsing and decisions (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from dynpose.errors import DynPoseError
from dynpose.runtime.policy import Policy, parse_policy

BOXES = np.array([[0, 0, 10, 10], [0, 0, 100, 100], [5, 5, 30, 40], [1, 1, 2, 3]], dtype=float)


def scores(col1: list[float]) -> np.ndarray:
    s = np.zeros((len(col1), 3))
    s[:, 1] = col1
    s[:, 0] = 1 - np.nan_to_num(np.asarray(col1))
    return s


@pytest.mark.parametrize(
    "text,expected",
    [
        ("band:0.59,0.69", Policy("band", (0.59, 0.69))),
        (" BAND: 0.5 , 0.6 ", Policy("band", (0.5, 0.6))),
        ("threshold:0.4", Policy("threshold", (0.4,))),
        ("fraction:0.5", Policy("fraction", (0.5,))),
        ("all-small", Policy("all-small")),
        ("all-large", Policy("all-large")),
        ("box:9216", Policy("box", (9216.0,))),
        ("box-threshold:9216,0.4", Policy("box-threshold", (9216.0, 0.4))),
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
    ],
)
def test_parse_errors_are_one_line(text: str) -> None:
    with pytest.raises(DynPoseError) as e:
        parse_policy(text)
    msg = str(e.value)
    assert "\n" not in msg and "routing policy" in msg and "band:LO,HI" in msg


def test_band_inclusive_edges_and_nan_goes_large() -> None:
    d = parse_policy("band:0.59,0.69").decide(scores([0.59, 0.69, 0.7, float("nan")]), BOXES)
    assert d.large.tolist() == [True, True, False, True]
    assert d.nan == 1 and d.num_large == 3 and d.num_small == 1


def test_threshold() -> None:
    d = parse_policy("threshold:0.5").decide(scores([0.49, 0.5, 0.9, 0.1]), BOXES)
    assert d.large.tolist() == [False, True, True, False] and d.nan == 0


def test_fraction_takes_top_scores_per_call() -> None:
    p = parse_policy("fraction:0.5")
    assert p.decide(scores([0.1, 0.9, 0.5, 0.7]), BOXES).large.tolist() == [False, True, False, True]
    # ties keep input order
    assert p.decide(scores([0.3, 0.3, 0.3, 0.3]), BOXES).large.tolist() == [True, True, False, False]
    assert parse_policy("fraction:0").decide(scores([0.1, 0.9, 0.5, 0.7]), BOXES).num_large == 0
    assert parse_policy("fraction:1").decide(scores([0.1, 0.9, 0.5, 0.7]), BOXES).num_large == 4
    d = p.decide(scores([0.1, float("nan"), 0.5, 0.7]), BOXES)
    assert d.large.tolist() == [False, True, False, True] and d.nan == 1


def test_router_free_policies() -> None:
    for text in ("all-small", "all-large", "box:100"):
        assert not parse_policy(text).needs_router
    for text in ("band:0.1,0.2", "threshold:0.5", "fraction:0.3"):
        assert parse_policy(text).needs_router
    assert parse_policy("all-small").decide(None, BOXES).num_large == 0
    assert parse_policy("all-large").decide(None, BOXES).num_large == 4
    # areas 100, 10000, 1200, 6: below 1000 px² -> small
    assert parse_policy("box:1000").decide(None, BOXES).large.tolist() == [False, True, True, False]


def test_router_policy_without_scores_or_wrong_shape() -> None:
    with pytest.raises(DynPoseError, match="needs router scores"):
        parse_policy("threshold:0.5").decide(None, BOXES)
    with pytest.raises(DynPoseError, match="router output"):
        parse_policy("threshold:0.5").decide(np.zeros((3, 3)), BOXES)


def test_empty_call() -> None:
    d = parse_policy("fraction:0.5").decide(np.zeros((0, 3)), np.zeros((0, 4)))
    assert d.large.shape == (0,) and d.nan == 0


def test_box_threshold_trusts_the_router_only_on_big_boxes() -> None:
    p = parse_policy("box-threshold:1000,0.5")
    assert p.needs_router
    # areas 100, 10000, 1200, 6
    d = p.decide(scores([0.9, 0.9, 0.4, float("nan")]), BOXES)
    assert d.large.tolist() == [False, True, False, False]  # small boxes go small whatever the score (NaN too)
    assert d.nan == 1
    assert p.decide(scores([0.1, float("nan"), 0.6, 0.9]), BOXES).large.tolist() == [False, True, True, False]


# -- cost model ------------------------------------------------------------------------------------------------------
def test_route_costs_break_even_and_speedup() -> None:
    from dynpose.runtime.policy import RouteCosts

    c = RouteCosts(small=2.0, large=10.0, router=1.0)
    assert c.per_crop(0.0) == 3.0 and c.per_crop(1.0) == 11.0 and c.per_crop(0.5, router=False) == 6.0
    # 3 + 8 f = 10 -> f = 7/8
    assert c.break_even() == pytest.approx(7 / 8) and c.per_crop(c.break_even()) == pytest.approx(10.0)
    assert c.speedup(0.0) == pytest.approx(10 / 3) and c.break_even(router=False) == 1.0
    # the router's crop serves the large model: its crop share is saved on large crops
    shared = RouteCosts(small=2.0, large=10.0, router=1.0, large_crop=1.0, shared_crop=True)
    assert shared.per_crop(1.0) == pytest.approx(10.0) and shared.break_even() == 1.0
    assert RouteCosts(small=6.0, large=8.0, router=2.5).break_even() is None  # small + router >= large


def test_cost_lines_say_when_a_route_cannot_pay() -> None:
    import logging

    from dynpose.runtime.policy import RouteCosts, cost_line, known_fraction

    c = RouteCosts(small=2.0, large=10.0, router=1.0)
    level, line = cost_line(c, parse_policy("fraction:0.3"), 0.3, "engine dir e")
    assert level == logging.INFO and "faster than large-only" in line and "break-even 88%" in line and "\n" not in line
    level, line = cost_line(c, parse_policy("fraction:0.95"), 0.95)
    assert level == logging.WARNING and "slower than large-only" in line
    level, line = cost_line(RouteCosts(small=6.0, large=8.0, router=2.5), parse_policy("threshold:0.5"), None)
    assert level == logging.WARNING and "cannot pay" in line
    level, line = cost_line(c, parse_policy("threshold:0.5"), None)
    assert level == logging.INFO and "under 88%" in line
    notes = {"router_calibration": {"policy": "threshold:0.5", "fraction": 0.25}}
    assert known_fraction(parse_policy("threshold:0.5"), notes) == 0.25
    assert known_fraction(parse_policy("threshold:0.6"), notes) is None
    assert known_fraction(parse_policy("fraction:0.4"), {}) == 0.4


def test_pipeline_logs_one_cost_line(tinypose_engine_dir, tmp_path, caplog) -> None:
    import logging
    import shutil

    from dynpose.engines.manifest import Manifest
    from dynpose.runtime.pipeline import Pipeline

    eng = shutil.copytree(tinypose_engine_dir, tmp_path / "eng")
    with caplog.at_level(logging.INFO, logger="dynpose"):
        Pipeline.from_engine_dir(eng, route="fraction:0.5").close()
    assert not [r for r in caplog.records if "large-only" in r.getMessage()]  # no costs stored: nothing said
    m = Manifest.load(eng)
    sha = {e.role: e.sha256 for e in m.entries if e.format == "onnx"}

    def role(r: str, total: float) -> dict:
        return {"sha256": sha[r], "ms": {"8": {"crop": 0.5, "infer": total - 0.5, "decode": 0.0, "total": total}}}

    m.set_costs(
        "ort", "cpu", {"roles": {"small": role("small", 6.0), "large": role("large", 8.0), "router": role("router", 2.5)}}
    )
    m.save(eng)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dynpose"):
        Pipeline.from_engine_dir(eng, route="fraction:0.5").close()
        Pipeline.from_engine_dir(eng, route="all-large").close()
    lines = [r for r in caplog.records if "large" in r.getMessage() and "per crop" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "cannot pay" in lines[0].getMessage()
