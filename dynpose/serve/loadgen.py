"""`dynpose-serve bench`: a closed-loop load generator for a running service.

C client threads each send their next request as soon as the last one is answered, N requests in all, cycling over
the images of a folder (sent as their files' bytes, with their boxes from a COCO detections file when given, else
for the service's detector). It reports requests/s, crops/s, latency percentiles (as the client sees them,
retries included), errors, retries, and the batch sizes the pose deployments formed during the run (the
difference of `/v1/stats` before and after).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.roles import Role
from dynpose.serve.client import Client


@dataclass(frozen=True)
class LoadItem:
    """One image to send: its name, file bytes and boxes (None: the service's detector)."""

    name: str
    data: bytes
    boxes: np.ndarray | None


def load_items(images: str | Path, detections: str | Path | None = None, det_score: float = 0.0) -> list[LoadItem]:
    """The images of a folder (or one image), with their detections by COCO image id (numeric file stems)."""
    from dynpose.data import IMAGE_SUFFIXES, load_detections

    root = Path(images)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise DynPoseError(f"--images {images}: not found; give a folder of images or one image")
    if not files:
        raise DynPoseError(f"--images {images}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    dets = load_detections(detections, score_thr=det_score) if detections is not None else None
    items = []
    for p in files:
        boxes = None
        if dets is not None:
            boxes = dets.get(int(p.stem), np.zeros((0, 5))) if p.stem.isdigit() else np.zeros((0, 5))
        items.append(LoadItem(p.name, p.read_bytes(), boxes))
    if dets is not None and not any(it.boxes is not None and len(it.boxes) for it in items):
        raise DynPoseError(f"--detections {detections}: no boxes for any image under {images} (ids are numeric file stems)")
    return items


def _percentiles(lat_s: Sequence[float]) -> dict[str, float | None]:
    if not lat_s:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    a = np.asarray(lat_s) * 1e3
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p95_ms": round(float(np.percentile(a, 95)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def _hist_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    d = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(d.items(), key=lambda kv: int(kv[0])) if v > 0}


def batch_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per pose model: the batches formed between two `/v1/stats` answers. A batch holds `crops` crops from
    `calls` calls (one call per request per model, so calls > 1 means crops of several requests ran together)."""
    out = {}
    for m, a in after.get("models", {}).items():
        b = before.get("models", {}).get(m, {})
        crops_hist = _hist_delta(b.get("crops_hist", {}), a.get("crops_hist", {}))
        calls_hist = _hist_delta(b.get("calls_hist", {}), a.get("calls_hist", {}))
        batches, crops, calls = (a.get(k, 0) - b.get(k, 0) for k in ("batches", "crops", "calls"))
        out[m] = {
            "batches": batches,
            "crops": crops,
            "calls": calls,
            "mean_crops_per_batch": round(crops / batches, 2) if batches else None,
            "max_crops_per_batch": max((int(k) for k in crops_hist), default=None),
            "mean_calls_per_batch": round(calls / batches, 2) if batches else None,
            "max_calls_per_batch": max((int(k) for k in calls_hist), default=None),
            "crops_hist": crops_hist,
            "calls_hist": calls_hist,
        }
    return out


def run_load(
    client: Client, items: Sequence[LoadItem], concurrency: int, requests: int, route: str | None = None, warmup: int = 0
) -> dict[str, Any]:
    """Send `requests` requests from `concurrency` threads (after `warmup` untimed ones); the figures as a dict."""
    if concurrency < 1 or requests < 1 or warmup < 0:
        raise DynPoseError("bench: --concurrency and --requests must be >= 1, --warmup >= 0")
    if not items:
        raise DynPoseError("bench: no images to send")
    for i in range(warmup):
        it = items[i % len(items)]
        client.pose_bytes(it.data, it.boxes, route)
    before = client.stats()
    retried0 = client.retried
    persons = [0]
    lock = threading.Lock()

    def call(it: LoadItem) -> int:
        ans = client.pose_bytes(it.data, it.boxes, route)
        with lock:
            persons[0] += len(ans.persons)
        return int(ans.crops.get(Role.SMALL, 0)) + int(ans.crops.get(Role.LARGE, 0))

    lat, errors, crops, wall = _closed_loop(call, items, concurrency, requests)
    after = client.stats()
    return {
        "url": client.url,
        "concurrency": concurrency,
        "requests": requests,
        "ok": len(lat),
        "errors": len(errors),
        "error_samples": errors[:5],
        "retries": client.retried - retried0,
        "seconds": round(wall, 3),
        "req_per_s": round(len(lat) / wall, 2),
        "crops_per_s": round(crops / wall, 2),
        "persons": persons[0],
        "crops": crops,
        **_percentiles(lat),
        "batches": batch_delta(before, after),
    }


def _closed_loop(
    call: Any, items: Sequence[LoadItem], concurrency: int, requests: int
) -> tuple[list[float], list[str], int, float]:
    """Run `call(item) -> crops` from `concurrency` threads, `requests` times in all: (latencies, errors, crops, wall)."""
    lat: list[float] = []
    errors: list[str] = []
    crops = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        nonlocal crops
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                n = call(items[i % len(items)])
            except DynPoseError as e:
                with lock:
                    errors.append(str(e))
                continue
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                crops += n

    threads = [threading.Thread(target=worker, name=f"dynpose-load-{k}") for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, errors, crops, time.perf_counter() - t0


def run_pipeline_load(pipe: Any, items: Sequence[LoadItem], concurrency: int, requests: int) -> dict[str, Any]:
    """The same closed loop against an in-process `Pipeline` (each request decodes its JPEG, as the service does):
    the baseline the service's overhead is measured against."""
    from dynpose.io.sources import decode_image_bytes

    def call(it: LoadItem) -> int:
        image = decode_image_bytes(it.data, it.name)
        pipe(image, it.boxes)
        return 0 if it.boxes is None else len(it.boxes)

    lat, errors, crops, wall = _closed_loop(call, items, concurrency, requests)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "ok": len(lat),
        "errors": len(errors),
        "seconds": round(wall, 3),
        "req_per_s": round(len(lat) / wall, 2),
        "crops_per_s": round(crops / wall, 2),
        **_percentiles(lat),
    }


def format_report(r: dict[str, Any]) -> str:
    """The figures as a few lines for a terminal."""
    lines = [
        f"{r['url']}: {r['requests']} requests, concurrency {r['concurrency']}, {r['seconds']} s",
        f"  {r['req_per_s']} req/s, {r['crops_per_s']} crops/s; latency p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, "
        f"p99 {r['p99_ms']} ms",
        f"  errors {r['errors']}, retries {r['retries']}",
    ]
    for e in r["error_samples"]:
        lines.append(f"    {e}")
    for m, b in r["batches"].items():
        hist = ", ".join(f"{k}:{v}" for k, v in b["calls_hist"].items()) or "none"
        lines.append(
            f"  {m}: {b['batches']} batches, {b['crops']} crops; per batch: {b['mean_crops_per_batch']} crops "
            f"(max {b['max_crops_per_batch']}) from {b['mean_calls_per_batch']} requests (max {b['max_calls_per_batch']}; "
            f"requests:batches {hist})"
        )
    return "\n".join(lines)
