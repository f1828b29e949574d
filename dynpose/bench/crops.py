"""The crop benchmark: plans run by a worker per model (crop, router or the cascade's first pass when the policy
reads it, both pose models at once, decode), the way the runtime runs a micro-batch, for large-only, small-only,
DynPose at routing fractions and any routing policies asked for (e.g. the calibrated route). A sample's calls run
as a Pipeline runs consecutive batches: a cascade keeps two in flight (`execute_many`, depth 2), so its small pass
over the next call overlaps the large model's escalations; each row says the share the cascade escalated.

Baselines run the model alone with every core (`timing.solo_models`); the routed configurations run on the engine
set's models as the runtime loads them (on ONNX Runtime CPU: router on every core, small and large on half each,
at the same time). Work per timed sample: one call of `batch` synthetic boxes, or (with real images and
detections) one pass over every real box in calls of `batch` boxes, so a policy that reads the router decides on
real crops."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynpose.bench.options import BenchOptions
from dynpose.bench.timing import (
    Rounds,
    RoundSpec,
    boxes_for_batch,
    fastest,
    percentile_ms,
    solo_models,
    synthetic_frame,
    threads_of,
    timed_rounds,
)
from dynpose.errors import DynPoseError
from dynpose.roles import Role
from dynpose.runtime.boxes import Boxes
from dynpose.runtime.engine_set import EngineSet
from dynpose.runtime.execute import LocalExecutor, execute_many
from dynpose.runtime.model import CropModel
from dynpose.runtime.person import Decision
from dynpose.runtime.plan import LARGE, FrameInput, make_plan
from dynpose.runtime.policy import AllLarge, AllSmall, Fraction, Policy, parse_policy

REF = "large-only"
REF_SPLIT = "large-only (split threads)"  # the large model alone on the share of cores the runtime gives it
REFS = (REF, REF_SPLIT)


@dataclass
class CropWork:
    """What one timed sample runs: plan calls, each (images, boxes per image)."""

    calls: list[tuple[list[np.ndarray], list[np.ndarray]]]
    source: str  # "synthetic" | "real"

    @property
    def crops(self) -> int:
        return sum(len(b) for _, boxes in self.calls for b in boxes)


def synthetic_work(batch: int, seed: int = 0) -> CropWork:
    """One call of `batch` seeded person-shaped boxes on a seeded textured frame (model cost does not depend on
    the pixels; a policy that reads the router then routes noise, so its fraction is only nominal)."""
    frame = synthetic_frame(seed)
    return CropWork([([frame], [boxes_for_batch(batch, frame.shape[:2], seed=seed + batch)])], "synthetic")


def real_work(frames: Sequence[tuple[np.ndarray, np.ndarray]], batch: int) -> CropWork:
    """Every box of the real frames ((image, boxes (M,>=4)) each), in order, cut into calls of `batch` boxes; a
    call spanning two images passes both (as the Pipeline's micro-batches do)."""
    flat = [(i, b) for i, (_, boxes) in enumerate(frames) for b in np.asarray(boxes, np.float64)[:, :4]]
    if not flat:
        raise DynPoseError("crop benchmark: the real images have no usable boxes; check --detections")
    calls = []
    for a in range(0, len(flat), batch):
        chunk = flat[a : a + batch]
        ids = list(dict.fromkeys(i for i, _ in chunk))
        calls.append(([frames[i][0] for i in ids], [np.stack([b for j, b in chunk if j == i]) for i in ids]))
    return CropWork(calls, "real")


def _frames(images: list[np.ndarray], boxes: list[np.ndarray]) -> list[FrameInput]:
    return [FrameInput(im, Boxes.of(b, im.shape)) for im, b in zip(images, boxes, strict=True)]


ESCALATED = "escalated"  # the counts' key for persons a cascade ran again on the large model


class Config:
    """One timed configuration: a policy and the models it runs on, a worker each (what a Pipeline runs)."""

    def __init__(self, policy: Policy, models: dict[Role, CropModel]) -> None:
        self.policy = policy
        self.models = models
        self.cards = {r: m.card for r, m in models.items()}
        self.executor = LocalExecutor(models)

    def run(self, calls: Sequence[tuple[list[np.ndarray], list[np.ndarray]]]) -> dict[Role | str, int]:
        """The calls, planned and run as a Pipeline runs consecutive batches (a cascade keeps two in flight, so the
        small model runs the next call while the large one escalates); persons each model answered for, and the
        cascade's escalations."""
        plans = (
            make_plan(
                [FrameInput(im, Boxes.of(b, im.shape)) for im, b in zip(images, boxes, strict=True)], self.policy, self.cards
            )
            for images, boxes in calls
        )
        counts: dict[Role | str, int] = {Role.SMALL: 0, Role.LARGE: 0, ESCALATED: 0}
        for res in execute_many(plans, self.executor, depth=2 if self.policy.cascades else 1):
            large = int((res.model == LARGE).sum())
            counts[Role.SMALL] += len(res.model) - large
            counts[Role.LARGE] += large
            counts[ESCALATED] += sum(d is Decision.ESCALATED for d in res.decision)
        return counts

    def threads(self) -> dict[str, int | None]:
        return {r.value: threads_of(h) for r, h in self.models.items()}

    def close(self) -> None:
        self.executor.close()


def configurations(
    engines: EngineSet, solo: dict[Role, CropModel], fractions: Sequence[float], policies: Sequence[str]
) -> dict[str, Config]:
    """name -> Config: baselines on the solo models, then DynPose at each fraction, then policies."""
    small, large = engines.pose_models
    s_solo, l_solo = solo[Role.SMALL], solo[Role.LARGE]
    pair = {Role.SMALL: small, Role.LARGE: large}
    out = {
        REF: Config(AllLarge(), {Role.SMALL: s_solo, Role.LARGE: l_solo}),
        "small-only": Config(AllSmall(), {Role.SMALL: s_solo, Role.LARGE: l_solo}),
    }
    if threads_of(l_solo) != threads_of(large):
        # On a busy machine one session with every core can be slower than one with half of them (its threads wait
        # for cores other work holds): both baselines run, and ratios are taken to the faster one.
        out[REF_SPLIT] = Config(AllLarge(), dict(pair))
    if fractions and engines.router is None:
        raise DynPoseError(
            "the engine dir has no router, so DynPose at routing fractions cannot run; export one "
            "(`dynpose-export --model router`) into it, or pass --fractions '' with router-free --policies"
        )
    router = {Role.ROUTER: engines.router} if engines.router is not None else {}
    for f in fractions:
        out[f"dynpose@{f:g}"] = Config(Fraction(float(f)), {**pair, **router})
    for text in policies:
        p = parse_policy(text)
        if p.needs_router and engines.router is None:
            raise DynPoseError(f"--policies {p}: needs a router, the engine dir has none")
        if str(p) not in out:
            out[str(p)] = Config(p, {**pair, **(router if p.needs_router else {})})
    return out


def _row(batch: int, name: str, config: Config, work: CropWork, rounds: Rounds, counts: dict, ref: str) -> dict:
    policy = str(config.policy)
    s = rounds.samples[name]
    ci = rounds.ci(name, ref)
    n_calls = len(work.calls)
    frac = config.policy.fixed_share() if name.startswith("dynpose@") else None
    large, small = counts.get(Role.LARGE, 0), counts.get(Role.SMALL, 0)
    return {
        "batch": batch,
        "config": "dynpose" if frac is not None else name,
        "fraction": frac,
        "policy": policy,
        "crops": work.crops,
        "crops_per_s": work.crops / float(np.median(s)),
        "latency_ms_p50": percentile_ms(s, 50) / n_calls,
        "latency_ms_p95": percentile_ms(s, 95) / n_calls,
        "ratio_vs_large": ci.ratio,
        "ratio_ci": [ci.lo, ci.hi] if np.isfinite(ci.half_width) else None,
        "ratio_half_width": ci.half_width if np.isfinite(ci.half_width) else None,
        "num_large": large,
        "num_small": small,
        "large_share": large / max(1, large + small),
        "escalated_share": counts.get(ESCALATED, 0) / max(1, large + small) if config.policy.cascades else None,
        "threads": config.threads(),
        "reference": name == ref,
        "samples_ms": [x * 1e3 for x in s],
    }


def _timed_batch(
    configs: dict[str, Config], work: CropWork, opts: BenchOptions, log: Callable[[str], None]
) -> tuple[Rounds, dict[str, dict[Role | str, int]]]:
    """Time every configuration on one batch's work; returns the rounds and each configuration's routing counts."""
    counts: dict[str, dict[Role | str, int]] = {}

    def call(name: str) -> Callable[[], None]:
        config = configs[name]

        def fn() -> None:
            counts[name] = config.run(work.calls)

        return fn

    def progress(msg: str) -> None:
        log(f"{work.crops} crops: {msg}")

    refs = [r for r in REFS if r in configs]
    rounds = timed_rounds({n: call(n) for n in configs}, refs, opts.rounds or RoundSpec(), opts.seed, progress)
    return rounds, counts


def crop_benchmark(
    engines: EngineSet,
    opts: BenchOptions,
    frames: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows, timing) for `opts.batches` x the configurations (`opts.fractions`, `opts.policies`), timed as
    `opts.rounds` says: rows are {batch, config, fraction, policy, crops_per_s, latency_ms_p50/p95, ratio_vs_large,
    ratio_ci, large_share, threads, ...}, timing per batch {batch, rounds, stopped, elapsed_s, others_cores}."""
    rows: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
    with solo_models(engines, opts.threads) as solo:
        configs = configurations(engines, solo, opts.fractions, opts.policies)
        try:
            for b in opts.batches:
                work = real_work(frames, b) if frames else synthetic_work(b, opts.seed)
                log(f"batch {b}: {len(configs)} configurations, {work.crops} {work.source} crops per sample")
                rounds, counts = _timed_batch(configs, work, opts, log)
                ref = fastest(rounds.samples, [r for r in REFS if r in configs])
                rows += [_row(b, n, cfg, work, rounds, counts[n], ref) for n, cfg in configs.items()]
                timing.append(
                    {
                        "batch": b,
                        "reference": ref,
                        "rounds": rounds.rounds,
                        "stopped": rounds.stopped,
                        "elapsed_s": rounds.elapsed_s,
                        "others_cores": rounds.others_cores,
                    }
                )
        finally:
            for config in configs.values():
                config.close()
    return rows, timing
