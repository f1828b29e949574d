"""`ExportOptions`: how every model of an export is made, one frozen object from the CLI (or a caller) down to the
steps.

    export_model("hrnet_w32", "engines/", ExportOptions(precision="int8", calib=spec))
    export_model("hrnet_w32", "engines/", precision="int8", calib=spec)      # the same, fields as keywords

Everything that can be refused before a model is built or a file written is checked here, once (`check`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from dynpose.engines.manifest import PRECISIONS
from dynpose.errors import DynPoseError
from dynpose.export.calibration.crops import NEEDS_CALIB, CalibSpec
from dynpose.export.steps import PlanOptions
from dynpose.roles import MODEL_ROLES, Role

FORMATS = ("onnx", "tensorrt", "openvino")
# Precisions only an OpenVINO export makes: bf16 (a CPU inference precision), auto (the fastest that passes the gate).
OPENVINO_ONLY = ("bf16", "auto")


@dataclass(frozen=True)
class ExportOptions:
    """precision: fp32 | fp16 | int8 (| bf16 | auto with fmt openvino); fmt: onnx | tensorrt | openvino; max_batch:
    the largest batch the files take; calib: INT8 calibration data (and the accuracy gate's persons); min_oks: the
    fp16 / int8 / bf16 gate (mean keypoint OKS against fp32; for a router the share of crops routed as fp32 routes
    them; 0 disables it); trust_pickle: allow pickled checkpoints; progress: progress lines; opt_batch / opt_level:
    the TensorRT profile's optimal batch and the builder's optimisation level."""

    precision: str = "fp32"
    fmt: str = "onnx"
    max_batch: int = 64
    calib: CalibSpec | None = None
    min_oks: float = 0.95
    trust_pickle: bool = False
    progress: bool = True
    opt_batch: int | None = None
    opt_level: int = 3

    @classmethod
    def of(cls, options: ExportOptions | None, overrides: Mapping[str, Any]) -> ExportOptions:
        """`options` (default: the defaults) with the keyword `overrides` of a call; an unknown keyword is one line."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise DynPoseError(f"export options: unknown {unknown}; use {', '.join(sorted(known))}")
        return replace(options or cls(), **overrides)

    def check(self, role: Role) -> None:
        """Refuse what cannot be exported (before any model is built): the role, precision and format, the batch,
        the gate's min_oks, INT8 without calibration data, an OpenVINO export on a machine without OpenVINO or the
        precision's instructions."""
        if role not in MODEL_ROLES:
            raise DynPoseError(f"role {role!r}: use one of {', '.join(map(str, MODEL_ROLES))}")
        if self.precision not in (*PRECISIONS, "auto"):
            raise DynPoseError(f"precision {self.precision!r}: use one of {(*PRECISIONS, 'auto')}")
        if self.fmt not in FORMATS:
            raise DynPoseError(f"format {self.fmt!r}: use one of {FORMATS}")
        if self.precision in OPENVINO_ONLY and self.fmt != "openvino":
            raise DynPoseError(
                f"--precision {self.precision} is made by the OpenVINO export only (a CPU inference precision / the "
                "fastest precision on this machine); add --format openvino"
            )
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise DynPoseError(f"max batch {self.max_batch!r}: must be an integer >= 1")
        # NaN compares false with every OKS, so a NaN gate would pass anything
        if isinstance(self.min_oks, bool) or not isinstance(self.min_oks, (int, float)) or not 0 <= self.min_oks <= 1:
            raise DynPoseError(f"min_oks {self.min_oks!r}: must be a number in [0, 1] (the accuracy gate's mean OKS)")
        # A spec with only a gate file (fp16's accuracy gate) has nothing to calibrate on.
        if self.precision == "int8" and (self.calib is None or not self.calib.sources):
            raise DynPoseError(NEEDS_CALIB)
        if self.fmt == "openvino":
            from dynpose.runtime.backends.openvino import cpu_info, require_precision

            info = cpu_info()  # refuses a machine without OpenVINO, in one line
            if self.precision not in ("auto", "int8"):
                require_precision(self.precision, info)

    def plan(self, engine_dir: str | os.PathLike) -> PlanOptions:
        """How a TensorRT plan of this export is built (the timing cache lives in the engine dir)."""
        return PlanOptions(self.opt_batch, self.opt_level, Path(engine_dir) / "timing.cache", self.progress)
