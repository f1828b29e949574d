"""The benchmark's table (terminal, logs) and plot (speed against large-only, with 95% intervals, against the share
of crops sent to the large model). Both name the models, backend, precision and threads the figures belong to."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dynpose.fileio import atomic_path
from dynpose.roles import Role


def _ratio_text(r: dict[str, Any]) -> str:
    if r.get("reference", r["config"] == "large-only"):
        return "1.00x (reference: the faster large-only)"
    ci = r.get("ratio_ci")
    return f"{r['ratio_vs_large']:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{r['ratio_vs_large']:.2f}x [?]"


def _name(r: dict[str, Any]) -> str:
    return r["config"] if r["fraction"] is None else f"dynpose@{r['fraction']:g}"


def model_lines(result: dict[str, Any]) -> list[str]:
    """Which files the figures are for: model, format, precision, and threads as the configurations ran them."""
    cfg = result["config"]
    models = cfg["models"]
    names = ", ".join(
        f"{role} {m['model']} ({m['format']} {m['precision']}, {m['input'][0]}x{m['input'][1]})"
        for role, m in models.items()
    )
    lines = [f"{cfg['backend']} on {cfg['device']}, {result['machine']['cpu']} ({result['machine']['cores_usable']} cores)"]
    lines.append(f"models: {names}")
    th = result.get("threads")
    if th:
        lines.append(
            f"threads: baselines run alone on {th['solo']}; routed configurations: router {th[Role.ROUTER.value]}, "
            f"small {th[Role.SMALL.value]} + large {th[Role.LARGE.value]} at once"
        )
    return lines


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Plain-text table of the crop figures (ratios with their 95% interval), the timing and load, the costs,
    and the pipeline, for the terminal and logs."""
    lines = model_lines(result)
    lines.append(
        f"{'batch':>5}  {'config':<28} {'crops/s':>8} {'p50 ms':>8} {'p95 ms':>8} {Role.LARGE.value:>6} {'escal.':>6}  "
        "vs large-only [95% CI]"
    )
    for r in result["crops"]:
        esc = r.get("escalated_share")
        lines.append(
            f"{r['batch']:>5}  {_name(r):<28} {r['crops_per_s']:>8.1f} {r['latency_ms_p50']:>8.2f} "
            f"{r['latency_ms_p95']:>8.2f} {r['large_share']:>6.0%} {'-' if esc is None else f'{esc:.0%}':>6}  "
            f"{_ratio_text(r)}"
        )
    if any(r.get("escalated_share") is not None for r in result["crops"]):
        lines.append("escal.: the share a cascade ran again on the large model (the small model ran on every crop)")
    for t in result.get("timing", []):
        lines.append(
            f"batch {t['batch']}: {t['rounds']} interleaved rounds ({t['stopped']}), {t['elapsed_s']:.0f} s; ratios "
            f"against {t.get('reference', 'large-only')}"
        )
    load = result.get("load") or {}
    if load.get("others_cores_mean") is not None:
        lines.append(
            f"other processes: {load['others_cores_mean']:.2f} of {load['cores']} cores busy on average "
            f"(max {load['others_cores_max']:.2f})"
        )
    if result.get("load_warning"):
        lines.append(f"warning: {result['load_warning']}")
    lines += result.get("cost_lines", [])
    p = result.get("pipeline")
    if p:
        lines.append(
            f"pipeline: {p['fps']:.2f} frames/s, {p['crops_per_s']:.1f} crops/s over {p['images']} images ({p['boxes']} "
            f"boxes, {p['crops']} crops run, {p['persons']} persons after OKS-NMS), route {p['route']} "
            f"({p['large_share']:.0%} large)"
        )
        lines.append(
            "  per frame (sequential pass): " + ", ".join(f"{k} {v:.1f} ms" for k, v in p["breakdown_ms_per_frame"].items())
        )
    return lines


def plot(result: dict[str, Any], dest: str | os.PathLike) -> Path:
    """Speed against large-only (95% intervals as error bars) vs the share of crops sent to the large model: one
    line per batch size for DynPose at fractions, one marker per extra policy, large-only at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["crops"]
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for i, b in enumerate(sorted({r["batch"] for r in rows})):
            color = f"C{i}"
            mine = [r for r in rows if r["batch"] == b]
            dyn = sorted((r for r in mine if r["config"] == "dynpose"), key=lambda r: r["large_share"])
            _errorbar(ax, dyn, color, "o-", f"DynPose fraction:F, batch {b}")
            other = [r for r in mine if r["config"] != "dynpose" and not r.get("reference")]
            for j, r in enumerate(other):
                _errorbar(ax, [r], color, "sdv^<>p*h"[j % 9], f"{r['config']}, batch {b}")
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="large-only (the faster of all / split cores)")
        ax.set_xlabel("share of crops run by the large model")
        ax.set_ylabel("crops/s relative to large-only (95% CI)")
        ax.set_xlim(-0.03, 1.03)
        import textwrap

        lines = [w for line in model_lines(result) for w in textwrap.wrap(line, 130)]
        ax.set_title("\n".join(lines), fontsize=7, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        dest = Path(dest)
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return dest


def _errorbar(ax: Any, rows: list[dict[str, Any]], color: str, fmt: str, label: str) -> None:
    if not rows:
        return
    x = [r["large_share"] for r in rows]
    y = [r["ratio_vs_large"] for r in rows]
    lo = [r["ratio_vs_large"] - r["ratio_ci"][0] if r["ratio_ci"] else 0.0 for r in rows]
    hi = [r["ratio_ci"][1] - r["ratio_vs_large"] if r["ratio_ci"] else 0.0 for r in rows]
    ax.errorbar(x, y, yerr=[lo, hi], fmt=fmt, color=color, capsize=3, markersize=4, label=label)
