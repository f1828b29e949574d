"""RTMPose and ViTPose in the zoo: exact release layouts (every size, through the meta device), published parameter
and FLOP counts, forward passes and decoding equal to MMPose's and the official ViTPose's own code on fixed inputs,
both ViTPose checkpoint formats into one model, the released download names, and refused checkpoints.

The reference outputs in `tests/data/zoo_reference.json` were made by running the upstream code (MMPose @ 759b39c,
ViTPose @ c050ed2; each file loaded by path, with stubs for mmcv's ConvModule, mmengine's BaseModule and the
registries) on the inputs and weights of `tests/zoo_inputs.py`; the JSON's "how" says which functions. MMPose
itself is not needed here. Only RTMPose-t and ViTPose-S are built with real weights; the larger sizes are checked
as layouts on the meta device.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zoo_inputs as zi
from test_weights import Server, assert_same_weights

from dynpose.errors import DynPoseError
from dynpose.models import create_model, get_card, load_weights
from dynpose.models.flops import count_flops
from dynpose.models.layouts import layout_of
from dynpose.models.vitpose import official_to_mmpose
from dynpose.models.weights import sha256_prefix_from_name
from dynpose.runtime.decode import average_flip_outputs, decode_heatmaps, decode_outputs, decode_simdr

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REF = json.loads((Path(__file__).parent / "data" / "zoo_reference.json").read_text())
RTMPOSE = ["rtmpose_t", "rtmpose_s", "rtmpose_m", "rtmpose_l"]
VITPOSE = ["vitpose_s", "vitpose_b", "vitpose_l", "vitpose_h"]
# MMPose's RTMPose README (projects/rtmpose, COCO table): parameters (M) and FLOPs (G) as published.
PUBLISHED = {
    "rtmpose_t": (3.34, 0.36),
    "rtmpose_s": (5.47, 0.68),
    "rtmpose_m": (13.59, 1.93),
    "rtmpose_l": (27.66, 4.16),
    "rtmpose_m_384x288": (13.72, 4.33),
    "rtmpose_l_384x288": (27.79, 9.35),
}
# Centre and scale (pixels) of a crop that is the input itself: image pixels == input pixels, the space MMPose's
# codecs decode to.
CENTRE, SCALE = [96.0, 128.0], [192.0, 256.0]


def meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name)


def shared_layout(shared: Path, name: str, fmt: str) -> dict:
    return json.loads((shared / "layouts" / f"{name}.{fmt}.json").read_text())


def as_lists(layout: dict) -> dict[str, list[int]]:
    return {k: list(v) for k, v in layout.items()}


def at_input(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.tile([CENTRE], (n, 1)), np.tile([SCALE], (n, 1))


# -- layouts, counts, cards ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RTMPOSE)
def test_rtmpose_state_dict_is_the_mmpose_release(shared: Path, name: str) -> None:
    d = shared_layout(shared, name, "mmpose")
    m = meta_model(name)
    got = as_lists(layout_of(m.state_dict()))
    assert list(got) == list(d["tensors"]) and got == d["tensors"]  # names, order, shapes
    assert sum(p.numel() for p in m.parameters()) == d["num_parameters"]


@pytest.mark.parametrize("name", VITPOSE)
def test_vitpose_reads_both_release_layouts(shared: Path, name: str) -> None:
    m = meta_model(name)
    formats = m.checkpoint_formats()
    for fmt, key in (("mmpose", "mmpose1"), ("official", "official")):
        d = shared_layout(shared, name, fmt)
        assert list(formats[key]) == list(d["tensors"]) and as_lists(formats[key]) == d["tensors"], fmt
    assert as_lists(layout_of(m.state_dict())) == shared_layout(shared, name, "mmpose")["tensors"]
    n = sum(p.numel() for p in m.parameters())
    # The official count holds the class-token position slot (C numbers) the model folds into the others.
    assert n == shared_layout(shared, name, "mmpose")["num_parameters"]
    assert n + m.backbone.pos_embed.shape[-1] == shared_layout(shared, name, "official")["num_parameters"]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_rtmpose_parameters_and_flops_against_mmpose_published(name: str) -> None:
    m = meta_model(name)
    card = get_card(name)
    params, gflops = PUBLISHED[name]
    assert sum(p.numel() for p in m.parameters()) / 1e6 == pytest.approx(params, abs=0.005)
    # Multiply-adds of convolutions and matrix products (dynpose.models.flops); MMPose's counter adds a few
    # element-wise operations, 1-2 % here.
    assert count_flops(m, card.input_size) / 2e9 == pytest.approx(gflops, rel=0.025)


def test_vitpose_flops_counted_on_the_meta_device() -> None:
    gmacs = {n: count_flops(meta_model(n), (192, 256)) / 2e9 for n in VITPOSE}
    # Backbone + head at 256x192; the paper's ViTPose-B 17.1 GFLOPs is the backbone alone (the head adds 1.4).
    assert gmacs == pytest.approx({"vitpose_s": 5.59, "vitpose_b": 18.52, "vitpose_l": 61.57, "vitpose_h": 125.83}, abs=0.01)


def test_384x288_models_differ_only_in_input_geometry() -> None:
    m, big = meta_model("rtmpose_m"), meta_model("rtmpose_m_384x288")
    small_sd, big_sd = layout_of(m.state_dict()), layout_of(big.state_dict())
    differ = {k for k in small_sd if small_sd[k] != big_sd[k]}
    assert differ == {"head.mlp.1.weight", "head.cls_x.weight", "head.cls_y.weight"}
    assert big_sd["head.mlp.1.weight"] == (256, 12 * 9) and big_sd["head.cls_x.weight"] == (576, 256)
    with torch.no_grad():
        x, y = big(torch.zeros(2, 3, 384, 288, device="meta"))
    assert x.shape == (2, 17, 576) and y.shape == (2, 17, 768)


def test_cards() -> None:
    for name in RTMPOSE + ["rtmpose_m_384x288", "rtmpose_l_384x288"]:
        card = get_card(name)
        assert (card.decoder, card.simdr_rule, card.simdr_split_ratio, card.color_order) == ("simdr", "mmpose", 2.0, "rgb")
        assert card.input_size == ((288, 384) if name.endswith("384x288") else (192, 256))
        assert card.mean == (123.675, 116.28, 103.53) and card.std == (58.395, 57.12, 57.375)
    for name in VITPOSE:
        card = get_card(name)
        assert (card.decoder, card.blur_kernel, card.input_size, card.color_order) == ("udp", 11, (192, 256), "rgb")
        assert card.sources["official"]["url"] is None and "ViTAE-Transformer/ViTPose" in card.sources["official"]["manual"]
    assert get_card("simdr_hrnet_w32").simdr_rule == "official"  # the SimDR authors' rule stays theirs
    # The example cards for users' own RTMPose / ViTPose ONNX files decode and crop as the zoo cards do.
    from dynpose.models import ModelCard

    cards = Path(__file__).parents[1] / "examples" / "cards"
    for file, name in (
        ("rtmpose_256x192", "rtmpose_t"),
        ("rtmpose_384x288", "rtmpose_l_384x288"),
        ("vitpose_256x192", "vitpose_b"),
    ):
        example = ModelCard.from_json_file(cards / f"{file}.json")
        assert example == get_card(name).with_(name=file, arch="onnx", sources={})


def test_forward_shapes_and_crowdpose_heads() -> None:
    t = create_model("rtmpose_t")
    with torch.no_grad():
        x, y = t(torch.randn(3, 3, 256, 192))
    assert x.shape == (3, 17, 384) and y.shape == (3, 17, 512) and torch.isfinite(x).all()
    m = meta_model("vitpose_s")
    assert m(torch.zeros(2, 3, 256, 192, device="meta")).shape == (2, 17, 64, 48)
    with torch.device("meta"):
        crowd = create_model("rtmpose_t", keypoints="crowdpose14")
    assert crowd.head.final_layer.out_channels == 14 and crowd.card.keypoints == "crowdpose14"


# -- equal to the upstream code -----------------------------------------------------------------------------------
def _deterministic(name: str, seed: int) -> torch.nn.Module:
    m = create_model(name)
    m.load_state_dict(zi.deterministic_state_dict(layout_of(m.state_dict()), seed=seed))
    return m


def test_rtmpose_t_forward_and_predict_equal_mmpose() -> None:
    """MMPose's CSPNeXt + RTMCCHead on the same weights and crops: the SimCC logits, and RTMCCHead.predict's
    keypoints and scores with and without the flip test (SimCCLabel decoding)."""
    ref = REF["rtmpose_t"]
    m = _deterministic("rtmpose_t", seed=1)
    x = zi.crops(2, 256, 192, seed=2)
    with torch.no_grad():
        px, py = (o.numpy() for o in m(torch.from_numpy(x)))
        fx, fy = (o.numpy() for o in m(torch.from_numpy(np.ascontiguousarray(x[..., ::-1]))))
    np.testing.assert_allclose(px[:, :, ::16], ref["simcc_x_slice"], atol=1e-5)
    np.testing.assert_allclose(py[:, :, ::16], ref["simcc_y_slice"], atol=1e-5)
    card = get_card("rtmpose_t")
    c, s = at_input(2)
    plain = decode_outputs([px, py], c, s, card)
    np.testing.assert_allclose(plain[..., :2], ref["keypoints"], atol=1e-4)
    np.testing.assert_allclose(plain[..., 2], ref["scores"], atol=1e-5)
    flip = decode_outputs(average_flip_outputs([px, py], [fx, fy], card), c, s, card)
    np.testing.assert_allclose(flip[..., :2], ref["flip_keypoints"], atol=1e-4)
    np.testing.assert_allclose(flip[..., 2], ref["flip_scores"], atol=1e-5)


@pytest.mark.parametrize("kind", ["random", "realistic"])
def test_simcc_decoding_equals_mmpose(kind: str) -> None:
    """SimCCLabel.decode (raw-logit argmax / 2, the smaller maximum as score, -1 where it is <= 0) and RTMCCHead's
    flip test (flip_vectors, logits averaged, no shift)."""
    ref = REF["simcc"][kind]
    x, y, fx, fy = zi.simcc_vectors(kind, n=4, seed=3)
    card = get_card("rtmpose_t")
    c, s = at_input(4)
    got = decode_simdr(x, y, c, s, card)
    np.testing.assert_allclose(got[..., :2], ref["keypoints"], atol=1e-4)
    np.testing.assert_allclose(got[..., 2], ref["scores"], atol=1e-5)
    flip = decode_outputs(average_flip_outputs([x, y], [fx, fy], card), c, s, card)
    np.testing.assert_allclose(flip[..., :2], ref["flip_keypoints"], atol=1e-4)
    np.testing.assert_allclose(flip[..., 2], ref["flip_scores"], atol=1e-5)
    if kind == "realistic":  # a third of the keypoints score below zero: MMPose puts them at bin -1 (-0.5 px)
        low = got[..., 2] <= 0
        assert low.any() and np.allclose(got[low][:, :2], -0.5)


@pytest.mark.parametrize("kind", ["random", "realistic", "border"])
def test_udp_decoding_equals_mmpose(kind: str) -> None:
    """UDPHeatmap.decode (blur kernel 11, refine_keypoints_dark_udp, (size - 1) scaling) and flip_heatmaps without
    shift, as the MMPose 1.x ViTPose configs set them."""
    ref = REF["udp"][kind]
    hm, fhm = zi.heatmaps(kind, n=4, seed=4)
    card = get_card("vitpose_s")
    c, s = at_input(4)
    got = decode_heatmaps(hm, c, s, card)
    np.testing.assert_allclose(got[..., :2], ref["keypoints"], atol=2e-4)
    np.testing.assert_allclose(got[..., 2], ref["scores"], atol=1e-5)
    flip = decode_outputs(average_flip_outputs([hm], [fhm], card), c, s, card)
    np.testing.assert_allclose(flip[..., :2], ref["flip_keypoints"], atol=2e-4)


@pytest.mark.parametrize("kind", ["random", "realistic", "border"])
def test_udp_decoding_equals_the_official_vitpose_evaluation(kind: str) -> None:
    """The official ViTPose test (keypoints_from_heatmaps, UDP, modulate kernel 11) blurs with OpenCV's reflecting
    border and keeps no maximum (MMPose 0.x post_dark_udp): the card an official file loads with
    (`blur_border="reflect"`) decodes as it does. MMPose 1.x's zero-padded blur agrees with it for peaks inside the
    map and parts within 4 heatmap pixels of an edge."""
    ref = REF["udp"][kind]
    card = get_card("vitpose_s").with_(blur_border="reflect")
    c, s = at_input(4)
    hm = zi.heatmaps(kind, n=4, seed=4)[0]
    got = decode_heatmaps(hm, c, s, card)
    np.testing.assert_allclose(got[..., :2], ref["official_keypoints"], atol=2e-4)
    np.testing.assert_allclose(got[..., 2], ref["official_scores"], atol=1e-5)
    mmpose1 = decode_heatmaps(hm, c, s, get_card("vitpose_s"))
    gap = np.abs(mmpose1[..., :2] - got[..., :2]).max(axis=-1)
    if kind == "realistic":
        assert gap.max() < 2e-4
    elif kind == "border":
        print(f"official vs MMPose 1.x UDP blur, peaks near an edge: median {np.median(gap):.2f}, max {gap.max():.2f} px")
        assert np.median(gap) > 1.0  # input pixels: why the card follows the weights' origin


def test_vitpose_s_official_checkpoint_runs_as_the_official_backbone(tmp_path: Path) -> None:
    """Weights in the official layout (class-token slot included), loaded through load_weights, reproduce the
    official ViT's features: the renaming and the folded position slot are exact."""
    m = create_model("vitpose_s")
    official = zi.deterministic_state_dict(m.checkpoint_formats()["official"], seed=5)
    path = tmp_path / "vitpose_small.pth"
    torch.save({"state_dict": official, "meta": {"epoch": 210}}, path)
    info = load_weights(m, path)
    assert info.format == "official" and info.num_tensors == len(m.state_dict())
    assert m.card.blur_border == "reflect" and get_card("vitpose_s").blur_border == "zero"  # the source's decoding
    x = torch.from_numpy(zi.crops(1, 256, 192, seed=6))
    with torch.no_grad():
        feats = m.backbone(x)
    ref = REF["vit_s_backbone"]
    assert list(feats.shape) == ref["feature_shape"] == [1, 384, 16, 12]
    np.testing.assert_allclose(feats[0, ::16, ::3, ::3].numpy(), ref["feature_slice"], atol=1e-4)


# -- loading: both formats, wrappers; refusals ------------------------------------------------------------------------
def _mmpose_release(sd: dict) -> dict:
    out = dict(sd)
    out["data_preprocessor.mean"] = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    out["data_preprocessor.std"] = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    return {"meta": {"dataset_meta": {"sigmas": np.array([0.026], np.float32)}, "epoch": 420}, "state_dict": out}


def _official_release(model: torch.nn.Module) -> dict:
    """The model's weights in the official ViTPose layout: the position table split into a class slot and the rest
    (any split with the same sum is the same model)."""
    own = model.state_dict()
    off = {}
    from dynpose.models.vitpose import mmpose_to_official_name

    for k, v in own.items():
        off[mmpose_to_official_name(k)] = v
    pos = own["backbone.pos_embed"]
    slot = torch.randn(1, 1, pos.shape[-1])
    off["backbone.pos_embed"] = torch.cat([slot, pos - slot], dim=1)
    return {"state_dict": off}


@pytest.fixture(scope="module")
def random_t() -> torch.nn.Module:
    return _deterministic("rtmpose_t", seed=7)


@pytest.fixture(scope="module")
def random_vit() -> torch.nn.Module:
    return _deterministic("vitpose_s", seed=8)


def test_rtmpose_mmpose_release_round_trip(tmp_path: Path, random_t: torch.nn.Module) -> None:
    path = tmp_path / "rtmpose-tiny.pth"
    torch.save(_mmpose_release(random_t.state_dict()), path)
    m = create_model("rtmpose_t")
    info = load_weights(m, path)
    assert_same_weights(random_t, m)
    assert info.format == "mmpose1" and info.wrapper == "state_dict" and m.card.color_order == "rgb"
    assert info.ignored == ["data_preprocessor.mean", "data_preprocessor.std"]
    # DataParallel prefixes and old files without num_batches_tracked load too.
    dp = {"module." + k: v for k, v in random_t.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": dp}, tmp_path / "dp.pth")
    info = load_weights(create_model("rtmpose_t"), tmp_path / "dp.pth")
    assert info.data_parallel and info.missing_num_batches_tracked > 0


@pytest.mark.parametrize("fmt", ["mmpose1", "official"])
def test_vitpose_both_formats_into_one_model(tmp_path: Path, random_vit: torch.nn.Module, fmt: str) -> None:
    release = _mmpose_release(random_vit.state_dict()) if fmt == "mmpose1" else _official_release(random_vit)
    torch.save(release, tmp_path / "vit.pth")
    m = create_model("vitpose_s")
    info = load_weights(m, tmp_path / "vit.pth")
    assert info.format == fmt and m.card.color_order == "rgb"
    assert m.card.blur_border == ("reflect" if fmt == "official" else "zero")
    sa, sb = random_vit.state_dict(), m.state_dict()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6 if k == "backbone.pos_embed" else 0)
    x = torch.randn(1, 3, 256, 192)
    with torch.no_grad():
        torch.testing.assert_close(m(x), random_vit(x), rtol=1e-4, atol=1e-5)


def test_official_to_mmpose_folds_the_class_slot() -> None:
    pos = torch.arange(2 * 3, dtype=torch.float32).view(1, 3, 2)  # slot [0, 1], patches [2, 3], [4, 5]
    out = official_to_mmpose({"backbone.pos_embed": pos, "backbone.blocks.7.mlp.fc2.bias": torch.zeros(1)})
    assert out["backbone.pos_embed"].tolist() == [[[2.0, 4.0], [4.0, 6.0]]]
    assert list(out) == ["backbone.pos_embed", "backbone.layers.7.ffn.layers.1.bias"]


def _save(tmp_path: Path, name: str, sd: dict) -> Path:
    path = tmp_path / f"{name}.pth"
    torch.save({"meta": {}, "state_dict": sd}, path)
    return path


def _empty_like_layout(layout: dict) -> dict:
    return {
        k: torch.zeros(s, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
        for k, s in layout.items()
    }


def _refused(model: torch.nn.Module, path: Path, match: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DynPoseError, match=match) as e:
        load_weights(model, path)
    assert "\n" not in str(e.value)  # one line
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded half-way


def test_another_size_is_refused_naming_both_layouts(tmp_path: Path, random_t: torch.nn.Module) -> None:
    path = _save(tmp_path, "s", _empty_like_layout(meta_model("rtmpose_s").checkpoint_formats()["mmpose1"]))
    _refused(
        random_t,
        path,
        r"holds the rtmpose_s \(mmpose1\) layout, but rtmpose_t expects its mmpose1 layout: first differing tensor "
        r"backbone\.stem\.0\.conv\.weight \(checkpoint \[16, 3, 3, 3\], expected \[12, 3, 3, 3\]\)",
    )


def test_another_family_is_refused(tmp_path: Path, random_t: torch.nn.Module) -> None:
    path = _save(tmp_path, "lpn", {"backbone." + k: v for k, v in create_model("lpn_50").state_dict().items()})
    _refused(random_t, path, r"holds the lpn_50 layout, but rtmpose_t expects .* first differing tensor backbone\.stem")
    # and the other way round: an RTMPose release offered to an official-layout model
    path = _save(tmp_path, "t", dict(random_t.state_dict()))
    _refused(
        create_model("lpn_50"),
        path,
        r"\(detected format mmpose1, the rtmpose_t \(mmpose1\) layout\) does not fit lpn_50: .*first differing tensor",
    )


def test_rtmpose_at_the_other_input_size_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path, "m384", _empty_like_layout(meta_model("rtmpose_m_384x288").checkpoint_formats()["mmpose1"]))
    m = meta_model("rtmpose_m").to_empty(device="cpu")
    for v in m.state_dict().values():
        v.zero_()
    _refused(
        m,
        path,
        r"holds the rtmpose_m_384x288 \(mmpose1\) layout, but rtmpose_m expects its mmpose1 layout: first differing "
        r"tensor head\.mlp\.1\.weight \(checkpoint \[256, 108\], expected \[256, 48\]\)",
    )


@pytest.mark.parametrize("fmt", ["official", "mmpose1"])
def test_vitpose_file_with_a_missing_tensor_is_refused(tmp_path: Path, random_vit: torch.nn.Module, fmt: str) -> None:
    release = _official_release(random_vit) if fmt == "official" else _mmpose_release(random_vit.state_dict())
    gone = "backbone.blocks.3.norm1.weight" if fmt == "official" else "backbone.layers.3.ln1.weight"
    del release["state_dict"][gone]
    torch.save(release, tmp_path / "vit.pth")
    _refused(
        create_model("vitpose_s"),
        tmp_path / "vit.pth",
        rf"holds a layout of no zoo model \(\d+ tensors\), but vitpose_s expects its {fmt} layout: first differing "
        rf"tensor {re.escape(gone)} \(missing from the checkpoint\)",
    )


def test_vitpose_of_another_size_is_refused(tmp_path: Path, random_vit: torch.nn.Module) -> None:
    layout = meta_model("vitpose_b").checkpoint_formats()["official"]
    torch.save({"state_dict": _empty_like_layout(layout)}, tmp_path / "b.pth")
    _refused(
        random_vit,
        tmp_path / "b.pth",
        r"holds the vitpose_b \(official\) layout, but vitpose_s expects its official layout: first differing tensor "
        r"backbone\.pos_embed \(checkpoint \[1, 193, 768\], expected \[1, 193, 384\]\)",
    )


def test_simcc_outputs_under_a_heatmap_card_are_refused() -> None:
    x, y = np.zeros((2, 17, 384), np.float32), np.zeros((2, 17, 512), np.float32)
    c, s = at_input(2)
    with pytest.raises(
        DynPoseError,
        match=r"model card 'vitpose_s' \(decoder udp\) expects heatmaps N x 17 x h x w, but the model gives SimCC/SimDR "
        r"vectors N x 17 x 384 and N x 17 x 512 \(first differing: output 0 is N x 17 x 384\); give it a card with "
        r"decoder simdr",
    ):
        decode_outputs([x, y], c, s, get_card("vitpose_s"))
    with pytest.raises(DynPoseError, match=r"'rtmpose_t' \(decoder simdr\) expects SimCC/SimDR vectors .* heatmaps N x 17"):
        decode_outputs([np.zeros((2, 17, 64, 48), np.float32)], c, s, get_card("rtmpose_t"))
    with pytest.raises(DynPoseError, match=r"first differing: output 0 is N x 17 x 576\)"):  # a 384x288 file, 256x192 card
        decode_outputs([np.zeros((2, 17, 576)), np.zeros((2, 17, 768))], c, s, get_card("rtmpose_m"))


# -- released download names ----------------------------------------------------------------------------------------
RELEASED = {  # MMPose 1.x model zoo (configs/body_2d_keypoint/rtmpose/*/*.yml, topdown_heatmap/coco/vitpose_coco.yml)
    "rtmpose_t": "projects/rtmposev1/rtmpose-tiny_simcc-aic-coco_pt-aic-coco_420e-256x192-cfc8f33d_20230126.pth",
    "rtmpose_s": "projects/rtmposev1/rtmpose-s_simcc-aic-coco_pt-aic-coco_420e-256x192-fcb2599b_20230126.pth",
    "rtmpose_m": "projects/rtmposev1/rtmpose-m_simcc-aic-coco_pt-aic-coco_420e-256x192-63eb25f7_20230126.pth",
    "rtmpose_l": "projects/rtmposev1/rtmpose-l_simcc-aic-coco_pt-aic-coco_420e-256x192-f016ffe0_20230126.pth",
    "rtmpose_m_384x288": "projects/rtmposev1/rtmpose-m_simcc-aic-coco_pt-aic-coco_420e-384x288-a62a0b32_20230228.pth",
    "rtmpose_l_384x288": "projects/rtmposev1/rtmpose-l_simcc-aic-coco_pt-aic-coco_420e-384x288-97d6cb0f_20230228.pth",
    "vitpose_s": "body_2d_keypoint/topdown_heatmap/coco/td-hm_ViTPose-small_8xb64-210e_coco-256x192-62d7a712_20230314.pth",
    "vitpose_b": "body_2d_keypoint/topdown_heatmap/coco/td-hm_ViTPose-base_8xb64-210e_coco-256x192-216eae50_20230314.pth",
    "vitpose_l": "body_2d_keypoint/topdown_heatmap/coco/td-hm_ViTPose-large_8xb64-210e_coco-256x192-53609f55_20230314.pth",
    "vitpose_h": "body_2d_keypoint/topdown_heatmap/coco/td-hm_ViTPose-huge_8xb64-210e_coco-256x192-e32adcd4_20230314.pth",
}


def test_mmpose_aliases_are_the_released_files() -> None:
    for name, file in RELEASED.items():
        src = get_card(name).sources["mmpose"]
        assert src["url"] == "https://download.openmmlab.com/mmpose/v1/" + file and src["format"] == "mmpose1"
        assert sha256_prefix_from_name(file.rsplit("/", 1)[1]) == file.rsplit("-", 1)[1][:8]
    body7 = get_card("rtmpose_l_384x288").sources["body7"]["url"]
    assert body7.endswith("/rtmpose-l_simcc-body7_pt-body7_420e-384x288-3f5a1437_20230504.pth")
    assert get_card("rtmpose_s").sources["mmpose-coco"]["url"].endswith("-256x192-8edcf0d7_20230127.pth")


def test_alias_download_from_a_local_server(
    tmp_path: Path, random_t: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alias path end to end against http.server on 127.0.0.1: an MMPose-style file whose name carries its real
    sha256 prefix is fetched once, checked, cached, and loads strictly."""
    monkeypatch.setenv("DYNPOSE_HOME", str(tmp_path / "home"))
    root = tmp_path / "www" / "projects" / "rtmposev1"
    root.mkdir(parents=True)
    tmp = root / "tmp.pth"
    torch.save(_mmpose_release(random_t.state_dict()), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    name = f"rtmpose-tiny_simcc-aic-coco_pt-aic-coco_420e-256x192-{digest}_20230126.pth"
    tmp.rename(root / name)
    srv = Server(tmp_path / "www")
    try:
        m = create_model("rtmpose_t")
        url = f"{srv.base}/projects/rtmposev1/{name}"
        m.card = m.card.with_(sources={"mmpose": {**m.card.sources["mmpose"], "url": url}})
        info = load_weights(m, "mmpose", progress=False)
        assert info.alias == "mmpose" and info.url == url and info.format == "mmpose1"
        assert srv.requests == [f"/projects/rtmposev1/{name}"]
        assert_same_weights(random_t, m)
    finally:
        srv.stop()


def test_vitpose_h_is_refused_by_the_onnx_exporter_in_one_line(tmp_path: Path) -> None:
    from dynpose.export.onnx_export import export_torch

    m = meta_model("vitpose_h")  # 637 M parameters: 2.55 GB of fp32, over protobuf's 2 GB
    with pytest.raises(DynPoseError, match=r"export of vitpose_h: 2\.55 GB of fp32 weights do not fit one ONNX file"):
        export_torch(m, tmp_path / "h.onnx", m.card)
    assert not list(tmp_path.iterdir())
