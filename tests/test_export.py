"""Export: user ONNX registration, zoo export + verification, manifest round trip/tampering, staging, fp16, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from dynpose.cli.export import main as export_cli
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.export.api import register_onnx
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import open_session, read_card, run_session

TP128_CARD = {
    "name": "tinypose_128x96",
    "input_width": 96,
    "input_height": 128,
    "color_order": "rgb",
    "mean": [123.675, 116.28, 103.53],
    "std": [58.395, 57.12, 57.375],
    "keypoints": "coco17",
    "decoder": "msra",
}


@pytest.fixture()
def card128() -> ModelCard:
    return ModelCard.from_dict(dict(TP128_CARD))


@pytest.fixture()
def card_file(tmp_path: Path) -> Path:
    p = tmp_path / "card.json"
    p.write_text(json.dumps(TP128_CARD))
    return p


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_register_user_onnx_manifest_round_trip(tmp_path: Path, tinypose_128: Path, card128: ModelCard) -> None:
    eng = tmp_path / "eng"
    (entry,) = register_onnx(tinypose_128, card128, eng, role="small", progress=False)
    assert entry.file == "small.onnx" and entry.format == "onnx" and entry.precision == "fp32"
    # The user's graph names are kept and recorded, not renamed.
    assert (entry.input_name, entry.output_name) == ("image", "heatmaps")
    m = Manifest.load(eng)
    (loaded,) = m.entries
    assert loaded.card == card128 and loaded.checkpoint_sha256 == entry.checkpoint_sha256
    assert loaded.checks["batch5_vs_batch1_rel_l2"] <= 1e-4
    assert read_card(eng / "small.onnx") == card128  # the card travels inside the ONNX file too
    # Dynamic batch: the registered file runs at 1 and 5 and agrees.
    sess = open_session(eng / "small.onnx")
    x = np.random.default_rng(0).standard_normal((5, 3, 128, 96)).astype(np.float32)
    np.testing.assert_allclose(run_session(sess, x, batch=5), run_session(sess, x, batch=1), rtol=1e-4, atol=1e-5)

    # Merge: another role is added, the same role+format replaced; the manifest keeps both roles.
    register_onnx(tinypose_128, card128.with_(name="other"), eng, role="large", progress=False)
    register_onnx(tinypose_128, card128.with_(name="again"), eng, role="small", progress=False)
    m = Manifest.load(eng)
    assert sorted((e.role, e.model) for e in m.entries) == [("small", "again"), ("large", "other")] or sorted(
        (e.role, e.model) for e in m.entries
    ) == [("large", "other"), ("small", "again")]
    assert not [p for p in eng.iterdir() if p.name.startswith(".staging")]


def test_manifest_refuses_tampered_or_missing_files(tmp_path: Path, tinypose_128: Path, card128: ModelCard) -> None:
    eng = tmp_path / "eng"
    register_onnx(tinypose_128, card128, eng, role="small", progress=False)
    f = eng / "small.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit changed
    f.write_bytes(bytes(data))
    with pytest.raises(DynPoseError, match="sha256"):
        Manifest.load(eng)
    f.unlink()
    with pytest.raises(DynPoseError, match="missing"):
        Manifest.load(eng)


def test_failed_export_leaves_previous_dir_intact(
    tmp_path: Path, tinypose_128: Path, tinypose_256: Path, card128: ModelCard
) -> None:
    eng = tmp_path / "eng"
    register_onnx(tinypose_128, card128, eng, role="small", progress=False)
    before = _snapshot(eng)
    # The 256x192 model with the 128x96 card fails verification after its file was staged.
    with pytest.raises(DynPoseError, match="does not match the card"):
        register_onnx(tinypose_256, card128, eng, role="small", progress=False)
    # int8 without calibration data fails before anything is written.
    with pytest.raises(DynPoseError, match="calibration data"):
        register_onnx(tinypose_128, card128, eng, role="small", precision="int8", progress=False)
    assert _snapshot(eng) == before
    assert sorted(p.name for p in eng.iterdir()) == sorted(before)  # no staging folder left behind
    Manifest.load(eng)


def test_fp16_tinypose_keeps_keypoints(tmp_path: Path, tinypose_128: Path, card128: ModelCard) -> None:
    eng = tmp_path / "eng"
    entries = register_onnx(tinypose_128, card128, eng, role="small", precision="fp16", progress=False)
    e = entries[0]
    assert e.file == "small.fp16.onnx" and e.precision == "fp16"
    print(
        f"fp16 vs fp32 on {e.checks['fp16_crops']} COCO crops: mean OKS {e.checks['fp16_oks']:.4f}, "
        f"heatmap rel L2 {e.checks['fp16_heatmap_rel_l2']:.2e}"
    )
    assert e.checks["fp16_oks"] >= 0.95
    m = onnx.load(str(eng / e.file))
    # fp16 weights inside, fp32 at the boundary.
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    Manifest.load(eng)


# -- CLI ----------------------------------------------------------------------------------------------------------
def _run(args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(export_cli, args)
    return r.exit_code, r.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "no_such_model", "--weights", "random"], "unknown model"),
        (["--model", "hrnet_w32"], "--weights random"),
        (["--model", "hrnet_w32", "--weights", "random", "--precision", "int8"], "calibration data"),
        (["--onnx", "MODEL", "--card", "CARD"], "--role"),
    ],
)
def test_cli_bad_inputs_one_line_exit_2(
    tmp_path: Path, tinypose_128: Path, card_file: Path, args: list[str], needle: str
) -> None:
    args = [str(tinypose_128) if a == "MODEL" else str(card_file) if a == "CARD" else a for a in args]
    code, out = _run([*args, "--engine-dir", str(tmp_path / "eng")])
    assert code == 2, out
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], out
    assert not (tmp_path / "eng" / "manifest.json").exists()


def test_cli_bad_card_and_corrupt_onnx(tmp_path: Path, tinypose_128: Path, card_file: Path) -> None:
    bad_card = tmp_path / "bad.json"
    bad_card.write_text(json.dumps({**TP128_CARD, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}))
    code, out = _run(
        ["--onnx", str(tinypose_128), "--card", str(bad_card), "--role", "small", "--engine-dir", str(tmp_path / "eng")]
    )
    assert code == 2 and "0-255 scale" in out and out.count("error:") == 1, out

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(tinypose_128.read_bytes()[:5000])
    code, out = _run(
        ["--onnx", str(broken), "--card", str(card_file), "--role", "small", "--engine-dir", str(tmp_path / "eng")]
    )
    assert code == 2 and "not a readable ONNX file" in out and out.count("error:") == 1, out

    code, out = _run(
        [
            "--onnx",
            str(tinypose_128),
            "--card",
            str(card_file),
            "--role",
            "small",
            "--precision",
            "int8",
            "--engine-dir",
            str(tmp_path / "eng"),
        ]
    )
    assert code == 2 and "calibration data" in out, out


def test_cli_registers_user_onnx_with_summary(tmp_path: Path, tinypose_128: Path, card_file: Path) -> None:
    eng = tmp_path / "eng"
    code, out = _run(
        ["--onnx", str(tinypose_128), "--card", str(card_file), "--role", "small", "--quiet", "--engine-dir", str(eng)]
    )
    assert code == 0, out
    assert "small.onnx" in out and "fp32" in out  # the summary table
    assert Manifest.load(eng).require("small").file == "small.onnx"


def test_cli_help_has_examples() -> None:
    code, out = _run(["--help"])
    assert code == 0 and "Examples:" in out and "--calib-root" in out


@pytest.mark.slow
def test_cli_hrnet_w32_random_export(tmp_path: Path) -> None:
    """The one HRNet-W32 export in the suite: CLI, random weights, verified against PyTorch (rel L2 <= 1e-4 at batch 1
    and 5 on random and real crops), opset >= 17, dynamic batch, card in the metadata, torch entry beside it."""
    import torch

    eng = tmp_path / "eng"
    code, out = _run(["--model", "hrnet_w32", "--weights", "random", "--quiet", "--engine-dir", str(eng)])
    assert code == 0, out
    m = Manifest.load(eng)
    e = m.require("large", "onnx")
    assert e.model == "hrnet_w32" and e.checks["fp32_rel_l2"] <= 1e-4
    assert os.path.getsize(eng / "large.onnx") == e.size
    print("hrnet_w32 fp32 rel L2:", {k: f"{v:.1e}" for k, v in e.checks.items() if k.startswith("fp32_rel_l2")})
    assert "fp32_rel_l2_real_b5" in e.checks and "fp32_rel_l2_random_b1" in e.checks
    model = onnx.load(str(eng / "large.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert read_card(eng / "large.onnx") == e.card
    sd = torch.load(eng / "large.pt", weights_only=True)  # the torch backend's state_dict
    assert "final_layer.weight" in sd and m.require("large", "torch").file == "large.pt"
