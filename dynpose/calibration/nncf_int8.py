"""INT8 OpenVINO IRs by NNCF post-training quantization, judged by the same gate as the Q/DQ path.

NNCF quantizes the IR itself (FakeQuantize where OpenVINO's CPU plugin fuses them: convolutions' inputs and weights,
the residual adds) from the same calibration crops as `quantize.search_int8` (`calibration_split`), then the result
is judged on the same held-out crops by the same `PoseJudge` (mean keypoint OKS against fp32). When the gate fails,
NNCF's accuracy-control loop (`quantize_with_accuracy_control`) puts the layers that cost the most OKS back in float
until the drop from fp32 is within `1 - min_oks`: the per-layer fallback, with the judge's own per-crop OKS as its
metric. Pose models only: a router's INT8 is the Q/DQ path's (one quantization, judged by routing decisions).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.calibration.crops import CalibSpec, CropSet
from dynpose.calibration.quantize import Evaluate, Int8Options, calibration_split
from dynpose.errors import DynPoseError
from dynpose.runtime.backends.openvino.builder import error_line, read_ir, save_ir
from dynpose.runtime.compare import Check, PoseJudge, decode_keypoints, oks_between

log = logging.getLogger(__name__)

NNCF_HINT = "NNCF is not installed: pip install 'dynpose[openvino]'"


def import_nncf() -> Any:
    try:
        import nncf
    except ImportError:
        raise DynPoseError(NNCF_HINT) from None
    nncf.set_log_level(logging.ERROR)  # its INFO lines repeat what the export logs
    return nncf


@contextlib.contextmanager
def _quiet(progress: bool) -> Any:
    """NNCF draws its progress bars on stdout whatever its log level; hide them unless progress is wanted."""
    if progress:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _per_crop_oks(judge: PoseJudge, test: list[np.ndarray], ref: list[np.ndarray], gate: CropSet) -> np.ndarray:
    card = judge.card
    a = decode_keypoints(test, gate.centers, gate.scales, card)
    b = decode_keypoints(ref, gate.centers, gate.scales, card)
    return oks_between(a, b, gate.areas, card.keypoint_set.sigmas, gate.mask)


def _validation_fn(
    judge: PoseJudge, gate: CropSet, ref: list[np.ndarray]
) -> Callable[[Any, Iterable[int]], tuple[float, list[float]]]:
    """NNCF's metric: per-crop OKS against fp32 of the crops it names (validation items are gate crop indices)."""

    def validate(compiled: Any, items: Iterable[int]) -> tuple[float, list[float]]:
        idx = np.asarray(list(items), np.int64)
        res = compiled(np.ascontiguousarray(gate.x[idx]))
        outs = [np.asarray(res[o], np.float32) for o in compiled.outputs]
        per = _per_crop_oks(judge, outs, [r[idx] for r in ref], gate.subset(idx))
        if not np.isfinite(np.concatenate([o.ravel() for o in outs])).all():
            per = np.zeros(len(idx))
        return float(per.mean()), [float(v) for v in per]

    return validate


# fp32 outputs (every output, graph order) on a batch of crops: what a candidate is judged against.
Reference = Callable[[np.ndarray], list[np.ndarray]]


def nncf_int8(
    fp32_xml: Path, dst_xml: Path, spec: CalibSpec, judge: PoseJudge, options: Int8Options, run: Evaluate, ref: Reference
) -> Check:
    """Quantize the f32 IR `fp32_xml` with NNCF on the spec's calibration crops and write `dst_xml`; the check says
    whether it passes `judge` on the held-out crops (run with `run`, against `ref`'s fp32 outputs). After a failed
    gate NNCF's accuracy control reverts layers to float (at most `options.max_steps` iterations)."""
    nncf = import_nncf()
    t0 = time.perf_counter()
    card = judge.card
    _, cal, gate = calibration_split(spec, card, options)
    model = read_ir(fp32_xml)
    calib = nncf.Dataset([np.ascontiguousarray(cal.x[i : i + 1]) for i in range(len(cal))])
    ref_out = ref(gate.x)
    common = {"subset_size": len(cal), "target_device": nncf.TargetDevice.CPU}
    try:
        with _quiet(options.progress):
            quantized = nncf.quantize(model, calib, **common)
        save_ir(quantized, dst_xml)
        check = judge(run(dst_xml, gate.x), ref_out, gate, "int8")
        reverted, quantizers = 0, _fake_quantizers(quantized)
        if not check and options.max_steps > 1 and judge.min_oks > 0:
            log.info(
                "%s: NNCF int8 gate OKS %.4f < %s; NNCF accuracy control",
                card.name,
                check.figures["int8_oks"],
                judge.min_oks,
            )
            restorer = nncf.AdvancedAccuracyRestorerParameters(max_num_iterations=options.max_steps)
            with _quiet(options.progress):
                quantized = nncf.quantize_with_accuracy_control(
                    read_ir(fp32_xml),
                    calib,
                    nncf.Dataset(list(range(len(gate)))),
                    _validation_fn(judge, gate, ref_out),
                    max_drop=1.0 - judge.min_oks,
                    drop_type=nncf.DropType.ABSOLUTE,
                    advanced_accuracy_restorer_parameters=restorer,
                    **common,
                )
            save_ir(quantized, dst_xml)
            check = judge(run(dst_xml, gate.x), ref_out, gate, "int8")
            reverted = max(0, quantizers - _fake_quantizers(quantized))
    except DynPoseError:
        raise
    except Exception as e:  # NNCF's own failures (an op it cannot handle) end this path, not the export
        return Check("int8", False, {}, f"NNCF int8 for {card.name} failed ({type(e).__name__}: {error_line(e)})")
    figures = {
        "int8_source": "nncf",
        "int8_calib_crops": len(cal),
        "int8_gate_crops": len(gate),
        "int8_min_oks": judge.min_oks,
        "int8_nncf_quantizers_reverted": reverted,
        "int8_nncf_s": round(time.perf_counter() - t0, 1),
        **check.figures,
    }
    return Check("int8", check.passed, figures, check.message)


def _fake_quantizers(model: Any) -> int:
    """FakeQuantize ops in a model: their drop under accuracy control counts the quantizers it put back in float."""
    return sum(1 for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize")
