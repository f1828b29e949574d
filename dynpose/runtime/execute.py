"""Executors run a plan's work; drivers walk a plan through its stages.

    with LocalExecutor(models, flip=False) as ex:
        result = execute(make_plan(frames, policy, cards), ex)

`LocalExecutor` gives each model (router, small, large) a worker thread of its own: on a CPU the ONNX Runtime /
OpenVINO sessions then run in parallel on their own share of the cores; GPU runners each own a CUDA stream, so the
workers' launches overlap on the device. A worker cuts its own crops (`Plan.crop`), a runner's max batch at a time,
so a 10,000-box frame holds at most one batch of crops per model in memory. The Ray Serve executor
(`dynpose.serve.app`) runs the same `Work` on remote deployments and is driven by `execute_async`.

`execute` runs one plan; `execute_many` keeps up to `depth` plans in flight, so while the large model works on
one batch's escalations the small model already runs the next batch (the cascade's overlap). Audit work (`Audit`)
goes to the large model's worker and is never waited for: its results reach the audit's sink. A worker runs audit
work only when no answer's work waits (a lower priority), so an audit delays an answer by at most the one audit
batch already running; `Audit.max_pending` bounds the audits waiting for the model's idle time. `audit_async` does
the same for `execute_async`'s event loop (there the audit's crops join the large deployment's batches).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.roles import Role
from dynpose.runtime.model import CropModel, PoseModel, Router
from dynpose.runtime.plan import AuditSample, Done, FrameInput, Plan, PlanResult, Purpose, Work, make_plan
from dynpose.runtime.policy import AllLarge, AllSmall

AuditSink = Callable[[AuditSample], None]
log = logging.getLogger(__name__)


class Executor(Protocol):
    """Runs work of a plan; each future yields the `Done` of one piece of it."""

    def submit(self, plan: Plan, work: Sequence[Work]) -> list[Future[Done]]: ...


class AsyncExecutor(Protocol):
    """Runs work of a plan from an event loop (the service's ingress)."""

    def run(self, plan: Plan, work: Sequence[Work]) -> Awaitable[list[Done]]: ...


class _Worker:
    """One model's thread: runs its jobs one at a time, every answer's job before any audit's (priority 0 before 1),
    each priority in the order submitted."""

    ANSWER, AUDIT, STOP = 0, 1, 2

    def __init__(self, name: str) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[..., Any] | None, tuple[Any, ...], Future[Any] | None]]
        self._queue = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        f: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise DynPoseError("executor is closed")
            self._queue.put((priority, next(self._order), fn, args, f))
        return f

    def _loop(self) -> None:
        while True:
            _, _, fn, args, f = self._queue.get()
            if fn is None or f is None:
                return
            if not f.set_running_or_notify_cancel():
                continue
            try:
                f.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the future
                f.set_exception(e)

    def shutdown(self) -> None:
        """Run what was submitted (audits included), then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put((self.STOP, next(self._order), None, (), None))
        self._thread.join()


def run_work(model: CropModel, plan: Plan, work: Work, flip: bool = False) -> Done:
    """One piece of a plan's work on one model: crop, then router scores or keypoints in image pixels."""
    crops = plan.crop(work)
    if isinstance(model, Router):
        out = model.run(crops)
    else:
        assert isinstance(model, PoseModel)
        out = model.run(crops, *plan.geometry(work.role, work.idx), flip=flip)
    return Done(work, out, model.runner.last_inference)


class SerialExecutor:
    """A plan's work on the calling thread, one piece after the other, each model on all the cores its runner has:
    what the local workers do, in turn (benchmarks compare the two; the answers are the same)."""

    def __init__(self, models: Mapping[Role, CropModel], flip: bool = False) -> None:
        self.models, self.flip = dict(models), flip

    def submit(self, plan: Plan, work: Sequence[Work]) -> list[Future[Done]]:
        futures: list[Future[Done]] = []
        for w in work:
            f: Future[Done] = Future()
            f.set_result(run_work(self.models[w.role], plan, w, self.flip))
            futures.append(f)
        return futures


class LocalExecutor:
    """A worker thread per model; see the module doc. The executor owns its threads (closed by `close()`), not the
    models' runners: whoever loaded them (an `EngineSet`) closes them. Thread-safe: concurrent plans queue on the
    per-model workers and never share mutable state."""

    def __init__(self, models: Mapping[Role, CropModel], flip: bool = False) -> None:
        self.models = dict(models)
        self.flip = flip
        self._workers = {r: _Worker(f"dynpose-{r.value}") for r in models}
        self._closed = False

    def submit(self, plan: Plan, work: Sequence[Work]) -> list[Future[Done]]:
        if self._closed:
            raise DynPoseError("executor is closed")
        futures = []
        for w in work:
            model = self.models.get(w.role)
            if model is None:
                raise DynPoseError(f"executor: the plan asks for the {w.role.value} model, which is not loaded")
            priority = _Worker.AUDIT if w.purpose is Purpose.AUDIT else _Worker.ANSWER
            for piece in w.chunks(model.runner.max_batch):
                futures.append(self._workers[w.role].submit(priority, run_work, model, plan, piece, self.flip))
        return futures

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers.values():
            w.shutdown()

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


# Audited persons whose large-model results may be outstanding at once: beyond it a plan's audit is skipped (and
# counted), so a large model busier than the audit can wait for does not pile up audits (each holds its plan's
# frames) without bound, nor measure frames ever further behind.
MAX_PENDING_AUDIT = 512


class Audit:
    """How a driver samples audit work: the share of small-model answers also run on the large model, the random
    generator that picks them, and where their `AuditSample`s go. Thread-safe (concurrent plans share it).

    Every plan it audits sends one `AuditSample` to `sink`, also a plan where no person was picked (it still
    counts the plan's persons and small-model answers, which the routed agreement needs); a plan skipped because
    `max_pending` audited persons are outstanding sends nothing and is counted in `skipped`."""

    def __init__(self, share: float, sink: AuditSink, seed: int | None = None, max_pending: int = MAX_PENDING_AUDIT) -> None:
        if not (isinstance(share, (int, float)) and 0.0 <= share <= 1.0):
            raise DynPoseError(f"audit share {share}: must be a number in [0, 1] (the share of small-model answers)")
        self.share = float(share)
        self.sink = sink
        self.rng = np.random.default_rng(seed)
        self.max_pending = max_pending
        self.pending = 0  # audited persons whose results are outstanding
        self.skipped = 0  # audited persons of plans skipped because `max_pending` were outstanding
        self.failed = 0  # audited persons whose large-model run failed (never counted in the figures)
        self._lock = threading.Lock()

    def work(self, plan: Plan) -> list[Work] | None:
        """A completed plan's audit work ([] when nobody was picked); None when it is skipped."""
        with self._lock:
            work = plan.audit_work(self.share, self.rng)
            n = sum(len(w.idx) for w in work)
            if n and self.pending and self.pending + n > self.max_pending:  # one plan alone always goes
                self.skipped += n
                return None
            self.pending += n
            return work

    def finished(self, plan: Plan, done: Sequence[Done] | None, persons: int) -> None:
        """The audit of `plan` ended: its sample goes to the sink (`done` None: it failed and is not counted)."""
        with self._lock:
            self.pending -= persons
            if done is None:
                self.failed += persons
        if done is not None:
            self.sink(plan.audit_sample(done))


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
    work = audit.work(plan)
    if work is None:
        return
    n = sum(len(w.idx) for w in work)
    if not n:
        audit.finished(plan, [], 0)
        return
    try:
        futures = executor.submit(plan, work)
    except DynPoseError:  # the executor closed under us: the audit is lost, never the answer
        audit.finished(plan, None, n)
        return
    lock = threading.Lock()
    done: list[Done] = []
    left = [len(futures)]
    failed = [False]

    def collect(f: Future[Done]) -> None:
        # on the large model's worker (or here, when already done); the lock keeps the count right either way
        with lock:
            if f.cancelled() or f.exception() is not None:
                failed[0] = True  # an audit never fails the run: a failed sample is simply not counted
            else:
                done.append(f.result())
            left[0] -= 1
            last = left[0] == 0
        if last:
            audit.finished(plan, None if failed[0] else done, n)

    for f in futures:
        f.add_done_callback(collect)


def audit_async(plan: Plan, executor: AsyncExecutor, audit: Audit) -> asyncio.Task[None] | None:
    """Start a completed plan's audit on the event loop without waiting for it (the service's ingress); the task is
    returned (None when there is nothing to run) and kept alive until it ends."""
    work = audit.work(plan)
    if work is None:
        return None
    n = sum(len(w.idx) for w in work)
    if not n:
        audit.finished(plan, [], 0)
        return None

    async def run() -> None:
        try:
            done = await executor.run(plan, work)
        except Exception as e:  # a lost audit is counted, never raised: nobody awaits it
            log.debug("audit of %d person(s) failed: %s", n, e)
            audit.finished(plan, None, n)
            return
        audit.finished(plan, done, n)

    task = asyncio.get_running_loop().create_task(run())
    _AUDIT_TASKS.add(task)
    task.add_done_callback(_AUDIT_TASKS.discard)
    return task


_AUDIT_TASKS: set[asyncio.Task[None]] = set()  # the event loop keeps only weak references to its tasks


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
