"""dynpose.video.keyframes on clips made from the shared COCO photos: a person walking into a still scene, a camera pan, a
cut, a moving patch that is nobody; the scout is the real PicoDet 192."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from clips import pan, static

from dynpose.errors import DynPoseError
from dynpose.runtime.detector import OnnxDetector
from dynpose.video.keyframes import KeyframeConfig, KeyframeDecision, KeyframePlanner

SKIER = np.array([[281.0, 45.0, 219.0, 347.0]])  # 000000000785.jpg's annotated person, standing still


@pytest.fixture(scope="module")
def photos(coco_dir: Path) -> dict[int, np.ndarray]:
    return {i: cv2.imread(str(coco_dir / f"{i:012d}.jpg")) for i in (785, 196141, 197388, 40083)}


def walk_in(photos: dict[int, np.ndarray], n: int = 10, step: int = 24) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """785 with a second person (cut from 196141, 1.5x) walking in from the left edge `step` px a frame; the frames
    and the walker's box per frame (x,y,w,h, clipped to the image)."""
    x, y, w, h = 556, 100, 48, 113
    walker = cv2.resize(photos[196141][y : y + h, x : x + w], (72, 170))
    frames, boxes = [], []
    for i in range(n):
        f = photos[785].copy()
        left = -72 + step * (i - 2)  # out of view for the first 3 frames
        a, b = max(left, 0), min(left + 72, f.shape[1])
        if b > a:
            f[200:370, a:b] = walker[:, a - left : b - left]
        frames.append(f)
        boxes.append(np.array([a, 200, max(b - a, 0), 170], dtype=np.float64))
    return frames, boxes


def run(planner: KeyframePlanner, frames: list[np.ndarray], tracked: list[np.ndarray]) -> list[KeyframeDecision]:
    out = []
    for f, t in zip(frames, tracked, strict=True):
        d = planner.decide(f, t)
        if d.full:
            planner.detected(t)
        out.append(d)
    return out


def test_a_still_scene_waits_for_the_interval(photos: dict[int, np.ndarray]) -> None:
    frames = static(photos[785], 12, sigma=2.0)  # sensor noise is not motion
    planner = KeyframePlanner(KeyframeConfig(max_interval=5))
    reasons = [d.reason for d in run(planner, frames, [SKIER] * len(frames))]
    assert reasons == ["first", "", "", "", "", "interval", "", "", "", "", "interval", ""]
    assert planner.stats == {"first": 1, "interval": 2}


def test_somebody_walking_in_calls_a_detection(photos: dict[int, np.ndarray]) -> None:
    frames, walker = walk_in(photos)
    planner = KeyframePlanner(KeyframeConfig(max_interval=30))
    # the tracks know the skier only; once detected, the walker is tracked too (its box from then on)
    decisions: list[KeyframeDecision] = []
    known = False
    for f, w in zip(frames, walker, strict=True):
        tracked = np.concatenate([SKIER, w[None]]) if known else SKIER
        d = planner.decide(f, tracked)
        decisions.append(d)
        if d.full:
            planner.detected(np.concatenate([SKIER, w[None]]) if w[2] > 0 else SKIER)
            known = w[2] > 0
    reasons = [d.reason for d in decisions]
    first_in = next(i for i, w in enumerate(walker) if w[2] > 0)
    assert reasons[0] == "first" and reasons[1:first_in] == [""] * (first_in - 1)
    assert "motion" in reasons[first_in : first_in + 2]  # at once, or the frame after when only a sliver shows
    assert reasons.count("motion") == 1  # tracked from then on: its motion is explained


def test_a_camera_pan_is_not_motion_but_brings_a_view_change(photos: dict[int, np.ndarray]) -> None:
    image = photos[197388]  # 640x392, five people standing
    frames = pan(image, 16, (400, 300), 0, 200, y=40)
    xs = np.linspace(0, 200, 16).round()
    gt = np.array([[139, 102, 222, 242], [287, 62, 75, 166], [540, 49, 100, 223], [373, 171, 267, 217]], float)
    tracked = [gt - np.array([x, 40, 0, 0]) for x in xs]  # where they are in each window
    planner = KeyframePlanner(KeyframeConfig(max_interval=30))
    reasons = [d.reason for d in run(planner, frames, tracked)]
    assert set(reasons) <= {"first", "view", ""}, reasons
    # 13.3 px a frame of a 400 px window: 8 % of it new after 3 frames
    assert reasons.count("view") >= 3


def test_a_cut_is_a_scene_change(photos: dict[int, np.ndarray]) -> None:
    a, b = photos[785], cv2.resize(photos[40083], (640, 425))
    planner = KeyframePlanner()
    reasons = [d.reason for d in run(planner, [a, a, b], [SKIER] * 3)]
    assert reasons == ["first", "", "scene"]


def test_lost_and_empty_tracks(photos: dict[int, np.ndarray]) -> None:
    planner = KeyframePlanner()
    f = photos[785]
    assert planner.decide(f, SKIER).reason == "first"
    assert planner.decide(f, SKIER, np.array([0.9])).full is False
    assert planner.decide(f, np.concatenate([SKIER, SKIER]), np.array([0.9, 0.1])).reason == "lost"
    assert planner.decide(f, None).reason == "empty"
    planner.reset()
    assert planner.decide(f, SKIER).reason == "first"


def moving_patch(photos: dict[int, np.ndarray], n: int = 8) -> list[np.ndarray]:
    """785 with a textured rectangle (no person: a sign, a screen) sliding 10 px a frame on the left."""
    rng = np.random.default_rng(0)
    patch = rng.integers(0, 255, (120, 50, 3), dtype=np.uint8)
    frames = []
    for i in range(n):
        f = photos[785].copy()
        f[150:270, 20 + 10 * i : 70 + 10 * i] = patch
        frames.append(f)
    return frames


def test_motion_the_detector_finds_nobody_in_is_clutter(photos: dict[int, np.ndarray]) -> None:
    frames = moving_patch(photos)
    planner = KeyframePlanner(KeyframeConfig(max_interval=30, clutter_frames=15))
    reasons = [d.reason for d in run(planner, frames, [SKIER] * len(frames))]
    # asked once (the detector finds only the skier), then the sliding patch is clutter
    assert reasons[:2] == ["first", "motion"] and reasons[2:] == [""] * (len(frames) - 2)


@pytest.fixture(scope="module")
def scout(shared: Path) -> OnnxDetector:
    return OnnxDetector(shared / "models" / "picodet_s_192_pedestrian.onnx", intra_op_threads=1)


def test_the_scout_confirms_an_entrant_and_dismisses_clutter(photos: dict[int, np.ndarray], scout: OnnxDetector) -> None:
    calls: list[tuple[int, ...]] = []

    def counted(image: np.ndarray) -> np.ndarray:
        calls.append(image.shape)
        return scout(image)

    frames, walker = walk_in(photos)
    planner = KeyframePlanner(KeyframeConfig(max_interval=30), scout=counted)
    decisions = [planner.decide(f, SKIER) for f in frames]
    hit = next(d for d in decisions if d.reason == "entrant")
    assert hit.full and len(hit.entrants) >= 1
    i = decisions.index(hit)
    x, y, w, h = hit.entrants[0, :4]
    wx, wy, ww, wh = walker[i]
    assert x < wx + ww and wx < x + w and y < wy + wh and wy < y + h  # the scout's box is on the walker
    assert all(c[0] < 425 or c[1] < 640 for c in calls)  # it looked at a region, not the whole frame

    only = KeyframePlanner(KeyframeConfig(max_interval=30, scout_boxes_only=True), scout=scout)
    boxes_only = [only.decide(f, SKIER) for f in frames]
    hit = next(d for d in boxes_only if d.reason == "entrant")
    assert not hit.full and len(hit.entrants) >= 1 and only.stats["entrant_boxes"] >= 1

    calls.clear()
    planner = KeyframePlanner(KeyframeConfig(max_interval=30), scout=counted)
    reasons = [planner.decide(f, SKIER).reason for f in moving_patch(photos)]
    assert reasons == ["first"] + [""] * 7  # no full detection for a patch that is nobody
    assert len(calls) == 1  # looked at once, then remembered as clutter


def test_bad_input_is_one_clear_error(photos: dict[int, np.ndarray]) -> None:
    with pytest.raises(DynPoseError, match="max_interval must be >= 1"):
        KeyframePlanner(KeyframeConfig(max_interval=0))
    with pytest.raises(DynPoseError, match="reveal must be in"):
        KeyframeConfig(reveal=2.0).validate()
    planner = KeyframePlanner()
    with pytest.raises(DynPoseError, match="H x W x 3 BGR image"):
        planner.decide(np.zeros((10, 10)), SKIER)
    with pytest.raises(DynPoseError, match="N x 4 or N x 5"):
        planner.decide(photos[785], np.zeros((2, 3)))
