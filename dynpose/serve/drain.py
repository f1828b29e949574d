"""The drain: when the service stops (SIGTERM, Ctrl-C, `Service.stop()`), every request already inside it is answered
before Serve and Ray go down; requests that arrive meanwhile get 503 + Retry-After + `Connection: close`.

Serve's own shutdown (`serve.shutdown`, `serve.delete`) stops the HTTP proxy, the ingress and the model deployments
together, so a request inside the ingress loses its connection, or the model replica it was about to call (8 of 8
clients in flight got "Remote end closed connection"). So the driver drains first, through a small named Ray actor
started with the service (`DrainControl`; its name travels to the replicas in `ServeConfig.drain_actor`):

1. `drain_requests` tells the control actor; every ingress replica's `DrainWatch` has a call pending on it, which
   returns now: from then on the replica refuses new requests (`HttpError` 503) and reports, every `REPORT_EVERY_S`,
   how many it still has in flight;
2. the driver waits until every replica that reported has none left (reports older than `STALE_S` are from a
   replica that is gone), at least `MIN_DRAIN_S` and at most `--drain-timeout-s`;
3. only then does `Service.stop` shut Serve (and a cluster it started) down.

A replica that never answered a request never watches (it has nothing to drain). An app deployed without `Service`
(a Serve config file) has no control actor: nothing drains it but Serve's own graceful shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

log = logging.getLogger(__name__)

NAMESPACE = "dynpose"
REPORT_EVERY_S = 0.2
STALE_S = 2.0  # a replica silent this long is gone (its requests with it)
MIN_DRAIN_S = 1.0  # every replica's pending call returns and it reports well within this


@ray.remote(num_cpus=0)
class DrainControl:
    """Where the driver says "drain" and the ingress replicas say how many requests they still hold."""

    def __init__(self) -> None:
        self.draining = asyncio.Event()
        self.reports: dict[str, tuple[int, float]] = {}

    async def start(self) -> None:
        self.draining.set()

    async def wait(self) -> None:
        """Returns once the drain has started (each ingress replica keeps one such call pending)."""
        await self.draining.wait()

    async def report(self, replica: str, in_flight: int) -> None:
        self.reports[replica] = (in_flight, time.monotonic())

    async def in_flight(self) -> int:
        """Requests still in flight over the replicas that reported lately."""
        now = time.monotonic()
        return sum(n for n, at in self.reports.values() if now - at < STALE_S)


def start_control(app_name: str) -> tuple[Any, str]:
    """A new control actor for this service (owned by this driver: it goes when the driver goes); (handle, name)."""
    name = f"drain-{app_name}-{uuid.uuid4().hex[:12]}"
    return DrainControl.options(name=name, namespace=NAMESPACE).remote(), name  # type: ignore[attr-defined]


def drain_requests(control: Any, timeout_s: float) -> int:
    """Start the drain and wait until no ingress replica holds a request (see the module note); returns the number
    still in flight when `timeout_s` ran out (0: drained)."""
    t0 = time.monotonic()
    ray.get(control.start.remote())
    while True:
        left = int(ray.get(control.in_flight.remote()))
        waited = time.monotonic() - t0
        if (left == 0 and waited >= MIN_DRAIN_S) or waited >= timeout_s:
            return left
        time.sleep(0.1)


class DrainWatch:
    """The ingress replica's side: counts its requests in flight, learns when the service drains, then reports."""

    def __init__(self, control_name: str | None) -> None:
        self.control_name = control_name
        self.replica = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.in_flight = 0
        self.draining = False
        self._task: asyncio.Task[None] | None = None

    @contextmanager
    def request(self) -> Iterator[None]:
        """Around each HTTP request (inside the replica's event loop)."""
        if self._task is None and self.control_name is not None:
            self._task = asyncio.ensure_future(self._watch())
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _watch(self) -> None:
        assert self.control_name is not None
        while True:
            try:
                control = await asyncio.to_thread(ray.get_actor, self.control_name, namespace=NAMESPACE)
                await control.wait.remote()
                break
            except Exception as e:  # no such actor (yet), or its driver went: nothing to drain for now
                log.debug("drain control %s: %s", self.control_name, e)
                await asyncio.sleep(5.0)
        self.draining = True
        while True:
            control.report.remote(self.replica, self.in_flight)
            await asyncio.sleep(REPORT_EVERY_S)
