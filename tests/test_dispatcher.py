"""Dispatcher with real ONNX Runtime sessions: TinyPose 128x96 (small), 256x192 (large), the DynPose router."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from dynpose.data import gt_boxes, load_coco
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.runtime.backends.ort import OrtRunner
from dynpose.runtime.decode import average_flip, decode_heatmaps
from dynpose.runtime.dispatcher import Dispatcher
from dynpose.runtime.model import PoseModel, Router
from dynpose.runtime.preprocess import box_to_center_scale, crop, normalize, to_model_colors, warp_matrix


@pytest.fixture(scope="module")
def models(tinypose_engine_dir: Path):
    m = Manifest.load(tinypose_engine_dir)
    out = {}
    for role in ("router", "small", "large"):
        e = m.require(role)
        runner = OrtRunner(tinypose_engine_dir / e.file, intra_op_threads=1, name=role).activate()
        out[role] = (Router if role == "router" else PoseModel)(runner, e.card)
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


def make_dispatcher(models, policy: str, flip: bool = False) -> Dispatcher:
    return Dispatcher(models["small"], models["large"], router=models["router"], policy=policy, flip=flip)


def alone(model: PoseModel, image: np.ndarray, boxes: np.ndarray, flip: bool = False) -> np.ndarray:
    """The reference: one model alone, cropped with the plain preprocess functions."""
    runner, card = model.runner, model.card
    c, s = box_to_center_scale(boxes, card.aspect_ratio, card.padding)
    batch = normalize(crop([image], np.zeros(len(c), np.int64), c, s, card), card)
    hm = runner.infer(batch)
    if flip:
        hm = average_flip(hm, runner.infer(batch[..., ::-1]), card.keypoint_set.flip_index())
    return decode_heatmaps(hm, c, s, card)


def test_crop_is_the_warp_of_the_image_in_model_colours(models, coco_frames) -> None:
    images, boxes = coco_frames
    card = models["small"].card
    c, s = box_to_center_scale(boxes[0], card.aspect_ratio, card.padding)
    rgb = np.ascontiguousarray(to_model_colors(images[0], card))
    ref = np.stack([cv2.warpAffine(rgb, warp_matrix(c[i], s[i], card), card.input_size) for i in range(len(c))])
    got = crop(images, np.zeros(len(c), dtype=np.int64), c, s, card)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)
    # the router card crops like the large TinyPose card, so the dispatcher reuses its crops
    assert models["router"].same_crop(models["large"])
    assert not models["router"].same_crop(models["small"])


@pytest.mark.parametrize("flip", [False, True])
def test_results_in_input_order_equal_each_model_alone(models, coco_frames, flip: bool) -> None:
    images, boxes = coco_frames
    with make_dispatcher(models, "fraction:0.5", flip=flip) as d:
        res = d.run(images, boxes)
    n = sum(len(b) for b in boxes)
    assert res.keypoints.shape == (n, 17, 3)
    assert res.counts == {"small": n - round(n / 2), "large": round(n / 2)}
    assert np.isfinite(res.router_scores).all()
    # the routed half are the crops with the highest router score[1]
    assert res.router_scores[res.large].min() >= res.router_scores[~res.large].max()
    for i, sl in enumerate(res.frame_slices(len(images))):
        ref_small = alone(models["small"], images[i], boxes[i], flip)
        ref_large = alone(models["large"], images[i], boxes[i], flip)
        want = np.where(res.large[sl][:, None, None], ref_large, ref_small)
        np.testing.assert_allclose(res.keypoints[sl], want, atol=1e-3)
        assert (res.frame_index[sl] == i).all()


def test_router_smaller_max_batch_than_the_pose_models(models, coco_frames, tinypose_engine_dir: Path) -> None:
    """The router's crops serve the large model even when the router ran them in several batches."""
    images, boxes = coco_frames
    e = Manifest.load(tinypose_engine_dir).require("router")
    runner = OrtRunner(tinypose_engine_dir / e.file, max_batch=2, intra_op_threads=1, name="router").activate()
    try:
        small_router = Router(runner, e.card)
        with make_dispatcher(models, "fraction:0.5") as d:
            want = d.run(images, boxes)
        with Dispatcher(models["small"], models["large"], router=small_router, policy="fraction:0.5") as d:
            got = d.run(images, boxes)
    finally:
        runner.deactivate()
    np.testing.assert_array_equal(got.large, want.large)
    np.testing.assert_allclose(got.keypoints, want.keypoints, atol=1e-4)


def test_flip_changes_but_keeps_keypoints_close(models, coco_frames) -> None:
    images, boxes = coco_frames
    with make_dispatcher(models, "all-large") as d, make_dispatcher(models, "all-large", flip=True) as df:
        a, b = d.run(images, boxes), df.run(images, boxes)
    assert not np.allclose(a.keypoints, b.keypoints)
    # mirrored pass averages in: same people, same joints (within a few pixels), left/right not swapped
    assert np.median(np.abs(a.keypoints[..., :2] - b.keypoints[..., :2])) < 3.0


def test_router_free_policy_skips_router(models, coco_frames) -> None:
    images, boxes = coco_frames
    with make_dispatcher(models, "all-small") as d:
        res = d(images[0], boxes[0])
    assert [s.model for s in res.spans] == ["small"]
    assert np.isnan(res.router_scores).all() and res.counts["large"] == 0
    with make_dispatcher(models, "box:20000") as d:
        res = d(images[0], boxes[0])
    areas = boxes[0][:, 2] * boxes[0][:, 3]
    assert (res.large == (areas >= 20000)).all()


def test_empty_and_bad_input(models, coco_frames) -> None:
    images, _ = coco_frames
    with make_dispatcher(models, "band:0.59,0.69") as d:
        res = d.run([images[0]], [np.zeros((0, 4))])
        assert res.keypoints.shape == (0, 17, 3) and res.spans == []
        with pytest.raises(DynPoseError, match="boxes must be"):
            d(images[0], np.zeros((3, 2)))
    with pytest.raises(DynPoseError, match="needs the router"):
        Dispatcher(models["small"], models["large"], policy="threshold:0.5")


def test_small_and_large_workers_overlap(models, coco_frames) -> None:
    """Each sub-batch is big enough (~100 ms+ on one core) that overlapping worker spans show concurrency; no
    speed is asserted, only that the two workers were busy at the same time."""
    images, boxes = coco_frames
    img, box = images[3], boxes[3]
    many = np.concatenate([box] * (48 // len(box) + 1))[:48]
    with make_dispatcher(models, "fraction:0.4") as d:
        res = d(img, many)
    spans = {s.model: s for s in res.spans}
    assert spans["small"].count + spans["large"].count == 48 and spans["router"].count == 48
    small, large = spans["small"], spans["large"]
    for s in (small, large):
        print(f"{s.model}: {s.count} crops, {1e3 * (s.end - s.start):.0f} ms")
    overlap = min(small.end, large.end) - max(small.start, large.start)
    print(f"overlap {1e3 * overlap:.0f} ms")
    assert overlap > 0
    # the router ran before both pose models
    assert spans["router"].end <= min(small.start, large.start)
