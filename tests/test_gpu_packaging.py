"""The GPU extras' pins (the TensorRT wheels cannot be fetched here, so the requirements are read from pyproject),
the install advice in the docs, and the prepared GPU check: its dry run (CI has no GPU) and its summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"


def _extras() -> dict[str, dict[str, Requirement]]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(REPO / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    return {name: {Requirement(r).name: Requirement(r) for r in reqs} for name, reqs in extras.items()}


def _allows(req: Requirement, *versions: str) -> list[bool]:
    return [req.specifier.contains(v, prereleases=False) for v in versions]


def test_gpu_extras_pin_matching_cuda_majors() -> None:
    extras = _extras()
    cu12, cu13 = extras["gpu-cu12"], extras["gpu-cu13"]
    assert set(cu12) == {"tensorrt-cu12", "cuda-python", "onnxruntime-gpu"}
    assert set(cu13) == {"tensorrt-cu13", "cuda-python", "onnxruntime-gpu"}
    # cuda-python: >= 12.9.1 (bindings that release the GIL) and the driver's CUDA major.
    assert _allows(cu12["cuda-python"], "12.9.0", "12.9.1", "12.9.10", "13.0.0") == [False, True, True, False]
    assert _allows(cu13["cuda-python"], "12.9.10", "13.0.0", "13.4.4") == [False, True, True]
    assert _allows(cu12["tensorrt-cu12"], "10.0.1", "11.4.0.106") == [True, True]
    assert _allows(cu13["tensorrt-cu13"], "10.13.3.9", "11.4.0.106") == [True, True]
    # The old extra stays, as the CUDA 12 set (which runs on CUDA 12 and 13 drivers).
    assert {n: str(r) for n, r in extras["gpu"].items()} == {n: str(r) for n, r in cu12.items()}


def test_no_gpu_extra_pulls_what_breaks_a_cuda12_driver_or_the_cpu_wheel() -> None:
    for name, reqs in _extras().items():
        if name in ("cpu", "dev"):  # the CPU wheel's own extra, and the dev set that includes it
            continue
        # `tensorrt` (metapackage) resolves to tensorrt-cu13 since 10.13.3; onnxruntime would hide the GPU providers.
        assert "tensorrt" not in reqs and "onnxruntime" not in reqs, name
        if "cuda-python" in reqs:
            assert not reqs["cuda-python"].specifier.contains("12.6.0"), f"{name}: cuda-python below 12.9.1 allowed"


def test_docs_say_how_to_pick_and_install() -> None:
    text = (REPO / "docs" / "tensorrt.md").read_text() + (REPO / "docs" / "gpu.md").read_text()
    for needle in (
        "nvidia-smi",
        "gpu-cu12",
        "gpu-cu13",
        "pip uninstall -y onnxruntime",
        "--extra-index-url https://pypi.nvidia.com",
        "cudaErrorInsufficientDriver",
        "bash benchmarks/gpu_check.sh",
    ):
        assert needle in text, needle
    readme = (REPO / "benchmarks" / "README.md").read_text()
    assert "bash benchmarks/gpu_check.sh" in readme


def _run_check(*args: str, env_out: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    if env_out is not None:
        env["OUT"] = env_out
    return subprocess.run(
        ["bash", str(GPU_CHECK), *args], capture_output=True, text=True, timeout=120, env=env, cwd=REPO, check=False
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _run_check("--dry-run", env_out=str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    text = res.stdout
    assert f"would write to {out}" in text and "dry run done (nothing was run)" in text
    for step in ("install", "tests", "engines", "bench-fp32", "bench-fp16-graphs", "streams-fp32", "summarize"):
        assert f"[{step}" in text, step
    assert "pip install --no-deps --no-build-isolation --no-index -e ." in text
    assert "dynpose.cli.bench" in text and "--backend torch --device cuda --batch 1,8,32,64" in text
    assert "--fp16 --channels-last --cuda-graphs" in text and "gpu_streams.py" in text
    assert "tests/test_torch_backend.py tests/test_gpu_torch.py" in text
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_without_a_gpu_says_so(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run for real")
    res = _run_check(str(tmp_path / "out"))
    assert res.returncode == 2
    assert "no CUDA device here" in res.stderr and "--dry-run" in res.stderr
    assert (tmp_path / "out" / "probe.json").is_file()
    res = _run_check("--budget")
    assert res.returncode != 0 and "--budget needs seconds" in res.stderr


def test_summary_of_a_real_bench(tmp_path: Path, tinypose_engine_dir: Path) -> None:
    """The summary step on what the other steps write: a real dynpose-bench result (TinyPose pair, ORT CPU, one
    round) and the step log; figures are whatever this machine measured."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    from dynpose.bench import RoundSpec, run_benchmark
    from dynpose.bench.options import BenchOptions

    out = tmp_path / "out"
    out.mkdir()
    rounds = RoundSpec(min_rounds=1, max_rounds=1, warmup=0)
    opts = BenchOptions(batches=(2,), fractions=(0.5,), rounds=rounds, json_out=out / "bench_cpu-ort.json", save=False)
    run_benchmark(tinypose_engine_dir, opts)
    (out / "steps.tsv").write_text("bench-cpu-ort\tok\t0\t3\tdynpose-bench\nstreams-fp32\tskipped\t-\t0\tbudget\n")
    (out / "probe.json").write_text(json.dumps({"python": "3.x", "missing": {"tensorrt": "none"}, "cuda": False}))
    text = gpu_check.summarize(out)
    summary = json.loads((out / "gpu_check.json").read_text())
    assert set(summary) == {"probe", "steps", "tests", "streams", "bench"}
    assert summary["bench"]["cpu-ort"]["crops"] and summary["tests"] is None
    assert [s["status"] for s in summary["steps"]] == ["ok", "skipped"]
    fields = next(line for line in text.splitlines() if line.startswith("cpu-ort")).split()
    # config, batch, large-only, small-only, dynpose@.5 crops/s, its ratio to large-only, the best fraction
    assert fields[1] == "2" and all(float(f) > 0 for f in fields[2:5]) and fields[5].endswith("x") and "x@" in fields[6]
    assert "missing modules: tensorrt" in text and (out / "gpu_check.txt").read_text() == text


def test_onnxruntime_comes_from_exactly_one_extra() -> None:
    """The CPU wheel is not a core dependency: a GPU extra replaces it instead of installing both."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    core = {Requirement(r).name for r in project["dependencies"]}
    assert "onnxruntime" not in core and "onnxruntime-gpu" not in core
    extras = _extras()
    assert set(extras["cpu"]) == {"onnxruntime"}
    assert any(r.startswith("dynpose[cpu") for r in project["optional-dependencies"]["dev"])
    for gpu in ("gpu", "gpu-cu12", "gpu-cu13"):
        assert "onnxruntime-gpu" in extras[gpu] and "onnxruntime" not in extras[gpu]
