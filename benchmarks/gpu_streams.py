"""Do the small and the large model really run at the same time on one GPU? (torch-CUDA backend)

Two TorchRunners (resnet_50 small, hrnet_w32 large, random weights: speed does not depend on the values), each on
its own CUDA stream. First sequentially (small then large, one thread), then concurrently (two threads, one per
runner). Every call is bracketed by CUDA events recorded on the runner's stream, so the report shows, on the
GPU's clock, how much of the time both models were in flight together, and crops/s for both schedules.

    python benchmarks/gpu_streams.py                  # batch 32 each, fp32
    python benchmarks/gpu_streams.py --fp16 --batch 64 --iters 50

Exits with status 2 and a one-line message on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import warnings
from typing import Any

import numpy as np


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of [start, end) intervals as sorted, disjoint intervals."""
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
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


def busy(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in merge(intervals))


def timed_calls(runner: Any, x: np.ndarray, iters: int, ref: Any, spans: list[tuple[float, float]]) -> None:
    """Run `iters` calls; store each call's [start, end] in ms since `ref`, measured on the runner's stream."""
    import torch

    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(runner.stream)
        runner.infer(x)
        end.record(runner.stream)
        events.append((start, end))
    torch.cuda.synchronize()
    spans.extend((ref.elapsed_time(s), ref.elapsed_time(e)) for s, e in events)


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu_streams: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
            "run this on a GPU machine with the CUDA build of torch",
            file=sys.stderr,
        )
        return 2
    from dynpose.models.zoo import create_model
    from dynpose.runtime.backends.torch import TorchRunner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights: timing only
        small = TorchRunner.from_module(create_model(args.small, weights="random"), "cuda", args.fp16, args.batch).activate()
        large = TorchRunner.from_module(create_model(args.large, weights="random"), "cuda", args.fp16, args.batch).activate()
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((args.batch, 3, 256, 192), dtype=np.float32)
    xl = rng.standard_normal((args.batch, 3, 256, 192), dtype=np.float32)

    torch.backends.cudnn.benchmark = True
    for _ in range(args.warmup):
        small.infer(xs)
        large.infer(xl)
    torch.cuda.synchronize()

    # Sequential: one thread, small then large.
    ref = torch.cuda.Event(enable_timing=True)
    ref.record()
    torch.cuda.synchronize()
    seq_small: list[tuple[float, float]] = []
    seq_large: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    for _ in range(args.iters):
        timed_calls(small, xs, 1, ref, seq_small)
        timed_calls(large, xl, 1, ref, seq_large)
    seq_s = time.perf_counter() - t0

    # Concurrent: one thread per runner, each on its own stream.
    ref = torch.cuda.Event(enable_timing=True)
    ref.record()
    torch.cuda.synchronize()
    con_small: list[tuple[float, float]] = []
    con_large: list[tuple[float, float]] = []
    go = threading.Barrier(3)

    def worker(runner: Any, x: np.ndarray, spans: list[tuple[float, float]]) -> None:
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

    crops = 2 * args.batch * args.iters
    name = torch.cuda.get_device_name()
    print(
        f"device {name}, torch {torch.__version__}, {'fp16' if args.fp16 else 'fp32'}, batch {args.batch} per "
        f"model, {args.iters} iterations, small {args.small}, large {args.large}"
    )
    for label, wall, a, b in (("sequential", seq_s, seq_small, seq_large), ("concurrent", con_s, con_small, con_large)):
        both = overlap(a, b)
        print(
            f"{label:>10}: {wall:7.3f} s  {crops / wall:8.1f} crops/s  small busy {busy(a):8.1f} ms  "
            f"large busy {busy(b):8.1f} ms  both in flight {both:8.1f} ms "
            f"({100 * both / max(1e-9, min(busy(a), busy(b))):5.1f}% of the shorter)"
        )
    print(f"speed-up concurrent/sequential: {seq_s / con_s:.2f}x")
    small.close()
    large.close()
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", default="resnet_50")
    p.add_argument("--large", default="hrnet_w32")
    p.add_argument("--batch", type=int, default=32, help="crops per call, per model")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fp16", action="store_true")
    sys.exit(run(p.parse_args()))


if __name__ == "__main__":
    main()
