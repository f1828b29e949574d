"""`run_benchmark`: the whole `dynpose-bench` run from an engine dir, and its options (`BenchOptions`)."""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.bench.costs import cost_lines, measure_costs, store_costs
from dynpose.bench.crops import crop_benchmark
from dynpose.bench.load import load_summary, load_warning
from dynpose.bench.options import BENCH_DIRNAME, DEFAULT_FRACTIONS, DEFAULTS, BenchOptions
from dynpose.bench.pipeline import pipeline_benchmark
from dynpose.bench.report import plot
from dynpose.bench.timing import machine_info, real_inputs, threads_of, versions
from dynpose.fileio import write_json_atomic
from dynpose.roles import MODEL_ROLES, Role
from dynpose.runtime.boxes import Boxes
from dynpose.runtime.engine_set import CPU_THREADED, EngineSet, LoadOptions, usable_cores

SCHEMA = "dynpose.bench"
SCHEMA_VERSION = 2
__all__ = ["BENCH_DIRNAME", "DEFAULTS", "DEFAULT_FRACTIONS", "BenchOptions", "run_benchmark"]


def _header(engines: EngineSet, opts: BenchOptions, engine_dir: str | os.PathLike) -> dict[str, Any]:
    models = {
        role.value: {
            "model": e.model,
            "file": e.file,
            "format": e.format,
            "precision": e.precision,
            "input": list(e.card.input_size),
            "loaded": engines.loaded[role],
        }
        for role, e in engines.entries.items()
    }
    rounds = opts.rounds
    assert rounds is not None
    config = {
        "engine_dir": str(engine_dir),
        "backend": opts.backend,
        "device": opts.device,
        "batches": list(opts.batches),
        "fractions": list(opts.fractions),
        "policies": list(opts.policies),
        "rounds": {"min": rounds.min_rounds, "max": rounds.max_rounds, "time_limit_s": rounds.time_limit_s},
        "warmup": rounds.warmup,
        "ci_target": rounds.target,
        "threads": opts.threads,
        "seed": opts.seed,
        "backend_options": dict(opts.backend_options),
        "models": models,
    }
    return {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(opts.device),
        "versions": versions(),
        "config": config,
        "threads": _threads(engines, opts),
    }


def _threads(engines: EngineSet, opts: BenchOptions) -> dict[str, Any]:
    def of(role: Role) -> Any:
        h = getattr(engines, role)
        return threads_of(h) if h is not None else None

    solo = (opts.threads or usable_cores()) if opts.backend in CPU_THREADED and opts.device == "cpu" else None
    return {"solo": solo, **{r.value: of(r) for r in MODEL_ROLES}}


def _outputs(engine_dir: str | os.PathLike, opts: BenchOptions, created: str) -> tuple[Path | None, Path | None]:
    if not opts.save:
        return opts.json_out, opts.plot_out
    stamp = created.replace(":", "").replace("-", "").replace("+0000", "Z")
    base = Path(engine_dir) / BENCH_DIRNAME / f"bench-{opts.backend}-{opts.device}-{stamp}"
    return opts.json_out or base.with_suffix(".json"), opts.plot_out or base.with_suffix(".png")


def _read_frames(inputs: list[tuple[Path, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    from dynpose.bench.pipeline import _read

    frames = []
    for path, boxes in inputs:
        img = _read(path)
        frames.append((img, Boxes.of(boxes, img.shape).as_array()))
    return frames


def run_benchmark(
    engine_dir: str | os.PathLike, opts: BenchOptions | None = None, log: Callable[[str], None] = lambda m: None
) -> dict[str, Any]:
    """The whole benchmark (costs, crop configurations, pipeline); writes JSON + plot (atomically) unless
    `opts.save` is off, and with `opts.store_costs` the per-crop costs into the manifest."""
    opts = (opts or BenchOptions()).resolved()
    assert opts.rounds is not None
    inputs = real_inputs(opts.images, opts.detections) if opts.images is not None and opts.detections is not None else None
    started = time.perf_counter()
    load = LoadOptions(opts.backend, opts.device, opts.threads, backend_options=opts.backend_options or None)
    with EngineSet.load(engine_dir, load) as engines:
        result = _header(engines, opts, engine_dir)
        # as many cost repeats as timed rounds (at most the 7 the manifest's figures take), so a short run stays short
        rounds = opts.rounds
        costs = measure_costs(
            engines,
            repeats=min(7, rounds.max_rounds),
            warmup=rounds.warmup,
            threads=opts.threads,
            seed=opts.seed,
            log=log,
        )
        result["costs"] = costs.to_dict()
        result["cost_lines"] = cost_lines(costs)
        frames = _read_frames(inputs) if inputs and opts.real_crops else None
        rows, timing = crop_benchmark(engines, opts, frames=frames, log=log)
        result["crops"], result["timing"] = rows, timing
        result["crop_inputs"] = "real" if frames else "synthetic"
        result["ratio_vs_large"] = {str(b): {} for b in opts.batches}
        for r in rows:
            if not r.get("reference"):
                key = f"{r['fraction']:g}" if r["fraction"] is not None else r["config"]
                result["ratio_vs_large"][str(r["batch"])][key] = r["ratio_vs_large"]
        others = load_summary([v for t in timing for v in t["others_cores"]])
        result["load"], result["load_warning"] = others, load_warning(others)
        route = opts.route or engines.manifest.route
        result["pipeline"] = (
            pipeline_benchmark(engines, inputs, route, opts.rounds.min_rounds, opts.rounds.warmup, log=log)
            if inputs
            else None
        )
    result["wall_s"] = time.perf_counter() - started
    if opts.store_costs:
        result["costs_stored_in"] = str(store_costs(engine_dir, costs))
    json_out, plot_out = _outputs(engine_dir, opts, result["created"])
    if json_out is not None:
        write_json_atomic(json_out, result)
        result["json_path"] = str(json_out)
    if plot_out is not None:
        plot(result, Path(plot_out))
        result["plot_path"] = str(plot_out)
    return result
