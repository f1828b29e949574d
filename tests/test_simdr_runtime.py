"""SimDR through the whole runtime: a two-output model exported, flipped and decoded the SimDR way by `PoseModel`,
dispatched beside a heatmap small model, run by `dynpose-run` with evaluation, collected for router training, and
judged on both outputs for fp16 and INT8.

One export of SimDR-HRNet-W32 (random weights, 31 M parameters) serves the module: TinyPose-128 is its small model
(SimDR is 256x192 COCO-17) and the DynPose router (random weights) routes between them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import plan_and_run, tinypose_card

from dynpose.data import gt_boxes, image_id_map, load_coco
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.export.api import export_model, register_onnx
from dynpose.export.calibration.crops import CalibSpec
from dynpose.export.calibration.quantize import head_nodes
from dynpose.export.judges import PoseJudge, decode_keypoints
from dynpose.models import create_model, get_card
from dynpose.roles import Role
from dynpose.runtime.decode import average_flip_outputs, average_flip_simdr, decode_outputs, decode_simdr
from dynpose.runtime.engine_set import EngineSet
from dynpose.runtime.pipeline import Pipeline
from dynpose.runtime.plan import LARGE, Work

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CARD = get_card("simdr_hrnet_w32")


@pytest.fixture(scope="module")
def simdr_dir(tmp_path_factory: pytest.TempPathFactory, tinypose_128: Path) -> Path:
    """TinyPose-128 small, SimDR-W32 large (its default role), the router: all through the export API."""
    eng = tmp_path_factory.mktemp("simdr_engines")
    register_onnx(tinypose_128, tinypose_card(96, 128), eng, role=Role.SMALL, progress=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights (on purpose) and torch's exporter notices
        export_model("simdr_hrnet_w32", eng, weights="random", progress=False)
        export_model("router", eng, weights="random", progress=False)
    return eng


@pytest.fixture(scope="module")
def torch_simdr(simdr_dir: Path) -> torch.nn.Module:
    """The PyTorch model with the exported weights (the engine dir's torch entry)."""
    entry = Manifest.load(simdr_dir).get(Role.LARGE, "torch")
    assert entry is not None
    m = create_model("simdr_hrnet_w32")
    m.load_state_dict(torch.load(simdr_dir / entry.file, weights_only=True))
    return m.eval()


@pytest.fixture(scope="module")
def coco_people(coco_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(BGR image, GT person boxes (M,4)) of the four COCO test images."""
    ann = load_coco(coco_dir / "test_coco.json")
    files = image_id_map(coco_dir, ann)
    boxes: dict[int, list[np.ndarray]] = {}
    for iid, box, _ in gt_boxes(ann):
        boxes.setdefault(iid, []).append(box)
    return [(cv2.imread(str(files[i])), np.asarray(b)[:, :4]) for i, b in sorted(boxes.items())]


def _torch_outputs(m: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in m(torch.from_numpy(np.ascontiguousarray(x)))]


def test_export_writes_both_outputs(simdr_dir: Path) -> None:
    man = Manifest.load(simdr_dir)
    e = man.get(Role.LARGE, "onnx")
    assert e is not None and e.model == "simdr_hrnet_w32" and e.card == CARD  # default_role: large
    assert e.output_name == "simdr_x"  # the manifest names the first output
    proto = onnx.load(str(simdr_dir / e.file), load_external_data=False)
    outs = {o.name: o.type.tensor_type.shape.dim for o in proto.graph.output}
    assert list(outs) == ["simdr_x", "simdr_y"]
    assert [[d.dim_param or d.dim_value for d in dims] for dims in outs.values()] == [["batch", 17, 384], ["batch", 17, 512]]
    # Verified against PyTorch on both outputs, at batch 1 and 5, on random and real COCO crops.
    assert e.checks["fp32_rel_l2"] < 1e-4
    assert {"fp32_rel_l2_random_b1", "fp32_rel_l2_random_b5", "fp32_rel_l2_real_b1", "fp32_rel_l2_real_b5"} <= set(e.checks)


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
def test_runtime_keypoints_equal_pytorch(
    simdr_dir: Path, torch_simdr: torch.nn.Module, coco_people: list, flip: bool
) -> None:
    """All crops to SimDR: the runtime's keypoints are the PyTorch model's outputs decoded by the official formulas
    (the flip test: the official softmax average of both passes, scored on the averaged probabilities)."""
    images = [img for img, _ in coco_people]
    boxes = [b for _, b in coco_people]
    with EngineSet.load(simdr_dir) as engines:
        plan, res = plan_and_run(engines, images, boxes, "all-large", flip)
        everyone = np.arange(len(plan))
        large = engines.require(Role.LARGE)
        x = large.inputs(plan.crop(Work(Role.LARGE, everyone)))
        centers, scales = plan.geometry(Role.LARGE, everyone)
    assert (res.model == LARGE).all() and len(x) == 12
    ox, oy = _torch_outputs(torch_simdr, x)
    if flip:
        fx, fy = _torch_outputs(torch_simdr, x[..., ::-1])
        px, py = average_flip_simdr(ox, oy, fx, fy, CARD.keypoint_set.flip_index())
        want = decode_simdr(px, py, centers, scales, CARD, softmax=False)
    else:
        want = decode_simdr(ox, oy, centers, scales, CARD)
    np.testing.assert_allclose(res.keypoints[..., :2], want[..., :2], atol=1e-3)
    np.testing.assert_allclose(res.keypoints[..., 2], want[..., 2], rtol=1e-3, atol=1e-6)


def test_flip_outputs_decode_like_the_official_probabilities() -> None:
    rng = np.random.default_rng(3)
    x, fx = (rng.standard_normal((2, 4, 17, 384)) * 4).astype(np.float32)
    y, fy = (rng.standard_normal((2, 4, 17, 512)) * 4).astype(np.float32)
    c, s = np.full((4, 2), 300.0), np.full((4, 2), 250.0)
    flip_index = CARD.keypoint_set.flip_index()
    logs = average_flip_outputs([x, y], [fx, fy], CARD)
    assert len(logs) == 2 and all(np.isfinite(v).all() for v in logs)
    px, py = average_flip_simdr(x, y, fx, fy, flip_index)
    got = decode_outputs(logs, c, s, CARD)  # read as logits, as every other output
    want = decode_simdr(px, py, c, s, CARD, softmax=False)
    np.testing.assert_array_equal(got[..., :2], want[..., :2])
    np.testing.assert_allclose(got[..., 2], want[..., 2], rtol=1e-5)
    with pytest.raises(DynPoseError, match=r"expects SimCC/SimDR vectors .* \(first differing: no output 1\)"):
        decode_outputs([x], c, s, CARD)
    with pytest.raises(DynPoseError, match="2 outputs but 1"):
        average_flip_outputs([x, y], [fx], CARD)


def test_pair_routes_between_heatmaps_and_simdr(simdr_dir: Path, coco_people: list, coco_dir: Path) -> None:
    """fraction:0.5: both models get crops; each crop's keypoints are its own model's (the runtime decodes each
    model by its card), and the Pipeline gives COCO-17 people."""
    images = [img for img, _ in coco_people]
    boxes = [b for _, b in coco_people]
    with EngineSet.load(simdr_dir) as engines:
        plan, res = plan_and_run(engines, images, boxes, "fraction:0.5")
        large = res.model == LARGE
        assert 0 < large.sum() < len(large)
        for role, idx in ((Role.LARGE, np.flatnonzero(large)), (Role.SMALL, np.flatnonzero(~large))):
            model = engines.require(role)
            alone = model.run(plan.crop(Work(role, idx)), *plan.geometry(role, idx))  # type: ignore[attr-defined]
            np.testing.assert_allclose(res.keypoints[idx], alone, rtol=1e-5, atol=1e-4)
        with Pipeline.from_engine_set(engines, route="fraction:0.5", flip=True) as pipe:
            persons = pipe(images[0], boxes[0])
    assert persons and all(p.keypoints.shape == (17, 3) and np.isfinite(p.keypoints).all() for p in persons)


def test_dynpose_run_evaluates_a_simdr_pair(simdr_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    from dynpose.cli.run import main

    out = tmp_path / "results.json"
    args = ["--engine-dir", simdr_dir, "--source", coco_dir, "--gt-boxes", coco_dir / "test_coco.json"]
    args += ["--route", "fraction:0.5", "--flip", "--out", out, "--eval", coco_dir / "test_coco.json"]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    results = json.loads(out.read_text())
    assert len(results) == 12 and all(len(p["keypoints"]) == 51 for p in results)
    assert "Average Precision" in r.stdout and "crops small" in r.stdout


def test_router_training_collects_simdr_keypoints(simdr_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    from dynpose.router.collect import collect_outputs

    out, crops = collect_outputs(
        simdr_dir, coco_dir / "test_coco.json", coco_dir, cache_dir=tmp_path, use_cache=False, progress=False
    )
    assert len(out) == len(crops) > 0
    assert np.isfinite(out.kpts_large).all() and np.isfinite(out.oks_large).all()
    assert not np.allclose(out.kpts_large, out.kpts_small)  # two different models, each decoded by its own card


def test_judges_decode_both_outputs(simdr_dir: Path, coco_dir: Path) -> None:
    from dynpose.export.verify import gate_crops
    from dynpose.onnx_utils import open_session, run_session_all

    e = Manifest.load(simdr_dir).get(Role.LARGE, "onnx")
    assert e is not None
    crops, _ = gate_crops(CARD, None)
    assert crops is not None and len(crops) == 12
    ref = run_session_all(open_session(simdr_dir / e.file), crops.x)
    assert [o.shape for o in ref] == [(12, 17, 384), (12, 17, 512)]
    np.testing.assert_array_equal(
        decode_keypoints(ref, crops.centers, crops.scales, CARD),
        decode_simdr(ref[0], ref[1], crops.centers, crops.scales, CARD)[..., :2],
    )
    judge = PoseJudge(CARD, 0.99)
    same = judge(ref, ref, crops, "int8")
    assert same and same.figures["int8_oks"] == pytest.approx(1.0) and same.figures["int8_heatmap_rel_l2"] == 0.0
    # Moving only the y vectors' peaks moves the keypoints: the judge reads the second output too.
    moved = [ref[0], np.roll(ref[1], 40, axis=2)]
    bad = judge(moved, ref, crops, "int8")
    assert not bad and "mean OKS vs fp32" in bad.message
    assert not judge([ref[0], ref[1] * np.nan], ref, crops, "int8")


def test_fp16_two_outputs_through_the_gate(simdr_dir: Path, tmp_path: Path) -> None:
    e = Manifest.load(simdr_dir).get(Role.LARGE, "onnx")
    assert e is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # onnxconverter-common: one line per weight below fp16's range
        (f16,) = register_onnx(
            simdr_dir / e.file, CARD, tmp_path, role="large", precision="fp16", min_oks=0.9, progress=False
        )
    c = f16.checks
    print(f"SimDR-W32 fp16 vs fp32 on {c['fp16_crops']} COCO crops: mean OKS {c['fp16_oks']:.4f}")
    assert c["fp16_crops"] == 12 and c["fp16_oks"] >= 0.9 and c["output_shapes"] == [[17, 384], [17, 512]]
    proto = onnx.load(str(tmp_path / f16.file), load_external_data=False)
    assert [o.name for o in proto.graph.output] == ["simdr_x", "simdr_y"]
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in proto.graph.output)  # fp32 at the edge
    assert f16.output_name == "simdr_x"


def test_int8_heads_are_both_linear_layers(simdr_dir: Path) -> None:
    """The INT8 search keeps the output heads first: for SimDR both linear layers and their bias Adds."""
    from dynpose.export.calibration.quantize import OP_TYPES

    e = Manifest.load(simdr_dir).get(Role.LARGE, "onnx")
    assert e is not None
    model = onnx.load(str(simdr_dir / e.file), load_external_data=False)
    heads = head_nodes(model, OP_TYPES["ort"])
    by_name = {n.name: n for n in model.graph.node}
    assert sorted(by_name[h].op_type for h in heads) == ["Add", "Add", "MatMul", "MatMul"]
    made = {o for h in heads for o in by_name[h].output}
    assert {"simdr_x", "simdr_y"} <= made


class TinySimDR(torch.nn.Module):
    """SimDR's shape at a fraction of the cost: stride-4 features, a 1x1 keypoint conv, each map flattened into two
    linear heads (384 x and 512 y bins at 256x192), as `dynpose.models.simdr.SimDR` without the HRNet."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 7, stride=4, padding=3), torch.nn.ReLU())
        self.final_layer = torch.nn.Conv2d(16, 17, 1)
        self.mlp_head_x = torch.nn.Linear(64 * 48, 384)
        self.mlp_head_y = torch.nn.Linear(64 * 48, 512)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.final_layer(self.features(x)).flatten(2)
        return self.mlp_head_x(maps), self.mlp_head_y(maps)


def test_int8_search_on_two_outputs(shared: Path, tmp_path: Path) -> None:
    """INT8 of a two-output model: calibrated, quantized, judged on keypoints decoded from both outputs; where the
    gate fails at first, the search puts both heads back to fp32 first. (SimDR-W32 itself: benchmarks/zoo_speed.py.)"""
    from dynpose.export.steps import to_onnx

    torch.manual_seed(0)
    card = CARD.with_(name="tiny_simdr")
    fp32, check = to_onnx(TinySimDR(), tmp_path / "tiny.onnx", card)
    assert check and [o.name for o in onnx.load(str(fp32)).graph.output] == ["simdr_x", "simdr_y"]
    spec = CalibSpec.from_root(shared / "data", gate_ann=shared / "data" / "coco" / "test_coco.json", jitter=0, max_crops=32)
    eng = tmp_path / "eng"
    (q,) = register_onnx(fp32, card, eng, role="large", precision="int8", calib=spec, min_oks=0.0, progress=False)
    c = q.checks
    assert c["int8_gate_crops"] == 12 and c["int8_fp32_layers"] == [] and 0 <= c["int8_oks"] <= 1
    assert c["int8_heatmap_rel_l2"] > 0  # over both outputs
    proto = onnx.load(str(eng / q.file), load_external_data=False)
    assert [o.name for o in proto.graph.output] == ["simdr_x", "simdr_y"]
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    print(f"tiny SimDR all-int8: OKS vs fp32 {c['int8_oks']:.4f}")

    # A gate all-int8 misses: the search's first fp32 layers are the two heads (MatMul + bias Add each).
    gate = min(0.9999, c["int8_oks"] + (1 - c["int8_oks"]) / 2)
    try:
        (q2,) = register_onnx(fp32, card, eng, role="large", precision="int8", calib=spec, min_oks=gate, progress=False)
    except DynPoseError as e:  # the step budget ran out: said in one line
        assert "no layer set reaches mean OKS" in str(e)
        return
    from dynpose.export.calibration.quantize import OP_TYPES

    kept = q2.checks["int8_fp32_layers"]
    heads = head_nodes(onnx.load(str(fp32)), OP_TYPES["ort"])
    assert q2.checks["int8_oks"] >= gate and kept
    assert kept[:4] == heads[: len(kept)]  # x head's Add, MatMul, then y's: the most sensitive layers come first
