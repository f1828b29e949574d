"""Heatmaps -> keypoints in image pixels: MSRA (argmax + quarter pixel), DARK and UDP decoders.

Each decoder follows its official reference (HRNet `lib/core/inference.py`; DarkPose `taylor`/`gaussian_blur`;
MMPose `refine_keypoints_dark_udp` + `UDPHeatmap.decode`), vectorised over crops and keypoints. The map back to
the image is the exact inverse of the crop `preprocess.warp_matrix` made for the same card, so a keypoint lands
where the crop took it from.

SimDR/SimCC models output two 1-D classifications per keypoint instead of a heatmap; `decode_simdr` (argmax / split
ratio, official scores) and `average_flip_simdr` (the official 1-D flip test) follow the authors' code.

`decode_outputs` and `average_flip_outputs` are what the runtime calls: a pose model's raw outputs (all of them, in
graph order) -> keypoints, and a batch's outputs + its mirror's -> outputs that decode the same way, for whichever
decoder the card names.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard


def get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,K,h,w) -> argmax coords (N,K,2) float32 x,y in heatmap pixels and maxima (N,K,1).

    As the official code, a keypoint whose maximum is not positive gets coordinates (0, 0).
    """
    hm = np.asarray(heatmaps)
    if hm.ndim != 4:
        raise DynPoseError(f"heatmaps must be N x K x h x w, got shape {hm.shape}")
    n, k, _, w = hm.shape
    flat = hm.reshape(n, k, -1)
    idx = np.argmax(flat, axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2).astype(np.float32)
    preds = np.stack([idx % w, idx // w], axis=2).astype(np.float32)
    preds *= (maxvals > 0.0).astype(np.float32)
    return preds, maxvals


def flip_back(heatmaps: np.ndarray, flip_index: list[int]) -> np.ndarray:
    """Heatmaps of a horizontally flipped crop -> heatmaps in the original frame (mirror + swap left/right)."""
    hm = np.asarray(heatmaps)
    if hm.ndim != 4:
        raise DynPoseError(f"heatmaps must be N x K x h x w, got shape {hm.shape}")
    return np.take(hm[..., ::-1], list(flip_index), axis=1)  # one copy, C-contiguous


def average_flip(
    heatmaps: np.ndarray, flipped_heatmaps: np.ndarray, flip_index: list[int], shift: bool = True
) -> np.ndarray:
    """The official flip test: flip the second pass back, shift it one pixel right, average with the first.

    The shift (HRNet's SHIFT_HEATMAP) corrects the half-pixel misalignment of a flipped non-UDP crop; UDP crops are
    symmetric, so pass `shift=False` for them.
    """
    back = flip_back(np.asarray(flipped_heatmaps, dtype=np.float32), flip_index)  # a fresh array: worked on in place
    if shift:
        back[..., 1:] = back[..., :-1]  # numpy buffers overlapping copies itself
    back += np.asarray(heatmaps, dtype=np.float32)
    back *= 0.5
    return back


# MMPose's MSRAHeatmap / UDPHeatmap `blur_kernel_size` and DarkPose's `TEST.BLUR_KERNEL` default: what a card that
# does not name its kernel gets (docs/runtime.md, "Decoding fidelity").
DEFAULT_BLUR_KERNEL = 11


def blur_kernel(card: ModelCard) -> int:
    """The DARK / UDP modulation kernel of `card`: its `blur_kernel` as its reference config sets it (11 for most
    models, 3 for DarkPose and PP-TinyPose at 128x96, 17 in MMPose's ResNet-152 DARK at 384x288), else 11."""
    return card.blur_kernel if card.blur_kernel is not None else DEFAULT_BLUR_KERNEL


def gaussian_blur(heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    """DarkPose/MMPose `gaussian_blur`: blur each map with zero padding, then rescale to keep its maximum."""
    hm = np.array(heatmaps, dtype=np.float32, copy=True)
    shape = hm.shape
    flat = hm.reshape(-1, shape[-2], shape[-1])
    border = (kernel - 1) // 2
    for i in range(flat.shape[0]):
        origin_max = flat[i].max()
        padded = cv2.copyMakeBorder(flat[i], border, border, border, border, cv2.BORDER_CONSTANT, value=0.0)
        blurred = cv2.GaussianBlur(padded, (kernel, kernel), 0)[border:-border, border:-border]
        new_max = blurred.max()
        flat[i] = blurred * (origin_max / new_max) if new_max != 0 else blurred
    return flat.reshape(shape)


def gaussian_blur_reflect(heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    """MMPose 0.x `post_dark_udp`'s blur (the official ViTPose evaluation): OpenCV's Gaussian with its default
    reflecting border (BORDER_REFLECT_101) and no rescaling of the maximum."""
    hm = np.array(heatmaps, dtype=np.float32, copy=True)
    flat = hm.reshape(-1, hm.shape[-2], hm.shape[-1])
    for i in range(flat.shape[0]):
        flat[i] = cv2.GaussianBlur(flat[i], (kernel, kernel), 0)
    return hm


def _refine_quarter(coords: np.ndarray, hm: np.ndarray) -> np.ndarray:
    """Official HRNet post-process: move a quarter pixel toward the higher neighbour, away from the border."""
    n, k, h, w = hm.shape
    px = np.floor(coords[..., 0] + 0.5).astype(np.int64)
    py = np.floor(coords[..., 1] + 0.5).astype(np.int64)
    ok = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
    xs, ys = np.clip(px, 1, w - 2), np.clip(py, 1, h - 2)
    ni, ki = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    dx = hm[ni, ki, ys, xs + 1] - hm[ni, ki, ys, xs - 1]
    dy = hm[ni, ki, ys + 1, xs] - hm[ni, ki, ys - 1, xs]
    out = coords.copy()
    out += np.where(ok[..., None], np.sign(np.stack([dx, dy], axis=-1)) * 0.25, 0.0)
    return out


def _refine_dark(coords: np.ndarray, hm: np.ndarray, kernel: int) -> np.ndarray:
    """DARK (Zhang et al.): blurred log-heatmap, one Newton step from the argmax (official `taylor`)."""
    n, k, h, w = hm.shape
    logh = np.log(np.maximum(gaussian_blur(hm, kernel), 1e-10)).astype(np.float64)
    px = coords[..., 0].astype(np.int64)
    py = coords[..., 1].astype(np.int64)
    ok = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2)
    x, y = np.clip(px, 2, w - 3), np.clip(py, 2, h - 3)
    ni, ki = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")

    def at(dy: int, dx: int) -> np.ndarray:
        return logh[ni, ki, y + dy, x + dx]

    c = at(0, 0)
    gx = 0.5 * (at(0, 1) - at(0, -1))
    gy = 0.5 * (at(1, 0) - at(-1, 0))
    dxx = 0.25 * (at(0, 2) - 2 * c + at(0, -2))
    dxy = 0.25 * (at(1, 1) - at(-1, 1) - at(1, -1) + at(-1, -1))
    dyy = 0.25 * (at(2, 0) - 2 * c + at(-2, 0))
    det = dxx * dyy - dxy**2
    ok &= det != 0
    safe = np.where(ok, det, 1.0)
    # offset = -H^-1 g with the 2x2 inverse written out
    ox = -(dyy * gx - dxy * gy) / safe
    oy = -(-dxy * gx + dxx * gy) / safe
    out = coords.astype(np.float64).copy()
    out[..., 0] += np.where(ok, ox, 0.0)
    out[..., 1] += np.where(ok, oy, 0.0)
    return out


def _refine_dark_udp(coords: np.ndarray, hm: np.ndarray, kernel: int, border: str = "zero") -> np.ndarray:
    """MMPose `refine_keypoints_dark_udp`: blur, clip to [1e-3, 50], log, edge padding, one Newton step. border
    "reflect": the blur of MMPose 0.x `post_dark_udp` (the official ViTPose's evaluation) instead."""
    n, k, h, w = hm.shape
    blur = gaussian_blur_reflect if border == "reflect" else gaussian_blur
    logh = np.log(np.clip(blur(hm, kernel), 1e-3, 50.0)).astype(np.float64)
    pad = np.pad(logh, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    x = np.clip(coords[..., 0].astype(np.int64), 0, w - 1) + 1
    y = np.clip(coords[..., 1].astype(np.int64), 0, h - 1) + 1
    ni, ki = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")

    def at(dy: int, dx: int) -> np.ndarray:
        return pad[ni, ki, y + dy, x + dx]

    i_ = at(0, 0)
    ix1, ix1_ = at(0, 1), at(0, -1)
    iy1, iy1_ = at(1, 0), at(-1, 0)
    ix1y1, ix1_y1_ = at(1, 1), at(-1, -1)
    gx = 0.5 * (ix1 - ix1_)
    gy = 0.5 * (iy1 - iy1_)
    dxx = ix1 - 2 * i_ + ix1_
    dyy = iy1 - 2 * i_ + iy1_
    dxy = 0.5 * (ix1y1 - ix1 - iy1 + i_ + i_ - ix1_ - iy1_ + ix1_y1_)
    hess = np.stack([np.stack([dxx, dxy], -1), np.stack([dxy, dyy], -1)], -2)
    hess = hess + np.finfo(np.float32).eps * np.eye(2)
    grad = np.stack([gx, gy], -1)[..., None]
    with np.errstate(all="ignore"):
        try:
            step = np.linalg.solve(hess, grad)[..., 0]
        except np.linalg.LinAlgError:  # a singular Hessian on a flat map: solve one by one, skip those
            step = np.zeros_like(grad[..., 0])
            for idx in np.ndindex(hess.shape[:2]):
                try:
                    step[idx] = np.linalg.solve(hess[idx], grad[idx])[..., 0]
                except np.linalg.LinAlgError:
                    pass
    step = np.where(np.isfinite(step), step, 0.0)
    return coords.astype(np.float64) - step


def decode_heatmaps(heatmaps: np.ndarray, centers: np.ndarray, scales: np.ndarray, card: ModelCard) -> np.ndarray:
    """(N,K,h,w) heatmaps of crops made at (centre, scale) in pixels -> (N,K,3) x, y in image pixels, score.

    The decoder is `card.decoder`: msra (argmax + quarter-pixel shift), dark (Taylor refinement of the blurred
    log-heatmap) or udp (MMPose UDP refinement, unbiased (size-1) scaling); dark and udp blur with
    `blur_kernel(card)`. Score is the heatmap maximum.
    """
    hm = np.asarray(heatmaps, dtype=np.float32)
    if hm.ndim != 4:
        raise DynPoseError(f"heatmaps must be N x K x h x w, got shape {hm.shape}")
    n, k, h, w = hm.shape
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    scales = np.asarray(scales, dtype=np.float64).reshape(-1, 2)
    if len(centers) != n or len(scales) != n:
        raise DynPoseError(f"decode: {n} heatmaps but {len(centers)} centres and {len(scales)} scales")
    out = np.zeros((n, k, 3), dtype=np.float32)
    if n == 0:
        return out
    peaks, maxvals = get_max_preds(hm)
    if card.decoder not in ("msra", "dark", "udp"):
        raise DynPoseError(f"model card {card.name!r}: unknown decoder {card.decoder!r}; use msra, dark or udp")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # non-finite maps are handled just below
        if card.decoder == "msra":
            coords = _refine_quarter(peaks, hm).astype(np.float64)
        elif card.decoder == "dark":
            coords = _refine_dark(peaks, hm, blur_kernel(card))
        else:
            coords = _refine_dark_udp(peaks, hm, blur_kernel(card), card.blur_border)
    # NaN/inf heatmaps (a broken engine) must not turn into NaN positions; their score stays NaN to show it
    coords = np.where(np.isfinite(coords), coords, peaks)

    c = centers[:, None, :]
    s = scales[:, None, :]
    if card.decoder == "udp":
        # inverse of get_udp_warp_matrix: heatmap pixel -> input pixel is (in-1)/(hm-1), input -> image s/(in-1)
        xy = coords / np.array([w - 1, h - 1], dtype=np.float64) * s + c - 0.5 * s
    else:
        # inverse of the official get_affine_transform (rot 0): isotropic, by the scale's width only
        f = s[..., 0:1] / w
        xy = (coords - np.array([w * 0.5, h * 0.5])) * f + c
    out[..., :2] = xy
    out[..., 2] = maxvals[..., 0]
    return out


# -- SimDR / SimCC: two 1-D classifications per keypoint ----------------------------------------------------------
def simdr_softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (the bins), computed stably in float32."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def _check_simdr(simdr_x: np.ndarray, simdr_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(simdr_x, dtype=np.float32)
    y = np.asarray(simdr_y, dtype=np.float32)
    if x.ndim != 3 or y.ndim != 3 or x.shape[:2] != y.shape[:2]:
        raise DynPoseError(f"SimDR outputs must be N x K x bins each with the same N, K; got {x.shape} and {y.shape}")
    return x, y


def simdr_maxima(
    simdr_x: np.ndarray, simdr_y: np.ndarray, split_ratio: float, softmax: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(N,K,Wx), (N,K,Wy) -> (N,K,2) x, y in input (crop) pixels and (N,K) scores.

    As the authors' `validate_simdr` (leeyegy/SimCC `lib/core/function.py`): each vector's argmax divided by the
    split ratio, and the score the larger of the two maxima. softmax=True normalises logits first (what the official
    evaluation does, so scores are probabilities); pass False for vectors that are probabilities already (the output
    of `average_flip_simdr`) or to score with raw logits. The argmax is the same either way.
    """
    x, y = _check_simdr(simdr_x, simdr_y)
    if softmax:
        x, y = simdr_softmax(x), simdr_softmax(y)
    ix, iy = np.argmax(x, axis=2), np.argmax(y, axis=2)
    max_x = np.take_along_axis(x, ix[..., None], axis=2)[..., 0]
    max_y = np.take_along_axis(y, iy[..., None], axis=2)[..., 0]
    coords = np.stack([ix, iy], axis=2).astype(np.float64) / float(split_ratio)
    return coords, np.maximum(max_x, max_y)


def simdr_maxima_mmpose(simdr_x: np.ndarray, simdr_y: np.ndarray, split_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(N,K,Wx), (N,K,Wy) -> (N,K,2) x, y in input (crop) pixels and (N,K) scores, as MMPose's `SimCCLabel.decode`
    (`get_simcc_maximum` without softmax): each vector's argmax over the raw values, the score the *smaller* of the
    two maxima, both bins set to -1 where that score is <= 0, then divided by the split ratio."""
    x, y = _check_simdr(simdr_x, simdr_y)
    ix, iy = np.argmax(x, axis=2), np.argmax(y, axis=2)
    scores = np.minimum(np.take_along_axis(x, ix[..., None], axis=2), np.take_along_axis(y, iy[..., None], axis=2))[..., 0]
    coords = np.stack([ix, iy], axis=2).astype(np.float64)
    coords[scores <= 0] = -1.0
    return coords / float(split_ratio), scores


def flip_back_simdr(vectors: np.ndarray, flip_index: list[int], axis: str) -> np.ndarray:
    """SimDR vectors of a horizontally flipped crop -> the original frame: swap left/right keypoints, and for the x
    vectors also mirror the bins (official `flip_back_simdr`); y vectors are not mirrored."""
    v = np.asarray(vectors)
    if v.ndim != 3:
        raise DynPoseError(f"SimDR vectors must be N x K x bins, got shape {v.shape}")
    if axis not in ("x", "y"):
        raise DynPoseError(f"flip_back_simdr: axis must be 'x' or 'y', got {axis!r}")
    return np.take(v[..., ::-1] if axis == "x" else v, list(flip_index), axis=1)


def average_flip_simdr(
    simdr_x: np.ndarray,
    simdr_y: np.ndarray,
    flipped_x: np.ndarray,
    flipped_y: np.ndarray,
    flip_index: list[int],
    shift: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The official SimDR flip test: flip the second pass back, shift its x vectors one bin toward lower indices
    (SHIFT_HEATMAP; a flipped crop lands split_ratio - 1 bins high, one bin at the released ratio 2), and average
    the two passes' softmax probabilities. Returns probabilities: decode them with `softmax=False`."""
    x, y = _check_simdr(simdr_x, simdr_y)
    fx, fy = _check_simdr(flipped_x, flipped_y)
    back_x = flip_back_simdr(fx, flip_index, "x")  # a fresh array: shifted in place
    back_y = flip_back_simdr(fy, flip_index, "y")
    if shift:
        back_x[..., :-1] = back_x[..., 1:]  # numpy buffers overlapping copies itself
    px = (simdr_softmax(x) + simdr_softmax(back_x)) * 0.5
    py = (simdr_softmax(y) + simdr_softmax(back_y)) * 0.5
    return px, py


def average_flip_simdr_logits(
    simdr_x: np.ndarray, simdr_y: np.ndarray, flipped_x: np.ndarray, flipped_y: np.ndarray, flip_index: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """MMPose's SimCC flip test (`RTMCCHead.predict` with `flip_vectors`): the mirrored pass's vectors flipped back
    (left/right swapped, x bins mirrored) and averaged with the first pass's raw values, no shift. Returns logits."""
    x, y = _check_simdr(simdr_x, simdr_y)
    fx, fy = _check_simdr(flipped_x, flipped_y)
    back_x = flip_back_simdr(fx, flip_index, "x")
    back_y = flip_back_simdr(fy, flip_index, "y")
    return (x + back_x) * 0.5, (y + back_y) * 0.5


def _crop_to_image(coords: np.ndarray, centers: np.ndarray, scales: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Points on a w x h grid spanning the crop -> image pixels: the inverse of the official get_affine_transform
    (rot 0), isotropic by the scale's width, as `decode_heatmaps` does for msra/dark."""
    w, h = grid
    f = scales[:, None, 0:1] / w
    return (coords - np.array([w * 0.5, h * 0.5])) * f + centers[:, None, :]


def decode_simdr(
    simdr_x: np.ndarray,
    simdr_y: np.ndarray,
    centers: np.ndarray,
    scales: np.ndarray,
    card: ModelCard,
    softmax: bool = True,
) -> np.ndarray:
    """SimDR outputs of crops made at (centre, scale) in pixels -> (N,K,3) x, y in image pixels, score.

    `simdr_maxima` with `card.simdr_split_ratio` gives input-pixel positions, mapped to the image like the msra
    decoder's heatmap positions but on the input grid (official transform_preds with output_size = IMAGE_SIZE;
    MMPose's `keypoints / input_size * scale + center - scale / 2` is the same map). A card with
    `simdr_rule="mmpose"` (RTMPose) scores by `simdr_maxima_mmpose` instead, on the raw values: `softmax` is then
    not used. softmax: as in `simdr_maxima` (False for the probabilities `average_flip_simdr` returns).
    """
    x, y = _check_simdr(simdr_x, simdr_y)
    n, k, wx = x.shape
    ratio = card.simdr_split_ratio
    want = (int(card.input_width * ratio), int(card.input_height * ratio))
    if (wx, y.shape[2]) != want:
        raise DynPoseError(
            f"model card {card.name!r}: SimDR outputs have {wx} x and {y.shape[2]} y bins, but input "
            f"{card.input_width}x{card.input_height} at split ratio {ratio} gives {want[0]} and {want[1]}; fix the "
            "card's input size or simdr_split_ratio"
        )
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    scales = np.asarray(scales, dtype=np.float64).reshape(-1, 2)
    if len(centers) != n or len(scales) != n:
        raise DynPoseError(f"decode: {n} SimDR outputs but {len(centers)} centres and {len(scales)} scales")
    out = np.zeros((n, k, 3), dtype=np.float32)
    if n == 0:
        return out
    if card.simdr_rule == "mmpose":
        coords, scores = simdr_maxima_mmpose(x, y, ratio)
    else:
        coords, scores = simdr_maxima(x, y, ratio, softmax=softmax)
    out[..., :2] = _crop_to_image(coords, centers, scales, card.input_size)
    out[..., 2] = scores
    return out


# -- any decoder: what the runtime calls ------------------------------------------------------------------------------
def _describe(shapes: Sequence[Sequence[int]]) -> str:
    dims = [" x ".join(["N", *map(str, sh[1:])]) for sh in shapes]
    if len(shapes) >= 2 and all(len(sh) == 3 for sh in shapes[:2]):
        return "SimCC/SimDR vectors " + " and ".join(dims[:2])
    if shapes and len(shapes[0]) == 4:
        return "heatmaps " + dims[0]
    return "outputs " + ", ".join(dims)


def output_layout_problem(shapes: Sequence[Sequence[int]], card: ModelCard) -> str | None:
    """None when outputs of these shapes (batch axis first, graph order) are what the card's decoder reads; else one
    line naming the expected layout, the found one and the first differing output."""
    k = card.keypoint_set.num
    if card.decoder == "simdr":
        ratio = card.simdr_split_ratio
        want = [(k, int(card.input_width * ratio)), (k, int(card.input_height * ratio))]
        expected = f"SimCC/SimDR vectors N x {k} x {want[0][1]} and N x {k} x {want[1][1]}"
        got = [tuple(sh[1:]) for sh in shapes[:2]]
        bad = next((i for i in range(2) if i >= len(got) or got[i] != want[i]), None)
        hint = "a heatmap decoder (msra, dark, udp)"
    else:
        expected = f"heatmaps N x {k} x h x w"
        got = [tuple(sh[1:]) for sh in shapes[:1]]
        bad = None if got and len(got[0]) == 3 and got[0][0] == k else 0
        if len(shapes) >= 2 and all(len(sh) == 3 for sh in shapes[:2]):
            hint = "decoder simdr"
        elif got and len(got[0]) == 3:
            hint = f"the model's keypoint set ({got[0][0]} keypoints)"
        else:
            hint = "the decoder the model's outputs need"
    if bad is None:
        return None
    first = f"output {bad} is N x {' x '.join(map(str, got[bad]))}" if bad < len(got) else f"no output {bad}"
    return (
        f"model card {card.name!r} (decoder {card.decoder}) expects {expected}, but the model gives "
        f"{_describe(shapes)} (first differing: {first}); give it a card with {hint} that matches the model"
    )


def decode_outputs(outputs: Sequence[np.ndarray], centers: np.ndarray, scales: np.ndarray, card: ModelCard) -> np.ndarray:
    """A pose model's raw outputs (graph order) for crops made at (centre, scale) -> (N,K,3) x, y in image pixels,
    score, by the card's decoder: `decode_simdr` on the first two outputs (x then y vectors, logits) for simdr,
    `decode_heatmaps` on the first output otherwise. Outputs the decoder cannot read (a SimCC model under a heatmap
    card, or the reverse) are refused in one line (`output_layout_problem`)."""
    outs = list(outputs)
    if not outs:
        raise DynPoseError(f"model card {card.name!r}: decode got no outputs")
    problem = output_layout_problem([np.shape(o) for o in outs], card)
    if problem:
        raise DynPoseError(problem)
    if card.decoder == "simdr":
        return decode_simdr(outs[0], outs[1], centers, scales, card)
    return decode_heatmaps(outs[0], centers, scales, card)


def average_flip_outputs(outputs: Sequence[np.ndarray], flipped: Sequence[np.ndarray], card: ModelCard) -> list[np.ndarray]:
    """The card's flip test on a batch's outputs and its mirrored batch's -> outputs `decode_outputs` reads.

    Heatmaps: `average_flip` on each output (the one-pixel shift except for UDP). SimDR under MMPose's rule
    (`card.simdr_rule`, RTMPose): `average_flip_simdr_logits`, logits in, logits out. SimDR under the authors' rule:
    `average_flip_simdr` on the x and y vectors, returned as log-probabilities, so that they stay logits to the
    decoder: the softmax of log p is p itself (p sums to 1), so the flip-averaged probabilities decode, and score, as
    the official flip test's do, through the same `decode_outputs` call as plain outputs. Probabilities are floored
    at the smallest normal float32 to keep the logs finite.
    """
    outs, flips = list(outputs), list(flipped)
    if len(outs) != len(flips):
        raise DynPoseError(f"flip test: {len(outs)} outputs but {len(flips)} outputs of the mirrored batch")
    flip_index = card.keypoint_set.flip_index()
    if card.decoder == "simdr" and len(outs) >= 2 and card.simdr_rule == "mmpose":
        return [*average_flip_simdr_logits(outs[0], outs[1], flips[0], flips[1], flip_index), *outs[2:]]
    if card.decoder == "simdr" and len(outs) >= 2:
        px, py = average_flip_simdr(outs[0], outs[1], flips[0], flips[1], flip_index)
        tiny = np.finfo(np.float32).tiny
        logs = [np.log(np.maximum(p, tiny)) for p in (px, py)]
        return logs + outs[2:]  # outputs past the two vectors are not decoded: the unflipped pass's, as they are
    shift = card.decoder != "udp"
    return [average_flip(o, f, flip_index, shift=shift) for o, f in zip(outs, flips, strict=True)]
