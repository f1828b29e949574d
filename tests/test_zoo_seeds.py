"""The seed documents' models: LPN, SimDR, stacked hourglass (MMPose names), DPN.

Official layouts (names, order, shapes, parameter counts), forward shapes, cards, strict loading from each release
format, SimDR decoding against a hand-worked example and the authors' formulas, counted FLOPs, default export roles,
and LPN-50 exported through the export API and run as a small model through dynpose-run.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_geometry import BOXES, ref_transform_preds
from test_weights import assert_same_weights, random_model

from dynpose.errors import DynPoseError
from dynpose.keypoints import COCO17
from dynpose.models import ModelCard, create_model, get_card, load_weights
from dynpose.models.flops import count_flops, model_cost
from dynpose.models.weights import sha256_prefix_from_name
from dynpose.runtime.decode import average_flip_simdr, decode_simdr, flip_back_simdr, simdr_maxima, simdr_softmax
from dynpose.runtime.preprocess import box_to_center_scale

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOCAL_LAYOUTS = Path(__file__).parent / "data" / "layouts"
NEW = ["lpn_50", "lpn_101", "lpn_152", "simdr_hrnet_w32", "simdr_hrnet_w48", "hourglass_1", "hourglass_2", "dpn"]
PARAMS = {
    "lpn_50": 2_911_153,
    "lpn_101": 5_353_458,
    "lpn_152": 7_377_459,
    "simdr_hrnet_w32": 31_289_521,
    "simdr_hrnet_w48": 66_349_153,
    # No shared layout: counted from MMPose's HourglassNet + CPMHead (tests/data/layouts, see its "source").
    "hourglass_1": 94_847_889,
    "hourglass_2": 187_709_090,
    "dpn": 56_187_008,
}
_MODELS: dict[str, torch.nn.Module] = {}


def model(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        _MODELS[name] = create_model(name)
    return _MODELS[name]


def layout(shared: Path, name: str) -> dict:
    if name.startswith("hourglass"):
        d = json.loads((LOCAL_LAYOUTS / f"{name}.mmpose.json").read_text())
        # An MMPose 1.x checkpoint's names; the zoo holds them without the backbone./head. prefixes.
        d["tensors"] = {k.removeprefix("backbone.").removeprefix("head."): v for k, v in d["tensors"].items()}
        return d
    return json.loads((shared / "layouts" / f"{name}.official.json").read_text())


# -- layouts, shapes, cards ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_state_dict_matches_layout(shared: Path, name: str) -> None:
    d = layout(shared, name)
    got = {k: list(v.shape) for k, v in model(name).state_dict().items()}
    assert list(got) == list(d["tensors"])  # same names in the same order as the released checkpoints
    assert got == d["tensors"]
    n = sum(p.numel() for p in model(name).parameters())
    assert n == d["num_parameters"] == PARAMS[name]


@pytest.mark.parametrize("name", NEW)
def test_forward_shapes_batch_1_and_5(shared: Path, name: str) -> None:
    m, card = model(name), get_card(name)
    expected = layout(shared, name)["output"][1:]
    with torch.no_grad():
        for n in (1, 5):
            out = m(torch.randn(n, 3, card.input_height, card.input_width))
            if name.startswith("simdr"):
                x, y = out
                assert x.shape == (n, 17, 384) and y.shape == (n, 17, 512)
                assert torch.isfinite(x).all() and torch.isfinite(y).all()
            else:
                assert list(out.shape) == [n, *expected] == [n, 17, card.input_height // 4, card.input_width // 4]
                assert torch.isfinite(out).all()


def test_dpn_batch_items_are_independent() -> None:
    # channel_shuffle reshapes across the batch axis; a wrong reshape would mix the crops of one batch.
    m = model("dpn")
    x = torch.randn(2, 3, 256, 192)
    with torch.no_grad():
        together = m(x)
        alone = torch.cat([m(x[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NEW)
def test_cards(name: str) -> None:
    card = model(name).card
    assert card == get_card(name) and card.task == "pose" and card.keypoints == "coco17"
    assert ModelCard.from_dict(json.loads(card.to_json())) == card
    size = (256, 256) if name.startswith("hourglass") else (192, 256)
    assert card.input_size == size
    assert card.decoder == ("simdr" if name.startswith("simdr") else "msra")
    for alias, src in card.sources.items():
        assert src["color_order"] == card.color_order, alias
        if src["url"] is None:  # Google Drive / Baidu / no release: the card says what to get and pass
            assert src["manual"], alias


def test_card_colours_and_normalisation() -> None:
    assert get_card("lpn_50").color_order == "bgr"  # LPN configs: COLOR_RGB false, as SimpleBaseline
    assert get_card("lpn_50").mean == (123.675, 116.28, 103.53)
    dpn = get_card("dpn")
    assert dpn.color_order == "bgr"
    # The DPN config lists mean (0.406, 0.456, 0.485) and std (0.225, 0.224, 0.229) in BGR order, on the 0-1 scale.
    np.testing.assert_allclose(dpn.mean, np.array([0.406, 0.456, 0.485]) * 255)
    np.testing.assert_allclose(dpn.std, np.array([0.225, 0.224, 0.229]) * 255)
    assert get_card("simdr_hrnet_w32").color_order == get_card("hourglass_1").color_order == "rgb"
    assert get_card("simdr_hrnet_w48").simdr_split_ratio == 2.0
    assert "lpn_50_256x192.pth" in get_card("lpn_50").sources["official"]["manual"]
    assert "iter-<N>.pth" in dpn.sources["official"]["manual"]
    mm = get_card("hourglass_1").sources["mmpose"]
    assert mm["format"] == "mmpose0" and sha256_prefix_from_name(mm["url"].rsplit("/", 1)[1]) == "4ec713ba"
    assert get_card("hourglass_2").sources == {}  # MMPose released no COCO Hourglass-104


def test_simdr_split_ratio_on_the_card() -> None:
    card = get_card("simdr_hrnet_w32")
    assert card.to_dict()["simdr_split_ratio"] == 2.0
    old = card.to_dict()
    del old["simdr_split_ratio"]  # cards written before the field existed still load, with the default
    assert ModelCard.from_dict(old).simdr_split_ratio == 2.0
    for bad in (0, -1.5, float("nan"), float("inf"), True, "2"):
        with pytest.raises(DynPoseError, match="simdr_split_ratio"):
            card.with_(simdr_split_ratio=bad)
    with pytest.raises(DynPoseError, match="'decoder' must be one of"):
        card.with_(decoder="simcc")


def test_crowdpose_keypoints_change_the_heads() -> None:
    m = create_model("simdr_hrnet_w32", keypoints="crowdpose14")
    with torch.no_grad():
        x, y = m(torch.randn(1, 3, 256, 192))
    assert x.shape == (1, 14, 384) and y.shape == (1, 14, 512)
    assert create_model("lpn_50", keypoints="crowdpose14").final_layer.out_channels == 14


# -- strict loading -----------------------------------------------------------------------------------------------
def _mmpose_split(sd: dict, head_prefix: str) -> dict:
    return {(head_prefix if k.startswith("multi_final_layers") else "backbone.") + k: v for k, v in sd.items()}


def _dpn_release(sd: dict) -> dict:
    # cvpack's engine.save_checkpoint: the model plus optimizer/scheduler state and the iteration.
    optimizer = {"state": {}, "param_groups": [{"lr": 5e-4, "weight_decay": 1e-5, "params": [0, 1, 2]}]}
    return {
        "model": dict(sd),
        "optimizer": optimizer,
        "scheduler": {"milestones": [48000], "last_epoch": 3},
        "iteration": 96000,
    }


RELEASES = {
    "lpn_50": {
        "official": lambda sd: sd,
        "checkpoint_pth": lambda sd: {"epoch": 150, "state_dict": {"module." + k: v for k, v in sd.items()}, "perf": 0.69},
        "model_wrapper": lambda sd: {"model": sd},
        "no_num_batches_tracked": lambda sd: {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
    },
    "simdr_hrnet_w32": {
        "sithu31296": lambda sd: sd,  # backbone. prefix, as the model
        "simcc_authors": lambda sd: {k.removeprefix("backbone."): v for k, v in sd.items()},
        "simcc_data_parallel": lambda sd: {
            "state_dict": {"module." + k.removeprefix("backbone."): v for k, v in sd.items()}
        },
    },
    "hourglass_1": {
        "mmpose0": lambda sd: {"state_dict": _mmpose_split(sd, "keypoint_head."), "meta": {"epoch": 210}},
        "mmpose1": lambda sd: {
            "state_dict": {**_mmpose_split(sd, "head."), "data_preprocessor.mean": torch.zeros(3, 1, 1)},
            "meta": {"dataset_meta": {"sigmas": np.array([0.026], np.float32)}},
        },
    },
    "dpn": {"dpn_release": _dpn_release},
}
CASES = [(name, fmt) for name, formats in RELEASES.items() for fmt in formats]
COLOURS = {"lpn_50": "bgr", "simdr_hrnet_w32": "rgb", "hourglass_1": "rgb", "dpn": "bgr"}


@pytest.mark.parametrize(("name", "fmt"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_load_round_trip(tmp_path: Path, name: str, fmt: str) -> None:
    src = random_model(name)
    path = tmp_path / f"{name}_{fmt}.pth"
    torch.save(RELEASES[name][fmt](src.state_dict()), path)
    dst = create_model(name)
    loaded = load_weights(dst, path)
    assert_same_weights(src, dst, skip_nbt=fmt == "no_num_batches_tracked")
    assert dst.card.color_order == COLOURS[name]
    assert loaded.num_tensors + loaded.missing_num_batches_tracked == len(src.state_dict())
    assert (loaded.missing_num_batches_tracked > 0) == (fmt == "no_num_batches_tracked")
    if fmt.startswith("mmpose"):
        assert loaded.format == fmt
    if fmt in ("checkpoint_pth", "simcc_data_parallel"):
        assert loaded.data_parallel
    if name == "dpn":
        assert loaded.wrapper == "model"


def test_create_model_with_a_checkpoint_path(tmp_path: Path) -> None:
    src = random_model("lpn_50")
    torch.save(src.state_dict(), tmp_path / "lpn_50_256x192.pth")
    m = create_model("lpn_50", weights=tmp_path / "lpn_50_256x192.pth")
    assert_same_weights(src, m)
    assert m.weights_source == str(tmp_path / "lpn_50_256x192.pth") and m.card.color_order == "bgr"


def _save(tmp_path: Path, name: str, **kw: object) -> Path:
    path = tmp_path / f"{name}.pth"
    torch.save(create_model(name, **kw).state_dict(), path)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("ckpt", "target", "message"),
    [
        ("lpn_50", "lpn_101", r"does not fit lpn_101: \d+ missing tensor\(s\): layer3\.6\.conv1\.weight"),
        ("hrnet_w32", "simdr_hrnet_w32", r"missing tensor\(s\): mlp_head_x\.weight, mlp_head_x\.bias, mlp_head_y"),
        ("lpn_50", "dpn", r"does not fit dpn: \d+ missing tensor\(s\): top\.conv\.conv\.weight.*unexpected tensor"),
    ],
)
def test_wrong_checkpoint_names_the_tensors(tmp_path: Path, ckpt: str, target: str, message: str) -> None:
    with pytest.raises(DynPoseError, match=message):
        load_weights(create_model(target), _save(tmp_path, ckpt))


def test_wrong_head_shape_is_named(tmp_path: Path) -> None:
    path = _save(tmp_path, "lpn_50", keypoints="crowdpose14")
    with pytest.raises(DynPoseError, match=r"final_layer\.weight \(checkpoint \[14, 256, 1, 1\], model \[17, 256, 1, 1\]\)"):
        load_weights(create_model("lpn_50"), path)


def test_official_alias_without_url_explains_where_to_get_it() -> None:
    with pytest.raises(
        DynPoseError, match=r"no direct download link; get it from the official LPN release.*lpn_101_256x192"
    ):
        create_model("lpn_101", weights="official")


# -- SimDR decoding -----------------------------------------------------------------------------------------------
def ref_simdr_preds(output_x, output_y, c, s, image_size, split_ratio=2.0):
    """Transcription of leeyegy/SimCC `validate_simdr` (no flip): softmax, argmax / split ratio, the larger of the
    two maxima as score, transform_preds with output_size = IMAGE_SIZE. Scales in official units (pixels / 200)."""
    tx = torch.softmax(torch.from_numpy(output_x), dim=2)
    ty = torch.softmax(torch.from_numpy(output_y), dim=2)
    max_val_x, preds_x = tx.max(2, keepdim=True)
    max_val_y, preds_y = ty.max(2, keepdim=True)
    mask = max_val_x < max_val_y
    max_val_x[mask] = max_val_y[mask]
    maxvals = max_val_x.numpy()
    output = torch.ones([output_x.shape[0], preds_x.size(1), 2])
    output[:, :, 0] = torch.squeeze(torch.true_divide(preds_x, split_ratio))
    output[:, :, 1] = torch.squeeze(torch.true_divide(preds_y, split_ratio))
    output = output.numpy()
    preds = output.copy()
    for i in range(output.shape[0]):
        preds[i] = ref_transform_preds(output[i], c[i], s[i], image_size)
    return preds, maxvals


def ref_flip_back_simdr(output_flipped, matched_parts, type="x"):  # noqa: A002 - the official signature
    if type == "x":
        output_flipped = output_flipped[:, :, ::-1]
    output_flipped = output_flipped.copy()
    for pair in matched_parts:
        tmp = output_flipped[:, pair[0], :].copy()
        output_flipped[:, pair[0], :] = output_flipped[:, pair[1], :]
        output_flipped[:, pair[1], :] = tmp
    return output_flipped


def test_simdr_decode_hand_worked_example() -> None:
    card = get_card("simdr_hrnet_w32")
    x = np.zeros((1, 17, 384), np.float32)
    y = np.zeros((1, 17, 512), np.float32)
    x[0, :, 100] = 5.0  # bin 100 / ratio 2 = crop x 50
    y[0, :, 301] = 5.0  # bin 301 / 2 = crop y 150.5
    y[0, 3, 300] = 7.0  # keypoint 3: a higher y peak at bin 300 -> crop y 150
    # A 240 x 320 crop box centred at (500, 400): 1.25 image pixels per crop pixel, crop centre (96, 128).
    out = decode_simdr(x, y, [[500.0, 400.0]], [[240.0, 320.0]], card)
    assert out.shape == (1, 17, 3)
    np.testing.assert_allclose(out[0, 0, :2], [(50 - 96) * 1.25 + 500, (150.5 - 128) * 1.25 + 400])  # 442.5, 428.125
    np.testing.assert_allclose(out[0, 3, :2], [442.5, 427.5])
    # Softmax maxima (the other bins hold 0, e^0 = 1): x e^5 / (e^5 + 383) = 0.2793, y e^5 / (e^5 + 511) = 0.2251;
    # the score is the larger one. Keypoint 3's y: e^7 / (e^7 + e^5 + 510) = 0.6249.
    e5, e7 = math.exp(5.0), math.exp(7.0)
    np.testing.assert_allclose(out[0, 0, 2], e5 / (e5 + 383), rtol=1e-6)
    np.testing.assert_allclose(out[0, 3, 2], e7 / (e7 + e5 + 510), rtol=1e-6)
    raw = decode_simdr(x, y, [[500.0, 400.0]], [[240.0, 320.0]], card, softmax=False)
    np.testing.assert_allclose(raw[..., :2], out[..., :2])
    assert raw[0, 0, 2] == 5.0 and raw[0, 3, 2] == 7.0  # raw logits: the larger maximum


def test_simdr_decode_matches_the_authors_formula() -> None:
    card = get_card("simdr_hrnet_w32")
    rng = np.random.default_rng(0)
    n = len(BOXES)
    x = (rng.standard_normal((n, 17, 384)) * 3).astype(np.float32)
    y = (rng.standard_normal((n, 17, 512)) * 3).astype(np.float32)
    centers, scales = box_to_center_scale(BOXES, card.aspect_ratio)
    got = decode_simdr(x, y, centers, scales, card)
    preds, maxvals = ref_simdr_preds(x, y, centers, scales / 200.0, [192, 256])
    np.testing.assert_allclose(got[..., :2], preds, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got[..., 2], maxvals[..., 0], rtol=1e-5)
    coords, scores = simdr_maxima(x, y, 2.0)
    np.testing.assert_array_equal(coords[..., 0], np.argmax(x, axis=2) / 2.0)
    np.testing.assert_allclose(simdr_softmax(x).sum(axis=2), 1.0, rtol=1e-5)


def test_simdr_flip_test_matches_the_authors_code() -> None:
    rng = np.random.default_rng(1)
    x, fx = rng.standard_normal((2, 3, 17, 384)).astype(np.float32)
    y, fy = rng.standard_normal((2, 3, 17, 512)).astype(np.float32)
    pairs = COCO17.flip_pairs
    # validate_simdr with FLIP_TEST and SHIFT_HEATMAP: flip back, shift x one bin down, average the softmaxes.
    rx = ref_flip_back_simdr(fx, pairs, "x")
    ry = ref_flip_back_simdr(fy, pairs, "y")
    rx[:, :, 0:-1] = rx.copy()[:, :, 1:]
    ref_x = (torch.softmax(torch.from_numpy(x), 2) + torch.softmax(torch.from_numpy(rx), 2)).numpy() * 0.5
    ref_y = (torch.softmax(torch.from_numpy(y), 2) + torch.softmax(torch.from_numpy(ry), 2)).numpy() * 0.5
    px, py = average_flip_simdr(x, y, fx, fy, COCO17.flip_index())
    np.testing.assert_allclose(px, ref_x, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(py, ref_y, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(flip_back_simdr(fy, COCO17.flip_index(), "y"), ry)
    with pytest.raises(DynPoseError, match="axis must be"):
        flip_back_simdr(fy, COCO17.flip_index(), "z")


def test_simdr_flip_lands_where_the_point_is() -> None:
    # A point at crop x = 40 (bin 80). The flipped crop sees it at pixel 191 - 40 = 151, bin 302, which mirrors back
    # to bin 81; the official one-bin shift brings it home to 80 for both keypoints of a left/right pair.
    card = get_card("simdr_hrnet_w32")
    x = np.full((1, 17, 384), -10.0, np.float32)
    y = np.zeros((1, 17, 512), np.float32)
    x[0, :, 80] = 10.0
    fx = np.full_like(x, -10.0)
    fx[0, :, 302] = 10.0
    px, py = average_flip_simdr(x, y, fx, y, COCO17.flip_index())
    out = decode_simdr(px, py, [[96.0, 128.0]], [[192.0, 256.0]], card, softmax=False)
    np.testing.assert_allclose(out[0, :, 0], 40.0)
    unshifted = average_flip_simdr(x, y, fx, y, COCO17.flip_index(), shift=False)[0]
    assert unshifted[0, 0, 81] == pytest.approx(unshifted[0, 0, 80])  # half the mass one bin off without the shift


def test_simdr_decode_rejects_bad_outputs() -> None:
    card = get_card("simdr_hrnet_w32")
    with pytest.raises(DynPoseError, match="384 and 512"):
        decode_simdr(np.zeros((1, 17, 192)), np.zeros((1, 17, 512)), [[0, 0]], [[1, 1]], card)
    with pytest.raises(DynPoseError, match="N x K x bins"):
        decode_simdr(np.zeros((1, 17, 384)), np.zeros((2, 17, 512)), [[0, 0]], [[1, 1]], card)
    with pytest.raises(DynPoseError, match="2 centres"):
        decode_simdr(np.zeros((1, 17, 384)), np.zeros((1, 17, 512)), [[0, 0], [1, 1]], [[1, 1]], card)
    empty = decode_simdr(np.zeros((0, 17, 384)), np.zeros((0, 17, 512)), np.zeros((0, 2)), np.zeros((0, 2)), card)
    assert empty.shape == (0, 17, 3)


# -- FLOPs --------------------------------------------------------------------------------------------------------
def test_count_flops_by_hand() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 6, 5))
    # conv: 8 x 3 x 3 x 3 multiply-adds at each of 4 x 6 outputs; linear: 192 x 5; two FLOPs per multiply-add.
    assert count_flops(net, (6, 4)) == 2 * (8 * 27 * 24 + 192 * 5)
    assert count_flops(net, (6, 4), batch=3) == 3 * count_flops(net, (6, 4))
    with pytest.raises(DynPoseError, match="positive"):
        count_flops(net, (0, 4))


def test_lpn_50_cost_matches_its_paper() -> None:
    cost = model_cost("lpn_50", model("lpn_50"))
    assert cost.params == 2_911_153 and cost.input_size == (192, 256)
    assert 1.0 <= cost.gmacs <= 1.1  # the LPN README: 2.9 M parameters, 1.0 GFLOPs at 256x192


# -- ONNX export through the export API, and an LPN pair through dynpose-run --------------------------------------
# The heavy models' exports (hourglass_1 95 M, DPN 56 M parameters: tens of seconds each on 2 cores) are proved by
# benchmarks/zoo_speed.py, which exports every zoo model through the export step and fails on a failed check;
# SimDR's two-output export and runtime are tests/test_simdr_runtime.py.
@pytest.fixture(scope="module")
def lpn_pair_dir(tmp_path_factory: pytest.TempPathFactory, tinypose_256: Path) -> Path:
    """LPN-50 (random weights) as the small model by its default role, TinyPose-256 large, the router (random)."""
    from conftest import tinypose_card

    from dynpose.export.api import export_model, register_onnx

    eng = tmp_path_factory.mktemp("lpn_pair")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model("lpn_50", eng, weights="random", progress=False)
        export_model("router", eng, weights="random", progress=False)
    register_onnx(tinypose_256, tinypose_card(192, 256), eng, role="large", progress=False)
    return eng


def test_onnx_export_lpn_50(lpn_pair_dir: Path) -> None:
    import onnx

    from dynpose.engines.manifest import Manifest

    man = Manifest.load(lpn_pair_dir)
    onnx_entry, torch_entry = man.get("small", "onnx"), man.get("small", "torch")
    assert onnx_entry is not None and torch_entry is not None
    assert onnx_entry.model == "lpn_50" and onnx_entry.card == get_card("lpn_50")
    # Traced at batch 2, checked by the export against PyTorch at batch 1 and 5 (random and real crops).
    assert onnx_entry.checks["fp32_rel_l2"] < 1e-4
    assert {"fp32_rel_l2_random_b1", "fp32_rel_l2_random_b5", "fp32_rel_l2_real_b5"} <= set(onnx_entry.checks)
    proto = onnx.load(str(lpn_pair_dir / onnx_entry.file), load_external_data=False)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch axis
    _check_batch_3(lpn_pair_dir, "lpn_50", onnx_entry.file, torch_entry.file)


def _check_batch_3(engine_dir: Path, name: str, onnx_file: str, torch_file: str) -> None:
    """ONNX Runtime at batch 3 against PyTorch with the exported weights (a third batch size)."""
    import onnxruntime as ort

    m = create_model(name)
    m.load_state_dict(torch.load(engine_dir / torch_file, weights_only=True))
    card = get_card(name)
    x = torch.randn(3, 3, card.input_height, card.input_width)
    with torch.no_grad():
        ref = m.eval()(x).numpy()
    sess = ort.InferenceSession(str(engine_dir / onnx_file), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == ref.shape == (3, 17, card.input_height // 4, card.input_width // 4)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)


def test_lpn_50_small_runs_through_dynpose_run(lpn_pair_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dynpose.cli.run import main

    out = tmp_path / "results.json"
    args = ["--engine-dir", lpn_pair_dir, "--source", coco_dir / "000000000785.jpg"]
    args += ["--detections", coco_dir / "test_coco_det_AP_H_56.json", "--det-score", "0.3"]
    args += ["--route", "fraction:0.5", "--out", out]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    results = json.loads(out.read_text())
    assert results and {p["image_id"] for p in results} == {785}
    assert all(len(p["keypoints"]) == 51 and all(math.isfinite(v) for v in p["keypoints"]) for p in results)
    assert "frames 1" in r.stdout and "crops small" in r.stdout


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("lpn_50", "small"),
        ("lpn_152", "small"),
        ("resnet_50", "small"),
        ("hrnet_w32", "large"),
        ("simdr_hrnet_w32", "large"),
        ("simdr_hrnet_w48", "large"),
        ("hourglass_1", "large"),
        ("hourglass_2", "large"),
        ("dpn", "large"),
        ("router", "router"),
    ],
)
def test_default_roles(name: str, role: str) -> None:
    from dynpose.export.api import default_role

    assert default_role(name) == role


def test_role_overrides_the_default(tmp_path: Path) -> None:
    from dynpose.export.api import export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entries = export_model("lpn_50", tmp_path, role="large", weights="random", progress=False)
    assert {e.role for e in entries} == {"large"}
