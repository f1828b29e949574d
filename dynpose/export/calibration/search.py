"""The layer search of INT8 quantization (and of OpenVINO's bf16): how many of the most sensitive layers to keep in fp32.

Plain functions over a `trial(k)` callable (quantize with the k most sensitive layers kept fp32, judge the result),
so the search reads on its own: the count doubles from ~6% of the layers until the gate holds, then a bisection
between the last failing and the passing count trims it until the gap is a quarter of the passing count. Every
quantization counts against `max_steps`, the first (every layer INT8) included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynpose.export.judges import Check

MAX_STEPS = 12


@dataclass(frozen=True)
class Trial:
    """One lower-precision model tried: the layers kept fp32, the file written, its judge's check (figures named
    after `precision`: int8, or bf16 for an OpenVINO IR), finite outputs."""

    exclude: list[str]
    path: Path
    check: Check
    finite: bool = True
    precision: str = "int8"

    @property
    def oks(self) -> float:
        return float(self.check.figures[f"{self.precision}_oks"])

    def step(self) -> dict[str, Any]:
        """The record the manifest keeps in `<precision>_search_steps`."""
        f, p = self.check.figures, self.precision
        return {
            "fp32_layers": len(self.exclude),
            "gate": f[f"{p}_oks"],
            "gate_min": f[f"{p}_oks_min"],
            "rel_l2": f[f"{p}_heatmap_rel_l2"],
            "finite": self.finite,
        }


def best_trial(tried: list[Trial]) -> Trial:
    """The trial with the highest gate OKS (the first of equals)."""
    return max(tried, key=lambda t: t.oks)


def grow(trial: Callable[[int], Trial], n_all: int, max_steps: int, tried: list[Trial]) -> tuple[Trial | None, int]:
    """Double the count kept fp32 from ~6% of `n_all` until a trial passes: (the passing trial or None, the last
    failing count). Starting there because single layers rarely fix a heatmap model and each try costs a
    quantization (ORT's quantizer takes ~10 s per graph rewrite on TinyPose's 269 convolutions)."""
    k, lo_fail = max(1, n_all // 16), 0
    while len(tried) < max_steps:
        k = min(k, n_all)
        t = trial(k)
        tried.append(t)
        if t.check:
            return t, lo_fail
        if k >= n_all:
            break
        lo_fail, k = k, k * 2
    return None, lo_fail


def trim(trial: Callable[[int], Trial], chosen: Trial, lo_fail: int, max_steps: int, tried: list[Trial]) -> Trial:
    """Bisect between the last failing count and the passing one until the gap is a quarter of the passing count."""
    while len(tried) < max_steps and len(chosen.exclude) - lo_fail > max(2, len(chosen.exclude) // 4):
        mid = (lo_fail + len(chosen.exclude)) // 2
        t = trial(mid)
        tried.append(t)
        if t.check:
            chosen = t
        else:
            lo_fail = mid
    return chosen


def search_fp32_layers(
    trial: Callable[[int], Trial], n_all: int, max_steps: int, tried: list[Trial]
) -> tuple[Trial | None, list[Trial]]:
    """(the passing trial with the fewest fp32 layers found, or None; every trial, `tried`'s first), at most
    `max_steps` trials in all."""
    chosen, lo_fail = grow(trial, n_all, max_steps, tried)
    if chosen is not None:
        chosen = trim(trial, chosen, lo_fail, max_steps, tried)
    return chosen, tried
