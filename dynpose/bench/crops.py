"""The crop benchmark: one Dispatcher call per timed sample (crop, router when the policy needs it, both models on
their workers, decode), the way the runtime runs a micro-batch, for large-only, small-only and DynPose at fractions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dynpose.bench.timing import boxes_for_batch, percentile_ms, round_robin, synthetic_frame
from dynpose.errors import DynPoseError
from dynpose.runtime.dispatcher import Dispatcher
from dynpose.runtime.engine_set import EngineSet


def policies(fractions: Sequence[float]) -> dict[str, str]:
    """Configuration name -> routing policy: the two single-model baselines, then DynPose at each fraction."""
    out = {"large-only": "all-large", "small-only": "all-small"}
    out.update({f"dynpose@{f:g}": f"fraction:{f!r}" for f in fractions})
    return out


def _rows(
    batch: int, samples: dict[str, list[float]], pol: dict[str, str], counts: dict[str, dict[str, int]]
) -> list[dict[str, Any]]:
    base = batch / float(np.median(samples["large-only"]))
    rows = []
    for name, s in samples.items():
        cps = batch / float(np.median(s))
        frac = float(pol[name].split(":")[1]) if name.startswith("dynpose@") else None
        rows.append(
            {
                "batch": batch,
                "config": "dynpose" if frac is not None else name,
                "fraction": frac,
                "policy": pol[name],
                "crops_per_s": cps,
                "latency_ms_p50": percentile_ms(s, 50),
                "latency_ms_p95": percentile_ms(s, 95),
                "ratio_vs_large": cps / base,
                "num_large": counts[name]["large"],
                "num_small": counts[name]["small"],
                "samples_ms": [x * 1e3 for x in s],
            }
        )
    return rows


def _prefixed(log: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda msg: log(prefix + msg)


def crop_benchmark(
    engines: EngineSet,
    batches: Sequence[int],
    fractions: Sequence[float],
    repeats: int,
    warmup: int,
    frame: np.ndarray | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> list[dict[str, Any]]:
    """Rows of {batch, config, fraction, crops_per_s, latency_ms_p50/p95, ratio_vs_large, ...} (see module doc)."""
    if engines.router is None and fractions:
        raise DynPoseError(
            "the engine dir has no router, so DynPose at routing fractions cannot run; export one "
            "(`dynpose-export --role router`) into it"
        )
    frame = synthetic_frame() if frame is None else frame
    small, large = engines.pose_models
    pol = policies(fractions)
    dispatchers = {name: Dispatcher(small, large, router=engines.router, policy=p) for name, p in pol.items()}
    rows: list[dict[str, Any]] = []
    try:
        for b in batches:
            boxes = boxes_for_batch(b, frame.shape[:2], seed=b)
            counts: dict[str, dict[str, int]] = {}

            def call(name: str, boxes: np.ndarray = boxes, counts: dict = counts) -> Callable[[], None]:
                def fn() -> None:
                    counts[name] = dispatchers[name].run([frame], [boxes]).counts

                return fn

            log(f"batch {b}: {len(dispatchers)} configurations x {repeats} rounds (+{warmup} warm-up)")
            samples = round_robin(
                {n: call(n) for n in dispatchers}, repeats, warmup, progress=_prefixed(log, f"batch {b}: ")
            )
            rows += _rows(b, samples, pol, counts)
    finally:
        for d in dispatchers.values():
            d.close()
    return rows
