"""Decoders, flip test, rescoring, OKS and OKS-NMS against direct transcriptions of the official code, synthetic
sub-pixel heatmaps, and the real TinyPose models on the 12 annotated COCO persons."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from test_geometry import BOXES, ref_transform_preds

from dynpose.data import gt_boxes, load_coco
from dynpose.keypoints import COCO17
from dynpose.models.card import ModelCard
from dynpose.runtime.backends.ort.runner import OrtRunner
from dynpose.runtime.decode import average_flip, decode_heatmaps, flip_back, get_max_preds
from dynpose.runtime.postprocess import oks, oks_matrix, oks_nms, rescore
from dynpose.runtime.preprocess import box_to_center_scale, crop, normalize

# -- official HRNet lib/core/inference.py -------------------------------------------------------------------------


def ref_get_max_preds(batch_heatmaps):
    batch_size, num_joints, width = batch_heatmaps.shape[0], batch_heatmaps.shape[1], batch_heatmaps.shape[3]
    heatmaps_reshaped = batch_heatmaps.reshape((batch_size, num_joints, -1))
    idx = np.argmax(heatmaps_reshaped, 2)
    maxvals = np.amax(heatmaps_reshaped, 2)
    maxvals = maxvals.reshape((batch_size, num_joints, 1))
    idx = idx.reshape((batch_size, num_joints, 1))
    preds = np.tile(idx, (1, 1, 2)).astype(np.float32)
    preds[:, :, 0] = (preds[:, :, 0]) % width
    preds[:, :, 1] = np.floor((preds[:, :, 1]) / width)
    pred_mask = np.tile(np.greater(maxvals, 0.0), (1, 1, 2)).astype(np.float32)
    preds *= pred_mask
    return preds, maxvals


def ref_final_preds_msra(batch_heatmaps, center, scale):
    coords, maxvals = ref_get_max_preds(batch_heatmaps)
    heatmap_height, heatmap_width = batch_heatmaps.shape[2], batch_heatmaps.shape[3]
    for n in range(coords.shape[0]):
        for p in range(coords.shape[1]):
            hm = batch_heatmaps[n][p]
            px = int(math.floor(coords[n][p][0] + 0.5))
            py = int(math.floor(coords[n][p][1] + 0.5))
            if 1 < px < heatmap_width - 1 and 1 < py < heatmap_height - 1:
                diff = np.array([hm[py][px + 1] - hm[py][px - 1], hm[py + 1][px] - hm[py - 1][px]])
                coords[n][p] += np.sign(diff) * 0.25
    preds = coords.copy()
    for i in range(coords.shape[0]):
        preds[i] = ref_transform_preds(coords[i], center[i], scale[i], [heatmap_width, heatmap_height])
    return preds, maxvals


# -- DarkPose (Zhang et al.) lib/core/inference.py -----------------------------------------------------------------


def ref_taylor(hm, coord):
    heatmap_height, heatmap_width = hm.shape[0], hm.shape[1]
    px, py = int(coord[0]), int(coord[1])
    if 1 < px < heatmap_width - 2 and 1 < py < heatmap_height - 2:
        dx = 0.5 * (hm[py][px + 1] - hm[py][px - 1])
        dy = 0.5 * (hm[py + 1][px] - hm[py - 1][px])
        dxx = 0.25 * (hm[py][px + 2] - 2 * hm[py][px] + hm[py][px - 2])
        dxy = 0.25 * (hm[py + 1][px + 1] - hm[py - 1][px + 1] - hm[py + 1][px - 1] + hm[py - 1][px - 1])
        dyy = 0.25 * (hm[py + 2 * 1][px] - 2 * hm[py][px] + hm[py - 2 * 1][px])
        derivative = np.array([[dx], [dy]])
        hessian = np.array([[dxx, dxy], [dxy, dyy]])
        if dxx * dyy - dxy**2 != 0:
            hessianinv = np.linalg.inv(hessian)
            offset = -hessianinv @ derivative
            offset = np.squeeze(np.array(offset.T), axis=0)
            coord += offset
    return coord


def ref_gaussian_blur(hm, kernel):
    border = (kernel - 1) // 2
    batch_size, num_joints, height, width = hm.shape
    for i in range(batch_size):
        for j in range(num_joints):
            origin_max = np.max(hm[i, j])
            dr = np.zeros((height + 2 * border, width + 2 * border))
            dr[border:-border, border:-border] = hm[i, j].copy()
            dr = cv2.GaussianBlur(dr, (kernel, kernel), 0)
            hm[i, j] = dr[border:-border, border:-border].copy()
            hm[i, j] *= origin_max / np.max(hm[i, j])
    return hm


def ref_final_preds_dark(hm, center, scale, kernel=11):
    coords, maxvals = ref_get_max_preds(hm)
    heatmap_height, heatmap_width = hm.shape[2], hm.shape[3]
    hm = ref_gaussian_blur(hm.copy(), kernel)
    hm = np.maximum(hm, 1e-10)
    hm = np.log(hm)
    for n in range(coords.shape[0]):
        for p in range(coords.shape[1]):
            coords[n, p] = ref_taylor(hm[n][p], coords[n][p])
    preds = coords.copy()
    for i in range(coords.shape[0]):
        preds[i] = ref_transform_preds(coords[i], center[i], scale[i], [heatmap_width, heatmap_height])
    return preds, maxvals


# -- MMPose 1.x UDPHeatmap.decode + refine_keypoints_dark_udp + TopdownPoseEstimator -------------------------------


def ref_udp(heatmaps, kernel=11):
    """One instance: (K,H,W) -> keypoints (K,2) in heatmap pixels (before the (size-1) scaling)."""
    K, H, W = heatmaps.shape
    flat = heatmaps.reshape(K, -1)
    idx = np.argmax(flat, axis=1)
    keypoints = np.stack(np.unravel_index(idx, (H, W))[::-1], axis=-1).astype(np.float32)[None]
    hm = ref_gaussian_blur(heatmaps[None].astype(np.float64).copy(), kernel)[0]
    np.clip(hm, 1e-3, 50.0, hm)
    np.log(hm, hm)
    heatmaps_pad = np.pad(hm, ((0, 0), (1, 1), (1, 1)), mode="edge").flatten()
    for n in range(1):
        index = keypoints[n, :, 0] + 1 + (keypoints[n, :, 1] + 1) * (W + 2)
        index += (W + 2) * (H + 2) * np.arange(0, K)
        index = index.astype(int).reshape(-1, 1)
        i_ = heatmaps_pad[index]
        ix1 = heatmaps_pad[index + 1]
        iy1 = heatmaps_pad[index + W + 2]
        ix1y1 = heatmaps_pad[index + W + 3]
        ix1_y1_ = heatmaps_pad[index - W - 3]
        ix1_ = heatmaps_pad[index - 1]
        iy1_ = heatmaps_pad[index - 2 - W]
        dx = 0.5 * (ix1 - ix1_)
        dy = 0.5 * (iy1 - iy1_)
        derivative = np.concatenate([dx, dy], axis=1).reshape(K, 2, 1)
        dxx = ix1 - 2 * i_ + ix1_
        dyy = iy1 - 2 * i_ + iy1_
        dxy = 0.5 * (ix1y1 - ix1 - iy1 + i_ + i_ - ix1_ - iy1_ + ix1_y1_)
        hessian = np.concatenate([dxx, dxy, dxy, dyy], axis=1).reshape(K, 2, 2)
        hessian = np.linalg.inv(hessian + np.finfo(np.float32).eps * np.eye(2))
        keypoints[n] -= np.einsum("imn,ink->imk", hessian, derivative).squeeze()
    return keypoints[0]


# -- official flip / rescoring / OKS-NMS ---------------------------------------------------------------------------


def ref_flip_back(output_flipped, matched_parts):
    output_flipped = output_flipped[:, :, :, ::-1].copy()
    for pair in matched_parts:
        tmp = output_flipped[:, pair[0], :, :].copy()
        output_flipped[:, pair[0], :, :] = output_flipped[:, pair[1], :, :]
        output_flipped[:, pair[1], :, :] = tmp
    return output_flipped


def ref_rescore(kpts, box_scores, in_vis_thre=0.2):
    out = []
    for kp, box_score in zip(kpts, box_scores, strict=True):
        kpt_score, valid_num = 0, 0
        for n_jt in range(kp.shape[0]):
            t_s = kp[n_jt][2]
            if t_s > in_vis_thre:
                kpt_score = kpt_score + t_s
                valid_num = valid_num + 1
        if valid_num != 0:
            kpt_score = kpt_score / valid_num
        out.append(kpt_score * box_score)
    return np.array(out)


def ref_oks_iou(g, d, a_g, a_d, sigmas):
    vars = (sigmas * 2) ** 2
    xg, yg = g[0::3], g[1::3]
    ious = np.zeros(d.shape[0])
    for n_d in range(d.shape[0]):
        xd, yd = d[n_d, 0::3], d[n_d, 1::3]
        dx, dy = xd - xg, yd - yg
        e = (dx**2 + dy**2) / vars / ((a_g + a_d[n_d]) / 2 + np.spacing(1)) / 2
        ious[n_d] = np.sum(np.exp(-e)) / e.shape[0] if e.shape[0] != 0 else 0.0
    return ious


def ref_oks_nms(kpts, scores, areas, thresh, sigmas):
    kpts = kpts.reshape(len(kpts), -1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        oks_ovr = ref_oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas)
        inds = np.where(oks_ovr <= thresh)[0]
        order = order[inds + 1]
    return keep


# -- helpers -------------------------------------------------------------------------------------------------------

CARD = ModelCard(name="t", input_width=192, input_height=256)


def gaussian_heatmaps(centres: np.ndarray, size=(48, 64), sigma=2.0) -> np.ndarray:
    """(N,K,2) sub-pixel centres -> (N,K,h,w) unnormalised Gaussians, as the training targets are drawn."""
    w, h = size
    xs, ys = np.arange(w)[None, None, None, :], np.arange(h)[None, None, :, None]
    cx, cy = centres[..., 0, None, None], centres[..., 1, None, None]
    return np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2)).astype(np.float32)


def random_heatmaps(seed: int, n: int, k: int = 17, size=(48, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w, h = size
    centres = rng.uniform([-2, -2], [w + 1, h + 1], (n, k, 2))
    hm = gaussian_heatmaps(centres, size) * rng.uniform(0.2, 1.0, (n, k, 1, 1)).astype(np.float32)
    hm += rng.normal(0, 0.01, hm.shape).astype(np.float32)
    hm[0, 0] = -np.abs(hm[0, 0]) - 0.1  # a joint with no positive response
    return hm


# -- tests ---------------------------------------------------------------------------------------------------------


def test_get_max_preds_matches_official():
    hm = random_heatmaps(1, 6)
    preds, maxvals = get_max_preds(hm)
    rp, rm = ref_get_max_preds(hm)
    np.testing.assert_array_equal(preds, rp)
    np.testing.assert_array_equal(maxvals, rm)


@pytest.mark.parametrize("size", [(48, 64), (24, 32)])
def test_msra_matches_official(size):
    n = len(BOXES)
    hm = random_heatmaps(2, n, size=size)
    card = CARD.with_(input_width=size[0] * 4, input_height=size[1] * 4)
    c, s = box_to_center_scale(BOXES, card.aspect_ratio)
    out = decode_heatmaps(hm, c, s, card)
    ref, maxvals = ref_final_preds_msra(hm, c, s / 200.0)
    np.testing.assert_allclose(out[..., :2], ref, atol=1e-3)
    np.testing.assert_allclose(out[..., 2], maxvals[..., 0])


def test_dark_matches_official():
    n = len(BOXES)
    hm = random_heatmaps(3, n)
    c, s = box_to_center_scale(BOXES, CARD.aspect_ratio)
    out = decode_heatmaps(hm, c, s, CARD.with_(decoder="dark"))
    ref, _ = ref_final_preds_dark(hm, c, s / 200.0, kernel=11)
    np.testing.assert_allclose(out[..., :2], ref, atol=1e-3)


def test_udp_matches_mmpose():
    n = len(BOXES)
    hm = random_heatmaps(4, n)
    hm[0, 0] = np.abs(hm[0, 0])  # MMPose marks non-positive maxima -1; compare where both find a maximum
    c, s = box_to_center_scale(BOXES, CARD.aspect_ratio)
    out = decode_heatmaps(hm, c, s, CARD.with_(decoder="udp"))
    input_size = np.array([192, 256])
    for i in range(n):
        kp = ref_udp(hm[i], kernel=11) / np.array([47, 63]) * input_size
        ref = kp / input_size * s[i] + c[i] - 0.5 * s[i]
        np.testing.assert_allclose(out[i, :, :2], ref, atol=1e-3)


def test_subpixel_recovery_on_synthetic_gaussians():
    rng = np.random.default_rng(5)
    w, h = 48, 64
    truth = rng.uniform([4, 4], [w - 5, h - 5], (8, 17, 2))
    hm = gaussian_heatmaps(truth, (w, h))
    # centre/scale chosen so image pixels equal heatmap pixels: errors read directly in heatmap pixels
    c_std, s_std = np.tile([w / 2, h / 2], (8, 1)), np.tile([w, h], (8, 1)).astype(float)
    c_udp, s_udp = np.tile([(w - 1) / 2, (h - 1) / 2], (8, 1)), np.tile([w - 1, h - 1], (8, 1)).astype(float)
    err = {}
    for dec, c, s in (("msra", c_std, s_std), ("dark", c_std, s_std), ("udp", c_udp, s_udp)):
        out = decode_heatmaps(hm, c, s, CARD.with_(decoder=dec))
        err[dec] = np.abs(out[..., :2] - truth).max()
    assert err["msra"] <= 0.25 + 1e-6
    assert err["dark"] < 0.1
    assert err["udp"] < 0.1
    assert err["dark"] < err["msra"]


def test_degenerate_heatmaps_do_not_crash():
    c, s = box_to_center_scale(BOXES[:3], 0.75)
    for hm in (
        np.zeros((3, 17, 64, 48), np.float32),
        np.full((3, 17, 64, 48), -1.0, np.float32),
        np.ones((3, 17, 64, 48), np.float32),
    ):
        for dec in ("msra", "dark", "udp"):
            out = decode_heatmaps(hm, c, s, CARD.with_(decoder=dec))
            assert out.shape == (3, 17, 3) and np.isfinite(out).all()
    nan = np.full((3, 17, 64, 48), np.nan, np.float32)
    nan[1] = random_heatmaps(11, 1)[0]
    nan[1, :, 5, 5] = np.inf
    for dec in ("msra", "dark", "udp"):
        out = decode_heatmaps(nan, c, s, CARD.with_(decoder=dec))
        assert np.isfinite(out[..., :2]).all()
    assert decode_heatmaps(np.zeros((0, 17, 64, 48), np.float32), np.zeros((0, 2)), np.zeros((0, 2)), CARD).shape == (
        0,
        17,
        3,
    )


def test_flip_back_and_average_match_official():
    hm = random_heatmaps(6, 3)
    flipped = random_heatmaps(7, 3)
    idx = COCO17.flip_index()
    np.testing.assert_array_equal(flip_back(flipped, idx), ref_flip_back(flipped, COCO17.flip_pairs))
    ref = ref_flip_back(flipped, COCO17.flip_pairs)
    ref_shift = ref.copy()
    ref_shift[:, :, :, 1:] = ref.copy()[:, :, :, 0:-1]
    np.testing.assert_allclose(average_flip(hm, flipped, idx), (hm + ref_shift) * 0.5, atol=1e-7)
    np.testing.assert_allclose(average_flip(hm, flipped, idx, shift=False), (hm + ref) * 0.5, atol=1e-7)


def test_rescore_matches_official():
    rng = np.random.default_rng(8)
    kp = rng.uniform(0, 1, (20, 17, 3))
    kp[3, :, 2] = 0.1  # no keypoint above the threshold
    bs = rng.uniform(0.3, 1.0, 20)
    np.testing.assert_allclose(rescore(kp, bs), ref_rescore(kp, bs), atol=1e-12)
    assert rescore(kp, bs)[3] == 0.0


def test_oks_nms_matches_official():
    rng = np.random.default_rng(9)
    base = rng.uniform(0, 300, (4, 17, 2))
    kp = np.concatenate([base[i] + rng.normal(0, sd, (5, 17, 2)) for i, sd in enumerate((1, 3, 8, 20))])
    kp = np.concatenate([kp, rng.uniform(0, 1, (len(kp), 17, 1))], axis=2)
    scores = rng.uniform(0, 1, len(kp))
    areas = rng.uniform(2000, 20000, len(kp))
    sig = np.asarray(COCO17.sigmas)
    for thr in (0.3, 0.9):
        assert oks_nms(kp, scores, areas, thr) == ref_oks_nms(kp, scores, areas, thr, sig)
    assert oks_nms(np.zeros((0, 17, 3)), np.zeros(0), np.zeros(0)) == []


def test_oks_matches_pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(10)
    gt_kp = np.concatenate([rng.uniform(50, 250, (17, 2)), rng.integers(0, 3, (17, 1))], axis=1)
    gt_kp[0, 2] = 2
    area = 9000.0
    preds = gt_kp[None, :, :2] + rng.normal(0, 6, (5, 17, 2))
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 400, "height": 400}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [40, 40, 220, 220],
                "area": area,
                "iscrowd": 0,
                "keypoints": gt_kp.ravel().tolist(),
                "num_keypoints": int((gt_kp[:, 2] > 0).sum()),
            }
        ],
    }
    gt.createIndex()
    dets = [
        {
            "image_id": 1,
            "category_id": 1,
            "score": 1.0 - 0.1 * i,
            "keypoints": np.concatenate([p, np.ones((17, 1))], 1).ravel().tolist(),
        }
        for i, p in enumerate(preds)
    ]
    dt = gt.loadRes(dets)
    ev = COCOeval(gt, dt, "keypoints")
    ev._prepare()
    ref = ev.computeOks(1, 1)[:, 0]  # dets sorted by score: same order as `preds`
    ours = [oks(p, gt_kp, area, COCO17.sigmas) for p in preds]
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    m = oks_matrix(preds, np.stack([gt_kp, gt_kp]), np.array([area, area]))
    np.testing.assert_allclose(m[:, 0], ref, atol=1e-9)
    no_labels = gt_kp.copy()
    no_labels[:, 2] = 0
    assert np.isnan(oks(preds[0], no_labels, area, COCO17.sigmas))


# -- the real models -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_persons(coco_dir):
    ds = load_coco(coco_dir / "test_coco.json")
    items = gt_boxes(ds, min_keypoints=1)
    images = {iid: cv2.imread(str(ds.image_path(coco_dir, iid))) for iid in {i for i, _, _ in items}}
    return items, images


def _mean_oks(model_path, card, coco_persons, flip=False):
    items, images = coco_persons
    vals = []
    with OrtRunner(model_path, intra_op_threads=1) as runner:
        for iid, box, person in items:
            c, s = box_to_center_scale(box[None], card.aspect_ratio, card.padding)
            batch = normalize(crop([images[iid]], np.zeros(len(c), np.int64), c, s, card), card)
            hm = runner.infer(batch)
            if flip:
                hm = average_flip(hm, runner.infer(batch[..., ::-1]), COCO17.flip_index())
            kp = decode_heatmaps(hm, c, s, card)[0]
            vals.append(oks(kp, person.keypoints, person.area, COCO17.sigmas))
    return float(np.mean(vals)), len(vals)


def test_real_tinypose_256_oks(tinypose_256, coco_persons):
    card = ModelCard(name="tinypose_256x192", input_width=192, input_height=256)
    mean, n = _mean_oks(tinypose_256, card, coco_persons)
    assert n == 12
    assert mean > 0.88 and abs(mean - 0.893) < 0.005, mean
    dark, _ = _mean_oks(tinypose_256, card.with_(decoder="dark"), coco_persons)
    assert dark > 0.88, dark
    flip, _ = _mean_oks(tinypose_256, card, coco_persons, flip=True)
    assert flip > 0.88, flip


def test_real_tinypose_128_oks(tinypose_128, coco_persons):
    card = ModelCard(name="tinypose_128x96", input_width=96, input_height=128)
    mean, n = _mean_oks(tinypose_128, card, coco_persons)
    assert n == 12
    assert abs(mean - 0.793) < 0.005, mean
