"""RTMPose and ViTPose through export and the runtime: a mixed-decoder pair (an RTMPose-t SimCC small model beside a
ViTPose heatmap large model) exported, checked for ops TensorRT and OpenVINO take, compiled by OpenVINO, dispatched
and decoded per card, run by `dynpose-run`, collected for router training, and lowered to fp16 and INT8 through the
accuracy gates.

RTMPose-t is the zoo model itself, exported by `dynpose-export --checkpoint URL` from an MMPose-format file served by
http.server on 127.0.0.1 (weights from
`tests/zoo_inputs.py`, with real spread: PyTorch's default initialisation collapses CSPNeXt's features to one value
for every crop). The large model is a tiny ViTPose (the zoo's ViTPose code at 64 wide, 2 layers: ViTPose-S itself
is 24 M parameters) exported through the export step and registered under a ViTPose card; the router has random
weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
import zoo_inputs as zi
from click.testing import CliRunner
from conftest import plan_and_run
from test_weights import Server

from dynpose.data import gt_boxes, image_id_map, load_coco
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.export.api import export_model, register_onnx
from dynpose.export.calibration.crops import CalibSpec
from dynpose.export.steps import to_onnx
from dynpose.models import ModelCard, create_model, get_card
from dynpose.models.layouts import layout_of
from dynpose.models.vitpose import ViTPose, ViTSize
from dynpose.roles import Role
from dynpose.runtime.decode import average_flip_outputs, decode_outputs
from dynpose.runtime.engine_set import EngineSet
from dynpose.runtime.plan import LARGE, Work, same_crop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTM = get_card("rtmpose_t")
# A user's ViTPose ONNX gets the example card (the zoo card's crop and decoding, no sources).
TINY_VIT = ModelCard.from_json_file(Path(__file__).parents[1] / "examples" / "cards" / "vitpose_256x192.json")
# What TensorRT's ONNX parser and OpenVINO's ONNX frontend both take at opset 17 (and what these graphs need).
STANDARD_OPS = {
    "Add", "Clip", "Concat", "Conv", "ConvTranspose", "Div", "Erf", "GlobalAveragePool", "HardSigmoid",
    "LayerNormalization", "MatMul", "MaxPool", "Mul", "ReduceL2", "Relu", "Reshape", "Sigmoid", "Softmax", "Split",
    "Squeeze", "Transpose",
}  # fmt: skip


def tiny_vitpose() -> torch.nn.Module:
    m = ViTPose(ViTSize(dims=64, layers=2, heads=2)).eval()
    m.load_state_dict(zi.deterministic_state_dict(layout_of(m.state_dict()), seed=9))
    return m


@pytest.fixture(scope="module")
def rtm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """An MMPose-format RTMPose-t file, named as MMPose names its releases (with its own sha256 prefix), with
    weights that tell crops apart, and the model holding them."""
    m = create_model("rtmpose_t")
    m.load_state_dict(zi.deterministic_state_dict(layout_of(m.state_dict()), seed=10))
    root = tmp_path_factory.mktemp("www") / "projects" / "rtmposev1"
    root.mkdir(parents=True)
    tmp = root / "tmp.pth"
    torch.save({"meta": {"epoch": 420}, "state_dict": m.state_dict()}, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    path = root / f"rtmpose-tiny_simcc-aic-coco_pt-aic-coco_420e-256x192-{digest}_20230126.pth"
    tmp.rename(path)
    return path, m.eval()


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory: pytest.TempPathFactory, rtm_checkpoint: tuple[Path, torch.nn.Module]) -> Iterator[Path]:
    """`dynpose-export --model rtmpose_t --checkpoint URL` from http.server on 127.0.0.1 (download, sha256 check,
    cache, strict load, export), the tiny ViTPose registered as large with the example ViTPose card, the router."""
    from dynpose.cli.export import main

    eng = tmp_path_factory.mktemp("families")
    www = rtm_checkpoint[0].parents[2]
    srv = Server(www)
    home = os.environ.get("DYNPOSE_HOME")
    os.environ["DYNPOSE_HOME"] = str(tmp_path_factory.mktemp("home"))
    try:
        url = f"{srv.base}/{rtm_checkpoint[0].relative_to(www).as_posix()}"
        r = CliRunner().invoke(main, ["--model", "rtmpose_t", "--checkpoint", url, "--engine-dir", str(eng)])
        assert r.exit_code == 0, r.output
        assert len(srv.requests) == 1
    finally:
        srv.stop()
        if home is None:
            os.environ.pop("DYNPOSE_HOME")
        else:
            os.environ["DYNPOSE_HOME"] = home
    work = tmp_path_factory.mktemp("tiny_vit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32, check = to_onnx(tiny_vitpose(), work / "tiny_vitpose.onnx", TINY_VIT)
        check.require()
        register_onnx(fp32, TINY_VIT, eng, role="large", progress=False)
        torch.manual_seed(0)
        export_model("router", eng, weights="random", progress=False)
    yield eng


@pytest.fixture(scope="module")
def coco_people(coco_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    ann = load_coco(coco_dir / "test_coco.json")
    files = image_id_map(coco_dir, ann)
    boxes: dict[int, list[np.ndarray]] = {}
    for iid, box, _ in gt_boxes(ann):
        boxes.setdefault(iid, []).append(box)
    return [(cv2.imread(str(files[i])), np.asarray(b)[:, :4]) for i, b in sorted(boxes.items())]


def _onnx(eng: Path, role: str) -> Path:
    e = Manifest.load(eng).get(role, "onnx")
    assert e is not None
    return eng / e.file


def test_dynpose_export_wrote_rtmpose_t(pair_dir: Path, rtm_checkpoint: tuple[Path, torch.nn.Module]) -> None:
    man = Manifest.load(pair_dir)
    e = man.get("small", "onnx")
    assert e is not None and e.model == "rtmpose_t" and e.card == RTM  # default role small; MMPose card, RGB
    assert e.output_name == "simdr_x" and e.checks["fp32_rel_l2"] < 1e-4
    assert {"fp32_rel_l2_random_b5", "fp32_rel_l2_real_b5"} <= set(e.checks)
    assert e.checkpoint_sha256 is not None and e.checkpoint_sha256.startswith(rtm_checkpoint[0].name.rsplit("-", 1)[1][:8])
    proto = onnx.load(str(pair_dir / e.file), load_external_data=False)
    dims = [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output]
    assert [o.name for o in proto.graph.output] == ["simdr_x", "simdr_y"] and dims == [
        ["batch", 17, 384],
        ["batch", 17, 512],
    ]


@pytest.mark.parametrize("role", ["small", "large"])
def test_graphs_hold_standard_ops_only(pair_dir: Path, role: str) -> None:
    """The GAU, ScaleNorm, channel attention and the ViT's attention export as plain opset-17 ONNX ops, no custom
    domain, every non-batch axis static: nothing TensorRT's parser or OpenVINO would refuse."""
    proto = onnx.load(str(_onnx(pair_dir, role)), load_external_data=False)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    assert {n.domain for n in proto.graph.node} == {""}
    assert {n.op_type for n in proto.graph.node} <= STANDARD_OPS
    for v in [*proto.graph.input, *proto.graph.output]:
        assert all(d.dim_value for d in v.type.tensor_type.shape.dim[1:])
    if role == "small":  # ScaleNorm and the GAU's relu(qk)^2 are there, as plain ops
        assert {"ReduceL2", "Clip", "MatMul", "Split", "Relu", "HardSigmoid"} <= {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("role", ["small", "large"])
def test_openvino_reads_and_compiles_the_exports(pair_dir: Path, role: str) -> None:
    import openvino as ov

    from dynpose.onnx_utils import open_session, run_session_all

    path = _onnx(pair_dir, role)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = zi.crops(3, 256, 192, seed=11)
    got = compiled(x)
    ref = run_session_all(open_session(path), x)
    assert len(compiled.outputs) == len(ref) == (2 if role == "small" else 1)
    for out, r in zip(compiled.outputs, ref, strict=True):
        np.testing.assert_allclose(got[out], r, rtol=1e-3, atol=1e-3 * float(np.abs(r).max()))


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
def test_rtmpose_keypoints_are_pytorch_decoded_the_mmpose_way(
    pair_dir: Path, rtm_checkpoint: tuple[Path, torch.nn.Module], coco_people: list, flip: bool
) -> None:
    images = [img for img, _ in coco_people]
    boxes = [b for _, b in coco_people]
    with EngineSet.load(pair_dir) as engines:
        plan, res = plan_and_run(engines, images, boxes, "all-small", flip)
        everyone = np.arange(len(plan))
        x = engines.require(Role.SMALL).inputs(plan.crop(Work(Role.SMALL, everyone)))
        centers, scales = plan.geometry(Role.SMALL, everyone)
    assert not (res.model == LARGE).any() and len(x) == 12
    m = rtm_checkpoint[1]
    with torch.no_grad():
        outs = [o.numpy() for o in m(torch.from_numpy(x))]
        if flip:
            mirrored = [o.numpy() for o in m(torch.from_numpy(np.ascontiguousarray(x[..., ::-1])))]
            outs = average_flip_outputs(outs, mirrored, RTM)  # logits averaged, no shift (RTMCCHead.predict)
    want = decode_outputs(outs, centers, scales, RTM)
    np.testing.assert_allclose(res.keypoints[..., :2], want[..., :2], atol=1e-2)
    np.testing.assert_allclose(res.keypoints[..., 2], want[..., 2], atol=1e-4)
    assert len({tuple(k) for k in res.keypoints[:, :, :2].round(1).reshape(12, -1)}) == 12  # crops told apart


def test_mixed_decoders_in_one_pair(pair_dir: Path, coco_people: list) -> None:
    """fraction:0.5 sends crops to both: each crop's keypoints are its own model's, decoded by its own card (SimCC
    under MMPose's rule for the small model, UDP heatmaps for the large one, each with its own crop geometry)."""
    images = [img for img, _ in coco_people]
    boxes = [b for _, b in coco_people]
    with EngineSet.load(pair_dir) as engines:
        small, large = engines.pose_models
        assert (small.card.decoder, large.card.decoder) == ("simdr", "udp") and not same_crop(small.card, large.card)
        plan, res = plan_and_run(engines, images, boxes, "fraction:0.5", flip=True)
        routed = res.model == LARGE
        assert 0 < routed.sum() < len(routed)
        for role, idx in ((Role.LARGE, np.flatnonzero(routed)), (Role.SMALL, np.flatnonzero(~routed))):
            model = engines.require(role)
            alone = model.run(plan.crop(Work(role, idx)), *plan.geometry(role, idx), flip=True)  # type: ignore[attr-defined]
            np.testing.assert_allclose(res.keypoints[idx], alone, rtol=1e-5, atol=1e-4)


def test_dynpose_run_evaluates_the_pair(pair_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    from dynpose.cli.run import main

    out = tmp_path / "results.json"
    args = ["--engine-dir", pair_dir, "--source", coco_dir, "--gt-boxes", coco_dir / "test_coco.json"]
    args += ["--route", "fraction:0.5", "--flip", "--out", out, "--eval", coco_dir / "test_coco.json"]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    results = json.loads(out.read_text())
    assert len(results) == 12 and all(len(p["keypoints"]) == 51 for p in results)
    assert all(np.isfinite(p["keypoints"]).all() for p in results)
    assert "Average Precision" in r.stdout and "crops small" in r.stdout


def test_router_training_collects_both_models(pair_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    from dynpose.router.collect import collect_outputs

    out, crops = collect_outputs(
        pair_dir, coco_dir / "test_coco.json", coco_dir, cache_dir=tmp_path, use_cache=False, progress=False
    )
    assert len(out) == len(crops) > 0
    assert np.isfinite(out.kpts_small).all() and np.isfinite(out.kpts_large).all()
    assert np.isfinite(out.oks_small).all() and np.isfinite(out.oks_large).all()


def test_a_simcc_model_registered_with_a_heatmap_card_is_refused(pair_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DynPoseError, match=r"expects heatmaps N x 17 x h x w, but the model gives SimCC/SimDR vectors") as e:
        register_onnx(_onnx(pair_dir, "small"), get_card("vitpose_s"), tmp_path / "eng", role="large", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "eng" / "manifest.json").exists()


def test_fp16_through_the_gate(pair_dir: Path, tmp_path: Path) -> None:
    """ScaleNorm's ReduceL2 stays fp32 by the block list; the overflow scan keeps whatever else leaves fp16's range
    on the real crops. Both models keep OKS >= 0.95 against fp32 on the 12 COCO persons."""
    for role, card in (("small", RTM), ("large", TINY_VIT)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # onnxconverter-common: weights below fp16's range
            (f16,) = register_onnx(_onnx(pair_dir, role), card, tmp_path / role, role=role, precision="fp16", progress=False)
        c = f16.checks
        print(f"{card.name} fp16: OKS {c['fp16_oks']:.4f} on {c['fp16_crops']} crops, kept fp32: {c['fp16_fp32_nodes']}")
        assert c["fp16_crops"] == 12 and c["fp16_oks"] >= 0.95
        proto = onnx.load(str(tmp_path / role / f16.file), load_external_data=False)
        assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in proto.graph.output)
        if role == "small":
            l2 = [n for n in proto.graph.node if n.op_type == "ReduceL2"]
            casts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Cast"}
            assert l2 and all(i in casts or "input" in i for n in l2 for i in n.input[:1])  # fed fp32


def test_int8_through_the_gate(pair_dir: Path, shared: Path, tmp_path: Path) -> None:
    """INT8 (Q/DQ) of RTMPose-t calibrated on real crops and judged on keypoints decoded from both vectors; the
    figures say which layers the search kept fp32."""
    spec = CalibSpec.from_root(shared / "data", gate_ann=shared / "data" / "coco" / "test_coco.json", jitter=0, max_crops=32)
    (q,) = register_onnx(
        _onnx(pair_dir, "small"), RTM, tmp_path, role="small", precision="int8", calib=spec, min_oks=0.0, progress=False
    )
    c = q.checks
    print(f"rtmpose_t int8: OKS {c['int8_oks']:.4f}, fp32 layers {c['int8_fp32_layers']}")
    assert c["int8_gate_crops"] == 12 and 0 <= c["int8_oks"] <= 1
    proto = onnx.load(str(tmp_path / q.file), load_external_data=False)
    assert [o.name for o in proto.graph.output] == ["simdr_x", "simdr_y"]
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
