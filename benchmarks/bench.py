"""DynPose throughput benchmark: crops/s of large-only, small-only and DynPose at routing fractions, and the
end-to-end pipeline on real images with a per-stage time breakdown. `dynpose-bench` is the command line for it
(or `python benchmarks/bench.py ...` from a checkout).

Measuring on a shared, noisy machine: every configuration gets its warm-up calls first, then the configurations
take turns (round-robin) for `repeats` rounds, so a slow spell on the machine hits all of them alike; figures are
medians (crops/s = batch / median latency) with p50/p95 latency.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.fileio import atomic_path, write_json_atomic
from dynpose.models.card import ModelCard
from dynpose.runtime.backends import BACKENDS, load_runner
from dynpose.runtime.backends.base import Runner
from dynpose.runtime.dispatcher import Dispatcher, crop_boxes, same_crop
from dynpose.runtime.pipeline import _pick_entry
from dynpose.runtime.policy import parse_policy
from dynpose.runtime.preprocess import box_to_center_scale

SCHEMA = "dynpose.bench"
SCHEMA_VERSION = 1
DEVICES = ("cpu", "cuda")
# Defaults per device. CPU: batch 1 and 8 with 5 rounds keeps HRNet-W32 + ResNet-50 under 10 minutes on 2 cores.
DEFAULTS = {
    "cpu": {"batches": (1, 8), "repeats": 5, "warmup": 1},
    "cuda": {"batches": (1, 8, 32, 64), "repeats": 20, "warmup": 5},
}
DEFAULT_FRACTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
STAGES = ("decode_image", "crop", "router", "small", "large", "decode_keypoints", "rescore_nms")


# -- arguments ---------------------------------------------------------------------------------------------------------
def parse_batches(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; each a positive integer."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise DynPoseError(f"--batch {text!r}: not a comma-separated list of integers (e.g. 1,8,32)") from None
    if not vals or any(v < 1 for v in vals):
        raise DynPoseError(f"--batch {text!r}: batch sizes must be integers >= 1 (e.g. 1,8,32)")
    return sorted(set(vals))


def parse_fractions(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; each in [0, 1] (the share of crops sent to the large model)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise DynPoseError(f"--fractions {text!r}: not a comma-separated list of numbers (e.g. 0,0.5,1)") from None
    if not vals or any(not (0.0 <= v <= 1.0) for v in vals):
        raise DynPoseError(f"--fractions {text!r}: each fraction must be in [0, 1] (share of crops sent to the large model)")
    return sorted(set(vals))


# -- machine and versions ------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "device": device,
    }
    if device == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                info["gpu"] = torch.cuda.get_device_name(0)
        except ImportError:
            pass
    return info


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("dynpose", "numpy", "onnxruntime", "onnxruntime-gpu", "opencv-python-headless", "torch", "tensorrt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# -- models ------------------------------------------------------------------------------------------------------------
def load_models(
    engine_dir: str | os.PathLike, backend: str, device: str, threads: int | None = None
) -> dict[str, tuple[Runner, ModelCard, dict[str, Any]]]:
    """role -> (runner, card, entry summary) for router (if any), small and large, from the engine dir's manifest.

    ORT on CPU: small and large run at the same time, so each gets half the usable cores (`threads` overrides);
    the router runs before them and gets them all."""
    if backend not in BACKENDS:
        raise DynPoseError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    manifest = Manifest.load(engine_dir)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out: dict[str, tuple[Runner, ModelCard, dict[str, Any]]] = {}
    try:
        for role in ("router", "small", "large"):
            if role == "router" and manifest.get(role) is None:
                continue
            # the Pipeline's choice per role: a router without a plan/state_dict falls back to its ONNX
            entry, role_backend, role_device = _pick_entry(manifest, Path(engine_dir), role, backend, device)
            opts: dict[str, Any] = {}
            if role_backend == "ort" and role_device == "cpu":
                opts["intra_op_threads"] = threads or (cores if role == "router" else max(1, cores // 2))
            runner = load_runner(role_backend, engine_dir, entry, device=role_device, **opts)
            out[role] = (
                runner,
                entry.card,
                {
                    "model": entry.model,
                    "file": entry.file,
                    "format": entry.format,
                    "precision": entry.precision,
                    "input": list(entry.card.input_size),
                    "backend": role_backend,
                    "device": role_device,
                },
            )
    except BaseException:
        close_models(out)
        raise
    return out


def close_models(models: dict[str, tuple[Runner, ModelCard, dict[str, Any]]]) -> None:
    for runner, _, _ in models.values():
        runner.close()


# -- inputs ------------------------------------------------------------------------------------------------------------
def synthetic_frame(seed: int = 0, size: tuple[int, int] = (480, 640)) -> np.ndarray:
    """A textured BGR frame (smoothed noise) for crop benchmarks when no images are given: model cost does not depend
    on the pixels, and real-image runs are the pipeline part's job."""
    import cv2

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    return cv2.GaussianBlur(img, (7, 7), 0)


def boxes_for_batch(batch: int, frame_hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """`batch` person-shaped boxes (x,y,w,h) inside the frame, seeded."""
    h, w = frame_hw
    rng = np.random.default_rng(seed)
    bw = rng.uniform(0.15, 0.35, batch) * w
    bh = np.minimum(bw * rng.uniform(1.6, 2.6, batch), 0.95 * h)
    x = rng.uniform(0, 1, batch) * (w - bw)
    y = rng.uniform(0, 1, batch) * (h - bh)
    return np.stack([x, y, bw, bh], axis=1)


def real_inputs(
    images: str | os.PathLike, detections: str | os.PathLike, score_thr: float = 0.0, ann: str | os.PathLike | None = None
) -> list[tuple[Path, np.ndarray]]:
    """(image file, boxes (M,5) x,y,w,h,score) for each image of the folder that has detections."""
    from dynpose.data import image_id_map, load_coco, load_detections

    images = Path(images)
    if not images.is_dir():
        raise DynPoseError(f"--images {images}: not a directory; pass the folder holding the images")
    dets = load_detections(detections, score_thr)
    files = image_id_map(images, load_coco(ann) if ann else None)
    out = [(files[i], dets[i]) for i in sorted(dets) if i in files]
    if not out:
        raise DynPoseError(
            f"--images {images}: no image matches an image_id in {detections}; file names must be the numeric ids "
            "(COCO: 000000000785.jpg)"
        )
    return out


# -- timing ------------------------------------------------------------------------------------------------------------
def percentile_ms(samples_s: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples_s, dtype=np.float64), q) * 1e3)


def round_robin(
    configs: dict[str, Callable[[], Any]], repeats: int, warmup: int, progress: Callable[[str], None] | None = None
) -> dict[str, list[float]]:
    """Time each config `repeats` times, taking turns; `warmup` untimed calls each first. -> name -> seconds."""
    for _ in range(warmup):
        for fn in configs.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(repeats):
        for name, fn in configs.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        if progress is not None:
            progress(f"round {r + 1}/{repeats}")
    return samples


def crop_benchmark(
    models: dict[str, tuple[Runner, ModelCard, dict[str, Any]]],
    batches: Sequence[int],
    fractions: Sequence[float],
    repeats: int,
    warmup: int,
    frame: np.ndarray | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> list[dict[str, Any]]:
    """Rows of {batch, config, fraction, crops_per_s, latency_ms_p50/p95, ratio_vs_large, ...}: one call of the
    Dispatcher per timed sample (crop, router when the policy needs it, both models, decode), the way the runtime
    runs a micro-batch."""
    if "router" not in models and fractions:
        raise DynPoseError(
            "the engine dir has no router, so DynPose at routing fractions cannot run; export one "
            "(`dynpose-export --role router`) into it"
        )
    frame = synthetic_frame() if frame is None else frame
    small, large = models["small"], models["large"]
    router = models.get("router")
    policies = {"large-only": "all-large", "small-only": "all-small"}
    policies.update({f"dynpose@{f:g}": f"fraction:{f!r}" for f in fractions})
    fraction_of = {f"dynpose@{f:g}": float(f) for f in fractions}
    dispatchers = {
        name: Dispatcher(
            small[0],
            large[0],
            small[1],
            large[1],
            router=router[0] if router else None,
            router_card=router[1] if router else None,
            policy=parse_policy(p),
        )
        for name, p in policies.items()
    }
    rows: list[dict[str, Any]] = []
    try:
        for b in batches:
            boxes = boxes_for_batch(b, frame.shape[:2], seed=b)
            counts: dict[str, dict[str, int]] = {}

            def call(name: str, boxes: np.ndarray = boxes, counts: dict = counts) -> Callable[[], None]:
                def fn() -> None:
                    counts[name] = dispatchers[name].run([frame], [boxes]).counts

                return fn

            log(f"batch {b}: {len(dispatchers)} configurations x {repeats} rounds (+{warmup} warm-up)")
            samples = round_robin(
                {n: call(n) for n in dispatchers}, repeats, warmup, progress=lambda m, b=b: log(f"batch {b}: {m}")
            )
            base = b / float(np.median(samples["large-only"]))
            for name, s in samples.items():
                cps = b / float(np.median(s))
                frac = fraction_of.get(name)
                rows.append(
                    {
                        "batch": b,
                        "config": "dynpose" if frac is not None else name,
                        "fraction": frac,
                        "policy": policies[name],
                        "crops_per_s": cps,
                        "latency_ms_p50": percentile_ms(s, 50),
                        "latency_ms_p95": percentile_ms(s, 95),
                        "ratio_vs_large": cps / base,
                        "num_large": counts[name]["large"],
                        "num_small": counts[name]["small"],
                        "samples_ms": [x * 1e3 for x in s],
                    }
                )
    finally:
        for d in dispatchers.values():
            d.close()
    return rows


def pipeline_benchmark(
    models: dict[str, tuple[Runner, ModelCard, dict[str, Any]]],
    inputs: list[tuple[Path, np.ndarray]],
    route: str,
    repeats: int,
    warmup: int,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """End-to-end frames/s over real images: read + `Pipeline` (Dispatcher with both models at once, rescoring,
    OKS-NMS), as `dynpose-run` runs it; and a per-stage breakdown from a sequential pass that times the same plain
    functions one by one (the concurrent run overlaps small and large, so its stages cannot be separated)."""
    from dynpose.runtime.decode import decode_heatmaps
    from dynpose.runtime.pipeline import OKS_NMS_THR, RESCORE_THR, Pipeline, clean_boxes
    from dynpose.runtime.postprocess import oks_nms, rescore
    from dynpose.runtime.sources import read_image

    small, large, router = models["small"], models["large"], models.get("router")
    policy = parse_policy(route)
    if policy.needs_router and router is None:
        raise DynPoseError(f"--route {route}: needs a router, the engine dir has none; use all-small/all-large/box:A")
    persons = int(sum(len(b) for _, b in inputs))

    def read(path: Path) -> np.ndarray:
        img = read_image(path)
        if img is None:
            raise DynPoseError(f"image {path}: cannot be decoded")
        return img

    # The Pipeline owns the dispatcher (closed with it) but not the runners, which the caller closes.
    pipe = Pipeline(
        Dispatcher(
            small[0],
            large[0],
            small[1],
            large[1],
            router=router[0] if router else None,
            router_card=router[1] if router else None,
            policy=policy,
        )
    )
    found = 0
    try:

        def one_pass() -> int:
            return sum(len(pipe(read(path), boxes)) for path, boxes in inputs)

        log(f"pipeline: {len(inputs)} images, {persons} boxes, route {policy}, {repeats} passes")
        for _ in range(warmup):
            one_pass()
        pass_s = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            found = one_pass()
            pass_s.append(time.perf_counter() - t0)
    finally:
        pipe.close()

    # Sequential, instrumented: the same steps the pipeline takes, each timed on its own.
    acc = dict.fromkeys(STAGES, 0.0)
    routed = {"small": 0, "large": 0}
    nk = large[1].keypoint_set.num
    reuse_router_crop = router is not None and same_crop(router[1], large[1])
    sigmas = large[1].keypoint_set.sigmas
    for _ in range(max(1, repeats)):
        for path, raw in inputs:
            t = time.perf_counter()
            img = read(path)
            acc["decode_image"] += time.perf_counter() - t
            boxes, _ = clean_boxes(raw, img.shape)
            xywh = boxes[:, :4]
            fi = np.zeros(len(xywh), dtype=np.int64)
            kps = np.zeros((len(xywh), nk, 3), dtype=np.float32)
            areas = np.zeros(len(xywh))
            scores = rcrops = None
            if policy.needs_router:
                assert router is not None
                t = time.perf_counter()
                rc, rs = box_to_center_scale(xywh, router[1].aspect_ratio, router[1].padding)
                rcrops = crop_boxes([img], fi, rc, rs, router[1])
                acc["crop"] += time.perf_counter() - t
                t = time.perf_counter()
                scores = router[0].infer(rcrops)
                acc["router"] += time.perf_counter() - t
            go_large = policy.decide(scores, xywh).large
            for m, (runner, card, _) in (("small", small), ("large", large)):
                idx = np.flatnonzero(go_large if m == "large" else ~go_large)
                if idx.size == 0:
                    continue
                routed[m] += int(idx.size)
                t = time.perf_counter()
                c, s = box_to_center_scale(xywh[idx], card.aspect_ratio, card.padding)
                if m == "large" and reuse_router_crop and rcrops is not None:
                    crops = rcrops[idx]  # as the Dispatcher: the router's crops serve the large model as they are
                else:
                    crops = crop_boxes([img], fi[idx], c, s, card)
                acc["crop"] += time.perf_counter() - t
                t = time.perf_counter()
                hm = runner.infer(crops)
                acc[m] += time.perf_counter() - t
                t = time.perf_counter()
                kps[idx] = decode_heatmaps(hm, c, s, card)
                acc["decode_keypoints"] += time.perf_counter() - t
                areas[idx] = np.prod(s, axis=1)
            t = time.perf_counter()
            inst = rescore(kps, boxes[:, 4], thr=RESCORE_THR)
            oks_nms(kps, inst, areas, thr=OKS_NMS_THR, sigmas=sigmas)
            acc["rescore_nms"] += time.perf_counter() - t
    frames = len(inputs) * max(1, repeats)
    total = sum(acc.values())
    med = float(np.median(pass_s))
    return {
        "images": len(inputs),
        "persons": persons,
        "persons_after_nms": found,
        "route": str(policy),
        "repeats": repeats,
        "fps": len(inputs) / med,
        "persons_per_s": persons / med,
        "pass_s": pass_s,
        "sequential_fps": frames / total if total > 0 else None,
        "breakdown_ms_per_frame": {k: v * 1e3 / frames for k, v in acc.items()},
        "breakdown_share": {k: (v / total if total > 0 else 0.0) for k, v in acc.items()},
        "routed_sequential": routed,
    }


# -- plot ------------------------------------------------------------------------------------------------------------
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


# -- one run -----------------------------------------------------------------------------------------------------------
def run_benchmark(
    engine_dir: str | os.PathLike,
    *,
    backend: str = "ort",
    device: str = "cpu",
    batches: Sequence[int] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    repeats: int | None = None,
    warmup: int | None = None,
    images: str | os.PathLike | None = None,
    detections: str | os.PathLike | None = None,
    route: str | None = None,
    threads: int | None = None,
    json_out: str | os.PathLike | None = None,
    plot_out: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """The whole benchmark; returns (and optionally writes atomically) the result dict."""
    if device not in DEVICES:
        raise DynPoseError(f"--device {device!r}: use cpu or cuda")
    if (images is None) != (detections is None):
        raise DynPoseError("--images and --detections go together: the pipeline part needs both")
    d = DEFAULTS[device]
    batches = list(batches) if batches else list(d["batches"])
    repeats = d["repeats"] if repeats is None else repeats
    warmup = d["warmup"] if warmup is None else warmup
    if repeats < 1 or warmup < 0:
        raise DynPoseError(f"--repeats must be >= 1 and --warmup >= 0 (got {repeats}, {warmup})")
    inputs = real_inputs(images, detections) if images is not None and detections is not None else None
    started = time.perf_counter()
    models = load_models(engine_dir, backend, device, threads)
    try:
        route = route or Manifest.load(engine_dir, verify=False).route
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(device),
            "versions": versions(),
            "config": {
                "engine_dir": str(engine_dir),
                "backend": backend,
                "device": device,
                "batches": batches,
                "fractions": list(fractions),
                "repeats": repeats,
                "warmup": warmup,
                "threads": threads,
                "models": {role: m[2] for role, m in models.items()},
            },
        }
        result["crops"] = crop_benchmark(models, batches, fractions, repeats, warmup, log=log)
        result["ratio_vs_large"] = {str(r["batch"]): {} for r in result["crops"]}
        for r in result["crops"]:
            if r["config"] == "dynpose":
                result["ratio_vs_large"][str(r["batch"])][f"{r['fraction']:g}"] = r["ratio_vs_large"]
        result["pipeline"] = pipeline_benchmark(models, inputs, route, repeats, warmup, log=log) if inputs else None
    finally:
        close_models(models)
    result["wall_s"] = time.perf_counter() - started
    if json_out is not None:
        write_json_atomic(json_out, result)
    if plot_out is not None:
        plot(result, plot_out)
    return result


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


if __name__ == "__main__":
    from dynpose.cli.bench import main

    main()
