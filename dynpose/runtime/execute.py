"""Executors run a plan's work; drivers walk a plan through its stages.

    with LocalExecutor(models, flip=False) as ex:
        result = execute(make_plan(frames, policy, cards), ex)

`LocalExecutor` gives each model (router, small, large) a worker thread of its own
(`ThreadPoolExecutor(max_workers=1)`): on a CPU the ONNX Runtime / OpenVINO sessions then run in parallel on their
own share of the cores; GPU runners each own a CUDA stream, so the workers' launches overlap on the device. A
worker cuts its own crops (`Plan.crop`), a runner's max batch at a time, so a 10,000-box frame holds at most one
batch of crops per model in memory. The Ray Serve executor (`dynpose.serve.app`) runs the same `Work` on remote
deployments and is driven by `execute_async`.

`execute` runs one plan; `execute_many` keeps up to `depth` plans in flight, so while the large model works on
one batch's escalations the small model already runs the next batch (the cascade's overlap). Audit work goes to
the large model's worker after the answer's work and is never waited for: its results reach `on_audit`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Protocol

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.roles import Role
from dynpose.runtime.model import CropModel, PoseModel, Router
from dynpose.runtime.plan import AuditSample, Done, FrameInput, Plan, PlanResult, Work, make_plan
from dynpose.runtime.policy import AllLarge, AllSmall

AuditSink = Callable[[AuditSample], None]


class Executor(Protocol):
    """Runs work of a plan; each future yields the `Done` of one piece of it."""

    def submit(self, plan: Plan, work: Sequence[Work]) -> list[Future[Done]]: ...


class AsyncExecutor(Protocol):
    """Runs work of a plan from an event loop (the service's ingress)."""

    def run(self, plan: Plan, work: Sequence[Work]) -> Awaitable[list[Done]]: ...


class LocalExecutor:
    """A worker thread per model; see the module doc. The executor owns its threads (closed by `close()`), not the
    models' runners: whoever loaded them (an `EngineSet`) closes them. Thread-safe: concurrent plans queue on the
    per-model workers and never share mutable state."""

    def __init__(self, models: Mapping[Role, CropModel], flip: bool = False) -> None:
        self.models = dict(models)
        self.flip = flip
        self._workers = {r: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dynpose-{r.value}") for r in models}
        self._closed = False

    def submit(self, plan: Plan, work: Sequence[Work]) -> list[Future[Done]]:
        if self._closed:
            raise DynPoseError("executor is closed")
        futures = []
        for w in work:
            model = self.models.get(w.role)
            if model is None:
                raise DynPoseError(f"executor: the plan asks for the {w.role.value} model, which is not loaded")
            for piece in w.chunks(model.runner.max_batch):
                try:
                    futures.append(self._workers[w.role].submit(self._run, plan, piece))
                except RuntimeError:  # the pool was shut down by a concurrent close()
                    raise DynPoseError("executor is closed") from None
        return futures

    def _run(self, plan: Plan, work: Work) -> Done:
        """On the model's worker thread: crop, then router scores or keypoints in image pixels."""
        model = self.models[work.role]
        crops = plan.crop(work)
        if isinstance(model, Router):
            out = model.run(crops)
        else:
            assert isinstance(model, PoseModel)
            out = model.run(crops, *plan.geometry(work.role, work.idx), flip=self.flip)
        return Done(work, out, model.runner.last_inference)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers.values():
            w.shutdown(wait=True)

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class Audit:
    """How a driver samples audit work: the share of small-model answers also run on the large model, the random
    generator that picks them, and where their `AuditSample`s go."""

    def __init__(self, share: float, sink: AuditSink, seed: int | None = None) -> None:
        if not 0.0 <= share <= 1.0:
            raise DynPoseError(f"audit share {share}: must be in [0, 1]")
        self.share = share
        self.sink = sink
        self.rng = np.random.default_rng(seed)


def _finish(plan: Plan, executor: Executor, futures: list[Future[Done]], audit: Audit | None) -> PlanResult:
    while True:
        plan.take([f.result() for f in futures])
        work = plan.next_work()
        if not work:
            break
        futures = executor.submit(plan, work)
    result = plan.result()
    if audit is not None:
        _submit_audit(plan, executor, audit)
    return result


def _submit_audit(plan: Plan, executor: Executor, audit: Audit) -> None:
    work = plan.audit_work(audit.share, audit.rng)
    if not work:
        return
    futures = executor.submit(plan, work)
    pending = [len(futures)]
    done: list[Done] = []

    def collect(f: Future[Done]) -> None:
        if f.cancelled() or f.exception() is not None:
            return  # an audit never fails the run: a failed sample is simply not counted
        done.append(f.result())
        pending[0] -= 1
        if pending[0] == 0:
            audit.sink(plan.audit_sample(done))

    for f in futures:
        f.add_done_callback(collect)


def execute(plan: Plan, executor: Executor, audit: Audit | None = None) -> PlanResult:
    """Run every stage of `plan` and return its answer (audit work, if asked, is left running)."""
    return _finish(plan, executor, executor.submit(plan, plan.next_work()), audit)


def execute_many(
    plans: Iterable[Plan], executor: Executor, depth: int = 1, audit: Audit | None = None
) -> Iterator[PlanResult]:
    """Results of `plans` in order, with up to `depth` plans in flight (a plan's first stage is submitted before the
    plan ahead of it is finished). Plans are pulled lazily, so the caller may build the next one (read frames, run
    the detector) while the models work."""
    inflight: deque[tuple[Plan, list[Future[Done]]]] = deque()
    for plan in plans:
        inflight.append((plan, executor.submit(plan, plan.next_work())))
        while len(inflight) >= max(1, depth):
            ahead, futures = inflight.popleft()
            yield _finish(ahead, executor, futures, audit)
    while inflight:
        ahead, futures = inflight.popleft()
        yield _finish(ahead, executor, futures, audit)


async def execute_async(plan: Plan, executor: AsyncExecutor) -> PlanResult:
    """`execute` for an event loop: the same stages, each awaited."""
    while work := plan.next_work():
        plan.take(await executor.run(plan, work))
    return plan.result()


def run_both(
    frames: Sequence[FrameInput], cards: Mapping[Role, ModelCard], executor: Executor
) -> tuple[PlanResult, PlanResult]:
    """Both pose models on every person of `frames`, at once (a worker each): the small model's answers and the
    large model's, the data router training and label-free calibration compare."""
    plans = [make_plan(frames, AllSmall(), cards), make_plan(frames, AllLarge(), cards)]
    small, large = execute_many(plans, executor, depth=2)
    return small, large
