"""Zoo models: official tensor layouts, parameter counts, forward shapes, cards, ONNX export with a free batch."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dynpose.errors import DynPoseError
from dynpose.models import ModelCard, create_model, get_card, list_models
from dynpose.models.weights import sha256_prefix_from_name

NAMES = ["hrnet_w32", "hrnet_w48", "resnet_50", "resnet_101", "resnet_152", "router"]
_MODELS: dict[str, torch.nn.Module] = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model(name: str) -> torch.nn.Module:
    """Build each model once per test session: HRNet-W48 / ResNet-152 take a second each to initialise."""
    if name not in _MODELS:
        _MODELS[name] = create_model(name)
    return _MODELS[name]


def layout(shared: Path, name: str) -> tuple[dict[str, list[int]], int]:
    fn = "dynpose_router.json" if name == "router" else f"{name}.official.json"
    d = json.loads((shared / "layouts" / fn).read_text())
    tensors = {k.removeprefix("backbone.") if name == "router" else k: v for k, v in d["tensors"].items()}
    return tensors, d["num_parameters"]


def test_list_models() -> None:
    seeds = ["lpn_50", "lpn_101", "lpn_152", "simdr_hrnet_w32", "simdr_hrnet_w48", "hourglass_1", "hourglass_2", "dpn"]
    families = ["rtmpose_t", "rtmpose_s", "rtmpose_m", "rtmpose_l", "rtmpose_m_384x288", "rtmpose_l_384x288"]
    families += ["vitpose_s", "vitpose_b", "vitpose_l", "vitpose_h"]  # tests/test_zoo_families.py
    assert list_models() == NAMES[:-1] + seeds + families + ["router"]  # the seed models: tests/test_zoo_seeds.py


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_official_layout(shared: Path, name: str) -> None:
    expected, num_params = layout(shared, name)
    got = {k: list(v.shape) for k, v in model(name).state_dict().items()}
    assert list(got) == list(expected)  # same names, same order as the released checkpoints
    assert got == expected
    assert sum(p.numel() for p in model(name).parameters()) == num_params


def test_parameter_counts_from_issue() -> None:
    counts = {n: sum(p.numel() for p in model(n).parameters()) for n in ("hrnet_w32", "resnet_50", "router")}
    assert counts == {"hrnet_w32": 28_536_113, "resnet_50": 33_999_697, "router": 853_219}


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_batch_1_and_5(name: str) -> None:
    m = model(name)
    with torch.no_grad():
        for n in (1, 5):
            out = m(torch.randn(n, 3, 256, 192))
            if name == "router":
                assert out.shape == (n, 3)
                assert bool(((out > 0) & (out < 1)).all())
            else:
                assert out.shape == (n, 17, 64, 48)
            assert torch.isfinite(out).all()


def test_router_batch_items_are_independent() -> None:
    # SGE reshapes across the batch axis; a wrong reshape would mix crops of one batch.
    m = model("router")
    x = torch.randn(4, 3, 256, 192)
    with torch.no_grad():
        together = m(x)
        alone = torch.cat([m(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(DynPoseError, match="unknown model 'hrnet_w64'.*hrnet_w32.*resnet_50.*router"):
        create_model("hrnet_w64")


def test_weights_none_is_silent_and_marked_unloaded() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = create_model("router")
    assert m.weights_source is None and m.checkpoint is None
    assert not m.training


def test_random_weights_warn() -> None:
    with pytest.warns(UserWarning, match="meaningless"):
        m = create_model("router", weights="random")
    assert m.weights_source == "random"


def test_bad_keyword_is_a_user_error() -> None:
    with pytest.raises(DynPoseError, match="bad keyword"):
        create_model("router", depth=3)


def test_crowdpose_keypoints_change_head_and_card() -> None:
    m = create_model("resnet_50", keypoints="crowdpose14")
    assert m.final_layer.out_channels == 14
    assert m.card.keypoints == "crowdpose14" and m.card.sources == {}
    with pytest.raises(DynPoseError, match="unknown keypoint set"):
        create_model("resnet_50", keypoints="mpii")


@pytest.mark.parametrize("name", NAMES)
def test_cards(name: str) -> None:
    card = model(name).card
    assert isinstance(card, ModelCard) and card == get_card(name)
    assert (card.input_width, card.input_height) == (192, 256)
    assert card.keypoints == "coco17"
    assert card.task == ("router" if name == "router" else "pose")
    assert ModelCard.from_dict(json.loads(card.to_json())) == card  # cards are plain data
    for alias, src in card.sources.items():
        assert src["color_order"] in ("rgb", "bgr")
        assert src.get("url") or src.get("manual"), alias
    if name != "router":
        mm = card.sources["mmpose"]
        assert mm["url"].startswith("https://download.openmmlab.com/mmpose/v1/body_2d_keypoint/topdown_heatmap/coco/")
        assert mm["color_order"] == "rgb"
        assert sha256_prefix_from_name(mm["url"].rsplit("/", 1)[1]) is not None
        # official SimpleBaseline weights were trained on BGR crops, official HRNet on RGB
        assert card.sources["official"]["color_order"] == ("bgr" if name.startswith("resnet") else "rgb")


@pytest.mark.parametrize("name", ["router", "resnet_50"])
def test_onnx_export_with_free_batch(tmp_path: Path, name: str) -> None:
    import onnxruntime as ort

    m = model(name)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            (torch.randn(1, 3, 256, 192),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["out"],
            dynamic_axes={"image": {0: "batch"}, "out": {0: "batch"}},
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 256, 192)  # a batch size the export never saw
    with torch.no_grad():
        ref = m(x).numpy()
    got = sess.run(None, {"image": x.numpy()})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
