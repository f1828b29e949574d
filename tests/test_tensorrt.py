"""TensorRT build + runner. Without tensorrt (everywhere but an NVIDIA machine) the pure parts and the error paths
run; the build/run tests skip with the reason tensorrt_available() gives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dynpose.engines.manifest import Entry, Manifest, describe_file
from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.runtime.backends.tensorrt import check_plan_metadata, load_trt
from dynpose.runtime.backends.tensorrt import cuda_utils as cu
from dynpose.runtime.backends.tensorrt.builder import INSTALL_HINT, build_engine, tensorrt_available
from dynpose.runtime.backends.tensorrt.runner import buffer_nbytes

HAS_TRT_MODULE = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA_PYTHON = importlib.util.find_spec("cuda") is not None and (
    importlib.util.find_spec("cuda.bindings") is not None or importlib.util.find_spec("cuda.cudart") is not None
)
TRT_OK, TRT_WHY = tensorrt_available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=TRT_WHY)

META = {"tensorrt_version": "10.13.3.9", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}


def _card() -> ModelCard:
    return ModelCard(name="tinypose", input_width=192, input_height=256, color_order="rgb")


# -- without TensorRT ----------------------------------------------------------------------------------------------
def test_available_reports_a_reason() -> None:
    ok, why = tensorrt_available()
    assert isinstance(ok, bool) and why
    if not HAS_TRT_MODULE:
        assert (ok, why) == (False, "tensorrt not installed (NVIDIA index only)")


@pytest.mark.skipif(HAS_TRT_MODULE, reason="checks the message shown when tensorrt is missing")
def test_build_without_tensorrt_is_one_line_hint(tmp_path: Path, tinypose_256: Path) -> None:
    with pytest.raises(DynPoseError) as e:
        build_engine(tinypose_256, tmp_path / "small.plan", input_name="image", input_chw=(3, 256, 192), max_batch=8)
    assert str(e.value) == INSTALL_HINT
    assert "\n" not in str(e.value)
    assert not (tmp_path / "small.plan").exists()


def test_build_rejects_bad_arguments_before_touching_tensorrt(tmp_path: Path, tinypose_256: Path) -> None:
    plan = tmp_path / "x.plan"
    with pytest.raises(DynPoseError, match="file not found"):
        build_engine(tmp_path / "none.onnx", plan, input_name="image", input_chw=(3, 256, 192), max_batch=8)
    with pytest.raises(DynPoseError, match="opt_batch must be in 1..8"):
        build_engine(tinypose_256, plan, input_name="image", input_chw=(3, 256, 192), max_batch=8, opt_batch=9)
    with pytest.raises(DynPoseError, match="input_chw"):
        build_engine(tinypose_256, plan, input_name="image", input_chw=(3, 0, 192), max_batch=8)
    with pytest.raises(DynPoseError, match="opt_level must be 0..5"):
        build_engine(tinypose_256, plan, input_name="image", input_chw=(3, 256, 192), max_batch=8, opt_level=7)


def test_buffer_sizes_refuse_data_dependent_shapes() -> None:
    assert buffer_nbytes((8, 17, 64, 48), np.dtype(np.float32), "heatmaps", "plan") == 8 * 17 * 64 * 48 * 4
    assert buffer_nbytes((8, 17, 64, 48), cu.BF16, "heatmaps", "plan") == 8 * 17 * 64 * 48 * 2
    with pytest.raises(DynPoseError, match="data-dependent shape") as e:
        buffer_nbytes((8, -1, 4), np.dtype(np.float32), "boxes", "TensorRT plan x.plan")
    assert "\n" not in str(e.value) and "'boxes'" in str(e.value)


def _tiny_graph(tmp_path: Path, name: str, nodes: list, inits: list, elem: int = TensorProto.FLOAT) -> Path:
    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", elem, ["N", 2])],
        [helper.make_tensor_value_info("y", elem, ["N", 2])],
        initializer=inits,
    )
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_plan_metadata_check() -> None:
    check_plan_metadata(META, installed_version="10.13.3.9", compute_capability="8.9")
    with pytest.raises(DynPoseError) as e:
        check_plan_metadata(
            META, installed_version="10.14.1.48", compute_capability="9.0", gpu_name="NVIDIA H100", where="large plan"
        )
    msg = str(e.value)
    assert msg == (
        "large plan: engine built with TensorRT 10.13.3.9 for sm_89 (NVIDIA L4); this machine has TensorRT "
        "10.14.1.48 and sm_90 (NVIDIA H100); rebuild with dynpose-export --format tensorrt"
    )
    with pytest.raises(DynPoseError, match="for sm_89 .*this machine has TensorRT 10.13.3.9 and sm_86"):
        check_plan_metadata(META, installed_version="10.13.3.9", compute_capability="8.6")
    with pytest.raises(DynPoseError, match="no 'tensorrt' build metadata; rebuild"):
        check_plan_metadata(None, installed_version="10.13.3.9", compute_capability="8.9")


def _plan_entry(engine_dir: Path, meta: dict | None, write: bool = True) -> Entry:
    if write:  # a stand-in file for the tests that fail before deserialising
        (engine_dir / "small.plan").write_bytes(b"plan bytes")
    return Entry(
        role="small",
        model="tinypose",
        file="small.plan",
        format="tensorrt",
        precision="fp16",
        card=_card(),
        input_name="image",
        output_name="heatmaps",
        max_batch=8,
        tensorrt=meta,
        **describe_file(engine_dir, "small.plan"),
    )


def test_loader_errors_without_a_gpu_stack(tmp_path: Path) -> None:
    entry = _plan_entry(tmp_path, META)
    entry.format = "onnx"
    with pytest.raises(DynPoseError, match="the tensorrt backend runs plans"):
        load_trt(tmp_path, entry)
    if not HAS_TRT_MODULE:
        with pytest.raises(DynPoseError) as e:
            load_trt(tmp_path, _plan_entry(tmp_path, META))
        assert str(e.value) == INSTALL_HINT


def test_parse_device() -> None:
    assert cu.parse_device("cuda") == 0
    assert cu.parse_device("cuda:2") == 2
    with pytest.raises(DynPoseError, match="must be 'cuda' or 'cuda:N', got 'cpu'"):
        cu.parse_device("cpu")


def test_io_dtype_conversions_match_torch() -> None:
    import torch

    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100
    x[:4] = [0.0, -0.0, 1.0, 3.140625]  # exactly representable in bf16
    bits = cu.to_io_dtype(x, cu.BF16)
    assert bits.dtype == np.uint16
    back = cu.from_io_dtype(bits, cu.BF16)
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()  # torch rounds to nearest even too
    np.testing.assert_array_equal(back, want)
    assert back[:4].tolist() == [0.0, 0.0, 1.0, 3.140625]
    h = cu.to_io_dtype(x, np.dtype(np.float16))
    assert h.dtype == np.float16
    out = cu.from_io_dtype(h, np.dtype(np.float16))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x, rtol=1e-3)


def test_host_array_is_a_view_of_the_memory() -> None:
    import ctypes

    buf = (ctypes.c_uint8 * 16)()
    view = cu.host_array(ctypes.addressof(buf), 16, np.dtype(np.float32))
    view[:] = [1.0, 2.0, 3.0, 4.0]
    assert bytes(buf) == np.array([1, 2, 3, 4], np.float32).tobytes()


@pytest.mark.skipif(not HAS_CUDA_PYTHON, reason="cuda-python not installed")
def test_cuda_check_raises_with_error_name() -> None:
    rt = cu.cudart()
    assert cu.check((rt.cudaError_t.cudaSuccess, 7)) == 7
    assert cu.check((rt.cudaError_t.cudaSuccess,)) is None
    with pytest.raises(DynPoseError, match="cudaMalloc failed: cudaErrorMemoryAllocation; lower the max batch"):
        cu.check((rt.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")
    if not TRT_OK:
        # A real call on this machine: no driver or no device, reported by name in one line.
        try:
            count = cu.check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        except DynPoseError as e:
            assert "cudaGetDeviceCount failed: cudaError" in str(e) and "\n" not in str(e)
        else:
            assert count >= 0


# -- with TensorRT and a GPU ---------------------------------------------------------------------------------------
@needs_trt
def test_build_and_run_matches_onnx_runtime(tmp_path: Path, tinypose_256: Path) -> None:
    from dynpose.runtime.backends.ort import OrtRunner

    cache = tmp_path / "timing.cache"
    cold = build_engine(
        tinypose_256,
        tmp_path / "cold.plan",
        input_name="image",
        input_chw=(3, 256, 192),
        max_batch=8,
        timing_cache=cache,
        progress=False,
    )
    assert cache.stat().st_size > 0
    # The second build reads the timing cache the first one saved (its build_s is printed, not asserted).
    meta = build_engine(
        tinypose_256,
        tmp_path / "small.plan",
        input_name="image",
        input_chw=(3, 256, 192),
        max_batch=8,
        timing_cache=cache,
        progress=False,
    )
    print(f"build_s cold {cold['build_s']} warm {meta['build_s']}")
    assert meta["profile"] == {"input": "image", "min": [1, 3, 256, 192], "opt": [4, 3, 256, 192], "max": [8, 3, 256, 192]}
    assert meta["tensorrt_version"] and "." in meta["compute_capability"]
    m = Manifest(entries=[_plan_entry(tmp_path, meta, write=False)])
    m.save(tmp_path)
    entry = Manifest.load(tmp_path).require("small", "tensorrt")

    x = np.random.default_rng(0).standard_normal((11, 3, 256, 192), dtype=np.float32)
    with OrtRunner(tinypose_256) as ort_runner:
        want = ort_runner.infer(x)
    with load_trt(tmp_path, entry) as r:
        assert r.max_batch == 8
        got = r.infer(x)  # 11 > 8: the base class splits
        one = r.infer(x[:1])
    assert got.shape == want.shape == (11, 17, 64, 48)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(one, want[:1], rtol=1e-2, atol=1e-3)

    stale = dict(meta, tensorrt_version="0.0.0")
    entry.tensorrt = stale
    with pytest.raises(DynPoseError, match="engine built with TensorRT 0.0.0"):
        load_trt(tmp_path, entry)


@needs_trt
def test_parser_errors_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    g = helper.make_graph(
        [helper.make_node("NoSuchOp", ["image"], ["y"], domain="nowhere")],
        "bad",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("nowhere", 1)]), bad)
    with pytest.raises(DynPoseError, match="cannot parse it") as e:
        build_engine(bad, tmp_path / "bad.plan", input_name="image", input_chw=(3, 8, 8), max_batch=2, progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "bad.plan").exists()
