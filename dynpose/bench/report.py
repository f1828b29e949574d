"""The benchmark's table (terminal, logs) and plot (crops/s against routing fraction)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dynpose.fileio import atomic_path


def plot(result: dict[str, Any], dest: str | os.PathLike) -> Path:
    """crops/s against routing fraction, one line per batch size, HRNet-only (large-only) dashed per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["crops"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, b in enumerate(sorted({r["batch"] for r in rows})):
        color = f"C{i}"
        dyn = sorted((r for r in rows if r["batch"] == b and r["config"] == "dynpose"), key=lambda r: r["fraction"])
        if dyn:
            ax.plot(
                [r["fraction"] for r in dyn], [r["crops_per_s"] for r in dyn], "o-", color=color, label=f"DynPose, batch {b}"
            )
        ref = next(r for r in rows if r["batch"] == b and r["config"] == "large-only")
        ax.axhline(ref["crops_per_s"], color=color, linestyle="--", linewidth=1, label=f"large only, batch {b}")
    ax.set_xlabel("fraction of crops sent to the large model")
    ax.set_ylabel("crops / s")
    ax.set_xlim(-0.02, 1.02)
    cfg = result["config"]
    ax.set_title(f"{cfg['backend']} / {cfg['device']}: {result['machine']['cpu'][:40]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return dest


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Plain-text table of the crop figures (and the pipeline), for the terminal and logs."""
    lines = [f"{'batch':>5}  {'config':<16} {'crops/s':>9} {'p50 ms':>9} {'p95 ms':>9} {'vs large':>8}"]
    for r in result["crops"]:
        name = r["config"] if r["fraction"] is None else f"dynpose@{r['fraction']:g}"
        lines.append(
            f"{r['batch']:>5}  {name:<16} {r['crops_per_s']:>9.1f} {r['latency_ms_p50']:>9.2f} "
            f"{r['latency_ms_p95']:>9.2f} {r['ratio_vs_large']:>7.2f}x"
        )
    p = result.get("pipeline")
    if p:
        lines.append(
            f"pipeline: {p['fps']:.2f} frames/s, {p['persons_per_s']:.1f} persons/s over {p['images']} images "
            f"({p['persons']} boxes, {p['persons_after_nms']} persons after OKS-NMS), route {p['route']}"
        )
        lines.append(
            "  per frame (sequential pass): " + ", ".join(f"{k} {v:.1f} ms" for k, v in p["breakdown_ms_per_frame"].items())
        )
    return lines
