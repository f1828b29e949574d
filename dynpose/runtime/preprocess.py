"""Box -> crop: the official HRNet / MMPose top-down geometry, as plain functions.

centre/scale: the box is widened or heightened to the model's aspect ratio (w/h), then padded by 1.25; `scale` is
kept in pixels (MMPose 1.x) rather than the official code's pixels/200, which is the same transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from dynpose.models.card import ModelCard


def box_to_center_scale(boxes_xywh: np.ndarray, aspect_ratio: float, padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """(N,4) x,y,w,h boxes -> centres (N,2) and scales (N,2) in pixels, as official HRNet `_box2cs` (x200)."""
    b = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    x, y, w, h = b[:, 0], b[:, 1], b[:, 2].copy(), b[:, 3].copy()
    center = np.stack([x + w * 0.5, y + h * 0.5], axis=1)
    wide = w > aspect_ratio * h
    h = np.where(wide, w / aspect_ratio, h)
    w = np.where(wide, w, h * aspect_ratio)
    scale = np.stack([w, h], axis=1) * padding
    return center, scale


def _rotate(pt: np.ndarray, rad: float) -> np.ndarray:
    sn, cs = np.sin(rad), np.cos(rad)
    return np.array([pt[0] * cs - pt[1] * sn, pt[0] * sn + pt[1] * cs])


def get_affine_transform(
    center: np.ndarray,
    scale: np.ndarray,
    output_size: tuple[int, int],
    rot: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    inv: bool = False,
) -> np.ndarray:
    """2x3 matrix mapping the (centre, scale) box to an output of `output_size` = (w, h): the official formula.

    Three point pairs (centre, a point half a width above it, and the third corner of the right triangle) go to
    `cv2.getAffineTransform`, exactly as HRNet's `get_affine_transform`, so crops match to float precision.
    """
    center = np.asarray(center, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    src_w = scale[0]
    dst_w, dst_h = output_size
    rad = np.pi * rot / 180
    src_dir = _rotate(np.array([0.0, src_w * -0.5]), rad)
    dst_dir = np.array([0.0, dst_w * -0.5])
    shift_arr = np.asarray(shift, dtype=np.float64)

    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center + scale * shift_arr
    src[1] = center + src_dir + scale * shift_arr
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir

    def third(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = a - b
        return b + np.array([-d[1], d[0]], dtype=np.float32)

    src[2] = third(src[0], src[1])
    dst[2] = third(dst[0], dst[1])
    if inv:
        return cv2.getAffineTransform(dst, src)
    return cv2.getAffineTransform(src, dst)


def get_udp_warp_matrix(center: np.ndarray, scale: np.ndarray, output_size: tuple[int, int], rot: float = 0.0) -> np.ndarray:
    """2x3 UDP warp (Huang et al., MMPose `get_udp_warp_matrix`): maps the box's [0, scale] extent onto
    [0, output_size - 1] pixel centres, so the crop is unbiased and flip-symmetric. `scale` in pixels."""
    cx, cy = (float(v) for v in np.asarray(center, dtype=np.float64).reshape(2))
    sw, sh = (float(v) for v in np.asarray(scale, dtype=np.float64).reshape(2))
    rad = np.deg2rad(rot)
    cs, sn = np.cos(rad), np.sin(rad)
    sx = (output_size[0] - 1) / sw
    sy = (output_size[1] - 1) / sh
    m = np.zeros((2, 3), dtype=np.float64)
    m[0, 0], m[0, 1] = cs * sx, -sn * sx
    m[0, 2] = sx * (-cx * cs + cy * sn + 0.5 * sw)
    m[1, 0], m[1, 1] = sn * sy, cs * sy
    m[1, 2] = sy * (-cx * sn - cy * cs + 0.5 * sh)
    return m


def warp_matrix(center: np.ndarray, scale: np.ndarray, card: ModelCard) -> np.ndarray:
    """The crop transform a card's decoder expects: the UDP warp for `udp`, the official affine otherwise."""
    if card.decoder == "udp":
        return get_udp_warp_matrix(center, scale, card.input_size)
    return get_affine_transform(center, scale, card.input_size)


def to_model_colors(image_bgr: np.ndarray, card: ModelCard) -> np.ndarray:
    """OpenCV images are BGR; a view in the order the weights expect."""
    return image_bgr[..., ::-1] if card.color_order == "rgb" else image_bgr


def crop(
    images: Sequence[np.ndarray], frame_index: np.ndarray, centers: np.ndarray, scales: np.ndarray, card: ModelCard
) -> np.ndarray:
    """The one crop primitive: box j of `images[frame_index[j]]` (uint8 BGR, as OpenCV reads it), given as
    centre/scale in pixels, warped with the card's transform to its input size -> (n,H,W,3) uint8 in the card's
    colour order.

    Warping is per channel, so each BGR frame is warped as is and only the small crops are put into the card's
    colour order (cheaper than converting whole frames, and no full-frame copy per model). uint8 out: the runtime
    normalises it next (`normalize`), calibration and router training store it as it is."""
    w, h = card.input_size
    out = np.empty((len(centers), h, w, 3), dtype=np.uint8)
    for j in range(len(centers)):
        m = warp_matrix(centers[j], scales[j], card)
        out[j] = cv2.warpAffine(images[int(frame_index[j])], m, (w, h), flags=cv2.INTER_LINEAR)
    return np.ascontiguousarray(out[..., ::-1]) if card.color_order == "rgb" else out


def normalize(crops_hwc: np.ndarray, card: ModelCard) -> np.ndarray:
    """(N,H,W,3) uint8/float in model colour order -> (N,3,H,W) fp32 normalised by the card's mean/std."""
    mean = np.asarray(card.mean, dtype=np.float32)[:, None, None]
    inv_std = 1.0 / np.asarray(card.std, dtype=np.float32)[:, None, None]
    # Per crop on the hot path: cast straight into the NCHW layout, then normalise in place. Working on NCHW keeps
    # numpy's inner loops H*W long (on NHWC they are 3 long), about 4x faster than cast, normalise, transpose.
    n, h, w, c = crops_hwc.shape
    x = np.empty((n, c, h, w), dtype=np.float32)
    np.copyto(x, crops_hwc.transpose(0, 3, 1, 2), casting="unsafe")
    x -= mean
    x *= inv_std
    return x
