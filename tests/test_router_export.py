"""Router export at lower precision (fp16, INT8 Q/DQ) gated on routing decisions, and the engine dir's default route."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from dynpose.cli.export import main as export_cli
from dynpose.engines.manifest import DEFAULT_ROUTE, Manifest, content_name
from dynpose.errors import DynPoseError
from dynpose.export.api import default_route, export_model
from dynpose.export.calibration.crops import CalibSpec, Source
from dynpose.export.judges import router_agreement
from dynpose.onnx_utils import open_session, run_session


@pytest.fixture(scope="module")
def spread_router(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A router checkpoint (release layout) whose scores spread over the crops like a trained router's.

    PyTorch's default init gives ~0.4884 on every COCO crop (differences ~1e-5), so any rounding reorders the crops
    and a decision check says nothing; He-normal convolutions give scores from 0.49 to 0.69 on the 12 COCO persons."""
    from dynpose.models import create_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = create_model("router", weights="random")
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            if mod.bias is not None:
                torch.nn.init.normal_(mod.bias, std=0.1)
    path = tmp_path_factory.mktemp("router_ckpt") / "router.pth"
    torch.save({"backbone." + k: v for k, v in m.state_dict().items()}, path)
    return path


def _calib(coco_dir: Path) -> CalibSpec:
    return CalibSpec(sources=[Source("coco", coco_dir / "test_coco.json", coco_dir)])


def _print_checks(e) -> None:
    c = e.checks
    print(
        f"router {e.precision}: decision agreement {c['router_decision_agreement']:.3f} under "
        f"{c['router_gate_policy']} on {c['router_gate_crops']} crops, score |diff| max "
        f"{c['router_score_max_abs_diff']:.2e} mean {c['router_score_mean_abs_diff']:.2e}, "
        f"{c[e.precision + '_speedup_b8']:.2f}x vs fp32 (ORT CPU, batch 8)"
    )


def test_router_fp16_and_int8_gated_on_decisions(tmp_path: Path, coco_dir: Path, spread_router: Path) -> None:
    eng = tmp_path / "eng"
    (e16, _) = export_model("router", eng, weights=str(spread_router), precision="fp16", progress=False)
    assert e16.file == content_name("router.fp16.onnx", e16.sha256) and e16.precision == "fp16"
    _print_checks(e16)
    # a real checkpoint, no calibration: the DynPose band, and the gate judged under it
    m = Manifest.load(eng)
    assert m.route == DEFAULT_ROUTE and e16.checks["router_gate_policy"] == "band:0.59,0.69"
    assert e16.checks["router_gate_crops"] == 12  # the 12 annotated COCO persons
    assert e16.checks["router_score_max_abs_diff"] < 1e-2 and e16.checks["router_decision_agreement"] >= 0.95
    assert e16.checks["fp16_speedup_b8"] > 0 and "fp32_ms_b8" in e16.checks
    half = onnx.load(str(eng / e16.file))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in half.graph.initializer)
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    (e8, _) = export_model(
        "router", eng, weights=str(spread_router), precision="int8", calib=_calib(coco_dir), progress=False
    )
    _print_checks(e8)
    assert e8.file == content_name("router.int8.onnx", e8.sha256) and e8.checks["int8_calib_crops"] > 0
    assert e8.checks["router_decision_agreement"] >= 0.95 and e8.checks["router_score_max_abs_diff"] < 0.05
    assert e8.checks["int8_speedup_b8"] > 0
    q = onnx.load(str(eng / e8.file))
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    assert {p.key for p in q.metadata_props} >= {p.key for p in half.metadata_props}  # the card travels along
    m = Manifest.load(eng)  # re-hashes every file
    # the same role+format replaced: only the int8 ONNX and the torch state_dict remain
    assert sorted((e.format, e.file) for e in m.entries) == [
        ("onnx", content_name("router.int8.onnx", e8.sha256)),
        ("torch", content_name("router.pt", m.require("router", "torch").sha256)),
    ]
    assert sorted(p.name for p in eng.iterdir() if p.suffix in (".onnx", ".pt")) == sorted(e.file for e in m.entries)
    # the INT8 file runs on the 12 real crops with the runtime's router card
    from dynpose.export.calibration.crops import coco_person_crops

    real = coco_person_crops(coco_dir, e8.card)
    assert real is not None
    got = run_session(open_session(eng / e8.file), real.x)
    assert got.shape == (12, 3) and np.isfinite(got).all()


def test_random_router_int8_fails_the_gate_one_line(tmp_path: Path, coco_dir: Path) -> None:
    """Random weights score every crop ~0.4884 (spread ~1e-5): INT8 noise reorders them, fraction:0.5 then routes
    most crops differently, and the gate says so in one line, leaving the engine dir as it was."""
    eng = tmp_path / "eng"
    torch.manual_seed(0)
    export_model("router", eng, weights="random", progress=False)
    before = {p.name: p.read_bytes() for p in eng.iterdir() if p.is_file()}
    torch.manual_seed(0)
    with pytest.raises(DynPoseError, match="routed as in fp32 under fraction:0.5") as err:
        export_model("router", eng, weights="random", precision="int8", calib=_calib(coco_dir), progress=False)
    print(err.value)
    assert "\n" not in str(err.value) and "--min-oks 0" in str(err.value)
    assert {p.name: p.read_bytes() for p in eng.iterdir() if p.is_file()} == before
    assert not [p for p in eng.iterdir() if p.name.startswith(".staging")]


def test_router_agreement_policies() -> None:
    ref = np.array([[0, 0.2, 0], [0, 0.6, 0], [0, 0.65, 0], [0, 0.9, 0]])
    test = ref + np.array([[0, 0.0, 0], [0, 0.0, 0], [0, 0.05, 0], [0, -0.01, 0]])
    a = router_agreement(test, ref, "band:0.59,0.69")  # crop 2 leaves the band
    assert a["agreement"] == pytest.approx(0.75) and a["max_abs_diff"] == pytest.approx(0.05)
    assert router_agreement(test, ref, "box:100")["policy"] == "fraction:0.5"  # box/all-* ignore the router
    assert router_agreement(test, ref, "all-small")["agreement"] == 1.0
    assert router_agreement(test * np.nan, ref, "fraction:0.5")["finite"] is False


def test_default_route_rules() -> None:
    m = Manifest()
    assert default_route(m, "random")[0] == "fraction:0.5" and "small model" in default_route(m, "random")[1]
    assert default_route(m, "trained")[0] == "fraction:0.5" and "--calibrate" in default_route(m, "trained")[1]
    assert default_route(m, "checkpoint")[0] == DEFAULT_ROUTE
    m.route, m.notes["router_calibration"] = "threshold:0.457", {"policy": "threshold:0.457"}
    for kind in ("random", "trained", "checkpoint"):
        route, why = default_route(m, kind)
        assert route == "threshold:0.457" and "kept" in why and "\n" not in why
    with pytest.raises(DynPoseError, match="router weights kind"):
        default_route(m, "pretrained")


def test_random_router_route_and_calibrated_route_kept(tmp_path: Path) -> None:
    eng = tmp_path / "eng"
    r = CliRunner().invoke(export_cli, ["--model", "router", "--weights", "random", "--engine-dir", str(eng)])
    assert r.exit_code == 0, r.output
    assert "route fraction:0.5: the router has random weights" in r.output  # the progress line says why
    assert "default route: fraction:0.5" in r.output  # and the summary
    assert Manifest.load(eng).route == "fraction:0.5"
    # a calibration (as `dynpose-train-router --calibrate` stores it) survives re-exporting the router
    d = json.loads((eng / "manifest.json").read_text())
    d["route"], d["notes"]["router_calibration"] = "threshold:0.457", {"policy": "threshold:0.457", "fraction": 0.5}
    (eng / "manifest.json").write_text(json.dumps(d))
    torch.manual_seed(0)
    export_model("router", eng, weights="random", progress=False)
    m = Manifest.load(eng)
    assert m.route == "threshold:0.457" and m.notes["router_calibration"]["fraction"] == 0.5
