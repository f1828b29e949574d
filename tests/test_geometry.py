"""Crop and back-projection geometry against direct transcriptions of the official formulas.

Reference functions below transcribe HRNet (deep-high-resolution-net.pytorch `lib/utils/transforms.py`,
`lib/dataset/coco.py::_box2cs`, scale in pixels/200) and MMPose (`get_udp_warp_matrix`, `UDPHeatmap.decode`,
`TopdownPoseEstimator` back-projection) so the package's pixel-scale versions are checked against them.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from dynpose.models.card import ModelCard
from dynpose.runtime.decode import decode_heatmaps
from dynpose.runtime.preprocess import (
    box_to_center_scale,
    crop,
    get_affine_transform,
    get_udp_warp_matrix,
    normalize,
    warp_matrix,
)

# -- official HRNet (pixel_std 200) ------------------------------------------------------------------------------


def ref_box2cs(box, aspect_ratio, pixel_std=200.0):
    x, y, w, h = box
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w * 1.0 / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w * 1.0 / pixel_std, h * 1.0 / pixel_std], dtype=np.float32)
    if center[0] != -1:
        scale = scale * 1.25
    return center, scale


def ref_get_dir(src_point, rot_rad):
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    return [src_point[0] * cs - src_point[1] * sn, src_point[0] * sn + src_point[1] * cs]


def ref_get_3rd_point(a, b):
    direct = a - b
    return b + np.array([-direct[1], direct[0]], dtype=np.float32)


def ref_get_affine_transform(center, scale, rot, output_size, shift=None, inv=0):
    shift = np.array([0, 0], dtype=np.float32) if shift is None else shift  # official default, without B008
    scale_tmp = scale * 200.0
    src_w = scale_tmp[0]
    dst_w, dst_h = output_size[0], output_size[1]
    rot_rad = np.pi * rot / 180
    src_dir = ref_get_dir([0, src_w * -0.5], rot_rad)
    dst_dir = np.array([0, dst_w * -0.5], np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0, :] = center + scale_tmp * shift
    src[1, :] = center + src_dir + scale_tmp * shift
    dst[0, :] = [dst_w * 0.5, dst_h * 0.5]
    dst[1, :] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir
    src[2:, :] = ref_get_3rd_point(src[0, :], src[1, :])
    dst[2:, :] = ref_get_3rd_point(dst[0, :], dst[1, :])
    if inv:
        return cv2.getAffineTransform(np.float32(dst), np.float32(src))
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def ref_affine_transform(pt, t):
    new_pt = np.array([pt[0], pt[1], 1.0]).T
    return np.dot(t, new_pt)[:2]


def ref_transform_preds(coords, center, scale, output_size):
    target = np.zeros(coords.shape)
    trans = ref_get_affine_transform(center, scale, 0, output_size, inv=1)
    for p in range(coords.shape[0]):
        target[p, 0:2] = ref_affine_transform(coords[p, 0:2], trans)
    return target


# -- MMPose UDP ----------------------------------------------------------------------------------------------------


def ref_udp_warp(center, scale, rot, output_size):
    input_size = center * 2
    rot_rad = np.deg2rad(rot)
    warp_mat = np.zeros((2, 3), dtype=np.float32)
    scale_x = (output_size[0] - 1) / scale[0]
    scale_y = (output_size[1] - 1) / scale[1]
    warp_mat[0, 0] = np.cos(rot_rad) * scale_x
    warp_mat[0, 1] = -np.sin(rot_rad) * scale_x
    warp_mat[0, 2] = scale_x * (
        -0.5 * input_size[0] * np.cos(rot_rad) + 0.5 * input_size[1] * np.sin(rot_rad) + 0.5 * scale[0]
    )
    warp_mat[1, 0] = np.sin(rot_rad) * scale_y
    warp_mat[1, 1] = np.cos(rot_rad) * scale_y
    warp_mat[1, 2] = scale_y * (
        -0.5 * input_size[0] * np.sin(rot_rad) - 0.5 * input_size[1] * np.cos(rot_rad) + 0.5 * scale[1]
    )
    return warp_mat


# fixed boxes: square-ish, very wide, very tall, exactly 3:4, tiny, far from the origin
BOXES = np.array(
    [
        [10.0, 20.0, 100.0, 150.0],
        [5.5, 40.25, 300.0, 50.0],
        [200.0, 3.0, 20.0, 400.0],
        [50.0, 60.0, 96.0, 128.0],
        [1.0, 1.0, 3.0, 2.0],
        [1500.0, 900.0, 240.0, 410.0],
    ]
)
CARD = ModelCard(name="t", input_width=192, input_height=256)


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def test_box_to_center_scale_matches_official_box2cs():
    for ar in (192 / 256, 96 / 128, 1.0):
        c, s = box_to_center_scale(BOXES, ar)
        for i, box in enumerate(BOXES):
            rc, rs = ref_box2cs(box, ar)
            np.testing.assert_allclose(c[i], rc, atol=1e-3)
            np.testing.assert_allclose(s[i], rs * 200.0, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("size", [(192, 256), (96, 128), (48, 64)])
def test_affine_matches_official(size):
    c, s = box_to_center_scale(BOXES, size[0] / size[1])
    grid = np.stack(np.meshgrid(np.linspace(-50, 2000, 7), np.linspace(-50, 1500, 5)), -1).reshape(-1, 2)
    for i in range(len(BOXES)):
        ref = ref_get_affine_transform(c[i], s[i] / 200.0, 0, size)
        ours = get_affine_transform(c[i], s[i], size)
        np.testing.assert_allclose(_apply(ours, grid), _apply(ref, grid), atol=1e-3)
        ref_inv = ref_get_affine_transform(c[i], s[i] / 200.0, 0, size, inv=1)
        ours_inv = get_affine_transform(c[i], s[i], size, inv=True)
        np.testing.assert_allclose(_apply(ours_inv, grid / 10), _apply(ref_inv, grid / 10), atol=1e-3)
        # rotation and shift follow the official code too
        ref_r = ref_get_affine_transform(c[i], s[i] / 200.0, 30.0, size, shift=np.array([0.1, -0.05]))
        ours_r = get_affine_transform(c[i], s[i], size, rot=30.0, shift=(0.1, -0.05))
        np.testing.assert_allclose(_apply(ours_r, grid), _apply(ref_r, grid), atol=1e-3)


def test_udp_warp_matches_mmpose():
    grid = np.stack(np.meshgrid(np.linspace(0, 2000, 6), np.linspace(0, 1500, 4)), -1).reshape(-1, 2)
    c, s = box_to_center_scale(BOXES, 0.75)
    for i in range(len(BOXES)):
        for rot in (0.0, 30.0, -90.0):
            ref = ref_udp_warp(c[i], s[i], rot, (192, 256))
            ours = get_udp_warp_matrix(c[i], s[i], (192, 256), rot=rot)
            np.testing.assert_allclose(_apply(ours, grid), _apply(ref, grid), rtol=1e-5, atol=1e-3)


def test_warp_matrix_picks_by_decoder():
    c, s = box_to_center_scale(BOXES[:1], 0.75)
    udp = CARD.with_(decoder="udp")
    np.testing.assert_allclose(warp_matrix(c[0], s[0], udp), get_udp_warp_matrix(c[0], s[0], (192, 256)))
    for dec in ("msra", "dark"):
        np.testing.assert_allclose(
            warp_matrix(c[0], s[0], CARD.with_(decoder=dec)), get_affine_transform(c[0], s[0], (192, 256))
        )


def test_crop_uses_the_cards_warp():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    c, s = box_to_center_scale(BOXES[:4], 0.75)
    for card in (CARD.with_(color_order="bgr"), CARD.with_(decoder="udp", color_order="bgr")):
        batch = normalize(crop([image], np.zeros(4, np.int64), c, s, card), card)
        assert batch.shape == (4, 3, 256, 192) and batch.dtype == np.float32
        for i in range(4):
            m = (
                ref_udp_warp(c[i], s[i], 0, (192, 256))
                if card.decoder == "udp"
                else ref_get_affine_transform(c[i], s[i] / 200.0, 0, (192, 256))
            )
            ref = normalize(cv2.warpAffine(image, m, (192, 256), flags=cv2.INTER_LINEAR)[None], card)[0]
            # matrices agree to float32 precision; bilinear sampling may differ by a rounding step
            assert np.abs(batch[i] - ref).mean() < 0.01


@pytest.mark.parametrize("hm_size", [(48, 64), (24, 32)])
def test_msra_back_projection_matches_transform_preds(hm_size):
    """A one-hot heatmap has no slope, so the decoder returns the grid point; its image position must be the
    official transform_preds of that point for every box shape."""
    w, h = hm_size
    card = CARD.with_(input_width=w * 4, input_height=h * 4)
    c, s = box_to_center_scale(BOXES, card.aspect_ratio)
    pts = np.array([[0, 0], [w - 1, h - 1], [3, 5], [w // 2, h // 3], [w - 3, 2]])
    hm = np.zeros((len(BOXES), len(pts), h, w), np.float32)
    for k, (x, y) in enumerate(pts):
        hm[:, k, y, x] = 0.8
    for dec in ("msra", "dark"):
        out = decode_heatmaps(hm, c, s, card.with_(decoder=dec))
        for i in range(len(BOXES)):
            ref = ref_transform_preds(pts.astype(np.float64), c[i], s[i] / 200.0, [w, h])
            np.testing.assert_allclose(out[i, :, :2], ref, atol=1e-3)
            np.testing.assert_allclose(out[i, :, 2], 0.8)


def test_udp_back_projection_matches_mmpose_and_inverts_the_crop():
    w, h = 48, 64
    card = CARD.with_(decoder="udp")
    c, s = box_to_center_scale(BOXES, card.aspect_ratio)
    # interior points: at the border the UDP refinement's edge padding moves a one-hot peak (as in MMPose)
    pts = np.array([[6, 6], [w - 7, h - 7], [7, 9], [w // 2, h // 2]])
    hm = np.zeros((len(BOXES), len(pts), h, w), np.float32)
    for k, (x, y) in enumerate(pts):
        hm[:, k, y, x] = 1.0
    out = decode_heatmaps(hm, c, s, card)
    input_size = np.array([192, 256])
    for i in range(len(BOXES)):
        # MMPose: UDPHeatmap.decode, then TopdownPoseEstimator maps input pixels back with center/scale
        kp_input = pts / np.array([w - 1, h - 1]) * input_size
        ref = kp_input / input_size * s[i] + c[i] - 0.5 * s[i]
        np.testing.assert_allclose(out[i, :, :2], ref, atol=1e-3)
        # and the UDP crop warp takes the decoded point back to the heatmap point x (in-1)/(hm-1)
        back = _apply(get_udp_warp_matrix(c[i], s[i], (192, 256)), out[i, :, :2].astype(np.float64))
        np.testing.assert_allclose(back, pts * (input_size - 1) / np.array([w - 1, h - 1]), atol=1e-3)
