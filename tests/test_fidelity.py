"""Our DARK / UDP decoders and OKS-NMS against numbers the reference code itself produced, frozen here.

How the numbers were made (none of that code is needed to run these tests): the maps of `fidelity_maps.fidelity_maps`
and the candidates of `fidelity_maps.tie_candidates` were fed to
- DARK: DarkPose (ilovepose/DarkPose, lib/core/inference.py: `get_max_preds`, `gaussian_blur(hm, kernel)`, log of
  max(hm, 1e-10), `taylor`; i.e. `get_final_preds` before its affine back-projection), which MMPose's
  `refine_keypoints_dark` (mmpose/codecs/utils/refinement.py) matched to 4e-6 px;
- UDP: MMPose's `get_heatmap_maximum` + `refine_keypoints_dark_udp(keypoints, heatmaps, blur_kernel_size)`;
- OKS-NMS: MMPose's `oks_nms` (mmpose/evaluation/functional/nms.py) and the official HRNet `oks_nms`
  (leoxiaobin/deep-high-resolution-net.pytorch lib/nms/nms.py), both run with numpy's argsort made stable (their
  `scores.argsort()[::-1]` as numpy computes it wherever its sort keeps ties in input order; as-is on this AVX-512
  machine numpy 2.4 returned [4, 0, 2] for the same candidates: its default argsort is not stable).
Coordinates are heatmap pixels (rounded to 1e-6); the decoders here map them to the image with centre / scale chosen
so that image pixels equal heatmap pixels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CARDS
from fidelity_maps import fidelity_maps, tie_candidates

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.models.zoo import MODELS
from dynpose.runtime.decode import DEFAULT_BLUR_KERNEL, blur_kernel, decode_heatmaps
from dynpose.runtime.postprocess import oks_nms

# (heatmap width, height, kernel, decoder) -> keypoints (x, y) of the six maps
REFERENCE = {
    (24, 32, 3, "dark"): [
        [9.891931, 11.458564],
        [11.992992, 18.897493],
        [9.720372, 15.99817],
        [5.710052, 9.285811],
        [1.622099, 28.206093],
        [14.333828, 9.326062],
    ],
    (24, 32, 3, "udp"): [
        [9.889194, 11.470428],
        [11.992748, 18.89724],
        [9.712895, 16.007845],
        [5.70431, 9.304113],
        [1.608811, 28.211336],
        [14.351587, 9.334962],
    ],
    (24, 32, 5, "dark"): [
        [9.891335, 11.461964],
        [11.995838, 18.896893],
        [9.80055, 16.076214],
        [5.705582, 9.293189],
        [1.623841, 28.207277],
        [14.354009, 9.347691],
    ],
    (24, 32, 5, "udp"): [
        [9.889418, 11.470306],
        [11.995799, 18.89617],
        [9.79594, 16.080332],
        [5.701641, 9.303419],
        [1.615262, 28.210964],
        [14.363747, 9.352222],
    ],
    (48, 64, 11, "dark"): [
        [20.209902, 23.309837],
        [24.439562, 38.422695],
        [19.831251, 32.486805],
        [11.759789, 18.895136],
        [3.318452, 57.329784],
        [29.235992, 18.936901],
    ],
    (48, 64, 11, "udp"): [
        [20.210032, 23.310036],
        [24.438395, 38.423328],
        [19.831787, 32.486885],
        [11.759967, 18.894981],
        [3.319995, 57.330036],
        [29.235426, 18.936327],
    ],
    (72, 96, 11, "dark"): [
        [30.530149, 35.149967],
        [36.906689, 57.946125],
        [29.437817, 48.490646],
        [17.742653, 28.509251],
        [4.980165, 86.44986],
        [44.083664, 28.394852],
    ],
    (72, 96, 11, "udp"): [
        [30.529993, 35.150013],
        [36.906967, 57.94603],
        [29.437958, 48.490761],
        [17.741827, 28.510296],
        [4.980157, 86.450012],
        [44.082848, 28.395237],
    ],
    (72, 96, 17, "dark"): [
        [30.530066, 35.149986],
        [36.919456, 57.949955],
        [29.896294, 48.929382],
        [17.74963, 28.500414],
        [5.024044, 86.449883],
        [44.173603, 28.532158],
    ],
    (72, 96, 17, "udp"): [
        [30.529997, 35.150005],
        [36.919456, 57.949947],
        [29.896395, 48.929478],
        [17.749565, 28.500383],
        [5.024098, 86.450005],
        [44.173733, 28.533012],
    ],
}


def _decode(w: int, h: int, card: ModelCard) -> np.ndarray:
    """Decode `fidelity_maps(w, h)` with centre / scale that make image pixels heatmap pixels."""
    if card.decoder == "udp":  # image = hm / (size - 1) * s + c - s / 2
        c, s = [[(w - 1) / 2, (h - 1) / 2]], [[w - 1, h - 1]]
    else:  # image = (hm - size / 2) * s_w / w + c
        c, s = [[w / 2, h / 2]], [[w, h]]
    return decode_heatmaps(fidelity_maps(w, h), c, s, card)[0, :, :2]


@pytest.mark.parametrize("key", list(REFERENCE), ids=[f"{w}x{h}-k{k}-{d}" for w, h, k, d in REFERENCE])
def test_dark_and_udp_match_the_reference_code(key: tuple[int, int, int, str]) -> None:
    w, h, kernel, decoder = key
    card = ModelCard(name="t", input_width=4 * w, input_height=4 * h, decoder=decoder, blur_kernel=kernel)
    np.testing.assert_allclose(_decode(w, h, card), REFERENCE[key], atol=1e-4)


def test_the_kernel_matters() -> None:
    """On two close peaks the references move by 0.08 px between kernels 3 and 5 at 32x24 and by 0.46 px between 11
    and 17 at 96x72: a decoder that picks another kernel than the model's reference disagrees with it."""
    ref = {k: np.asarray(v) for k, v in REFERENCE.items()}
    assert np.abs(ref[24, 32, 3, "dark"] - ref[24, 32, 5, "dark"]).max() > 0.07
    assert np.abs(ref[72, 96, 11, "dark"] - ref[72, 96, 17, "dark"]).max() > 0.4
    assert np.abs(ref[72, 96, 11, "udp"] - ref[72, 96, 17, "udp"]).max() > 0.4


def test_cards_without_a_kernel_get_the_references_default() -> None:
    """An old card (no `blur_kernel`) decodes with 11, MMPose's and DarkPose's default, whatever its heatmap size."""
    old = ModelCard.from_dict(
        {"name": "old", "input_width": 288, "input_height": 384, "color_order": "rgb", "mean": [1, 2, 3], "std": [1, 1, 1]}
    )
    assert old.blur_kernel is None and blur_kernel(old) == DEFAULT_BLUR_KERNEL == 11
    for decoder in ("dark", "udp"):
        np.testing.assert_allclose(_decode(72, 96, old.with_(decoder=decoder)), REFERENCE[72, 96, 11, decoder], atol=1e-4)


def test_zoo_and_example_cards_carry_their_references_kernel() -> None:
    kernels = {name: (card.blur_kernel, card.heatmap_sigma) for name, (_, card) in MODELS.items()}
    for name in ("hrnet_w32", "hrnet_w48", "resnet_50", "resnet_101", "resnet_152", "lpn_50", "hourglass_1"):
        assert kernels[name] == (11, 2.0), name  # 256x192 / 256x256 at sigma 2: 11 in MMPose's and DarkPose's configs
    assert kernels["dpn"] == (5, None)  # DPN's own test-time blur; its targets have no sigma
    assert kernels["simdr_hrnet_w32"] == (None, None)  # no heatmap
    for size, sigma in (("128x96", 1), ("256x192", 2)):  # PP-TinyPose: PaddleDetection's DARK kernelsize 3
        card = ModelCard.from_json_file(CARDS / f"tinypose_{size}.json")
        assert (card.blur_kernel, card.heatmap_sigma) == (3, sigma)


def test_a_users_card_sets_the_kernel(tmp_path) -> None:
    d = json.loads((CARDS / "tinypose_128x96.json").read_text()) | {"decoder": "dark", "blur_kernel": 5}
    (tmp_path / "card.json").write_text(json.dumps(d))
    card = ModelCard.from_json_file(tmp_path / "card.json")
    assert blur_kernel(card) == 5 and ModelCard.from_dict(json.loads(card.to_json())) == card
    np.testing.assert_allclose(_decode(24, 32, card), REFERENCE[24, 32, 5, "dark"], atol=1e-4)
    for bad in (4, 1, 11.0, True, "11"):
        with pytest.raises(DynPoseError, match="'blur_kernel' must be an odd integer >= 3"):
            ModelCard.from_dict(d | {"blur_kernel": bad})
    for bad in (0, -2.0, float("inf"), "2"):
        with pytest.raises(DynPoseError, match="'heatmap_sigma' must be a finite number > 0"):
            ModelCard.from_dict(d | {"heatmap_sigma": bad})


def test_oks_nms_ties_follow_the_references_order() -> None:
    kps, scores, areas = tie_candidates()
    for thr in (0.3, 0.9):
        assert oks_nms(kps, scores, areas, thr) == [4, 1, 3]  # MMPose's and HRNet's oks_nms with a stable argsort
    # the case: two identical candidates scored alike keep the second, as the references do
    assert oks_nms(kps[[0, 0]], np.array([0.5, 0.5]), areas[:2]) == [1]
    # the rule does not depend on the number of candidates (numpy's unstable sort does)
    many = np.repeat(kps[:1], 40, axis=0)
    assert oks_nms(many, np.full(40, 0.5), np.full(40, 1e4)) == [39]
