"""PyTorch backend on CPU: real zoo models, real state_dict files, a real manifest on disk."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dynpose.engines.manifest import Entry, Manifest, describe_file
from dynpose.errors import DynPoseError
from dynpose.models.zoo import create_model
from dynpose.onnx_utils import rel_l2
from dynpose.runtime.backends import load_runner
from dynpose.runtime.backends.torch import TorchRunner, load_torch
from dynpose.runtime.backends.torch.runner import load_state_dict_file


def _random(name: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "random weights" is the point here
        torch.manual_seed(0)
        return create_model(name, weights="random")


def _direct(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return _random("resnet_50")


@pytest.fixture(scope="module")
def router() -> torch.nn.Module:
    return _random("router")


def _crops(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, h, w), dtype=np.float32)


def test_cpu_runner_matches_module_and_splits_batches(resnet: torch.nn.Module) -> None:
    # ResNet is fully convolutional; a 64x32 crop keeps this fast and still runs every layer.
    x = _crops(3, 64, 32)
    want = _direct(resnet, x)
    with TorchRunner.from_module(resnet, device="cpu", max_batch=2, name="small") as r:
        got = r.infer(x)  # 3 > max_batch: split into 2 + 1
        assert got.dtype == np.float32 and got.shape == (3, 17, 16, 8)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert r.module.training is False
    with pytest.raises(DynPoseError, match="closed"):
        r.infer(x)


def test_cpu_fp16_returns_fp32_close_to_fp32(router: torch.nn.Module) -> None:
    x = _crops(2, 256, 192, seed=1)
    want = _direct(router, x)
    module = _random("router")
    module.load_state_dict(router.state_dict())
    with TorchRunner.from_module(module, device="cpu", fp16=True) as r:
        got = r.infer(x)
    assert got.dtype == np.float32 and got.shape == (2, 3)
    np.testing.assert_allclose(got, want, atol=2e-2)


def _torch_entry(engine_dir: Path, model: torch.nn.Module, role: str, file: str) -> Entry:
    torch.save(model.state_dict(), engine_dir / file)
    return Entry(
        role=role,
        model=model.card.name,
        file=file,
        format="torch",
        precision="fp32",
        card=model.card,
        max_batch=4,
        **describe_file(engine_dir, file),
    )


def test_state_dict_round_trip_through_manifest(tmp_path: Path, router: torch.nn.Module) -> None:
    m = Manifest()
    m.put(_torch_entry(tmp_path, router, "router", "router.pt"))
    m.save(tmp_path)

    loaded = Manifest.load(tmp_path)  # re-hashes router.pt
    entry = loaded.require("router", "torch")
    x = _crops(5, 256, 192, seed=2)
    with load_torch(tmp_path, entry) as r:
        assert r.max_batch == 4
        np.testing.assert_allclose(r.infer(x), _direct(router, x), rtol=1e-5, atol=1e-6)
    # the generic loader reaches the same backend
    with load_runner("torch", tmp_path, entry, device="cpu") as r:
        np.testing.assert_allclose(r.infer(x[:1]), _direct(router, x[:1]), rtol=1e-5, atol=1e-6)


def test_weights_that_do_not_fit_the_arch(tmp_path: Path, router: torch.nn.Module) -> None:
    entry = _torch_entry(tmp_path, router, "router", "router.pt")
    sd = router.state_dict()
    missing = dict(sd)
    missing.pop("conv1.weight")
    torch.save(missing, tmp_path / "router.pt")
    with pytest.raises(DynPoseError, match=r"1 missing e\.g\. \['conv1\.weight'\]"):
        load_torch(tmp_path, entry)

    reshaped = dict(sd)
    reshaped["conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(reshaped, tmp_path / "router.pt")
    with pytest.raises(DynPoseError, match="do not fit model 'router'.*size mismatch"):
        load_torch(tmp_path, entry)


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(DynPoseError, match="cannot load it as a state_dict") as e:
        load_state_dict_file(bad)
    assert "\n" not in str(e.value)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(DynPoseError, match="expected a state_dict"):
        load_state_dict_file(tmp_path / "list.pt")
    with pytest.raises(DynPoseError, match="file not found"):
        load_state_dict_file(tmp_path / "missing.pt")


def test_wrong_format_entry(tmp_path: Path, router: torch.nn.Module) -> None:
    entry = _torch_entry(tmp_path, router, "router", "router.pt")
    entry.format = "onnx"
    with pytest.raises(DynPoseError, match="the torch backend runs state_dict"):
        load_torch(tmp_path, entry)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_request_without_cuda(router: torch.nn.Module) -> None:
    for device in ("cuda", "cuda:0"):
        with pytest.raises(DynPoseError, match=f"device '{device}' requested but this torch") as e:
            TorchRunner.from_module(router, device=device)
        assert "\n" not in str(e.value)
    with pytest.raises(DynPoseError, match="unknown device 'gpu'"):
        TorchRunner.from_module(router, device="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch CUDA build)")
def test_cuda_runner_matches_cpu(resnet: torch.nn.Module) -> None:
    x = _crops(5, 64, 32)
    want = _direct(resnet, x)
    module = _random("resnet_50")
    module.load_state_dict(resnet.state_dict())
    with TorchRunner.from_module(module, device="cuda", max_batch=4) as r:
        # TF32 (torch.backends.cudnn.allow_tf32, on by default): fp32 convolutions on Ampere+ round their inputs to
        # 10-bit mantissas, ~1e-3 relative per layer through a deep random net; compare the whole output.
        assert rel_l2(r.infer(x), want) < 1e-2
        assert r.stream is not None and r.stream != torch.cuda.current_stream()
    module = _random("resnet_50")
    module.load_state_dict(resnet.state_dict())
    with TorchRunner.from_module(module, device="cuda", fp16=True) as r:
        got = r.infer(x)
    assert got.dtype == np.float32
    assert rel_l2(got, want) < 3e-2
