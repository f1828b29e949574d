"""Do the small and the large model really run at the same time on one GPU? (torch-CUDA backend)

Two TorchRunners (resnet_50 small, hrnet_w32 large, random weights: speed does not depend on the values), each on
its own CUDA stream. First sequentially (small then large, one thread), then concurrently (two threads, one per
runner). Each runner records CUDA events on its own stream around the stream work of every call (H2D copy, model,
D2H copy; the host staging before it and the wait after it are outside), so the report shows, on the GPU's clock,
how much of the time both models had work in flight together, and crops/s for both schedules.

`torch.backends.cudnn.benchmark` is left at torch's default (off), as the pipeline leaves it: the pipeline's batch
sizes change every frame, and the benchmark mode would re-tune every convolution for each new size.

    python benchmarks/gpu_streams.py                  # batch 32 each, fp32
    python benchmarks/gpu_streams.py --fp16 --channels-last --batch 64 --iters 50 --json streams.json

Exits with status 2 and a one-line message on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

Span = tuple[float, float]


def merge(intervals: list[Span]) -> list[Span]:
    """Union of [start, end) intervals as sorted, disjoint intervals."""
    out: list[Span] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def overlap(a: list[Span], b: list[Span]) -> float:
    """Total time covered by both interval sets."""
    total, a, b = 0.0, merge(a), merge(b)
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def busy(intervals: list[Span]) -> float:
    return sum(e - s for s, e in merge(intervals))


def timed_calls(runner: Any, x: np.ndarray, iters: int, ref: Any, spans: list[Span]) -> None:
    """Run `iters` calls; store each call's stream-work [start, end] in ms since `ref` (the runner's own events)."""
    import torch

    events: list[tuple[Any, Any]] = []
    runner.record_gpu_spans(events)
    try:
        for _ in range(iters):
            runner.infer(x)
    finally:
        runner.record_gpu_spans(None)
    torch.cuda.synchronize()
    spans.extend((ref.elapsed_time(s), ref.elapsed_time(e)) for s, e in events)


def _schedule(label: str, wall: float, a: list[Span], b: list[Span], crops: int) -> dict[str, float | str]:
    both = overlap(a, b)
    return {
        "schedule": label,
        "wall_s": wall,
        "crops_per_s": crops / wall,
        "small_busy_ms": busy(a),
        "large_busy_ms": busy(b),
        "both_in_flight_ms": both,
        "overlap_pct_of_shorter": 100 * both / max(1e-9, min(busy(a), busy(b))),
    }


def _runners(args: argparse.Namespace) -> tuple[Any, Any]:
    from dynpose.models.zoo import create_model
    from dynpose.runtime.backends.torch import TorchRunner

    opts = {"fp16": args.fp16, "channels_last": args.channels_last, "cuda_graphs": args.cuda_graphs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights: timing only
        small = TorchRunner.from_module(create_model(args.small, weights="random"), "cuda", args.batch, **opts)
        large = TorchRunner.from_module(create_model(args.large, weights="random"), "cuda", args.batch, **opts)
    return small.activate(), large.activate()


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu_streams: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
            "run this on a GPU machine with the CUDA build of torch",
            file=sys.stderr,
        )
        return 2
    small, large = _runners(args)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((args.batch, 3, 256, 192), dtype=np.float32)
    xl = rng.standard_normal((args.batch, 3, 256, 192), dtype=np.float32)
    for _ in range(args.warmup):
        small.infer(xs)
        large.infer(xl)
    torch.cuda.synchronize()

    # Sequential: one thread, small then large.
    ref = torch.cuda.Event(enable_timing=True)
    ref.record()
    torch.cuda.synchronize()
    seq_small: list[Span] = []
    seq_large: list[Span] = []
    t0 = time.perf_counter()
    for _ in range(args.iters):
        timed_calls(small, xs, 1, ref, seq_small)
        timed_calls(large, xl, 1, ref, seq_large)
    seq_s = time.perf_counter() - t0

    # Concurrent: one thread per runner, each on its own stream.
    ref = torch.cuda.Event(enable_timing=True)
    ref.record()
    torch.cuda.synchronize()
    con_small: list[Span] = []
    con_large: list[Span] = []
    go = threading.Barrier(3)

    def worker(runner: Any, x: np.ndarray, spans: list[Span]) -> None:
        go.wait()
        timed_calls(runner, x, args.iters, ref, spans)

    threads = [
        threading.Thread(target=worker, args=(small, xs, con_small)),
        threading.Thread(target=worker, args=(large, xl, con_large)),
    ]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    con_s = time.perf_counter() - t0
    small.close()
    large.close()

    crops = 2 * args.batch * args.iters
    precision = "fp16" if args.fp16 else "fp32"
    layout = " channels_last" if args.channels_last else ""
    graphs = " cuda_graphs" if args.cuda_graphs else ""
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "config": {**vars(args), "json": str(args.json) if args.json else None},
        "schedules": [
            _schedule("sequential", seq_s, seq_small, seq_large, crops),
            _schedule("concurrent", con_s, con_small, con_large, crops),
        ],
        "speedup_concurrent": seq_s / con_s,
    }
    print(
        f"device {result['device']}, torch {torch.__version__}, {precision}{layout}{graphs}, batch {args.batch} per "
        f"model, {args.iters} iterations, small {args.small}, large {args.large}"
    )
    for r in result["schedules"]:
        print(
            f"{r['schedule']:>10}: {r['wall_s']:7.3f} s  {r['crops_per_s']:8.1f} crops/s  small busy "
            f"{r['small_busy_ms']:8.1f} ms  large busy {r['large_busy_ms']:8.1f} ms  both in flight "
            f"{r['both_in_flight_ms']:8.1f} ms ({r['overlap_pct_of_shorter']:5.1f}% of the shorter)"
        )
    print(f"speed-up concurrent/sequential: {result['speedup_concurrent']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", default="resnet_50")
    p.add_argument("--large", default="hrnet_w32")
    p.add_argument("--batch", type=int, default=32, help="crops per call, per model")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true", help="one CUDA graph per batch bucket (see TorchRunner)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    sys.exit(run(p.parse_args()))


if __name__ == "__main__":
    main()
