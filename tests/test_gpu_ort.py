"""ONNX Runtime on a GPU: the provider options dynpose builds (pure, checked here), the CPU/GPU wheel clash, the
missing-provider error, and the ORT runner closed under load (real sessions on the CPU)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import tinypose_card

from dynpose.engines.manifest import Entry, describe_file
from dynpose.errors import DynPoseError
from dynpose.onnx_utils import (
    DEFAULT_PROVIDER_OPTIONS,
    ORT_TRT_CACHE_DIR,
    cuda_ep_options,
    ort_install_problem,
    provider_chain,
    providers_for,
    tensorrt_ep_options,
)
from dynpose.runtime.backends.ort import OrtRunner, load_ort, ort_provider_options


def test_cuda_options_search_heuristically() -> None:
    assert cuda_ep_options() == {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"}
    assert cuda_ep_options("DEFAULT", device_id=1) == {"device_id": 1, "cudnn_conv_algo_search": "DEFAULT"}
    with pytest.raises(DynPoseError, match="cudnn_conv_algo_search 'FAST': use one of HEURISTIC, DEFAULT"):
        cuda_ep_options("FAST")
    # Every CUDA session gets the heuristic search unless told otherwise (ORT's own default is EXHAUSTIVE).
    assert DEFAULT_PROVIDER_OPTIONS["CUDAExecutionProvider"]["cudnn_conv_algo_search"] == "HEURISTIC"


def test_provider_chain() -> None:
    assert provider_chain("cpu") == ["CPUExecutionProvider"]
    assert provider_chain("cuda") == [
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}),
        "CPUExecutionProvider",
    ]
    trt = {"trt_fp16_enable": True}
    chain = provider_chain(
        "trt", {"TensorrtExecutionProvider": trt, "CUDAExecutionProvider": {"cudnn_conv_algo_search": "DEFAULT"}}
    )
    assert chain == [
        ("TensorrtExecutionProvider", trt),
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "DEFAULT"}),  # the caller's choice wins
        "CPUExecutionProvider",
    ]
    with pytest.raises(DynPoseError, match="unknown device 'gpu' for ONNX Runtime; use cpu, cuda, trt"):
        provider_chain("gpu")


def test_tensorrt_options(tmp_path: Path) -> None:
    opts = tensorrt_ep_options("image", (3, 256, 192), 64, tmp_path / "cache", precision="fp16")
    assert opts == {
        "device_id": 0,
        "trt_profile_min_shapes": "image:1x3x256x192",
        "trt_profile_opt_shapes": "image:32x3x256x192",
        "trt_profile_max_shapes": "image:64x3x256x192",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path / "cache"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(tmp_path / "cache"),
        "trt_fp16_enable": True,
        "trt_int8_enable": False,
    }
    one = tensorrt_ep_options("x", (3, 8, 8), 1, "c", precision="int8")
    assert one["trt_profile_opt_shapes"] == "x:1x3x8x8" and one["trt_int8_enable"] and not one["trt_fp16_enable"]
    assert not tensorrt_ep_options("x", (3, 8, 8), 8, "c")["trt_fp16_enable"]
    with pytest.raises(DynPoseError, match="cannot name it"):
        tensorrt_ep_options("a:b", (3, 8, 8), 8, "c")
    with pytest.raises(DynPoseError, match="input_chw must be three positive sizes"):
        tensorrt_ep_options("x", (3, 0, 8), 8, "c")
    with pytest.raises(DynPoseError, match="max_batch must be an integer >= 1"):
        tensorrt_ep_options("x", (3, 8, 8), 0, "c")
    with pytest.raises(DynPoseError, match="precision 'bf16'"):
        tensorrt_ep_options("x", (3, 8, 8), 8, "c", precision="bf16")


def _entry(engine_dir: Path, onnx: Path, precision: str = "fp32") -> Entry:
    (engine_dir / "large.onnx").write_bytes(onnx.read_bytes())
    return Entry(
        role="large",
        model="tinypose_256x192",
        file="large.onnx",
        format="onnx",
        precision=precision,
        card=tinypose_card(192, 256),
        input_name="image",
        max_batch=16,
        **describe_file(engine_dir, "large.onnx"),
    )


def test_options_from_the_manifest_entry(tmp_path: Path, tinypose_256: Path) -> None:
    entry = _entry(tmp_path, tinypose_256, precision="fp16")
    assert ort_provider_options("cpu", entry, tmp_path) == {}
    assert ort_provider_options("cuda", entry, tmp_path) == {"CUDAExecutionProvider": cuda_ep_options()}
    trt = ort_provider_options("trt", entry, tmp_path)["TensorrtExecutionProvider"]
    assert trt["trt_profile_max_shapes"] == "image:16x3x256x192" and trt["trt_profile_min_shapes"] == "image:1x3x256x192"
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_path"] == str(tmp_path / ORT_TRT_CACHE_DIR)
    runner = load_ort(tmp_path, entry, device="cpu")
    assert runner.provider_options == {}
    with runner:  # a real CPU session opened through the same path
        assert runner.infer(np.zeros((2, 3, 256, 192), np.float32)).shape == (2, 17, 64, 48)


def test_wheel_clash_is_named() -> None:
    assert ort_install_problem(["onnxruntime"]) is None
    assert ort_install_problem(["onnxruntime-gpu"]) is None
    msg = ort_install_problem(["onnxruntime", "onnxruntime_gpu"])
    assert msg is not None and "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in msg


def test_missing_gpu_provider_is_one_line() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    with pytest.raises(DynPoseError, match="ONNX Runtime has no CUDAExecutionProvider here") as e:
        providers_for("cuda")
    assert "\n" not in str(e.value) and "--device cpu" in str(e.value)


def test_trt_cache_folder_that_cannot_be_made(tmp_path: Path, tinypose_256: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    opts = {"TensorrtExecutionProvider": {"trt_engine_cache_path": str(blocker / "cache")}}
    r = OrtRunner(tinypose_256, device="trt", provider_options=opts)
    with pytest.raises(DynPoseError, match="cannot create the TensorRT EP cache folder") as e:
        r.activate()
    assert "\n" not in str(e.value) and not r.is_active


def test_close_under_load(tinypose_128: Path) -> None:
    """One thread infers while the main thread closes: each call returns the right heatmaps or a DynPoseError."""
    x = np.random.default_rng(0).standard_normal((2, 3, 128, 96), dtype=np.float32)
    runner = OrtRunner(tinypose_128).activate()
    want = runner.infer(x)
    errors: list[BaseException] = []
    results: list[np.ndarray] = []

    def loop() -> None:
        while True:
            try:
                results.append(runner.infer(x))
            except DynPoseError:
                return
            except BaseException as e:  # what this test is about
                errors.append(e)
                return

    t = threading.Thread(target=loop)
    t.start()
    while not results and t.is_alive():
        threading.Event().wait(0.01)
    runner.deactivate()
    t.join(timeout=60)
    assert not t.is_alive() and not errors, errors
    for got in results:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
