"""`dynpose-bench`'s options and the per-device defaults."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dynpose.bench.timing import RoundSpec
from dynpose.errors import DynPoseError

DEVICES = ("cpu", "cuda")
# Defaults per device: rounds go on until every ratio's interval is within +-5% or the time limit (per batch size).
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"batches": (1, 8), "rounds": RoundSpec(min_rounds=5, warmup=1, time_limit_s=240.0)},
    "cuda": {"batches": (1, 8, 32, 64), "rounds": RoundSpec(min_rounds=10, warmup=5, time_limit_s=120.0)},
}
DEFAULT_FRACTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
BENCH_DIRNAME = "bench"  # figures go to ENGINE_DIR/bench/ unless --json/--plot say otherwise


@dataclass(frozen=True)
class BenchOptions:
    """Everything a benchmark run takes besides the engine dir (the CLI's flags)."""

    backend: str = "ort"
    device: str = "cpu"
    batches: tuple[int, ...] = ()  # () -> the device default
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    policies: tuple[str, ...] = ()  # extra routing policies timed beside the fractions (e.g. the calibrated route)
    rounds: RoundSpec | None = None  # None -> the device default
    threads: int | None = None
    seed: int = 0
    images: Path | None = None
    detections: Path | None = None
    route: str | None = None  # the pipeline part's policy (None: the manifest's)
    real_crops: bool = True  # with images + detections, time the crop part on their real boxes
    json_out: Path | None = None
    plot_out: Path | None = None
    save: bool = True  # write JSON + plot (to ENGINE_DIR/bench/ when no path is given)
    store_costs: bool = False  # write the measured per-crop costs into the manifest
    backend_options: dict[str, Any] = field(default_factory=dict)  # torch: fp16, channels_last, cuda_graphs, compile
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> BenchOptions:
        """Device defaults filled in; bad combinations refused."""
        if self.device not in DEVICES:
            raise DynPoseError(f"--device {self.device!r}: use cpu or cuda")
        if (self.images is None) != (self.detections is None):
            raise DynPoseError("--images and --detections go together: the real-image parts need both")
        d = DEFAULTS[self.device]
        out = replace(self, batches=tuple(self.batches) or tuple(d["batches"]), rounds=self.rounds or d["rounds"])
        assert out.rounds is not None
        out.rounds.validate()
        return out
