"""The planner and the local executor with real ONNX Runtime sessions: TinyPose 128x96 (small), 256x192 (large), the
DynPose router. Pure planner tests (stages, kept decisions, audit sampling) need no model at all."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import tinypose_card

from dynpose.data import gt_boxes, load_coco
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.roles import Role
from dynpose.runtime.backends.ort import OrtRunner
from dynpose.runtime.boxes import Boxes
from dynpose.runtime.decode import average_flip, decode_heatmaps
from dynpose.runtime.execute import Audit, LocalExecutor, execute, execute_many, run_both
from dynpose.runtime.model import PoseModel, Router
from dynpose.runtime.person import Decision
from dynpose.runtime.plan import LARGE, SMALL, Done, FrameInput, Purpose, make_plan, same_crop
from dynpose.runtime.policy import parse_policy
from dynpose.runtime.preprocess import box_to_center_scale, crop, normalize, to_model_colors, warp_matrix


@pytest.fixture(scope="module")
def models(tinypose_engine_dir: Path):
    m = Manifest.load(tinypose_engine_dir)
    out = {}
    for role in (Role.ROUTER, Role.SMALL, Role.LARGE):
        e = m.require(role)
        runner = OrtRunner(tinypose_engine_dir / e.file, intra_op_threads=1, name=role.value).activate()
        out[role] = (Router if role is Role.ROUTER else PoseModel)(runner, e.card)
    yield out
    for h in out.values():
        h.runner.deactivate()


@pytest.fixture(scope="module")
def coco_frames(coco_dir: Path):
    """The four COCO images and their GT person boxes."""
    ds = load_coco(coco_dir / "test_coco.json")
    by_image: dict[int, list[np.ndarray]] = {}
    for iid, box, _ in gt_boxes(ds):
        by_image.setdefault(iid, []).append(box)
    ids = sorted(by_image)
    images = [cv2.imread(str(ds.image_path(coco_dir, i))) for i in ids]
    return images, [np.asarray(by_image[i]) for i in ids]


def frames_of(images, boxes, keep=None) -> list[FrameInput]:
    keep = keep or [None] * len(images)
    return [FrameInput(im, Boxes.of(b, im.shape), k) for im, b, k in zip(images, boxes, keep, strict=True)]


def cards(models) -> dict[Role, ModelCard]:
    return {r: m.card for r, m in models.items()}


def run(models, images, boxes, policy: str, flip: bool = False, keep=None):
    with LocalExecutor(models, flip) as ex:
        return execute(make_plan(frames_of(images, boxes, keep), parse_policy(policy), cards(models)), ex)


def alone(model: PoseModel, image: np.ndarray, boxes: np.ndarray, flip: bool = False) -> np.ndarray:
    """The reference: one model alone, cropped with the plain preprocess functions."""
    runner, card = model.runner, model.card
    c, s = box_to_center_scale(boxes, card.aspect_ratio, card.padding)
    batch = normalize(crop([image], np.zeros(len(c), np.int64), c, s, card), card)
    hm = runner.infer(batch)
    if flip:
        hm = average_flip(hm, runner.infer(batch[..., ::-1]), card.keypoint_set.flip_index())
    return decode_heatmaps(hm, c, s, card)


# -- the planner alone -------------------------------------------------------------------------------------------------
def _plan(policy: str, n: int = 6, keep=None, areas=None):
    img = np.zeros((480, 640, 3), np.uint8)
    sides = np.sqrt(areas) if areas is not None else np.full(n, 100.0)
    boxes = np.array([[10 + 5 * i, 10, s, s] for i, s in enumerate(sides)])
    cs = {Role.SMALL: tinypose_card(96, 128), Role.LARGE: tinypose_card(192, 256)}
    if parse_policy(policy).needs_router:
        cs[Role.ROUTER] = tinypose_card(192, 256)
    return make_plan([FrameInput(img, Boxes.of(boxes, img.shape), keep)], parse_policy(policy), cs)


def _done(work, fill):
    return [Done(w, fill(w)) for w in work]


def test_router_free_policies_decide_at_once() -> None:
    plan = _plan("box:10000", areas=np.array([9000, 11000, 20000, 100, 10000, 5]))
    work = plan.next_work()
    assert {w.role for w in work} == {Role.SMALL, Role.LARGE}
    assert [w.idx.tolist() for w in work] == [[0, 3, 5], [1, 2, 4]]
    plan.take(_done(work, lambda w: np.ones((len(w.idx), 17, 3), np.float32)))
    assert plan.next_work() == []
    res = plan.result()
    assert res.model.tolist() == [SMALL, LARGE, LARGE, SMALL, LARGE, SMALL]
    assert np.isnan(res.router_scores).all() and res.crops[Role.ROUTER] == 0


def test_router_policy_runs_the_router_first_then_the_pose_models() -> None:
    plan = _plan("fraction:0.5")
    (first,) = plan.next_work()
    assert first.role is Role.ROUTER and first.purpose is Purpose.SIGNAL and len(first.idx) == 6
    with pytest.raises(DynPoseError, match="not taken"):
        plan.next_work()
    with pytest.raises(DynPoseError, match="before every stage"):
        plan.result()
    scores = np.array([0.1, 0.9, 0.3, 0.8, 0.2, 0.7])
    plan.take([Done(first, np.stack([1 - scores, scores, scores], axis=1))])
    second = plan.next_work()
    assert {w.role: w.idx.tolist() for w in second} == {Role.SMALL: [0, 2, 4], Role.LARGE: [1, 3, 5]}
    plan.take(_done(second, lambda w: np.zeros((len(w.idx), 17, 3), np.float32)))
    res = plan.result()
    np.testing.assert_allclose(res.router_scores, scores, rtol=1e-6)
    assert res.crops == {Role.ROUTER: 6, Role.SMALL: 3, Role.LARGE: 3}


def test_cascade_escalates_the_unsure_and_their_answer_replaces_the_small_one() -> None:
    plan = _plan("cascade:0.5")
    (first,) = plan.next_work()
    assert first.role is Role.SMALL and len(first.idx) == 6
    conf = np.array([0.9, 0.2, 0.6, np.nan, 0.49, 0.5])
    small = np.zeros((6, 17, 3), np.float32)
    small[:, :, 2] = conf[:, None]
    plan.take([Done(first, small)])
    (second,) = plan.next_work()
    assert second.role is Role.LARGE and second.idx.tolist() == [1, 3, 4]  # NaN confidence escalates too
    large = np.full((3, 17, 3), 7.0, np.float32)
    plan.take([Done(second, large)])
    res = plan.result()
    assert res.decision == [Decision.POLICY, Decision.ESCALATED, Decision.POLICY, Decision.ESCALATED] + [
        Decision.ESCALATED,
        Decision.POLICY,
    ]
    assert (res.keypoints[[1, 3, 4]] == 7.0).all() and (res.keypoints[[0, 2, 5], :, :2] == 0).all()
    assert res.nan_signals == 1 and res.crops == {Role.ROUTER: 0, Role.SMALL: 6, Role.LARGE: 3}
    np.testing.assert_allclose(res.confidence[[0, 1, 2, 4, 5]], conf[[0, 1, 2, 4, 5]], rtol=1e-6)


def test_kept_decisions_skip_the_signal_and_run_at_once() -> None:
    keep = (Role.LARGE, None, Role.SMALL, None, None, Role.LARGE)
    plan = _plan("threshold:0.5", keep=keep)
    first = {w.role: w.idx.tolist() for w in plan.next_work()}
    assert first == {Role.ROUTER: [1, 3, 4], Role.SMALL: [2], Role.LARGE: [0, 5]}
    with pytest.raises(DynPoseError, match="kept decisions for"):
        FrameInput(np.zeros((4, 4, 3), np.uint8), Boxes.of(np.ones((2, 4)), (4, 4)), (None,))


def test_audit_samples_only_persons_the_small_model_answered() -> None:
    plan = _plan("all-small", n=200)
    for w in plan.next_work():
        plan.take([Done(w, np.zeros((len(w.idx), 17, 3), np.float32))])
    assert plan.next_work() == []
    (audit,) = plan.audit_work(0.25, np.random.default_rng(0))
    assert audit.purpose is Purpose.AUDIT and audit.role is Role.LARGE and 25 < len(audit.idx) < 75
    sample = plan.audit_sample([Done(audit, np.ones((len(audit.idx), 17, 3), np.float32))])
    assert sample.small.shape == sample.large.shape == (len(audit.idx), 17, 3)
    assert _plan("all-large").audit_work(1.0, np.random.default_rng(0)) in ([],)  # nothing answered by small


def test_boxes_validated_once_and_rows_kept() -> None:
    b = Boxes.of([[0, 0, 10, 10, 0.9], [5, 5, 0, 10, 0.8], [np.nan, 0, 1, 1, 1], [1, 1, 5, 5, 0.5]], (100, 100))
    assert b.rows.tolist() == [0, 3] and b.dropped == 2 and b.scored
    assert not Boxes.of([[0, 0, 10, 10]], (100, 100)).scored
    with pytest.raises(DynPoseError, match="boxes must be"):
        Boxes.of(np.zeros((3, 2)), (100, 100))
    with pytest.raises(DynPoseError, match="more than the 3 allowed"):
        Boxes.of(np.ones((4, 4)), (100, 100), max_boxes=3)


# -- with models -------------------------------------------------------------------------------------------------------
def test_crop_is_the_warp_of_the_image_in_model_colours(models, coco_frames) -> None:
    images, boxes = coco_frames
    card = models[Role.SMALL].card
    c, s = box_to_center_scale(boxes[0], card.aspect_ratio, card.padding)
    rgb = np.ascontiguousarray(to_model_colors(images[0], card))
    ref = np.stack([cv2.warpAffine(rgb, warp_matrix(c[i], s[i], card), card.input_size) for i in range(len(c))])
    got = crop(images, np.zeros(len(c), dtype=np.int64), c, s, card)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)
    # the router card crops like the large TinyPose card, so the plan reuses its crops
    assert same_crop(models[Role.ROUTER].card, models[Role.LARGE].card)
    assert not same_crop(models[Role.ROUTER].card, models[Role.SMALL].card)


@pytest.mark.parametrize("flip", [False, True])
def test_results_in_input_order_equal_each_model_alone(models, coco_frames, flip: bool) -> None:
    images, boxes = coco_frames
    res = run(models, images, boxes, "fraction:0.5", flip=flip)
    n = sum(len(b) for b in boxes)
    large = res.model == LARGE
    assert res.keypoints.shape == (n, 17, 3)
    assert (int((~large).sum()), int(large.sum())) == (n - round(n / 2), round(n / 2))
    assert np.isfinite(res.router_scores).all()
    # the routed half are the crops with the highest router score[1]
    assert res.router_scores[large].min() >= res.router_scores[~large].max()
    for i, sl in enumerate(res.frame_slices()):
        ref_small = alone(models[Role.SMALL], images[i], boxes[i], flip)
        ref_large = alone(models[Role.LARGE], images[i], boxes[i], flip)
        want = np.where(large[sl][:, None, None], ref_large, ref_small)
        np.testing.assert_allclose(res.keypoints[sl], want, atol=1e-3)
        assert (res.frame_index[sl] == i).all()


def test_cascade_answers_are_each_model_alone(models, coco_frames) -> None:
    images, boxes = coco_frames
    conf = run(models, images, boxes, "all-small").keypoints[:, :, 2].mean(axis=1)
    t = float(np.median(conf))  # half the persons escalate
    res = run(models, images, boxes, f"cascade:{t!r}")
    esc = np.array([d is Decision.ESCALATED for d in res.decision])
    assert esc.any() and (~esc).any() and (res.model[esc] == LARGE).all()
    assert (res.confidence[esc] < t).all() and (res.confidence[~esc] >= t).all()
    for i, sl in enumerate(res.frame_slices()):
        want = np.where(
            esc[sl][:, None, None],
            alone(models[Role.LARGE], images[i], boxes[i]),
            alone(models[Role.SMALL], images[i], boxes[i]),
        )
        np.testing.assert_allclose(res.keypoints[sl], want, atol=1e-3)


def test_router_smaller_max_batch_than_the_pose_models(models, coco_frames, tinypose_engine_dir: Path) -> None:
    """The router's crops serve the large model even when the router ran them in several batches."""
    images, boxes = coco_frames
    e = Manifest.load(tinypose_engine_dir).require(Role.ROUTER)
    runner = OrtRunner(tinypose_engine_dir / e.file, max_batch=2, intra_op_threads=1, name="router").activate()
    try:
        want = run(models, images, boxes, "fraction:0.5")
        got = run({**models, Role.ROUTER: Router(runner, e.card)}, images, boxes, "fraction:0.5")
    finally:
        runner.deactivate()
    np.testing.assert_array_equal(got.model, want.model)
    np.testing.assert_allclose(got.keypoints, want.keypoints, atol=1e-4)


def test_flip_changes_but_keeps_keypoints_close(models, coco_frames) -> None:
    images, boxes = coco_frames
    a, b = run(models, images, boxes, "all-large"), run(models, images, boxes, "all-large", flip=True)
    assert not np.allclose(a.keypoints, b.keypoints)
    # mirrored pass averages in: same people, same joints (within a few pixels), left/right not swapped
    assert np.median(np.abs(a.keypoints[..., :2] - b.keypoints[..., :2])) < 3.0


def test_router_free_policy_skips_router(models, coco_frames) -> None:
    images, boxes = coco_frames
    res = run(models, images[:1], boxes[:1], "all-small")
    assert [s[0] for s in res.spans] == [Role.SMALL]
    assert np.isnan(res.router_scores).all() and (res.model == SMALL).all()
    res = run(models, images[:1], boxes[:1], "box:20000")
    areas = boxes[0][:, 2] * boxes[0][:, 3]
    assert ((res.model == LARGE) == (areas >= 20000)).all()


def test_empty_and_bad_input(models, coco_frames) -> None:
    images, _ = coco_frames
    res = run(models, [images[0]], [np.zeros((0, 4))], "band:0.59,0.69")
    assert res.keypoints.shape == (0, 17, 3) and res.spans == []
    without_router = {r: m.card for r, m in models.items() if r is not Role.ROUTER}
    with pytest.raises(DynPoseError, match="needs the router"):
        make_plan([], parse_policy("threshold:0.5"), without_router)
    with pytest.raises(DynPoseError, match="H x W x 3 uint8"):
        FrameInput(np.zeros((4, 4), np.float32), Boxes.empty())


def test_small_and_large_workers_overlap(models, coco_frames) -> None:
    """Each model's work is big enough (~100 ms+ on one core) that overlapping spans show concurrency; no speed is
    asserted, only that the two workers were busy at the same time."""
    images, boxes = coco_frames
    img, box = images[3], boxes[3]
    many = np.concatenate([box] * (48 // len(box) + 1))[:48]
    res = run(models, [img], [many], "fraction:0.4")
    spans = {role: (a, b, n) for role, a, b, n in res.spans}
    assert spans[Role.SMALL][2] + spans[Role.LARGE][2] == 48 and spans[Role.ROUTER][2] == 48
    (s0, s1, _), (l0, l1, _) = spans[Role.SMALL], spans[Role.LARGE]
    print(
        f"small {1e3 * (s1 - s0):.0f} ms, large {1e3 * (l1 - l0):.0f} ms, overlap {1e3 * (min(s1, l1) - max(s0, l0)):.0f} ms"
    )
    assert min(s1, l1) - max(s0, l0) > 0
    # the router ran before both pose models
    assert spans[Role.ROUTER][1] <= min(s0, l0)


def test_cascade_batches_overlap_the_next_small_pass_with_the_escalations(models, coco_frames) -> None:
    """With two plans in flight, the small model works on the second batch while the large model escalates the
    first one's persons (the cascade's overlap)."""
    images, boxes = coco_frames
    img, box = images[3], boxes[3]
    many = np.concatenate([box] * (48 // len(box) + 1))[:48]
    policy = parse_policy("cascade:0.99")  # nearly everyone escalates: long large passes
    with LocalExecutor(models) as ex:
        plans = [make_plan(frames_of([img], [many]), policy, cards(models)) for _ in range(2)]
        first, second = execute_many(plans, ex, depth=2)
    l0, l1 = next((a, b) for r, a, b, _ in first.spans if r is Role.LARGE)
    s0, s1 = next((a, b) for r, a, b, _ in second.spans if r is Role.SMALL)
    assert min(l1, s1) - max(l0, s0) > 0


def test_run_both_and_audit_give_both_models_on_the_same_persons(models, coco_frames) -> None:
    images, boxes = coco_frames
    pose = {r: m for r, m in models.items() if r is not Role.ROUTER}
    with LocalExecutor(pose) as ex:
        small, large = run_both(frames_of(images, boxes), cards(pose), ex)
        got = []
        plan = make_plan(frames_of(images, boxes), parse_policy("all-small"), cards(pose))
        execute(plan, ex, Audit(1.0, got.append, seed=0))
    assert (small.model == SMALL).all() and (large.model == LARGE).all()
    assert len(got) == 1  # the audit finished on the large model's worker before the executor closed
    np.testing.assert_allclose(got[0].small, small.keypoints, atol=1e-5)
    np.testing.assert_allclose(got[0].large, large.keypoints, atol=1e-5)
