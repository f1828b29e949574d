"""Per-crop cost of each model of an engine dir on this machine and backend, for the manifest.

`measure_costs(engines)` times, for the router, the small and the large model, each alone with every core dynpose
may use (`timing.solo_models`): the crop and normalisation (`plan.crop_boxes` + `inputs`), the inference, and for a
pose model the decoding, per crop, at batch 1 and 8, as medians over interleaved repeats on seeded synthetic boxes
(the cost of a model does not depend on what the pixels show). `store_costs` writes the `CostRecord` into the
manifest's `notes.costs["<backend>/<device>"]`, with the sha256 of every timed file, so the figures stop applying
as soon as an entry is re-exported (`Manifest.costs`).

The second half is the cost model of a route: `model_costs` (the record at one batch size, as the policies read
it: `Policy.cost`), `break_even`, and the one line `dynpose-run`, `dynpose-bench` and the exporter print on whether
a route can pay (`cost_line`, `log_route_costs`).

`dynpose-export` stores the costs once the engine dir has both pose models in the exported format (at export time on
the export machine; from `dynpose/cli/export.py`, since `dynpose.export` sits below `dynpose.bench`):

    store_costs(engine_dir, measure_costs_dir(engine_dir, backend, device))

with backend "ort"/device "cpu" for ONNX exports, "openvino"/"cpu" for IRs and "tensorrt"/"cuda" for plans.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dynpose.bench.agreement import calibration_warnings
from dynpose.bench.timing import boxes_for_batch, cpu_model, solo_models, synthetic_frame, threads_of
from dynpose.engines.manifest import MANIFEST_NAME, CostRecord, Manifest, RoleCosts, updating_manifest
from dynpose.errors import DynPoseError
from dynpose.roles import Role
from dynpose.runtime.engine_set import EngineSet, LoadOptions
from dynpose.runtime.model import CropModel, PoseModel, Router
from dynpose.runtime.plan import crop_boxes, same_crop
from dynpose.runtime.policy import ModelCosts, Policy

log = logging.getLogger(__name__)

COST_BATCHES = (1, 8)
PARTS = ("crop", "infer", "decode")


def _time_parts(model: CropModel, frame: np.ndarray, boxes: np.ndarray) -> dict[str, float]:
    """Seconds of each part for one batch of boxes on one model."""
    fi = np.zeros(len(boxes), np.int64)
    t0 = time.perf_counter()
    u8, c, s = crop_boxes([frame], fi, boxes, model.card)
    x = model.inputs(u8)
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


def _variants(engines: EngineSet, solo: dict[Role, CropModel]) -> dict[Role, list[CropModel]]:
    """Each role's handles to time: alone on every core, and (pose models) on the share the runtime gives it;
    on a busy machine the second can be the faster, and a cost is what the model takes at its best here."""
    out: dict[Role, list[CropModel]] = {}
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
) -> CostRecord:
    """The cost record (see the module doc): per role and batch the ms per crop of each part, the faster of its
    thread settings (`threads`)."""
    if repeats < 1 or warmup < 0:
        raise DynPoseError(f"cost measurement: repeats must be >= 1 and warm-up >= 0 (got {repeats}, {warmup})")
    frame = synthetic_frame(seed)
    per_batch: dict[Role, dict[int, dict[str, float]]] = {}
    threads_used: dict[Role, dict[int, int | None]] = {}
    with solo_models(engines, threads) as solo:
        variants = _variants(engines, solo)
        for b in batches:
            boxes = boxes_for_batch(b, frame.shape[:2], seed=seed + b)
            for _ in range(warmup):
                for hs in variants.values():
                    for h in hs:
                        _time_parts(h, frame, boxes)
            runs: dict[tuple[Role, int], list[dict[str, float]]] = {
                (r, i): [] for r, hs in variants.items() for i in range(len(hs))
            }
            for _ in range(repeats):
                for (r, i), acc in runs.items():
                    acc.append(_time_parts(variants[r][i], frame, boxes))
            for role, hs in variants.items():
                options = [(_medians(runs[(role, i)], b), threads_of(h)) for i, h in enumerate(hs)]
                ms, th = min(options, key=lambda o: o[0]["total"])
                per_batch.setdefault(role, {})[int(b)] = ms
                threads_used.setdefault(role, {})[int(b)] = th
            log(f"costs at batch {b}: " + ", ".join(f"{r} {per_batch[r][int(b)]['total']:.2f} ms" for r in variants))
    return _record(engines, repeats, per_batch, threads_used)


def _record(
    engines: EngineSet,
    repeats: int,
    per_batch: dict[Role, dict[int, dict[str, float]]],
    threads_used: dict[Role, dict[int, int | None]],
) -> CostRecord:
    router, large = engines.router, engines.large
    roles = {
        role: RoleCosts(
            engines.entries[role].file, engines.entries[role].sha256, engines.entries[role].precision, ms, threads_used[role]
        )
        for role, ms in per_batch.items()
    }
    return CostRecord(
        backend=engines.backend,
        device=engines.device,
        roles=roles,
        # the runtime reuses the router's crops for the large model when both crop alike (its crop is then free)
        shared_crop=bool(router is not None and large is not None and same_crop(router.card, large.card)),
        measured=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        machine={"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None},
        repeats=repeats,
    )


def measure_costs_dir(
    engine_dir: str | os.PathLike,
    backend: str = "ort",
    device: str = "cpu",
    threads: int | None = None,
    batches: Sequence[int] = COST_BATCHES,
) -> CostRecord:
    """`measure_costs` on an engine dir opened with `EngineSet.load` (router, small and large as present)."""
    with EngineSet.load(engine_dir, LoadOptions(backend, device, threads, with_detector=False)) as engines:
        return measure_costs(engines, batches, threads=threads)


def store_costs(engine_dir: str | os.PathLike, record: CostRecord) -> Path:
    """Write a cost record into the manifest's `notes.costs["<backend>/<device>"]` (atomically, the rest kept)."""
    with updating_manifest(engine_dir, f"store costs {record.backend}/{record.device}") as manifest:
        manifest.set_costs(record)
    return Path(engine_dir) / MANIFEST_NAME


# -- what a route costs ------------------------------------------------------------------------------------------
COST_BATCH = 8  # the batch the cost lines quote: a busy frame's micro-batch (batch 1 is the latency view)


def model_costs(record: CostRecord | None, batch: int = COST_BATCH) -> ModelCosts | None:
    """The record at (the measured batch nearest) `batch` as the policies read it; None without small and large
    figures. A router that was not measured costs infinity (a policy that reads it cannot be priced)."""
    if record is None:
        return None
    small, large = record.ms(Role.SMALL, batch), record.ms(Role.LARGE, batch)
    if small is None or large is None:
        return None
    router = record.ms(Role.ROUTER, batch)
    return ModelCosts(
        small=small,
        large=large,
        router=router if router is not None else math.inf,
        batch=batch,
        large_crop=record.ms(Role.LARGE, batch, "crop") or 0.0,
        shared_crop=record.shared_crop,
    )


def break_even(policy: Policy, costs: ModelCosts) -> float | None:
    """The largest share of persons `policy` may leave to the large model and still be no slower than large-only
    (its cost is linear in the share); None when no share pays (its fixed part costs at least the large model)."""
    at0, at1 = policy.cost(costs, 0.0), policy.cost(costs, 1.0)
    if not math.isfinite(at0) or at0 >= costs.large:
        return None
    slope = at1 - at0
    return 1.0 if slope <= 0 else min(1.0, (costs.large - at0) / slope)


def speedup(policy: Policy, costs: ModelCosts, share: float) -> float:
    """Persons/s against large-only when `share` end on the large model (> 1: the route pays)."""
    return costs.large / policy.cost(costs, share)


def cost_line(costs: ModelCosts, policy: Policy, share: float | None, where: str = "") -> tuple[int, str]:
    """(logging level, one line) saying whether `policy` can pay by the measured costs, and its break-even share;
    `share`: the share of persons it sends to the large model, if known."""
    head = f"{where}: " if where else ""
    parts = f"per crop at batch {costs.batch}: small {costs.small:.1f} ms, large {costs.large:.1f} ms"
    parts += f", router {costs.router:.1f} ms" if policy.needs_router else ""
    be = break_even(policy, costs)
    name = f"route {policy}"
    if be is None:
        what = "its fixed part (the small model" + (" plus the router" if policy.needs_router else "") + ")"
        return logging.WARNING, (
            f"{head}{name} cannot pay: {what} costs at least as much as the large model alone ({parts}); it is slower "
            "than all-large at any share"
        )
    if share is None:
        return logging.INFO, (
            f"{head}{name} beats large-only while it leaves under {be:.0%} of the persons to the large model "
            f"(break-even; at most {speedup(policy, costs, 0.0):.2f}x at 0%; {parts})"
        )
    slower = share > be + 1e-9
    return logging.WARNING if slower else logging.INFO, (
        f"{head}{name} leaves {share:.0%} of the persons to the large model: {speedup(policy, costs, share):.2f}x "
        f"large-only by the measured costs, {'slower' if slower else 'faster'} than large-only (break-even "
        f"{be:.0%}; {parts})"
    )


def known_share(policy: Policy, manifest: Manifest) -> float | None:
    """The share of persons a policy leaves to the large model when it is known without data: fixed by the
    policy, or measured by `dynpose-train-router --calibrate` for this very policy."""
    fixed = policy.fixed_share()
    if fixed is not None:
        return fixed
    cal = manifest.calibration
    return cal.fraction if cal is not None and cal.policy == str(policy) else None


def log_route_costs(manifest: Manifest, policy: Policy, backend: str, device: str, where: str = "") -> str | None:
    """Log one line on whether `policy` pays on this backend/device, when the manifest holds measured costs
    (`dynpose-bench --store-costs`); returns the line (None: no costs stored, or nothing to say for all-large).
    Before it, a warning for each way a calibrated route's figures no longer apply (`agreement.calibration_warnings`:
    models re-exported, footage changed since the calibration)."""
    for line in calibration_warnings(manifest, policy, where):
        log.warning("%s", line)
    if policy.fixed_share() == 1.0:
        return None
    costs = model_costs(manifest.costs(backend, device))
    if costs is None or (policy.needs_router and not math.isfinite(costs.router)):
        return None  # nothing measured (or not the router this route needs): no claim either way
    level, line = cost_line(costs, policy, known_share(policy, manifest), where)
    log.log(level, "%s", line)
    return line


def cost_lines(record: CostRecord, batch: int = COST_BATCH) -> list[str]:
    """Human lines: per-crop ms of each role at `batch` and what it means for routing with the router."""
    from dynpose.runtime.policy import Threshold

    lines = []
    for role, r in record.roles.items():
        b = min(r.ms, key=lambda k: abs(k - batch))
        ms = r.ms[b]
        lines.append(
            f"cost {role.value:<6} {ms['total']:7.2f} ms/crop at batch {b} (crop {ms['crop']:.2f}, infer "
            f"{ms['infer']:.2f}, decode {ms['decode']:.2f}; {r.precision}, {r.threads.get(b) or '-'} threads)"
        )
    costs = model_costs(record, batch)
    if costs is not None and math.isfinite(costs.router):
        # any router policy has this cost line; a threshold stands for them all
        lines.append(cost_line(costs, Threshold(0.5), None)[1].replace("route threshold:0.5", "routing"))
    return lines
