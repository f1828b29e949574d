"""Tracking on real clips made from the shared photos: ids, key-frame detection, temporal routing, smoothing.

Every run goes through the real TinyPose engine dir, the real PicoDet detector and ONNX Runtime; the clips are
written with OpenCV (mp4v) and read back, so compression noise is part of the test. Figures the issue asks for are
printed (run with -s to see them): the mean OKS of detection every 3rd frame against every frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
from clips import blank, pan, static, write_clip

from dynpose.errors import DynPoseError
from dynpose.io.sources import Frame, open_source
from dynpose.roles import Role
from dynpose.runtime.engine_set import EngineSet, LoadOptions
from dynpose.runtime.person import Decision
from dynpose.runtime.pipeline import Pipeline
from dynpose.runtime.postprocess import iou_matrix
from dynpose.video import (
    OneEuroConfig,
    OneEuroFilter,
    StreamStats,
    StreamTracker,
    Tracker,
    TrackerConfig,
    VideoOptions,
    box_from_keypoints,
    parse_smoothing,
    pose_agreement,
)

PAN_FRAMES = 24
PAN_PX = 240  # the window moves this far right over the clip: people move left by 10.4 px a frame


@pytest.fixture(scope="module")
def engines(tinypose_engine_dir: Path, shared: Path) -> Iterator[EngineSet]:
    det = shared / "models" / "picodet_s_320_pedestrian.onnx"
    with EngineSet.load(tinypose_engine_dir, LoadOptions(detector=det, threads=2)) as e:
        yield e


def frames_of(images: Sequence[np.ndarray]) -> list[Frame]:
    return [Frame(i, f"f{i:03d}", im) for i, im in enumerate(images)]


def run(
    engines: EngineSet, frames: Sequence[Frame], options: VideoOptions, route: str = "all-large", fps: float = 10.0
) -> tuple[list[list], StreamStats, list[int]]:
    """One stream through a StreamTracker, a plan per frame: each frame's persons, the stream's counters, router
    crops per frame."""
    with Pipeline.from_engine_set(engines, route=route) as pipe:
        stream = StreamTracker(options, pipe, fps=fps)
        outs, crops = [], []
        for f in frames:
            before = stream.stats.router_crops
            step = stream.prepare(f)
            outs.append(stream.finish(step, next(pipe.run_frames([[step.input]]))[0]))
            crops.append(stream.stats.router_crops - before)
        return outs, stream.stats, crops


def median_router_threshold(engines: EngineSet, image: np.ndarray) -> str:
    """A threshold policy splitting this image's persons between the models (the fixture router is random, its
    scores sit within 1e-4 of each other)."""
    with Pipeline.from_engine_set(engines, route="fraction:0.5") as pipe:
        scores = sorted(p.router_score for p in pipe(image))
    mid = len(scores) // 2
    return f"threshold:{(scores[mid - 1] + scores[mid]) / 2:.9f}"


@pytest.fixture(scope="module")
def pan_clip(coco_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Frame]:
    """A slow pan (10.4 px a frame) over the five-person COCO photo, written as mp4 and read back."""
    img = cv2.imread(str(coco_dir / "000000197388.jpg"))
    path = write_clip(tmp_path_factory.mktemp("pan") / "pan.mp4", pan(img, PAN_FRAMES, (400, 300), 0, PAN_PX, 40))
    with open_source(path) as src:
        return list(src)


@pytest.fixture(scope="module")
def pan_runs(engines: EngineSet, pan_clip: list[Frame]) -> dict[str, tuple[list[list], StreamStats, list[int]]]:
    return {
        "reference": run(engines, pan_clip, VideoOptions()),
        "every1": run(engines, pan_clip, VideoOptions(track=True)),
        "every3": run(engines, pan_clip, VideoOptions(track=True, det_every=3)),
    }


# -- pieces --------------------------------------------------------------------------------------------------------
def test_iou_and_box_from_keypoints() -> None:
    a = np.array([[0, 0, 10, 10], [20, 20, 10, 10]], dtype=float)
    iou = iou_matrix(a, np.array([[5, 0, 10, 10]], dtype=float))
    assert iou.shape == (2, 1) and iou[0, 0] == pytest.approx(50 / 150) and iou[1, 0] == 0
    assert iou_matrix(np.zeros((0, 4)), a).shape == (0, 2)
    kps = np.array([[10, 20, 0.9], [30, 60, 0.8], [500, 500, 0.1]], dtype=float)  # the last one is not visible
    box = box_from_keypoints(kps, kpt_thr=0.3, padding=1.25)
    assert box == pytest.approx([7.5, 15.0, 25.0, 50.0])  # the 20 x 40 extent, padded 1.25 about its centre
    assert box_from_keypoints(kps[[0, 2]], kpt_thr=0.3) is None  # one visible keypoint says nothing about size


def _pose(cx: float, cy: float, k: int = 17, h: float = 100.0) -> np.ndarray:
    rng = np.random.default_rng(int(cx * 7 + cy))
    xy = np.stack([cx + rng.uniform(-0.2, 0.2, k) * h, cy + rng.uniform(-0.5, 0.5, k) * h], axis=1)
    return np.concatenate([xy, np.full((k, 1), 0.9)], axis=1).astype(np.float32)


def test_tracker_ids_birth_after_confirmation_death_after_misses() -> None:
    """Two people walking right; B leaves after frame 4; C appears at frame 6. Ids come on confirmation, stay with
    their person, end after max_missed, and are never reused."""
    tracker = Tracker(TrackerConfig(confirm=2, max_missed=2))
    seen: dict[str, list[int | None]] = {"A": [], "B": [], "C": []}
    for f in range(10):
        people = {"A": (100 + 5 * f, 200), "B": (300 + 5 * f, 200)} if f <= 4 else {"A": (100 + 5 * f, 200)}
        if f >= 6:
            people["C"] = (600, 220)
        names = list(people)
        kps = np.stack([_pose(*people[n]) for n in names])
        boxes = np.array([[people[n][0] - 30, people[n][1] - 60, 60, 120] for n in names], dtype=float)
        owners = tracker.update(f, boxes, kps, np.ones(len(names)))
        for n, t in zip(names, owners, strict=True):
            assert t is not None
            seen[n].append(t.track_id)
        if f == 7:
            assert len(tracker.tracks) == 2  # B ended after 2 missed frames (frames 5, 6, 7: gone at the third)
    assert seen["A"] == [None] + [1] * 9  # an id from the second sighting on, the same one throughout
    assert seen["B"] == [None, 2, 2, 2, 2]
    assert seen["C"] == [None, 3, 3, 3]  # a new person gets a new id; B's is not reused
    assert tracker.ended == 1


def test_one_euro_filter_smooths_noise_and_follows_motion() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(60) / 30.0
    noisy = 100.0 + rng.normal(0, 2.0, 60)
    f = OneEuroFilter(OneEuroConfig(1.0, 0.05))
    smooth = np.array([f(ti, np.array([x]))[0] for ti, x in zip(t, noisy, strict=True)])
    assert np.abs(np.diff(smooth[10:])).mean() < 0.3 * np.abs(np.diff(noisy[10:])).mean()
    ramp = 300.0 * t  # 300 px/s: beta raises the cut-off, so the smoothed value lags less than with beta 0
    lag = {}
    for beta in (0.0, 0.05):
        g = OneEuroFilter(OneEuroConfig(1.0, beta))
        out = [g(ti, np.array([x]))[0] for ti, x in zip(t, ramp, strict=True)]
        lag[beta] = ramp[-1] - out[-1]
    assert 0 < lag[0.05] < 0.5 * lag[0.0]
    assert parse_smoothing(None) is None and parse_smoothing("none") is None
    assert parse_smoothing("one-euro") == OneEuroConfig() and parse_smoothing("one-euro:0.5,0.1") == OneEuroConfig(0.5, 0.1)
    for bad in ("kalman", "one-euro:1", "one-euro:a,b", "one-euro:0,1"):
        with pytest.raises(DynPoseError, match="--smooth"):
            parse_smoothing(bad)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (VideoOptions(det_every=3), "add --track"),
        (VideoOptions(smooth=OneEuroConfig()), "add --track"),
        (VideoOptions(track=True, det_every=0), "--det-every must be >= 1"),
        (VideoOptions(track=True, reroute_every=0), "--reroute-every must be >= 1"),
        (VideoOptions(track=True, det_every=5, tracker=TrackerConfig(max_missed=2)), "--track-max-missed 2"),
        (VideoOptions(track=True, tracker=TrackerConfig(confirm=0)), "confirm must be >= 1"),
    ],
)
def test_video_options_refused(options: VideoOptions, message: str) -> None:
    with pytest.raises(DynPoseError, match=message):
        options.validate()


def test_kept_decisions_skip_the_router_and_the_rest_route_as_before(engines: EngineSet, coco_dir: Path) -> None:
    """Kept boxes skip the router and go where told; the others are routed as without kept decisions; no kept
    decision (or all None) gives the very same result as before."""
    img = cv2.imread(str(coco_dir / "000000197388.jpg"))
    boxes = engines.detector(img)[:, :4]
    assert len(boxes) == 5
    with Pipeline.from_engine_set(engines, route="fraction:0.5") as pipe:
        plain = pipe.run_batch([img], [boxes])[0]
        same = pipe.run_batch([img], [boxes], keep=[[None] * 5])[0]
        hooked = pipe.run_batch([img], [boxes], keep=[[Role.LARGE, Role.SMALL, None, None, Role.SMALL]])[0]
        for a, b in zip(plain, same, strict=True):
            np.testing.assert_array_equal(a.keypoints, b.keypoints)
            assert (a.model, a.index) == (b.model, b.index) and a.router_score == b.router_score
        by = {p.index: p for p in hooked}
        assert [by[i].model for i in (0, 1, 4)] == [Role.LARGE, Role.SMALL, Role.SMALL]
        assert all(by[i].decision is Decision.KEPT and np.isnan(by[i].router_score) for i in (0, 1, 4))
        routed = [by[i] for i in (2, 3)]
        assert all(p.decision is Decision.POLICY and np.isfinite(p.router_score) for p in routed)
        assert sum(p.model is Role.LARGE for p in routed) == 1  # fraction 0.5 of the two routed boxes
        # a box the Pipeline drops (entirely outside the image) takes its kept decision with it
        outside = np.concatenate([[[-500.0, -500.0, 10.0, 10.0]], boxes])
        persons = pipe.run_batch([img], [outside], keep=[[Role.LARGE] + [Role.SMALL] * 5])[0]
        assert [p.model for p in persons] == [Role.SMALL] * 5 and pipe.stats.dropped_boxes == 1
        with pytest.raises(DynPoseError, match="6 kept decisions for 5 boxes"):
            pipe.run_batch([img], [boxes], keep=[[None] * 6])


# -- clips ---------------------------------------------------------------------------------------------------------
def _people_by_id(outs: list[list], people: np.ndarray) -> dict[int, list[int]]:
    """Per track id, the annotated person (index into `people`, photo x,y,w,h) each of its boxes overlaps most,
    frame by frame (a box in the pan's frame f sits at x + f * speed in the photo)."""
    by: dict[int, list[int]] = {}
    for f, persons in enumerate(outs):
        ids = [p.track_id for p in persons if p.track_id is not None]
        assert len(ids) == len(set(ids)), f"frame {f}: one id twice"
        for p in persons:
            if p.track_id is not None:
                box = np.asarray(p.box, dtype=float) + [f * PAN_PX / (PAN_FRAMES - 1), 40, 0, 0]
                by.setdefault(p.track_id, []).append(int(iou_matrix(box[None], people)[0].argmax()))
    return by


@pytest.mark.parametrize("setting", ["every1", "every3"])
def test_track_ids_stay_with_their_person_over_a_pan(pan_runs: dict, setting: str, coco_dir: Path) -> None:
    from dynpose.data import gt_boxes, load_coco

    people = np.array([b for iid, b, _ in gt_boxes(load_coco(coco_dir / "test_coco.json")) if iid == 197388])
    outs, stats, _ = pan_runs[setting]
    by_id = _people_by_id(outs, people)
    for tid, who in by_id.items():
        assert len(set(who)) == 1, f"id {tid} moved between people {who}"
    owners = [who[0] for who in by_id.values()]
    assert len(owners) == len(set(owners))  # and no person got two ids (no fragmentation)
    long_tracks = [t for t, who in by_id.items() if len(who) >= PAN_FRAMES - 3]
    assert len(long_tracks) >= 2  # the people in view all along keep one id from the 2nd frame to the last
    assert stats.tracks == len(by_id) <= len(people)


def test_det_every_3_calls_the_detector_a_third_as_often_and_agrees(
    pan_runs: dict, engines: EngineSet, shared: Path
) -> None:
    ref, ref_stats, _ = pan_runs["reference"]
    every1, _, _ = pan_runs["every1"]
    every3, stats3, _ = pan_runs["every3"]
    assert ref_stats.detector_calls == PAN_FRAMES
    assert stats3.detector_calls == math.ceil(PAN_FRAMES / 3) + stats3.redetections
    assert stats3.redetections == 0
    # tracking alone changes no pose: detection every frame with --track gives the untracked keypoints exactly
    for a, b in zip(ref, every1, strict=True):
        assert len(a) == len(b)
        for p, q in zip(a, b, strict=True):
            np.testing.assert_array_equal(p.keypoints, q.keypoints)
    oks_pan = pose_agreement(ref, every3)
    with open_source(shared / "data" / "video" / "street.mp4") as src:
        street = list(src)
    street_ref, _, _ = run(engines, street, VideoOptions(), fps=5.0)
    street3, st, _ = run(engines, street, VideoOptions(track=True, det_every=3), fps=5.0)
    oks_street = pose_agreement(street_ref, street3)
    print(
        f"\nmean OKS of --det-every 3 vs every frame: {oks_pan:.3f} on the {PAN_FRAMES}-frame pan "
        f"(detector calls {stats3.detector_calls} vs {PAN_FRAMES}), {oks_street:.3f} on street.mp4 (5 frames at "
        f"5 fps, detector calls {st.detector_calls} vs 5)"
    )
    assert oks_pan >= 0.9
    assert oks_street >= 0.8  # 5 fps: people move a fifth of a second between frames
    assert st.detector_calls == 2


def test_temporal_routing_calls_the_router_less_with_the_same_decisions(engines: EngineSet, coco_dir: Path) -> None:
    """A static scene: the router sees the same crops every frame, so keeping each track's decision for 4 frames
    gives the decisions routing every frame gives, with a quarter of the router calls."""
    img = cv2.imread(str(coco_dir / "000000196141.jpg"))
    route = median_router_threshold(engines, img)
    clip = frames_of(static(img, 8))
    every, st_every, _ = run(engines, clip, VideoOptions(track=True), route=route)
    kept, st_kept, crops = run(engines, clip, VideoOptions(track=True, reroute_every=4), route=route)
    decisions = [{p.track_id: p.model for p in persons} for persons in every]
    assert decisions == [{p.track_id: p.model for p in persons} for persons in kept]
    assert {m for d in decisions for m in d.values()} == {Role.SMALL, Role.LARGE}  # a real mix, not one model
    n = len(every[0])
    assert st_every.router_crops == 8 * n and st_every.router_saved == 0
    assert crops == [n, 0, 0, 0, n, 0, 0, 0]  # new tracks, then again when the decisions are 4 frames old
    assert st_kept.router_crops == 2 * n and st_kept.router_saved == 6 * n


def test_a_confidence_drop_routes_again(engines: EngineSet, coco_dir: Path) -> None:
    """Detection on the first frame only; the scene blurs from frame 4: the tracks whose keypoint confidence fell
    by more than reroute_drop are routed again on the next frame, though their decisions are not old."""
    img = cv2.imread(str(coco_dir / "000000196141.jpg"))
    opts = VideoOptions(track=True, det_every=8, reroute_every=100, tracker=TrackerConfig(max_missed=10))
    clean = frames_of(static(img, 8))
    blurred = frames_of(static(img, 4) + static(cv2.GaussianBlur(img, (41, 41), 0), 4))
    _, _, crops_clean = run(engines, clean, opts, route="threshold:0.5")
    _, _, crops_blur = run(engines, blurred, opts, route="threshold:0.5")
    assert crops_clean[0] > 0 and crops_clean[1:] == [0] * 7
    assert crops_blur[:5] == crops_clean[:5] and crops_blur[5] > 0 and crops_blur[6:] == [0, 0]


def _jitter(outs: list[list]) -> float:
    """Mean frame-to-frame keypoint movement (pixels) of the tracks seen in 3+ frames."""
    by: dict[int, list[np.ndarray]] = {}
    for persons in outs:
        for p in persons:
            if p.track_id is not None:
                by.setdefault(p.track_id, []).append(p.keypoints[:, :2])
    moves = [np.linalg.norm(np.diff(np.stack(v), axis=0), axis=-1).mean() for v in by.values() if len(v) >= 3]
    assert moves
    return float(np.mean(moves))


def test_one_euro_reduces_jitter_on_a_noisy_static_clip(engines: EngineSet, coco_dir: Path) -> None:
    img = cv2.imread(str(coco_dir / "000000196141.jpg"))
    clip = frames_of(static(img, 12, sigma=12.0, seed=1))
    raw, _, _ = run(engines, clip, VideoOptions(track=True))
    smooth, _, _ = run(engines, clip, VideoOptions(track=True, smooth=OneEuroConfig()))
    j_raw, j_smooth = _jitter(raw), _jitter(smooth)
    print(f"\nkeypoint jitter on a static clip with noise: {j_raw:.2f} px raw, {j_smooth:.2f} px with one-euro")
    assert j_smooth < 0.6 * j_raw
    assert [len(p) for p in raw] == [len(p) for p in smooth]  # smoothing moves keypoints, never persons or scores
    assert all(p.score == q.score for a, b in zip(raw, smooth, strict=True) for p, q in zip(a, b, strict=True))


def test_a_gap_ends_tracks_then_new_ids_and_a_lost_track_brings_detection_forward(
    engines: EngineSet, coco_dir: Path
) -> None:
    """People for 6 frames, 6 black frames, people again. With detection every 4th frame the first black frame
    (frame 6, between key frames) collapses every pose, which brings detection forward to frame 7; the tracks end
    after max_missed frames unseen, and the people of the second part get new ids."""
    img = cv2.imread(str(coco_dir / "000000196141.jpg"))
    clip = frames_of(static(img, 6) + blank(img, 6) + static(img, 6))
    opts = VideoOptions(track=True, det_every=4, tracker=TrackerConfig(confirm=2, max_missed=4))
    outs, stats, _ = run(engines, clip, opts)
    first = {p.track_id for persons in outs[:6] for p in persons} - {None}
    assert len(first) >= 3
    # the black frames show no tracked person (PicoDet sees one in a black frame: shown as the Pipeline gives it,
    # with a collapsed pose and no track)
    assert all(p.track_id is None and p.score < 0.05 for persons in outs[6:12] for p in persons)
    assert stats.redetections >= 1
    later = {p.track_id for persons in outs[12:] for p in persons} - {None}
    assert later and min(later) > max(first)
    assert stats.detector_calls < len(clip) // 2
