"""Request bodies that cannot hold the ingress: a deadline per body and a bound on the slow ones.

Serve's HTTP proxy (uvicorn) hands a request to an ingress replica as soon as its headers are in; the body then
streams through the proxy while the request holds one of the replica's `--max-ongoing` slots. A client that sends
headers and then a trickle of body (slowloris) holds its slot for as long as it likes: 80 such clients held all 64
slots and the service answered nobody. Ray Serve's proxy offers no body or header timeout of its own (its
`request_timeout_s` is end to end, `keep_alive_timeout_s` only for idle connections between requests), so the
ingress bounds the read itself:

- every body must be complete within `--body-timeout-s` of the request reaching the ingress;
- at most `slow_bodies` uploads (a quarter of `--max-ongoing`) may still be arriving `SLOW_AFTER_S` after they
  started; past that the slowest of them (fewest bytes per second) are cut at once, so a flood of stalled uploads
  is cleared within a second or two and the other slots stay free for clients that send their bodies.

A cut upload is answered 408 with `Connection: close`, so the proxy closes the connection instead of keeping it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from dynpose.serve.http import HttpError, read_body

# An upload still arriving this long after it started counts as slow (a whole image body from a client on any
# usable link takes well under a second; a slow one is cut only when there are more than `slow_bodies` of them).
SLOW_AFTER_S = 1.0
WATCH_EVERY_S = 0.25


@dataclass(eq=False)
class _Upload:
    started: float
    expected: int | None  # Content-Length, when given
    received: int = 0
    task: asyncio.Task[bytes] | None = None
    cut: str | None = None  # why the guard cut it

    def rate(self, now: float) -> float:
        return self.received / max(now - self.started, 1e-3)

    def progress(self, now: float) -> str:
        of = f" of {self.expected:,}" if self.expected is not None else ""
        return f"{self.received:,}{of} bytes arrived in {now - self.started:.1f} s"


class UploadGuard:
    """Reads request bodies for one ingress replica (one event loop): `await guard.read(stream, headers)`."""

    def __init__(self, limit_bytes: int, timeout_s: float, slow_bodies: int, slow_after_s: float = SLOW_AFTER_S) -> None:
        self.limit_bytes = limit_bytes
        self.timeout_s = timeout_s
        self.slow_bodies = slow_bodies
        self.slow_after_s = slow_after_s
        self.uploads: set[_Upload] = set()
        self.cut = 0  # uploads cut so far (slow, or past the deadline)
        self._watchdog: asyncio.Task[None] | None = None

    async def read(self, stream: AsyncIterator[bytes], headers: Mapping[str, str]) -> bytes:
        """The whole body (`http.read_body`'s 413 / 400 checks), or a 408 HttpError when it is cut."""
        declared = headers.get("content-length")
        up = _Upload(time.monotonic(), int(declared) if declared is not None and declared.isdigit() else None)

        async def counted() -> AsyncIterator[bytes]:
            async for chunk in stream:
                up.received += len(chunk)
                yield chunk

        up.task = asyncio.ensure_future(read_body(counted(), headers, self.limit_bytes))
        self.uploads.add(up)
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch())
        try:
            await asyncio.wait({up.task}, timeout=self.timeout_s)
        finally:  # also when this request is cancelled (the client went away): stop reading for it
            self.uploads.discard(up)
            if not up.task.done():
                up.task.cancel()
        if up.task.done() and not up.task.cancelled():
            return up.task.result()  # or read_body's HttpError (413, 400), or the client's disconnect
        self.cut += 1
        now = time.monotonic()
        why = up.cut or f"request body: not complete within {self.timeout_s:g} s (--body-timeout-s)"
        raise HttpError(408, f"{why}: {up.progress(now)}; send the whole body at once, then retry", close=True)

    async def _watch(self) -> None:
        """While uploads are arriving: cut the slowest of those past `slow_after_s` beyond `slow_bodies`."""
        try:
            while self.uploads:
                await asyncio.sleep(WATCH_EVERY_S)
                now = time.monotonic()
                slow = [u for u in self.uploads if now - u.started >= self.slow_after_s and u.cut is None]
                for u in sorted(slow, key=lambda u: u.rate(now))[: max(0, len(slow) - self.slow_bodies)]:
                    u.cut = f"request body: the slowest of {len(slow)} slow uploads (at most {self.slow_bodies} are kept)"
                    if u.task is not None:
                        u.task.cancel()
        finally:
            self._watchdog = None

    def stats(self) -> dict[str, Any]:
        return {"arriving": len(self.uploads), "cut": self.cut}
