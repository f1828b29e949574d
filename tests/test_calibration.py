"""Calibration crop sets and INT8 Q/DQ with the sensitivity search, on the real TinyPose models and shared data."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import tinypose_card

from dynpose.cli.export import main as export_cli
from dynpose.data import gt_boxes, load_coco
from dynpose.engines.manifest import Manifest, content_name
from dynpose.errors import DynPoseError
from dynpose.export.api import register_onnx
from dynpose.export.calibration.crops import CalibSpec, build_crop_set
from dynpose.export.calibration.quantize import quantize_int8, quiet_ort_quantization
from dynpose.runtime.preprocess import box_to_center_scale, crop, normalize

CARD128 = tinypose_card(96, 128)
CARD256 = tinypose_card(192, 256)


def _spec(shared: Path, **kw: object) -> CalibSpec:
    return CalibSpec.from_root(shared / "data", gate_ann=shared / "data" / "coco" / "test_coco.json", **kw)


def test_crop_set_split_cache_and_runtime_preprocessing(tmp_path: Path, shared: Path) -> None:
    spec = _spec(shared, jitter=1)
    crops = build_crop_set(spec, CARD128, tmp_path)
    gate = crops.held_out
    assert len(gate) == 12  # the 12 annotated COCO persons with >= 5 keypoints
    # Gate images never calibrate: no calibration crop comes from a COCO image (same centres would show it).
    coco_centres = {tuple(np.round(c, 3)) for c in gate.centers}
    assert not any(tuple(np.round(c, 3)) in coco_centres for c in crops.calib.centers)
    assert len(crops.calib) >= 80 and crops.calib.flipped.any()

    # The crops are exactly what the runtime feeds: the crop primitive on the image with the card.
    ds = load_coco(shared / "data" / "coco" / "test_coco.json")
    iid, box, _ = [b for b in gt_boxes(ds, min_keypoints=5)][0]
    img = cv2.imread(str(shared / "data" / "coco" / ds.images[iid].file_name))
    c, s = box_to_center_scale(box[None], CARD128.aspect_ratio, CARD128.padding)
    want = normalize(crop([img], np.zeros(1, np.int64), c, s, CARD128), CARD128)[0]
    np.testing.assert_allclose(gate.x[0], want, atol=1e-5)

    # Cached by content: one npz, reused; another card (size) gets its own.
    files = list(tmp_path.glob("calib-*.npz"))
    assert len(files) == 1
    again = build_crop_set(spec, CARD128, tmp_path)
    np.testing.assert_array_equal(again.x, crops.x)
    build_crop_set(spec, CARD256, tmp_path)
    assert len(list(tmp_path.glob("calib-*.npz"))) == 2


def test_calib_spec_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DynPoseError, match="calibration data"):
        CalibSpec().validate()
    with pytest.raises(DynPoseError, match="no COCO annotation"):
        CalibSpec.from_root(tmp_path)
    code = CliRunner().invoke(
        export_cli,
        [
            "--model",
            "hrnet_w32",
            "--weights",
            "random",
            "--precision",
            "int8",
            "--calib-ann",
            str(tmp_path / "missing.json"),
            "--calib-images",
            str(tmp_path),
            "--engine-dir",
            str(tmp_path / "e"),
        ],
    )
    assert code.exit_code == 2 and "file not found" in code.output


def test_int8_qdq_without_gate_and_unreachable_gate(tmp_path: Path, shared: Path, tinypose_128: Path) -> None:
    spec = _spec(shared, jitter=0, max_crops=32)
    out = tmp_path / "q.onnx"
    checks = quantize_int8(tinypose_128, out, CARD128, spec, min_oks=0.0, cache_dir=tmp_path, progress=False)
    qmodel = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in qmodel.graph.node}
    # ORT flavour: uint8 activations (asymmetric), int8 weights.
    assert any(i.data_type == onnx.TensorProto.UINT8 for i in qmodel.graph.initializer if i.name.endswith("_zero_point"))
    assert checks["int8_fp32_layers"] == [] and len(checks["int8_search_steps"]) == 1
    assert checks["int8_speedup_b8"] > 0 and 0 <= checks["int8_oks"] <= 1
    print(f"TinyPose-128 all-int8: OKS vs fp32 {checks['int8_oks']:.3f}, speed-up {checks['int8_speedup_b8']:.2f}x")

    # TensorRT flavour: symmetric int8 activations (zero points 0, int8 type) on the same calibration ranges.
    checks = quantize_int8(
        tinypose_128,
        out,
        CARD128,
        spec,
        target="tensorrt",
        min_oks=0.0,
        cache_dir=tmp_path,
        progress=False,
    )
    zps = [i for i in onnx.load(str(out)).graph.initializer if i.name.endswith("_zero_point")]
    assert zps and not any(z.data_type == onnx.TensorProto.UINT8 for z in zps)  # int8 (int32 for biases)
    assert all(not onnx.numpy_helper.to_array(z).any() for z in zps)
    assert checks["int8_target"] == "tensorrt"

    # A gate the search cannot reach within its step budget: one line with the best figure.
    with pytest.raises(DynPoseError, match=r"no layer set reaches mean OKS 0.9999 vs fp32 \(best 0\.\d+"):
        quantize_int8(
            tinypose_128,
            out,
            CARD128,
            spec,
            min_oks=0.9999,
            cache_dir=tmp_path,
            progress=False,
            max_steps=1,
        )


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_quantization_leaves_the_root_logger_alone(tmp_path: Path, shared: Path, tinypose_128: Path) -> None:
    """ORT's quantizer logs notes through the root logger; silencing them must not change the root logger's level,
    handlers or filters (that would hide the host application's warnings and ours)."""
    root = logging.getLogger()
    seen = _Records()
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(seen)
    try:
        before = (root.level, list(root.handlers), list(root.filters))
        spec = _spec(shared, jitter=0, max_crops=16)
        quantize_int8(tinypose_128, tmp_path / "q.onnx", CARD128, spec, min_oks=0.0, cache_dir=tmp_path, progress=False)
        assert (root.level, list(root.handlers), list(root.filters)) == before
        assert logging.getLogger("onnxruntime.quantization").level == logging.NOTSET
        ort_notes = [r for r in seen.records if "onnxruntime" in r.pathname and r.levelno < logging.ERROR]
        assert not ort_notes, [r.getMessage() for r in ort_notes]
        # our own progress lines still reach the root handlers (dynpose's logger propagates unless a CLI set it up)
        if logging.getLogger("dynpose").propagate:
            assert any(r.name.startswith("dynpose.export.calibration") for r in seen.records)
    finally:
        root.removeHandler(seen)
        root.setLevel(old_level)


def test_quiet_ort_quantization_without_root_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    """On a root logger without handlers, ORT's module-level `logging.warning` would call `basicConfig()` and leave
    a handler behind; inside the block it does not, and other warnings still reach `logging.lastResort`."""
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization.quantize import check_static_quant_arguments

    root = logging.getLogger()
    saved = list(root.handlers)
    for h in saved:
        root.removeHandler(h)
    try:
        with quiet_ort_quantization():
            check_static_quant_arguments(QuantFormat.QOperator, QuantType.QInt8, QuantType.QInt8)  # ORT warns
            logging.getLogger("host.app").warning("the host's warning")
        assert root.handlers == [] and root.filters == []
    finally:
        for h in saved:
            root.addHandler(h)
    err = capsys.readouterr().err
    assert "the host's warning" in err and "QuantFormat.QDQ" not in err


@pytest.mark.slow
def test_int8_tinypose256_keeps_oks_gate_on_coco12(tmp_path: Path, shared: Path, tinypose_256: Path) -> None:
    """The requirement: TinyPose 256x192 INT8 (calibrated on shared/data, COCO images held out) keeps mean keypoint
    OKS vs FP32 >= 0.95 on the 12 annotated COCO persons."""
    eng = tmp_path / "eng"
    spec = _spec(shared, jitter=1, max_crops=96)
    (e,) = register_onnx(tinypose_256, CARD256, eng, role="small", precision="int8", calib=spec, progress=False)
    c = e.checks
    print(
        f"TinyPose-256 int8: gate OKS {c['int8_oks']:.4f} (min {c['int8_oks_min']:.4f}) on {c['int8_gate_crops']} "
        f"COCO persons, {len(c['int8_fp32_layers'])} layers fp32 / {c['int8_quantized_layers']} int8, "
        f"speed-up {c['int8_speedup_b8']:.2f}x at batch 8"
    )
    assert e.file == content_name("small.int8.onnx", e.sha256) and c["int8_gate_crops"] == 12
    assert c["int8_oks"] >= 0.95
    assert c["int8_quantized_layers"] > 0
    Manifest.load(eng)  # sizes and hashes of the int8 file recorded
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(eng / e.file)).graph.node)


def test_tensorrt_format_without_tensorrt_is_one_line(tmp_path: Path, tinypose_128: Path) -> None:
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here; this test covers machines without it")
    except ImportError:
        pass
    card = tmp_path / "card.json"
    card.write_text(CARD128.to_json())
    r = CliRunner().invoke(
        export_cli,
        [
            "--onnx",
            str(tinypose_128),
            "--card",
            str(card),
            "--role",
            "small",
            "--format",
            "tensorrt",
            "--quiet",
            "--engine-dir",
            str(tmp_path / "e"),
        ],
    )
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "tensorrt" in r.output.lower(), r.output
    assert not (tmp_path / "e" / "manifest.json").exists()
