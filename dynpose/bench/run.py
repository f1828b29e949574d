"""`run_benchmark`: the whole `dynpose-bench` run from an engine dir."""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dynpose.bench.crops import crop_benchmark
from dynpose.bench.pipeline import pipeline_benchmark
from dynpose.bench.report import plot
from dynpose.bench.timing import machine_info, real_inputs, versions
from dynpose.errors import DynPoseError
from dynpose.fileio import write_json_atomic
from dynpose.runtime.engine_set import EngineSet

SCHEMA = "dynpose.bench"
SCHEMA_VERSION = 1
DEVICES = ("cpu", "cuda")
# Defaults per device. CPU: batch 1 and 8 with 5 rounds keeps HRNet-W32 + ResNet-50 under 10 minutes on 2 cores.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"batches": (1, 8), "repeats": 5, "warmup": 1},
    "cuda": {"batches": (1, 8, 32, 64), "repeats": 20, "warmup": 5},
}
DEFAULT_FRACTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def _header(engines: EngineSet, device: str, config: dict[str, Any]) -> dict[str, Any]:
    models = {
        role: {
            "model": e.model,
            "file": e.file,
            "format": e.format,
            "precision": e.precision,
            "input": list(e.card.input_size),
            "loaded": engines.loaded[role],
        }
        for role, e in engines.entries.items()
    }
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "versions": versions(),
        "config": {**config, "models": models},
    }


def run_benchmark(
    engine_dir: str | os.PathLike,
    *,
    backend: str = "ort",
    device: str = "cpu",
    batches: Sequence[int] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    repeats: int | None = None,
    warmup: int | None = None,
    images: str | os.PathLike | None = None,
    detections: str | os.PathLike | None = None,
    route: str | None = None,
    threads: int | None = None,
    backend_options: Mapping[str, Any] | None = None,
    json_out: str | os.PathLike | None = None,
    plot_out: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """The whole benchmark; returns (and optionally writes atomically) the result dict."""
    if device not in DEVICES:
        raise DynPoseError(f"--device {device!r}: use cpu or cuda")
    if (images is None) != (detections is None):
        raise DynPoseError("--images and --detections go together: the pipeline part needs both")
    d = DEFAULTS[device]
    batches = list(batches) if batches else list(d["batches"])
    repeats = d["repeats"] if repeats is None else repeats
    warmup = d["warmup"] if warmup is None else warmup
    if repeats < 1 or warmup < 0:
        raise DynPoseError(f"--repeats must be >= 1 and --warmup >= 0 (got {repeats}, {warmup})")
    inputs = real_inputs(images, detections) if images is not None and detections is not None else None
    started = time.perf_counter()
    config = {
        "engine_dir": str(engine_dir),
        "backend": backend,
        "device": device,
        "batches": batches,
        "fractions": list(fractions),
        "repeats": repeats,
        "warmup": warmup,
        "threads": threads,
        "backend_options": dict(backend_options or {}),
    }
    with EngineSet.load(engine_dir, backend, device, threads=threads, backend_options=backend_options) as engines:
        route = route or engines.manifest.route
        result = _header(engines, device, config)
        result["crops"] = crop_benchmark(engines, batches, fractions, repeats, warmup, log=log)
        result["ratio_vs_large"] = {str(b): {} for b in batches}
        for r in result["crops"]:
            if r["config"] == "dynpose":
                result["ratio_vs_large"][str(r["batch"])][f"{r['fraction']:g}"] = r["ratio_vs_large"]
        result["pipeline"] = pipeline_benchmark(engines, inputs, route, repeats, warmup, log=log) if inputs else None
    result["wall_s"] = time.perf_counter() - started
    if json_out is not None:
        write_json_atomic(json_out, result)
    if plot_out is not None:
        plot(result, Path(plot_out))
    return result
