"""The torch backend as a GPU path: options (fp16, channels_last, CUDA graphs per batch bucket, torch.compile),
bucketing and padding (pure, here), concurrency and close under load (CPU here, CUDA on a GPU), the EngineSet /
dynpose-bench plumbing. CUDA-only tests skip with the reason; `benchmarks/gpu_check.sh` runs them on a lent GPU."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dynpose.engines.manifest import Entry, Manifest, describe_file
from dynpose.errors import DynPoseError
from dynpose.models.zoo import create_model
from dynpose.onnx_utils import rel_l2
from dynpose.runtime.backends.torch import TorchRunner
from dynpose.runtime.backends.torch.runner import TorchOptions, batch_buckets, bucket_for, stage_padded

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch CUDA build); run benchmarks/gpu_check.sh")
# TF32: torch runs fp32 convolutions on Ampere+ with 10-bit mantissa inputs (torch.backends.cudnn.allow_tf32 is on by
# default), so a deep network's fp32 output differs from the CPU's; compare relative L2. For scale, on the CPU these
# random ResNet-50 / router nets differ from fp32 by 2.4e-4 / 1.7e-4 in fp16 and 1.7e-3 / 1.5e-3 in bf16 (7-bit
# mantissa, coarser than TF32's 10), so the bounds below leave a wide margin and still catch a wrong layout or
# a stale padding row (errors of order 1).
TF32_REL_L2 = 1e-2
FP16_REL_L2 = 3e-2


def _random(name: str, seed: int = 0) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random weights are the point
        torch.manual_seed(seed)
        return create_model(name, weights="random")


def _copy(module: torch.nn.Module, name: str) -> torch.nn.Module:
    twin = _random(name)
    twin.load_state_dict(module.state_dict())
    return twin


def _crops(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, h, w), dtype=np.float32)


def _direct(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return _random("resnet_50")


@pytest.fixture(scope="module")
def router() -> torch.nn.Module:
    return _random("router", seed=1)


# -- bucketing and padding (pure) ------------------------------------------------------------------------------------
def test_batch_buckets() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(2) == (1, 2)
    assert batch_buckets(3) == (1, 2, 3)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    for bad in (0, -1, 2.5, None):
        with pytest.raises(DynPoseError, match="max_batch must be an integer >= 1"):
            batch_buckets(bad)  # type: ignore[arg-type]


def test_bucket_for_is_the_smallest_bucket_that_fits() -> None:
    buckets = batch_buckets(48)
    for n in range(1, 49):
        b = bucket_for(n, buckets)
        assert b >= n and b in buckets
        assert all(c < n for c in buckets if c < b)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    with pytest.raises(DynPoseError, match="larger than the largest captured batch 48"):
        bucket_for(49, buckets)


def test_stage_padded_copies_and_zero_fills() -> None:
    dest = np.full(8 * 2 * 3, 7.0, dtype=np.float32)  # room for 8 items of 2 x 3; 7 marks untouched memory
    batch = np.arange(3 * 2 * 3, dtype=np.float32).reshape(3, 2, 3) + 1
    view = stage_padded(dest, batch, 4)
    assert view.shape == (4, 2, 3) and np.shares_memory(view, dest)
    np.testing.assert_array_equal(view[:3], batch)
    assert not view[3].any()  # the padding item is zero, not stale data
    assert (dest[4 * 6 :] == 7.0).all()  # nothing past the bucket is written
    np.testing.assert_array_equal(stage_padded(dest, batch, 3), batch)
    with pytest.raises(DynPoseError, match="cannot pad a batch of 3 to 2"):
        stage_padded(dest, batch, 2)
    with pytest.raises(DynPoseError, match="staging buffer holds 8 items, 9 needed"):
        stage_padded(dest, batch, 9)


def test_padding_rows_do_not_change_the_real_rows(resnet: torch.nn.Module, router: torch.nn.Module) -> None:
    # What CUDA graph buckets rely on: the zoo models treat every crop on its own (eval BatchNorm, per-crop pooling),
    # so running a batch padded with zero rows and slicing gives the unpadded result.
    for module, (h, w) in ((resnet, (64, 32)), (router, (256, 192))):
        x = _crops(3, h, w, seed=3)
        dest = np.empty(4 * x[0].size, dtype=np.float32)
        padded = stage_padded(dest, x, 4)
        np.testing.assert_allclose(_direct(module, padded.copy())[:3], _direct(module, x), rtol=1e-4, atol=1e-5)


# -- options ----------------------------------------------------------------------------------------------------------
def test_options_are_checked(router: torch.nn.Module) -> None:
    assert TorchOptions.from_flags({}, "r") == TorchOptions()
    assert TorchOptions.from_flags({"fp16": True, "cuda_graphs": True}, "r").enabled() == ["fp16", "cuda_graphs"]
    with pytest.raises(DynPoseError, match=r"^r: unknown torch backend option\(s\) \['half'\]; use fp16"):
        TorchOptions.from_flags({"half": True}, "r")
    with pytest.raises(DynPoseError, match="on/off flags"):
        TorchOptions.from_flags({"fp16": 1}, "r")
    with pytest.raises(DynPoseError, match=r"unknown torch backend option\(s\) \['graphs'\]"):
        TorchRunner.from_module(router, "cpu", graphs=True)
    with pytest.raises(DynPoseError, match="CUDA graphs need a CUDA device") as e:
        TorchRunner.from_module(router, "cpu", cuda_graphs=True)
    assert "\n" not in str(e.value)


def test_channels_last_on_cpu_matches(resnet: torch.nn.Module) -> None:
    x = _crops(3, 64, 32, seed=4)
    want = _direct(resnet, x)
    with TorchRunner.from_module(_copy(resnet, "resnet_50"), "cpu", max_batch=2, channels_last=True) as r:
        got = r.infer(x)
        assert r.module.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert got.flags["C_CONTIGUOUS"] and got.shape == (3, 17, 16, 8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_compile_flag_wraps_the_module(router: torch.nn.Module) -> None:
    # The compile itself runs on the first call (a minute on 2 CPU cores: the CUDA test below runs it on a GPU);
    # here, that the flag reaches torch.compile and leaves the eager module in place.
    r = TorchRunner.from_module(_copy(router, "router"), "cpu", compile=True).activate()
    try:
        assert type(r._forward).__name__ == "OptimizedModule" and r._forward._orig_mod is r.module
    finally:
        r.deactivate()


class _TwoHeads(torch.nn.Module):
    """Two outputs (like SimDR's x and y vectors): every output comes back, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y.mean(dim=(2, 3)), y.amax(dim=1)


def test_every_output_is_returned() -> None:
    torch.manual_seed(0)
    module = _TwoHeads().eval()
    x = _crops(5, 8, 6)
    with torch.inference_mode():
        want = [t.numpy() for t in module(torch.from_numpy(x))]
    with TorchRunner.from_module(module, "cpu", max_batch=4, channels_last=True) as r:
        got = r.infer_all(x)  # 5 > 4: split and concatenated per output
    assert [g.shape for g in got] == [(5, 4), (5, 8, 6)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


# -- concurrency and close under load ---------------------------------------------------------------------------------
def _close_under_load(runner: TorchRunner, x: np.ndarray, want: np.ndarray, tol: float) -> None:
    """One thread infers in a loop while the main thread closes the runner: every call either returns the right
    result or raises DynPoseError (never AttributeError or a CUDA error), and calls after the close fail."""
    errors: list[BaseException] = []
    done = threading.Event()
    results = []

    def loop() -> None:
        while not done.is_set():
            try:
                results.append(runner.infer(x))
            except DynPoseError:
                done.set()
            except BaseException as e:  # what this test is about
                errors.append(e)
                done.set()

    t = threading.Thread(target=loop)
    t.start()
    while not results and t.is_alive():
        threading.Event().wait(0.01)
    runner.deactivate()
    t.join(timeout=60)
    assert not t.is_alive() and not errors, errors
    assert results and all(rel_l2(r, want) < tol for r in results)
    with pytest.raises(DynPoseError, match="not active"):
        runner.infer(x)


def test_close_under_load_on_cpu(router: torch.nn.Module) -> None:
    x = _crops(2, 256, 192, seed=5)
    _close_under_load(TorchRunner.from_module(_copy(router, "router"), "cpu").activate(), x, _direct(router, x), 1e-5)


# -- EngineSet and dynpose-bench plumbing -----------------------------------------------------------------------------
def _router_dir(tmp: Path, router: torch.nn.Module) -> Path:
    torch.save(router.state_dict(), tmp / "router.pt")
    m = Manifest()
    m.put(
        Entry(
            role="router",
            model="router",
            file="router.pt",
            format="torch",
            precision="fp32",
            card=router.card,
            max_batch=4,
            **describe_file(tmp, "router.pt"),
        )
    )
    m.save(tmp)
    return tmp


def test_engine_set_passes_backend_options(tmp_path: Path, router: torch.nn.Module) -> None:
    from dynpose.runtime.engine_set import EngineSet, LoadOptions

    engine_dir = _router_dir(tmp_path, router)
    x = _crops(3, 256, 192, seed=6)
    with EngineSet.load(engine_dir, LoadOptions("torch", "cpu", backend_options={"channels_last": True})) as es:
        runner = es.require("router").runner
        assert isinstance(runner, TorchRunner) and runner.options == TorchOptions(channels_last=True)
        np.testing.assert_allclose(runner.infer(x), _direct(router, x), rtol=1e-4, atol=1e-5)
    with pytest.raises(DynPoseError, match=r"backend options \['fp16'\] are torch backend options; --backend ort"):
        EngineSet.load(engine_dir, LoadOptions("ort", "cpu", backend_options={"fp16": True}))
    with pytest.raises(DynPoseError, match=r"unknown torch backend option\(s\) \['fp8'\]"):
        EngineSet.load(engine_dir, LoadOptions("torch", "cpu", backend_options={"fp8": True}))


def test_bench_flags_belong_to_the_torch_backend(tmp_path: Path, router: torch.nn.Module) -> None:
    from dynpose.cli.bench import main

    engine_dir = _router_dir(tmp_path, router)
    res = CliRunner().invoke(main, ["--engine-dir", str(engine_dir), "--backend", "ort", "--fp16", "--channels-last"])
    assert res.exit_code == 2
    assert "error: --fp16, --channels-last: torch backend options; use --backend torch" in res.output
    res = CliRunner().invoke(main, ["--engine-dir", str(engine_dir), "--backend", "torch", "--cuda-graphs"])
    assert res.exit_code == 2 and "error: --cuda-graphs: CUDA graphs need --device cuda" in res.output


# -- CUDA -------------------------------------------------------------------------------------------------------------
@needs_cuda
def test_cuda_graphs_match_eager_for_every_bucket(resnet: torch.nn.Module) -> None:
    x = _crops(11, 64, 32, seed=7)
    want = _direct(resnet, x)
    chw = (3, 64, 32)
    sizes = (1, 3, 5, 8, 11, 2)  # 11: split 8 + 3 (bucket 4, one padding row)
    with TorchRunner.from_module(_copy(resnet, "resnet_50"), "cuda", max_batch=8, input_chw=chw) as eager:
        ref = {n: eager.infer(x[:n]) for n in sizes}
    with TorchRunner.from_module(_copy(resnet, "resnet_50"), "cuda", 8, input_chw=chw, cuda_graphs=True) as r:
        assert sorted(r._graphs) == [1, 2, 4, 8]
        for n in sizes:
            got = r.infer(x[:n])
            assert got.shape == (n, 17, 16, 8)
            assert rel_l2(got, ref[n]) < 1e-3  # same precision, another schedule of the same kernels
            assert rel_l2(got, want[:n]) < TF32_REL_L2


@needs_cuda
def test_cuda_graphs_refuse_another_input_size(resnet: torch.nn.Module) -> None:
    with TorchRunner.from_module(_copy(resnet, "resnet_50"), "cuda", 2, input_chw=(3, 64, 32), cuda_graphs=True) as r:
        with pytest.raises(DynPoseError, match=r"captured for N x 3 x 64 x 32 inputs, got \(1, 3, 32, 32\)"):
            r.infer(_crops(1, 32, 32))


@needs_cuda
def test_cuda_fp16_channels_last_graphs_close_to_fp32(resnet: torch.nn.Module, router: torch.nn.Module) -> None:
    for module, name, chw in ((resnet, "resnet_50", (3, 64, 32)), (router, "router", (3, 256, 192))):
        x = _crops(6, *chw[1:], seed=8)
        want = _direct(module, x)
        opts = {"fp16": True, "channels_last": True, "cuda_graphs": True}
        with TorchRunner.from_module(_copy(module, name), "cuda", 8, input_chw=chw, **opts) as r:
            got = r.infer(x)
            assert r.input_metadata().dtype == "float16"
        assert got.dtype == np.float32 and np.isfinite(got).all()
        assert rel_l2(got, want) < FP16_REL_L2


@needs_cuda
def test_cuda_two_runners_in_two_threads(resnet: torch.nn.Module, router: torch.nn.Module) -> None:
    xs, xr = _crops(5, 64, 32, seed=9), _crops(3, 256, 192, seed=10)
    small = TorchRunner.from_module(_copy(resnet, "resnet_50"), "cuda", 8, input_chw=(3, 64, 32), cuda_graphs=True)
    other = TorchRunner.from_module(_copy(router, "router"), "cuda", 8, fp16=True)
    with small, other:
        ref_s, ref_r = small.infer(xs), other.infer(xr)
        out: dict[str, list[np.ndarray]] = {"s": [], "r": []}

        def work(runner: TorchRunner, x: np.ndarray, key: str) -> None:
            for _ in range(10):
                out[key].append(runner.infer(x))

        threads = [threading.Thread(target=work, args=a) for a in ((small, xs, "s"), (other, xr, "r"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert small.stream != other.stream
    assert len(out["s"]) == len(out["r"]) == 10
    for got in out["s"]:
        np.testing.assert_allclose(got, ref_s, rtol=1e-5, atol=1e-6)
    for got in out["r"]:
        np.testing.assert_allclose(got, ref_r, rtol=1e-3, atol=1e-3)


@needs_cuda
def test_cuda_close_under_load(resnet: torch.nn.Module) -> None:
    x = _crops(4, 64, 32, seed=11)
    r = TorchRunner.from_module(_copy(resnet, "resnet_50"), "cuda", 8, input_chw=(3, 64, 32), cuda_graphs=True)
    _close_under_load(r.activate(), x, _direct(resnet, x), TF32_REL_L2)


@needs_cuda
def test_cuda_gpu_spans_cover_the_stream_work(resnet: torch.nn.Module) -> None:
    x = _crops(8, 64, 32, seed=12)
    spans: list = []
    with TorchRunner.from_module(_copy(resnet, "resnet_50"), "cuda", 8) as r:
        r.record_gpu_spans(spans)
        for _ in range(3):
            r.infer(x)
        r.record_gpu_spans(None)
        r.infer(x)
    torch.cuda.synchronize()
    assert len(spans) == 3 and all(s.elapsed_time(e) > 0 for s, e in spans)


@needs_cuda
def test_cuda_compile_matches_eager(router: torch.nn.Module) -> None:
    x = _crops(4, 256, 192, seed=13)
    with TorchRunner.from_module(_copy(router, "router"), "cuda", 8) as eager:
        want = eager.infer(x)
    with TorchRunner.from_module(_copy(router, "router"), "cuda", 8, compile=True) as r:
        got = r.infer(x)
        again = r.infer(x[:3])  # a second shape: at most one recompile, still right
    assert rel_l2(got, want) < 1e-3 and rel_l2(again, want[:3]) < 1e-3
