"""Export: user ONNX registration, zoo export + verification, manifest round trip/tampering, staging, fp16, CLI."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from dynpose.cli.export import main as export_cli
from dynpose.engines.manifest import Manifest, content_name
from dynpose.errors import DynPoseError
from dynpose.export.api import register_onnx
from dynpose.export.judges import measure_speedup
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import open_session, read_card, run_session
from dynpose.roles import Role

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
    # content-named: a new export never overwrites a file the current manifest names (engines/manifest.py)
    assert entry.file == content_name("small.onnx", entry.sha256) and entry.format == "onnx" and entry.precision == "fp32"
    # The user's graph names are kept and recorded, not renamed.
    assert (entry.input_name, entry.output_name) == ("image", "heatmaps")
    m = Manifest.load(eng)
    (loaded,) = m.entries
    assert loaded.card == card128 and loaded.checkpoint_sha256 == entry.checkpoint_sha256
    assert loaded.checks["batch5_vs_batch1_rel_l2"] <= 1e-4
    assert read_card(eng / entry.file) == card128  # the card travels inside the ONNX file too
    # Dynamic batch: the registered file runs at 1 and 5 and agrees.
    sess = open_session(eng / entry.file)
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
    (entry,) = register_onnx(tinypose_128, card128, eng, role="small", progress=False)
    f = eng / entry.file
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
    assert e.file == content_name("small.fp16.onnx", e.sha256) and e.precision == "fp16"
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


class _Records(logging.Handler):
    """The records one logger emits, read directly from it (a CLI test may have turned propagation off)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _Records:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def test_fp16_gate_skipped_says_why(
    tmp_path: Path, tinypose_128: Path, card128: ModelCard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No real crops anywhere: the fp16 gate cannot run, and the export says so (a WARNING naming why) and records
    it in the entry's checks instead of passing silently."""
    empty = tmp_path / "no_coco"
    empty.mkdir()
    monkeypatch.setenv("DYNPOSE_VERIFY_COCO", str(empty))
    with _Records("dynpose.export.steps") as log:
        (e,) = register_onnx(tinypose_128, card128, tmp_path / "eng", role="small", precision="fp16", progress=False)
    assert e.checks["fp16_gate"].startswith("skipped: ") and str(empty) in e.checks["fp16_gate"]
    assert e.checks["fp16_finite"] is True and "fp16_oks" not in e.checks
    warned = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "fp16 accuracy gate skipped" in warned[0] and str(empty) in warned[0], warned
    assert not any("[" in r.getMessage() and "[/]" in r.getMessage() for r in log.records)  # no rich markup


def test_cli_fp16_gates_on_gate_ann(
    tmp_path: Path, tinypose_128: Path, card_file: Path, coco_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--gate-ann is the fp16 gate's crops too (it used to be dropped unless a --calib-* option came with it)."""
    empty = tmp_path / "no_coco"
    empty.mkdir()
    monkeypatch.setenv("DYNPOSE_VERIFY_COCO", str(empty))  # so only --gate-ann can supply crops
    eng = tmp_path / "eng"
    args = ["--onnx", str(tinypose_128), "--card", str(card_file), "--role", "small", "--precision", "fp16"]
    code, out = _run([*args, "--gate-ann", str(coco_dir / "test_coco.json"), "--engine-dir", str(eng)])
    assert code == 0, out
    c = Manifest.load(eng).require("small").checks
    assert c["fp16_crops"] == 12 and c["fp16_oks"] >= 0.95 and "fp16_gate" not in c
    assert "fp16 vs fp32 mean keypoint OKS" in out  # the progress line, through the CLI's logging handler
    # int8 still needs calibration data: a gate file alone is not enough
    code, out = _run([*args[:-1], "int8", "--gate-ann", str(coco_dir / "test_coco.json"), "--engine-dir", str(eng)])
    assert code == 2 and "calibration data" in out, out
    code, out = _run([*args, "--gate-ann", str(tmp_path / "missing.json"), "--engine-dir", str(eng)])
    assert code == 2 and "file not found" in out, out


def test_speed_figures_named_by_precision(tinypose_128: Path) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 128, 96)).astype(np.float32)
    sp = measure_speedup(tinypose_128, tinypose_128, x, "fp16", repeats=1)
    assert {"fp32_ms", "fp16_ms", "speedup", "batch"} <= set(sp) and "int8_ms" not in sp
    assert sp["fp16_ms"] > 0 and sp["speedup"] > 0


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
    e = Manifest.load(eng).require("small")
    assert e.file == content_name("small.onnx", e.sha256)
    assert e.file in out and "fp32" in out  # the summary table


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
    assert os.path.getsize(eng / e.file) == e.size
    print("hrnet_w32 fp32 rel L2:", {k: f"{v:.1e}" for k, v in e.checks.items() if k.startswith("fp32_rel_l2")})
    assert "fp32_rel_l2_real_b5" in e.checks and "fp32_rel_l2_random_b1" in e.checks
    model = onnx.load(str(eng / e.file))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert read_card(eng / e.file) == e.card
    pt = m.require("large", "torch")
    sd = torch.load(eng / pt.file, weights_only=True)  # the torch backend's state_dict
    assert "final_layer.weight" in sd and pt.file == content_name("large.pt", pt.sha256)


def test_cli_stores_costs_once_the_pair_is_there(tmp_path: Path, tinypose_128: Path, tinypose_256: Path) -> None:
    """The export measures per-crop costs into the manifest when the dir holds a small and a large model (the
    runtime reads them to say whether routing pays); a lone model is not timed, --no-costs skips it."""
    eng = tmp_path / "eng"
    cards = Path(__file__).resolve().parents[1] / "examples" / "cards"
    base = ["--quiet", "--engine-dir", str(eng)]
    code, out = _run(["--onnx", str(tinypose_256), "--card", str(cards / "tinypose_256x192.json"), "--role", "large", *base])
    assert code == 0 and "cost " not in out and not Manifest.load(eng).notes.get("costs")
    code, out = _run(["--onnx", str(tinypose_128), "--card", str(cards / "tinypose_128x96.json"), "--role", "small", *base])
    assert code == 0 and "cost small" in out and "cost large" in out, out
    m = Manifest.load(eng)
    rec = m.costs("ort", "cpu")
    assert rec is not None and set(rec.roles) == {Role.SMALL, Role.LARGE}
    assert rec.roles[Role.LARGE].ms[8]["total"] > 0
    code, out = _run(["--model", "router", "--weights", "random", "--no-costs", *base])
    assert code == 0 and "cost " not in out
