"""INT8 OpenVINO IRs by NNCF post-training quantization, judged by the same gate as the Q/DQ path.

NNCF quantizes the IR itself (FakeQuantize where OpenVINO's CPU plugin fuses them: convolutions' inputs and weights,
the residual adds, with fast bias correction) from the same calibration crops as `quantize.search_int8`
(`calibration_split`), and the result is judged on the same held-out crops by the same `PoseJudge` (mean keypoint
OKS against fp32). It is one candidate: the OpenVINO export keeps it when it passes and runs faster than the Q/DQ
candidate, whose layer search is the per-layer fallback. NNCF's own fallback (`quantize_with_accuracy_control`) was
tried and left out: it ranks every quantizer by re-compiling and re-running the model without it, which took over
12 minutes for TinyPose-128 on the 2-core machine (the Q/DQ search: 93 s). Pose models only: a router's INT8 is the
Q/DQ path's (one quantization, judged by routing decisions).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.export.calibration.crops import CalibSpec
from dynpose.export.calibration.quantize import Evaluate, Int8Options, calibration_split
from dynpose.export.judges import Check, PoseJudge
from dynpose.runtime.backends.openvino.builder import error_line, read_ir, save_ir

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
def _quiet(progress: bool) -> Iterator[None]:
    """NNCF draws its progress bars on stdout whatever its log level; hide them unless progress is wanted."""
    if progress:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# fp32 outputs (every output, graph order) on a batch of crops: what a candidate is judged against.
Reference = Callable[[np.ndarray], list[np.ndarray]]


def nncf_int8(
    fp32_xml: Path, dst_xml: Path, spec: CalibSpec, judge: PoseJudge, options: Int8Options, run: Evaluate, ref: Reference
) -> Check:
    """Quantize the f32 IR `fp32_xml` with NNCF on the spec's calibration crops and write `dst_xml`; the check says
    whether it passes `judge` on the held-out crops (run with `run`, against `ref`'s fp32 outputs)."""
    nncf = import_nncf()
    t0 = time.perf_counter()
    card = judge.card
    _, cal, gate = calibration_split(spec, card, options)
    model = read_ir(fp32_xml)
    calib = nncf.Dataset([np.ascontiguousarray(cal.x[i : i + 1]) for i in range(len(cal))])
    ref_out = ref(gate.x)
    try:
        with _quiet(options.progress):
            quantized = nncf.quantize(model, calib, subset_size=len(cal), target_device=nncf.TargetDevice.CPU)
        save_ir(quantized, dst_xml)
        check = judge(run(dst_xml, gate.x), ref_out, gate, "int8")
    except DynPoseError:
        raise
    except Exception as e:  # NNCF's own failures (an op it cannot handle) end this path, not the export
        return Check("int8", False, {}, f"NNCF int8 for {card.name} failed ({type(e).__name__}: {error_line(e)})")
    figures = {
        "int8_source": "nncf",
        "int8_calib_crops": len(cal),
        "int8_gate_crops": len(gate),
        "int8_min_oks": judge.min_oks,
        "int8_nncf_quantizers": _fake_quantizers(quantized),
        "int8_nncf_s": round(time.perf_counter() - t0, 1),
        **check.figures,
    }
    return Check("int8", check.passed, figures, check.message)


def _fake_quantizers(model: Any) -> int:
    """FakeQuantize ops in a model (the quantizers NNCF placed)."""
    return sum(1 for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize")
