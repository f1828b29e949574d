"""`Client`: the Python side of `POST /v1/pose` (standard library only: no Ray, no requests).

    from dynpose.serve import Client
    client = Client("http://127.0.0.1:8000", timeout=30, retries=5)
    persons = client.pose(cv2.imread("photo.jpg"), boxes=dets)      # -> list[Person]

`pose(image_bgr)` sends the image PNG-encoded (lossless: the service sees exactly the pixels given, so its answer
equals an in-process `Pipeline` on that array); `pose_file(path)` / `pose_bytes(data)` send a JPEG or PNG file as
it is. Connection errors (refused, reset, dropped) and 503s (a replica restarting, the service draining) are retried
with exponential backoff, honouring Retry-After; a 4xx is a `ServiceError` at once (retrying would not help); a
request that times out is not retried (the service may still be working on it). One `Client` may be shared by
threads: each thread keeps its own keep-alive connection.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.runtime.person import Person

RETRY_STATUSES = (502, 503, 504)
_CONNECTION_ERRORS = (ConnectionError, http.client.HTTPException)  # refused, reset, dropped, a cut-off answer


class ServiceError(DynPoseError):
    """The service refused a request (`status` 4xx/5xx, its one-line `{"error"}`) or could not be reached
    (`status` None)."""

    def __init__(self, message: str, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass
class PoseAnswer:
    """A decoded `/v1/pose` answer: the persons, crops per model, the route used and the service's stage times."""

    persons: list[Person]
    crops: dict[str, int] = field(default_factory=dict)
    route: str = ""
    timing_ms: dict[str, float] = field(default_factory=dict)
    attempts: int = 1


def _boxes_json(boxes: Any) -> list[list[float]] | None:
    if boxes is None:
        return None
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return []
    b = b[None] if b.ndim == 1 else b
    return [[float(v) for v in row] for row in b]


class Client:
    """A DynPose service at `url` (e.g. http://127.0.0.1:8000). timeout: seconds per attempt; retries: further
    attempts after a connection error or a 503 (0: none); backoff_s: the first wait, doubled each retry."""

    def __init__(
        self, url: str = "http://127.0.0.1:8000", timeout: float = 30.0, retries: int = 5, backoff_s: float = 0.2
    ) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DynPoseError(f"service URL {url!r}: expected http://HOST:PORT")
        if timeout <= 0 or retries < 0 or backoff_s < 0:
            raise DynPoseError("Client: timeout must be > 0, retries and backoff_s >= 0")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port or (443 if self._https else 80)
        self._base = parts.path.rstrip("/")
        self.timeout, self.retries, self.backoff_s = float(timeout), int(retries), float(backoff_s)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.retried = 0  # attempts repeated so far, over all threads (the load generator reports it)

    # -- pose ------------------------------------------------------------------------------------------------------
    def pose(self, image_bgr: np.ndarray, boxes: Any = None, route: str | None = None) -> list[Any]:
        """Persons (`Person`) in a BGR uint8 image; boxes (M,4|5) x,y,w,h[,score] or None (the service's
        detector finds them); route: a routing policy for this request (default: the service's)."""
        import cv2

        if not isinstance(image_bgr, np.ndarray) or image_bgr.dtype != np.uint8 or image_bgr.ndim not in (2, 3):
            raise DynPoseError("Client.pose: image must be a uint8 BGR numpy array (as cv2.imread gives)")
        ok, png = cv2.imencode(".png", image_bgr)
        if not ok:
            raise DynPoseError(f"Client.pose: cannot PNG-encode an image of shape {image_bgr.shape}")
        return self.pose_bytes(png.tobytes(), boxes, route).persons

    def pose_file(self, path: str | os.PathLike, boxes: Any = None, route: str | None = None) -> PoseAnswer:
        """Persons in an image file, sent as it is (JPEG, PNG, ...)."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DynPoseError(f"image {path}: cannot be read ({e.strerror or e})") from None
        return self.pose_bytes(data, boxes, route)

    def pose_bytes(self, data: bytes, boxes: Any = None, route: str | None = None) -> PoseAnswer:
        """Persons in an encoded image (the file's bytes), as a `PoseAnswer`."""
        payload: dict[str, Any] = {"image": base64.b64encode(data).decode("ascii")}
        if boxes is not None:
            payload["boxes"] = _boxes_json(boxes)
        if route is not None:
            payload["route"] = route
        d, attempts = self.request("POST", "/v1/pose", json.dumps(payload).encode(), "application/json")
        return PoseAnswer(
            persons=[Person.from_dict(p) for p in d["persons"]],
            crops=d.get("crops", {}),
            route=d.get("route", ""),
            timing_ms=d.get("timing_ms", {}),
            attempts=attempts,
        )

    # -- other endpoints -------------------------------------------------------------------------------------------
    def healthy(self) -> bool:
        """True when `/healthz` answers 200 (every deployment up); False when it cannot be reached or is not ready."""
        try:
            self._once("GET", "/healthz", None, None)
            return True
        except (ServiceError, OSError, *_CONNECTION_ERRORS):
            return False

    def wait_healthy(self, timeout_s: float = 120.0, interval_s: float = 0.5) -> None:
        """Block until `/healthz` answers 200, or raise a ServiceError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.url}: not healthy after {timeout_s:g} s (is dynpose-serve running?)")
            time.sleep(interval_s)

    def info(self) -> dict[str, Any]:
        return self.request("GET", "/v1/info")[0]

    def stats(self) -> dict[str, Any]:
        return self.request("GET", "/v1/stats")[0]

    # -- transport -------------------------------------------------------------------------------------------------
    def request(
        self, method: str, path: str, body: bytes | None = None, ctype: str | None = None
    ) -> tuple[dict[str, Any], int]:
        """The answer's JSON and the attempts it took; retries connection errors and 503s (see the class note)."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.retried += 1
            try:
                return self._once(method, path, body, ctype), attempt + 1
            except ServiceError as e:
                if e.status not in RETRY_STATUSES:
                    raise
                last, wait = str(e), e.retry_after_s
            except TimeoutError:
                self._drop_connection()
                raise ServiceError(f"{self.url}{path}: no answer within {self.timeout:g} s (timeout)") from None
            except (OSError, *_CONNECTION_ERRORS) as e:
                self._drop_connection()
                last, wait = f"{self.url}{path}: {type(e).__name__}: {e}", None
            if attempt < self.retries:
                time.sleep(min(10.0, wait if wait is not None else self.backoff_s * 2**attempt))
        raise ServiceError(f"{last} (gave up after {self.retries + 1} attempts)")

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _once(self, method: str, path: str, body: bytes | None, ctype: str | None) -> dict[str, Any]:
        conn = self._connection()
        headers = {"Content-Type": ctype} if ctype else {}
        try:
            conn.request(method, self._base + path, body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except BaseException:
            self._drop_connection()  # a half-used connection cannot take the next request
            raise
        if resp.getheader("Connection", "").lower() == "close":
            self._drop_connection()
        try:
            d = json.loads(raw) if raw else {}
        except ValueError:
            d = {"error": raw[:200].decode("utf-8", "replace").strip()}
        if resp.status >= 400:
            msg = d.get("error", "") if isinstance(d, dict) else ""
            retry_after = resp.getheader("Retry-After") or ""
            wait = float(retry_after) if retry_after.isdigit() else None
            raise ServiceError(f"{self.url}{path}: HTTP {resp.status}: {msg or resp.reason}", resp.status, wait)
        if not isinstance(d, dict):
            raise ServiceError(f"{self.url}{path}: the answer is not a JSON object", resp.status)
        return d

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        self._drop_connection()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
