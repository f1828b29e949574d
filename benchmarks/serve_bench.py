"""The service vs the in-process Pipeline: req/s and latency at several client concurrencies, on one machine.

    python benchmarks/serve_bench.py --engine-dir engines/
    python benchmarks/serve_bench.py --engine-dir engines/ --concurrency 1,4,16 --requests 40,80,160 --repeats 3

Closed loop (each client sends its next request when the last one is answered), cycling over the COCO test images
with their detections at --det-score. "Pipeline" is `Pipeline.from_engine_dir` called from C threads in this
process (each call decodes the JPEG, as the service does); "service" is `dynpose-serve` on a local Ray cluster
started here (every deployment one replica unless set), driven by `dynpose.serve.loadgen.run_load` over HTTP on
127.0.0.1. The two never run at the same time; within each, the concurrencies take turns over --repeats rounds.
Figures are the median over the rounds, with [min-max]. The ratio is service req/s over Pipeline req/s at the
same concurrency (below 1: the service's overhead; above 1: its batching across requests paying off).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rounds(run: Any, levels: list[int], requests: list[int], repeats: int) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
    for _ in range(repeats):
        for c, n in zip(levels, requests, strict=True):
            out[c].append(run(c, n))
    return out


def _summary(rounds: list[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in rounds if r[key] is not None]
    if not vals:
        return "-"
    med = statistics.median(vals)
    return f"{med:.1f} [{min(vals):.1f}-{max(vals):.1f}]" if len(vals) > 1 else f"{med:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--images", default=str(SHARED / "data" / "coco"))
    ap.add_argument("--detections", default=str(SHARED / "data" / "coco" / "test_coco_det_AP_H_56.json"))
    ap.add_argument("--det-score", type=float, default=0.9, help="detections kept (0.9: 1-5 persons per COCO image)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", default="40,80,160", help="timed requests per round, per concurrency")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores the models use (both ways)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--json", default=None, help="write every round's figures here")
    args = ap.parse_args()
    levels, requests = _ints(args.concurrency), _ints(args.requests)
    if len(levels) != len(requests):
        ap.error("--concurrency and --requests need the same number of values")

    from dynpose.fileio import write_json_atomic
    from dynpose.runtime.pipeline import Pipeline
    from dynpose.serve.client import Client
    from dynpose.serve.config import DEPLOYMENTS, Replicas, ServeConfig, check_config
    from dynpose.serve.loadgen import load_items, run_load, run_pipeline_load
    from dynpose.serve.service import Service

    items = load_items(args.images, args.detections, det_score=args.det_score)
    t0 = time.perf_counter()
    with Pipeline.from_engine_dir(args.engine_dir, threads=args.threads) as pipe:
        run_pipeline_load(pipe, items, max(levels), max(levels))  # warm-up
        local = _rounds(lambda c, n: run_pipeline_load(pipe, items, c, n), levels, requests, args.repeats)
    cfg = check_config(
        ServeConfig(
            engine_dir=args.engine_dir,
            threads=args.threads,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            replica_cpus=0.25,
            replicas={k: Replicas(1, 1) for k in DEPLOYMENTS},
        )
    )
    with Service.start(cfg, port=_free_port(), address="local") as svc:
        client = Client(svc.url, timeout=120, retries=3)
        client.wait_healthy()
        remote = _rounds(lambda c, n: run_load(client, items, c, n, warmup=c), levels, requests, args.repeats)
    wall = time.perf_counter() - t0

    crops = sum(len(it.boxes) for it in items if it.boxes is not None) / len(items)
    print(
        f"{len(items)} images, {crops:.2f} boxes per request (det score >= {args.det_score}); threads {args.threads}; "
        f"max batch {args.max_batch}, batch wait {args.batch_wait_ms:g} ms; {args.repeats} rounds; {wall:.0f} s\n"
    )
    print("| clients | service req/s | service p50 ms | service p95 ms | Pipeline req/s | Pipeline p95 ms | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in levels:
        ratio = statistics.median(r["req_per_s"] for r in remote[c]) / statistics.median(r["req_per_s"] for r in local[c])
        print(
            f"| {c} | {_summary(remote[c], 'req_per_s')} | {_summary(remote[c], 'p50_ms')} | "
            f"{_summary(remote[c], 'p95_ms')} | {_summary(local[c], 'req_per_s')} | {_summary(local[c], 'p95_ms')} | "
            f"{ratio:.2f}x |"
        )
    print("\nrequests per pose batch (service, last round):")
    for c in levels:
        b = remote[c][-1]["batches"]
        print(
            f"  {c} clients: "
            + "; ".join(f"{m} {v['mean_calls_per_batch']} (max {v['max_calls_per_batch']})" for m, v in b.items())
        )
    errors = sum(r["errors"] for rs in (*remote.values(), *local.values()) for r in rs)
    print(f"errors: {errors}")
    if args.json:
        write_json_atomic(args.json, {"service": remote, "pipeline": local})


if __name__ == "__main__":
    main()
