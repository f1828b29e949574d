"""Helpers of `benchmarks/gpu_check.sh` (the prepared check for a lent GPU machine); each works on its own too.

    python benchmarks/gpu_check.py probe                       # what this machine has, as JSON
    python benchmarks/gpu_check.py torch-engines DIR           # a torch-only engine dir, random weights (no ONNX)
    python benchmarks/gpu_check.py runner-bench --json F [--fp16 --channels-last --cuda-graphs]
    python benchmarks/gpu_check.py summarize OUTDIR            # OUTDIR/gpu_check.json + gpu_check.txt, printed

Only the standard library, numpy and torch are needed: a GPU machine may lack onnx, onnxruntime, opencv, click
or rich, and the check must still run there (`probe` says what is missing; the shell script picks what can run).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import importlib.metadata as md
import json
import platform
import shutil
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from dynpose.roles import Role  # noqa: E402 - after the checkout is on the path; imports nothing beyond the stdlib

# Third-party modules dynpose imports somewhere at run time, and the dynpose modules each step needs.
MODULES = (
    "numpy", "torch", "onnx", "onnxruntime", "onnxslim", "onnxconverter_common", "cv2", "click", "rich", "tqdm",
    "matplotlib", "pycocotools", "scipy", "pytest", "tensorrt", "cuda.bindings",
)  # fmt: skip
DYNPOSE_MODULES = ("dynpose.runtime.backends.torch", "dynpose.cli.bench", "dynpose.cli.export")
DISTS = ("torch", "numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-python", "setuptools", "pip", "pytest")
PAIR = {Role.ROUTER: "router", Role.SMALL: "resnet_50", Role.LARGE: "hrnet_w32"}  # role -> zoo model
BATCHES = (1, 8, 32, 64)
FRACTIONS = (0.0, 0.5, 1.0)


def _importable(name: str) -> str | None:
    """None when `name` imports, else the first line of why not."""
    try:
        importlib.import_module(name)
    except Exception as e:  # ImportError, OSError from a shared library, anything a broken install raises
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"
    return None


def _nvidia_smi() -> dict[str, str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError) as e:
        return {"error": str(e).splitlines()[0]}
    name, driver, mem = ([*out.splitlines()[0].split(", "), "", "", ""])[:3]
    return {"name": name, "driver": driver, "memory": mem}


def probe() -> dict[str, Any]:
    """Python, torch/CUDA, the GPU and its driver, and which modules import (with why not)."""
    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    info["missing"] = {m: why for m in MODULES if (why := _importable(m)) is not None}
    info["dynpose_missing"] = {m: why for m in DYNPOSE_MODULES if (why := _importable(m)) is not None}
    versions = {}
    for d in DISTS:
        try:
            versions[d] = md.version(d)
        except md.PackageNotFoundError:
            pass
    info["versions"] = versions
    info["nvidia_smi"] = _nvidia_smi()
    info["cuda"] = False
    if "torch" not in info["missing"]:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda_build"] = torch.version.cuda
        info["cuda"] = bool(torch.cuda.is_available())
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    if "onnxruntime" not in info["missing"]:
        import onnxruntime as ort

        info["ort_providers"] = ort.get_available_providers()
    return info


# -- torch-only engine dir ---------------------------------------------------------------------------------------------
def torch_engines(engine_dir: Path, max_batch: int = 64) -> Path:
    """The DynPose pair (router, ResNet-50 small, HRNet-W32 large) with random weights as `torch` entries only: what
    `dynpose-export --model all --weights random` writes for the torch backend, without ONNX (nor onnx installed)."""
    import torch

    from dynpose.engines.manifest import Entry, Manifest, describe_file, tool_versions
    from dynpose.models.card import ModelCard
    from dynpose.models.zoo import create_model

    engine_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(route="fraction:0.5")  # a random router's scores mean nothing: route by rank, half large
    torch.manual_seed(0)
    for role, name in PAIR.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # random weights are the point
            model = create_model(name, weights="random")
        card = model.card
        assert isinstance(card, ModelCard)
        file = f"{role.value}.pt"
        torch.save(model.state_dict(), engine_dir / file)
        manifest.put(
            Entry(
                role=role.value,
                model=name,
                file=file,
                format="torch",
                precision="fp32",
                card=card,
                max_batch=max_batch,
                versions=tool_versions(),
                **describe_file(engine_dir, file),
            )
        )
    manifest.notes["weights"] = "random (gpu_check.py torch-engines): speed only"
    manifest.save(engine_dir)
    return engine_dir


# -- runner-level benchmark (when dynpose-bench cannot import, e.g. no opencv) ----------------------------------------
def _median_ms(samples: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(samples) * 1e3, q))


def runner_bench(
    opts: dict[str, bool], batches: tuple[int, ...], repeats: int, warmup: int, device: str = "cuda"
) -> dict[str, Any]:
    """crops/s of large-only, small-only and DynPose at FRACTIONS on random crops, models only (no crop or decode):
    a DynPose sample runs the router on every crop, then small and large on their shares in two threads."""
    import numpy as np
    import torch

    from dynpose.models.zoo import create_model
    from dynpose.runtime.backends.torch import TorchRunner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        runners = {
            role: TorchRunner.from_module(
                create_model(name, weights="random"), device, max(batches), role.value, None, **opts
            )
            for role, name in PAIR.items()
        }
    for r in runners.values():
        r.activate()
    pool = cf.ThreadPoolExecutor(2)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    try:
        for b in batches:
            x = rng.standard_normal((b, 3, 256, 192), dtype=np.float32)

            def sample(frac: float | None, x: np.ndarray = x, b: int = b) -> float:
                t0 = time.perf_counter()
                if frac is None:  # large-only
                    runners[Role.LARGE].infer(x)
                elif frac < 0:  # small-only
                    runners[Role.SMALL].infer(x)
                else:
                    scores = runners[Role.ROUTER].infer(x)[:, 0]
                    order = np.argsort(-scores, kind="stable")
                    n_large = int(round(frac * b))
                    jobs = [pool.submit(runners[Role.LARGE].infer, x[order[:n_large]])] if n_large else []
                    if n_large < b:
                        jobs.append(pool.submit(runners[Role.SMALL].infer, x[order[n_large:]]))
                    for j in jobs:
                        j.result()
                return time.perf_counter() - t0

            configs: dict[str, float | None] = {"large-only": None, "small-only": -1.0}
            configs.update({f"dynpose@{f:g}": f for f in FRACTIONS})
            for frac in configs.values():
                for _ in range(warmup):
                    sample(frac)
            samples: dict[str, list[float]] = {k: [] for k in configs}
            for _ in range(repeats):  # round-robin, like dynpose-bench
                for name, frac in configs.items():
                    samples[name].append(sample(frac))
            base = b / float(np.median(samples["large-only"]))
            for name, s in samples.items():
                cps = b / float(np.median(s))
                frac = configs[name]
                rows.append(
                    {
                        "batch": b,
                        "config": "dynpose" if name.startswith("dynpose@") else name,
                        "fraction": frac if name.startswith("dynpose@") else None,
                        "crops_per_s": cps,
                        "latency_ms_p50": _median_ms(s, 50),
                        "latency_ms_p95": _median_ms(s, 95),
                        "ratio_vs_large": cps / base,
                    }
                )
    finally:
        pool.shutdown()
        for r in runners.values():
            r.deactivate()
    return {
        "schema": "dynpose.gpu_check.runner_bench",
        "kind": "models only (no crop/decode): dynpose-bench could not import here",
        "machine": {"gpu": torch.cuda.get_device_name(0) if device != "cpu" else None, "torch": torch.__version__},
        "config": {"backend": "torch", "device": device, "backend_options": opts, "repeats": repeats, "warmup": warmup},
        "crops": rows,
    }


# -- summary -----------------------------------------------------------------------------------------------------------
def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests(xml_path: Path) -> dict[str, Any] | None:
    if not xml_path.is_file():
        return None
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError:
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    skipped = [
        {"test": f"{c.get('classname')}::{c.get('name')}", "reason": (s.get("message") or "")[:200]}
        for c in suite.iter("testcase")
        if (s := c.find("skipped")) is not None
    ]
    keys = ("tests", "failures", "errors", "skipped")
    return {**{k: int(suite.get(k, 0)) for k in keys}, "time_s": float(suite.get("time", 0)), "skipped_list": skipped}


def _bench_lines(name: str, result: dict[str, Any]) -> list[str]:
    rows = result.get("crops") or []
    lines = []
    for b in sorted({r["batch"] for r in rows}):
        at = {(r["config"], r["fraction"]): r for r in rows if r["batch"] == b}
        large, small = at.get(("large-only", None)), at.get(("small-only", None))
        half = at.get(("dynpose", 0.5))
        dyn = [r for r in rows if r["batch"] == b and r["config"] == "dynpose"]
        best = max(dyn, key=lambda r: r["ratio_vs_large"]) if dyn else None

        def cps(r: dict[str, Any] | None) -> str:
            return f"{r['crops_per_s']:10.1f}" if r else f"{'-':>10}"

        best_s = f"{best['ratio_vs_large']:.2f}x@{best['fraction']:g}" if best else "-"
        ratio = f"{half['ratio_vs_large']:.2f}x" if half else "-"
        lines.append(f"{name:<22} {b:>5} {cps(large)} {cps(small)} {cps(half)} {ratio:>9} {best_s:>11}")
    return lines


def summarize(out: Path) -> str:
    """Merge the step outputs in `out` into gpu_check.json and a printed table (gpu_check.txt); returns the table."""
    probe_info = _load(out / "probe.json") or {}
    steps = []
    steps_file = out / "steps.tsv"
    if steps_file.is_file():
        for line in steps_file.read_text().splitlines():
            name, status, rc, seconds, note = ([*line.split("\t"), "", "", "", ""])[:5]
            steps.append({"step": name, "status": status, "rc": rc, "seconds": seconds, "note": note})
    benches = {p.stem.removeprefix("bench_"): _load(p) for p in sorted(out.glob("bench_*.json"))}
    streams = {p.stem.removeprefix("streams_"): _load(p) for p in sorted(out.glob("streams_*.json"))}
    tests = _tests(out / "tests.xml")
    gpu = probe_info.get("gpu") or "no CUDA device"
    smi = probe_info.get("nvidia_smi") or {}
    lines = [
        f"dynpose GPU check: {gpu}, driver {smi.get('driver', '?')}, torch {probe_info.get('torch', '?')} "
        f"(CUDA {probe_info.get('torch_cuda_build', '?')}), python {probe_info.get('python', '?')}",
        "missing modules: " + (", ".join(sorted(probe_info.get("missing", {}))) or "none"),
        "",
        "steps:",
        *[f"  {s['step']:<22} {s['status']:<8} rc={s['rc']:<4} {s['seconds']:>5} s  {s['note']}" for s in steps],
    ]
    if tests:
        lines += [
            "",
            f"tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped ({tests['time_s']:.0f} s)",
            *[f"  skipped {t['test']}: {t['reason']}" for t in tests["skipped_list"]],
        ]
    if streams:
        lines += ["", "streams (gpu_streams.py, per-call stream work on the GPU clock):"]
        for name, r in streams.items():
            if not r:
                continue
            con = next(s for s in r["schedules"] if s["schedule"] == "concurrent")
            seq = next(s for s in r["schedules"] if s["schedule"] == "sequential")
            lines.append(
                f"  {name:<10} batch {r['config']['batch']}: sequential {seq['crops_per_s']:.1f} crops/s, concurrent "
                f"{con['crops_per_s']:.1f} crops/s ({r['speedup_concurrent']:.2f}x), both in flight "
                f"{con['overlap_pct_of_shorter']:.1f}% of the shorter model's busy time"
            )
    if benches:
        head = f"{'bench config':<22} {'batch':>5} {'large-only':>10} {'small-only':>10} {'dynpose@.5':>10}"
        lines += ["", "crops/s (median of the rounds; dynpose@.5: half the crops to HRNet-W32):"]
        lines += [f"{head} {'vs large':>9} {'best':>11}"]
        for name, r in benches.items():
            if r:
                lines += _bench_lines(name, r)
    text = "\n".join(lines) + "\n"
    summary = {"probe": probe_info, "steps": steps, "tests": tests, "streams": streams, "bench": benches}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "gpu_check.txt").write_text(text)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe")
    te = sub.add_parser("torch-engines")
    te.add_argument("engine_dir", type=Path)
    te.add_argument("--max-batch", type=int, default=64)
    rb = sub.add_parser("runner-bench")
    rb.add_argument("--json", type=Path, required=True)
    rb.add_argument("--repeats", type=int, default=20)
    rb.add_argument("--warmup", type=int, default=5)
    rb.add_argument("--device", default="cuda")
    rb.add_argument("--batch", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    for flag in ("--fp16", "--channels-last", "--cuda-graphs"):
        rb.add_argument(flag, action="store_true")
    sm = sub.add_parser("summarize")
    sm.add_argument("out", type=Path)
    args = p.parse_args()
    if args.cmd == "probe":
        print(json.dumps(probe(), indent=2))
    elif args.cmd == "torch-engines":
        t0 = time.perf_counter()
        print(f"wrote {torch_engines(args.engine_dir, args.max_batch)} in {time.perf_counter() - t0:.1f} s")
    elif args.cmd == "runner-bench":
        opts = {"fp16": args.fp16, "channels_last": args.channels_last, "cuda_graphs": args.cuda_graphs}
        batches = tuple(int(b) for b in args.batch.split(","))
        result = runner_bench({k: v for k, v in opts.items() if v}, batches, args.repeats, args.warmup, args.device)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print("\n".join(_bench_lines("runner-bench", result)))
    else:
        print(summarize(args.out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
