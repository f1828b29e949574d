"""Is the machine busy with other work while we time? CPU time used machine-wide (/proc/stat) minus this process's
own (/proc/self/stat, all its threads), sampled around every timed round.

Other processes' CPU use, in cores, is what tells a reader whether the figures were measured on a quiet machine:
on a 2-core box, another job using one core halves what the pose models can get, and the configurations that use
both cores (DynPose's two workers) suffer differently from those that use one. Linux only; elsewhere the load is
reported as unknown.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Others using more than this many cores on average (or a tenth of the machine, if more) makes the run "loaded".
LOADED_CORES = 0.25


@dataclass(frozen=True)
class CpuSample:
    wall: float  # perf_counter seconds
    busy: float  # CPU seconds used by everything on the machine since boot
    own: float  # CPU seconds used by this process (user + system, all threads)


def _ticks() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100.0


def sample() -> CpuSample | None:
    """A snapshot of machine-wide and own CPU time, or None where /proc is not there."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        with open("/proc/self/stat") as f:
            own_fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu" or len(own_fields) < 13:
        return None
    v = [float(x) for x in fields[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    busy = v[0] + v[1] + v[2] + sum(v[5:8])
    own = float(own_fields[11]) + float(own_fields[12])  # utime, stime (fields 14 and 15 of the full line)
    hz = _ticks()
    return CpuSample(time.perf_counter(), busy / hz, own / hz)


def others_cores(a: CpuSample | None, b: CpuSample | None) -> float | None:
    """Mean number of cores other processes kept busy between two samples."""
    if a is None or b is None or b.wall <= a.wall:
        return None
    return max(0.0, ((b.busy - a.busy) - (b.own - a.own)) / (b.wall - a.wall))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_summary(per_round: Sequence[float | None]) -> dict[str, Any]:
    """{others_cores_mean, others_cores_max, cores, loaded, rounds} over the rounds that could be measured."""
    vals = [v for v in per_round if v is not None]
    n = cores()
    if not vals:
        return {"others_cores_mean": None, "others_cores_max": None, "cores": n, "loaded": None, "rounds": 0}
    mean = sum(vals) / len(vals)
    return {
        "others_cores_mean": mean,
        "others_cores_max": max(vals),
        "cores": n,
        "loaded": mean > max(LOADED_CORES, 0.1 * n),
        "rounds": len(vals),
    }


def load_warning(summary: dict[str, Any]) -> str | None:
    """One line when other processes used the CPU during the run (None on a quiet or unknown machine)."""
    if not summary.get("loaded"):
        return None
    return (
        f"machine loaded: other processes kept {summary['others_cores_mean']:.2f} of {summary['cores']} cores busy on "
        f"average (up to {summary['others_cores_max']:.2f}) while timing; the figures are noisy, see the intervals"
    )
