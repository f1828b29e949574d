"""TensorRT build + runner. Without tensorrt (everywhere but an NVIDIA machine) the pure parts and the error paths
run; the build/run tests skip with the reason tensorrt_available() gives."""

from __future__ import annotations

import importlib.util
import io
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dynpose.engines.manifest import Entry, Manifest, describe_file
from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import rel_l2
from dynpose.runtime.backends.tensorrt import check_plan_metadata, load_trt
from dynpose.runtime.backends.tensorrt import cuda_utils as cu
from dynpose.runtime.backends.tensorrt.builder import INSTALL_HINT, PhaseBars, build_engine, tensorrt_available
from dynpose.runtime.backends.tensorrt.runner import TrtRunner, buffer_nbytes

HAS_TRT_MODULE = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA_PYTHON = importlib.util.find_spec("cuda") is not None and (
    importlib.util.find_spec("cuda.bindings") is not None or importlib.util.find_spec("cuda.cudart") is not None
)
TRT_OK, TRT_WHY = tensorrt_available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=TRT_WHY)

META = {"tensorrt_version": "10.13.3.9", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}
TF32_REL_L2 = 1e-2


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


def test_bf16_keeps_nan_and_inf() -> None:
    import torch

    bits = np.array(
        [0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x7F80FFFF, 0xFF800001, 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0x7F7FFFFF],
        dtype=np.uint32,
    )
    x = bits.view(np.float32)
    out = cu.to_io_dtype(x, cu.BF16)
    back = cu.from_io_dtype(out, cu.BF16)
    # Every NaN payload stays NaN with its sign (the rounding add used to turn 0x7F800001 into inf and 0xFFFFFFFF
    # into +0); inf stays inf, and the largest finite float rounds to inf as round-to-nearest-even says.
    assert np.isnan(back[:6]).all()
    assert (np.signbit(back[:6]) == [False, False, False, False, True, True]).all()
    assert back[6:].tolist() == [np.inf, -np.inf, np.inf]
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.isnan(back), np.isnan(want))
    np.testing.assert_array_equal(back[~np.isnan(back)], want[~np.isnan(want)])


def test_cuda_python_version_rule() -> None:
    assert cu.cuda_python_problem("12.9.1") is None
    assert cu.cuda_python_problem("12.9.10") is None
    assert cu.cuda_python_problem("13.0.0") is None
    assert cu.cuda_python_problem(None) is None
    for old in ("12.6.2.post1", "12.9.0", "11.8.7"):
        msg = cu.cuda_python_problem(old)
        assert msg is not None and "holds the GIL" in msg and "cuda-python>=12.9.1" in msg


@pytest.mark.skipif(not HAS_CUDA_PYTHON, reason="cuda-python not installed")
def test_native_handle_of_a_stream() -> None:
    rt = cu.cudart()
    assert cu.native_handle(rt.cudaStream_t(init_value=1234)) == 1234


def test_progress_bars_follow_the_phases() -> None:
    out = io.StringIO()
    bars = PhaseBars(file=out)
    bars.phase_start("Building engine", None, 3)
    bars.phase_start("Tactic search", "Building engine", 10)  # nested: no bar of its own
    assert bars.open_phases == ["Building engine"]

    def steps() -> None:
        for i in range(100):
            assert bars.step_complete("Tactic search", i) is True  # True: keep building

    workers = [threading.Thread(target=steps) for _ in range(4)]  # TensorRT calls from its own threads
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for i in range(3):
        assert bars.step_complete("Building engine", i) is True
    assert bars._bars["Building engine"].n == 3  # the nested phase's steps did not advance it
    bars.phase_finish("Tactic search")
    bars.phase_finish("Building engine")
    bars.phase_finish("never started")  # TensorRT may finish a phase early or twice: harmless
    assert bars.open_phases == []
    assert "TensorRT: Building engine" in out.getvalue()


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
    # An fp32 plan is not bit-exact: TensorRT enables TF32 by default (BuilderFlag.TF32), so convolutions round
    # their inputs to 10-bit mantissas, ~1e-3 relative per layer; compare the whole output, not each element.
    assert rel_l2(got, want) < TF32_REL_L2
    assert rel_l2(one, want[:1]) < TF32_REL_L2

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


@pytest.fixture(scope="module")
def tinypose_plan(tmp_path_factory: pytest.TempPathFactory, tinypose_256: Path) -> Path:
    """TinyPose 256x192 as an fp32 plan, batch 1..4 (built once for the tests below)."""
    plan = tmp_path_factory.mktemp("plans") / "tinypose.plan"
    build_engine(tinypose_256, plan, input_name="image", input_chw=(3, 256, 192), max_batch=4, progress=False)
    return plan


@needs_trt
def test_progress_monitor_reports_build_phases(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    onnx_path = _qdq_conv(tmp_path, quantize=False)
    build_engine(onnx_path, tmp_path / "p.plan", input_name="image", input_chw=(3, 8, 8), max_batch=2, progress=True)
    assert "TensorRT: " in capfd.readouterr().err  # the tqdm bars of the IProgressMonitor


@needs_trt
def test_fp16_plan_runs_the_fp16_graph(tmp_path: Path, tinypose_256: Path) -> None:
    from dynpose.export.fp16 import convert_fp16
    from dynpose.runtime.backends.ort import OrtRunner

    x = np.random.default_rng(1).standard_normal((5, 3, 256, 192), dtype=np.float32)
    half = tmp_path / "tinypose.fp16.onnx"
    convert_fp16(tinypose_256, half, sample=x)
    plan = tmp_path / "fp16.plan"
    build_engine(half, plan, input_name="image", input_chw=(3, 256, 192), max_batch=8, progress=False)
    with OrtRunner(half) as ort_half, OrtRunner(tinypose_256) as ort_fp32:
        want_half, want_fp32 = ort_half.infer(x), ort_fp32.infer(x)
    with TrtRunner(plan, device="cuda") as r:
        assert r.input_metadata().dtype == "float32"  # the converter keeps fp32 IO; fp16 inside
        got = r.infer(x)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    # Strongly typed: TensorRT runs the graph's own precision mix, so the plan tracks the fp16 ONNX closely.
    assert rel_l2(got, want_half) < 1e-2
    assert rel_l2(got, want_fp32) < 3e-2


def _qdq_conv(tmp: Path, quantize: bool = True) -> Path:
    """image (N,3,8,8) -> [Q/DQ int8, scale 4/127] -> Conv 3x3 with int8 per-channel weights (DQ) -> heatmaps;
    `quantize=False`: the same Conv in plain fp32."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    if quantize:
        w_scale = (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
        w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
        inits = [
            helper.make_tensor("x_scale", TensorProto.FLOAT, [], [4.0 / 127]),
            helper.make_tensor("x_zp", TensorProto.INT8, [], [0]),
            helper.make_tensor("w_q", TensorProto.INT8, list(w_q.shape), w_q.flatten().tolist()),
            helper.make_tensor("w_scale", TensorProto.FLOAT, [4], w_scale.tolist()),
            helper.make_tensor("w_zp", TensorProto.INT8, [4], [0, 0, 0, 0]),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["image", "x_scale", "x_zp"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=0),
            helper.make_node("Conv", ["xd", "w"], ["heatmaps"], pads=[1, 1, 1, 1]),
        ]
    else:
        inits = [helper.make_tensor("w", TensorProto.FLOAT, list(w.shape), w.flatten().tolist())]
        nodes = [helper.make_node("Conv", ["image", "w"], ["heatmaps"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializer=inits,
    )
    path = tmp / ("qdq_conv.onnx" if quantize else "conv.onnx")
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def test_qdq_fixture_runs_in_onnx_runtime(tmp_path: Path) -> None:
    """The int8 test's graph, here on the CPU: quantizing the input costs at most half a step per element."""
    from dynpose.runtime.backends.ort import OrtRunner

    x = np.random.default_rng(2).uniform(-4, 4, (6, 3, 8, 8)).astype(np.float32)
    with OrtRunner(_qdq_conv(tmp_path)) as q, OrtRunner(_qdq_conv(tmp_path, quantize=False)) as f:
        got, want = q.infer(x), f.infer(x)
    assert got.shape == want.shape == (6, 4, 8, 8)
    assert 1e-4 < rel_l2(got, want) < 2e-2  # really quantized, and close


@needs_trt
def test_int8_plan_from_explicit_qdq(tmp_path: Path) -> None:
    from dynpose.runtime.backends.ort import OrtRunner

    qdq = _qdq_conv(tmp_path)
    plan = tmp_path / "int8.plan"
    build_engine(qdq, plan, input_name="image", input_chw=(3, 8, 8), max_batch=4, progress=False)
    x = np.random.default_rng(2).uniform(-4, 4, (6, 3, 8, 8)).astype(np.float32)
    with OrtRunner(qdq) as ort_runner:
        want = ort_runner.infer(x)
    with TrtRunner(plan, device="cuda") as r:
        got = r.infer(x)  # 6 > 4: split
    # Same quantized values on both sides: int8 x int8 products summed exactly, then scaled; fp32 rounding only.
    assert got.shape == (6, 4, 8, 8) and rel_l2(got, want) < 1e-3


@needs_trt
def test_two_runners_in_two_threads(tinypose_plan: Path) -> None:
    rng = np.random.default_rng(3)
    xa, xb = (rng.standard_normal((3, 3, 256, 192), dtype=np.float32) for _ in range(2))
    with TrtRunner(tinypose_plan) as a, TrtRunner(tinypose_plan) as b:
        ref_a, ref_b = a.infer(xa), b.infer(xb)
        out: dict[str, list[np.ndarray]] = {"a": [], "b": []}

        def work(runner: TrtRunner, x: np.ndarray, key: str) -> None:
            for _ in range(10):
                out[key].append(runner.infer(x))

        threads = [threading.Thread(target=work, args=t) for t in ((a, xa, "a"), (b, xb, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert len(out["a"]) == len(out["b"]) == 10
    for got in out["a"]:
        np.testing.assert_allclose(got, ref_a, rtol=1e-5, atol=1e-6)
    for got in out["b"]:
        np.testing.assert_allclose(got, ref_b, rtol=1e-5, atol=1e-6)


@needs_trt
def test_use_after_close_and_close_under_load(tinypose_plan: Path) -> None:
    x = np.random.default_rng(4).standard_normal((2, 3, 256, 192), dtype=np.float32)
    r = TrtRunner(tinypose_plan).activate()
    want = r.infer(x)
    errors: list[BaseException] = []
    results: list[np.ndarray] = []

    def loop() -> None:
        while True:
            try:
                results.append(r.infer(x))
            except DynPoseError:
                return
            except BaseException as e:  # an AttributeError on freed buffers, a CUDA error: what this test is about
                errors.append(e)
                return

    t = threading.Thread(target=loop)
    t.start()
    while not results and t.is_alive():
        threading.Event().wait(0.01)
    r.close()  # waits for the call in flight, then frees; the loop's next call gets DynPoseError
    t.join(timeout=60)
    assert not t.is_alive() and not errors, errors
    for got in results:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(DynPoseError, match="not active"):
        r.infer(x)
    r.close()  # a second close is a no-op
