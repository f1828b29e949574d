"""Per-crop cost of each model of an engine dir on this machine and backend, for the manifest.

`measure_costs(engines)` times, for the router, the small and the large model, each alone with every core dynpose
may use (`timing.solo_models`): the crop and normalisation (`CropModel.crop` + `inputs`), the inference, and for a
pose model the decoding, per crop, at batch 1 and 8, as medians over interleaved repeats on seeded synthetic boxes
(the cost of a model does not depend on what the pixels show). `store_costs` writes the record into the manifest's
`notes.costs["<backend>/<device>"]`, with the sha256 of every timed file, so the figures stop applying as soon as
an entry is re-exported (`Manifest.costs`). The runtime reads them back (`dynpose.runtime.policy.route_costs`) to
say whether a route can pay.

The exporter's hook, after it commits a pose model or router (one line, at export time on the export machine; from
`dynpose/cli/export.py`, since `dynpose.export` sits below `dynpose.bench` and must not import it):

    store_costs(engine_dir, measure_costs_dir(engine_dir, backend=backend, device=device), backend, device)

with backend "ort"/device "cpu" for ONNX exports and "tensorrt"/"cuda" for plans.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.bench.timing import boxes_for_batch, cpu_model, solo_models, synthetic_frame, threads_of
from dynpose.engines.manifest import MANIFEST_NAME, updating_manifest
from dynpose.errors import DynPoseError
from dynpose.runtime.engine_set import EngineSet
from dynpose.runtime.model import CropModel, PoseModel, Router

COST_BATCHES = (1, 8)
PARTS = ("crop", "infer", "decode")


def _time_parts(model: CropModel, frame: np.ndarray, boxes: np.ndarray) -> dict[str, float]:
    """Seconds of each part for one batch of boxes on one model."""
    fi = np.zeros(len(boxes), np.int64)
    t0 = time.perf_counter()
    c, s = model.geometry(boxes)
    x = model.inputs(model.crop([frame], fi, c, s))
    t1 = time.perf_counter()
    if isinstance(model, Router):
        model.scores(x)
        t2 = t3 = time.perf_counter()
    else:
        assert isinstance(model, PoseModel)
        outs = model.infer(x)
        t2 = time.perf_counter()
        model.decode(outs, c, s)
        t3 = time.perf_counter()
    return {"crop": t1 - t0, "infer": t2 - t1, "decode": t3 - t2}


def _medians(runs: list[dict[str, float]], batch: int) -> dict[str, float]:
    ms = {p: float(np.median([r[p] for r in runs])) * 1e3 / batch for p in PARTS}
    ms["total"] = sum(ms.values())
    return ms


def _variants(engines: EngineSet, solo: dict[str, CropModel]) -> dict[str, list[CropModel]]:
    """Each role's handles to time: alone on every core, and (pose models) on the share the Dispatcher gives it;
    on a busy machine the second can be the faster, and a cost is what the model takes at its best here."""
    out: dict[str, list[CropModel]] = {}
    for role, handle in solo.items():
        split = getattr(engines, role)
        out[role] = [handle] if split is None or split.runner is handle.runner else [handle, split]
    return out


def measure_costs(
    engines: EngineSet,
    batches: Sequence[int] = COST_BATCHES,
    repeats: int = 7,
    warmup: int = 2,
    threads: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """The cost record (see the module doc): {"measured", "machine", "backend", "device", "batches", "shared_crop",
    "roles": {role: {"file", "sha256", "precision", "threads", "ms": {batch: {"crop", "infer", "decode",
    "total"}}}}}, per crop in milliseconds; per role and batch the faster of its thread settings (`threads`)."""
    if repeats < 1 or warmup < 0:
        raise DynPoseError(f"cost measurement: repeats must be >= 1 and warm-up >= 0 (got {repeats}, {warmup})")
    frame = synthetic_frame(seed)
    per_batch: dict[str, dict[str, dict[str, float]]] = {}
    threads_used: dict[str, dict[str, int | None]] = {}
    with solo_models(engines, threads) as solo:
        variants = _variants(engines, solo)
        for b in batches:
            boxes = boxes_for_batch(b, frame.shape[:2], seed=seed + b)
            for _ in range(warmup):
                for hs in variants.values():
                    for h in hs:
                        _time_parts(h, frame, boxes)
            runs: dict[tuple[str, int], list[dict[str, float]]] = {
                (r, i): [] for r, hs in variants.items() for i in range(len(hs))
            }
            for _ in range(repeats):
                for (r, i), acc in runs.items():
                    acc.append(_time_parts(variants[r][i], frame, boxes))
            for role, hs in variants.items():
                options = [(_medians(runs[(role, i)], b), threads_of(h)) for i, h in enumerate(hs)]
                ms, th = min(options, key=lambda o: o[0]["total"])
                per_batch.setdefault(role, {})[str(b)] = ms
                threads_used.setdefault(role, {})[str(b)] = th
            log(f"costs at batch {b}: " + ", ".join(f"{r} {per_batch[r][str(b)]['total']:.2f} ms" for r in variants))
    return _record(engines, batches, repeats, per_batch, threads_used)


def _record(
    engines: EngineSet,
    batches: Sequence[int],
    repeats: int,
    per_batch: dict[str, dict[str, dict[str, float]]],
    threads_used: dict[str, dict[str, int | None]],
) -> dict[str, Any]:
    router = engines.router
    return {
        "measured": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None},
        "backend": engines.backend,
        "device": engines.device,
        "batches": [int(b) for b in batches],
        "repeats": repeats,
        # the runtime reuses the router's crops for the large model when both crop alike (its crop is then free)
        "shared_crop": bool(router is not None and engines.large is not None and router.same_crop(engines.large)),
        "roles": {
            role: {
                "file": engines.entries[role].file,
                "sha256": engines.entries[role].sha256,
                "precision": engines.entries[role].precision,
                "threads": threads_used[role],
                "ms": ms,
            }
            for role, ms in per_batch.items()
        },
    }


def measure_costs_dir(
    engine_dir: str | os.PathLike,
    backend: str = "ort",
    device: str = "cpu",
    threads: int | None = None,
    batches: Sequence[int] = COST_BATCHES,
) -> dict[str, Any]:
    """`measure_costs` on an engine dir opened with `EngineSet.load` (router, small and large as present)."""
    with EngineSet.load(engine_dir, backend, device, threads=threads) as engines:
        return measure_costs(engines, batches, threads=threads)


def store_costs(engine_dir: str | os.PathLike, record: dict[str, Any], backend: str, device: str) -> Path:
    """Write a cost record into the manifest's `notes.costs["<backend>/<device>"]` (atomically, the rest kept)."""
    with updating_manifest(engine_dir, f"store costs {backend}/{device}") as manifest:
        manifest.set_costs(backend, device, record)
    return Path(engine_dir) / MANIFEST_NAME


def cost_lines(record: dict[str, Any], batch: int = 8) -> list[str]:
    """Human lines: per-crop ms of each role at `batch` and what it means for routing."""
    from dynpose.runtime.policy import cost_line, route_costs

    b = str(min((int(k) for k in record["batches"]), key=lambda k: abs(k - batch)))
    lines = []
    for role, r in record["roles"].items():
        ms = r["ms"][b]
        lines.append(
            f"cost {role:<6} {ms['total']:7.2f} ms/crop at batch {b} (crop {ms['crop']:.2f}, infer {ms['infer']:.2f}, "
            f"decode {ms['decode']:.2f}; {r['precision']}, {(r['threads'] or {}).get(b) or '-'} threads)"
        )
    costs = route_costs(record, int(b))
    if costs is not None and np.isfinite(costs.router):
        lines.append(cost_line(costs, None, None)[1])
    return lines
