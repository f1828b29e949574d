"""Checkpoint loading: every release format round-trips, bad checkpoints fail loudly, downloads use a real server."""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dynpose.errors import DynPoseError
from dynpose.models import cache_dir, create_model, download, load_weights
from dynpose.models.weights import sha256_prefix_from_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def dynpose_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("DYNPOSE_HOME", str(home))
    return home


def random_model(name: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = create_model(name, weights="random")
    # Non-default running stats and counters, so a buffer that fails to load shows up in the comparison.
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if k.endswith("running_var"):
                v.uniform_(0.5, 2.0)
            elif k.endswith("num_batches_tracked"):
                v.fill_(7)
    return m


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip_nbt: bool = False) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if skip_nbt and k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(sa[k], sb[k]), k


def mmpose1(sd: dict) -> dict:
    head = ("final_layer", "deconv_layers")
    out = {("head." if k.startswith(head) else "backbone.") + k: v for k, v in sd.items()}
    # MMPose 1.x saves the data preprocessor's normalisation buffers too.
    out["data_preprocessor.mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    out["data_preprocessor.std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    # mmengine keeps the dataset meta with numpy arrays/scalars: plain data that must load without trust_pickle.
    meta = {"epoch": 210, "dataset_meta": {"sigmas": np.array([0.026, 0.025], np.float32), "num_keypoints": np.int64(17)}}
    return {"meta": meta, "state_dict": out}


def mmpose0(sd: dict) -> dict:
    head = ("final_layer", "deconv_layers")
    return {"state_dict": {("keypoint_head." if k.startswith(head) else "backbone.") + k: v for k, v in sd.items()}}


FORMATS: dict[str, Callable[[dict], object]] = {
    "official": lambda sd: sd,
    "mmpose1": mmpose1,
    "mmpose0": mmpose0,
    "data_parallel": lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 140},
    "model_wrapper": lambda sd: {"model": sd},
    "dynpose_router": lambda sd: {"backbone." + k: v for k, v in sd.items()},
    "no_num_batches_tracked": lambda sd: {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
}

CASES = [  # (model, checkpoint layout, detected format, colour order the card must end with)
    ("hrnet_w32", "official", "official", "rgb"),
    ("hrnet_w32", "mmpose1", "mmpose1", "rgb"),
    ("resnet_50", "official", "official", "bgr"),
    ("resnet_50", "mmpose1", "mmpose1", "rgb"),
    ("resnet_50", "mmpose0", "mmpose0", "rgb"),
    ("router", "dynpose_router", "dynpose_router", "rgb"),
    ("router", "data_parallel", "official", "rgb"),
    ("router", "model_wrapper", "official", "rgb"),
    ("router", "no_num_batches_tracked", "official", "rgb"),
]


@pytest.mark.parametrize(("name", "layout", "fmt", "color"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_round_trip(tmp_path: Path, name: str, layout: str, fmt: str, color: str) -> None:
    src = random_model(name)
    path = tmp_path / f"{name}-{layout}.pth"
    torch.save(FORMATS[layout](src.state_dict()), path)

    dst = create_model(name)
    info = load_weights(dst, path)

    assert info.format == fmt
    assert info.path == path and info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.data_parallel == (layout == "data_parallel")
    assert info.ignored == (["data_preprocessor.mean", "data_preprocessor.std"] if layout == "mmpose1" else [])
    n_bn = sum(k.endswith("num_batches_tracked") for k in src.state_dict())
    assert info.missing_num_batches_tracked == (n_bn if layout == "no_num_batches_tracked" else 0)
    assert_same_weights(src, dst, skip_nbt=layout == "no_num_batches_tracked")
    assert dst.card.color_order == info.color_order == color
    assert dst.checkpoint is info and dst.weights_source == str(path)


def test_create_model_with_checkpoint_path(tmp_path: Path) -> None:
    src = random_model("router")
    path = tmp_path / "backbone.pth"
    torch.save({"backbone." + k: v for k, v in src.state_dict().items()}, path)
    m = create_model("router", weights=path)
    assert_same_weights(src, m)
    assert m.checkpoint.format == "dynpose_router" and not m.training


def test_color_order_override(tmp_path: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(create_model("router").state_dict(), path)
    m = create_model("router")
    assert load_weights(m, path, color_order="bgr").color_order == "bgr" and m.card.color_order == "bgr"
    with pytest.raises(DynPoseError, match="color_order"):
        load_weights(m, path, color_order="gray")


# -- checkpoints that must be refused ----------------------------------------------------------------------------
def test_wrong_shape_names_tensor_and_format(tmp_path: Path) -> None:
    sd = create_model("resnet_50", keypoints="crowdpose14").state_dict()  # 14 heatmaps instead of 17
    path = tmp_path / "crowdpose.pth"
    torch.save(mmpose1(sd), path)
    m = create_model("resnet_50")
    orig = m.final_layer.weight.clone()
    with pytest.raises(DynPoseError) as e:
        load_weights(m, path)
    msg = str(e.value)
    assert "format mmpose1" in msg and "resnet_50" in msg and "\n" not in msg
    assert "final_layer.weight (checkpoint [14, 256, 1, 1], model [17, 256, 1, 1])" in msg
    assert torch.equal(m.final_layer.weight, orig)  # nothing half-loaded
    assert m.checkpoint is None


def test_missing_tensor_is_refused(tmp_path: Path) -> None:
    sd = {"backbone." + k: v for k, v in create_model("router").state_dict().items() if not k.startswith("layer2.")}
    path = tmp_path / "backbone.pth"
    torch.save(sd, path)
    with pytest.raises(DynPoseError, match=r"format dynpose_router.*2 missing tensor\(s\): layer2.weight, layer2.bias"):
        load_weights(create_model("router"), path)


def test_unexpected_tensor_is_refused(tmp_path: Path) -> None:
    sd = dict(create_model("router").state_dict())
    sd["layer3.weight"] = torch.zeros(3, 3)
    path = tmp_path / "extra.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(DynPoseError, match=r"format official.*1 unexpected tensor\(s\): layer3.weight"):
        load_weights(create_model("router"), path)


def test_other_model_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "router.pth"
    torch.save(create_model("router").state_dict(), path)
    pattern = r"does not fit hrnet_w32: \d+ missing .*\d+ unexpected tensor\(s\): conv1.bias.* wrong shape: conv1.weight"
    with pytest.raises(DynPoseError, match=pattern):
        load_weights(create_model("hrnet_w32"), path)


def test_pickle_checkpoint_needs_trust(tmp_path: Path) -> None:
    src = random_model("router")
    path = tmp_path / "old.pth"
    # Old training scripts saved their argparse namespace beside the weights: loading it runs pickle code.
    torch.save({"state_dict": src.state_dict(), "args": argparse.Namespace(lr=1e-3)}, path)
    m = create_model("router")
    with pytest.raises(DynPoseError, match=r"needs pickle.*argparse.Namespace.*trust_pickle=True.*--trust-checkpoint"):
        load_weights(m, path)
    info = load_weights(m, path, trust_pickle=True)
    assert info.wrapper == "state_dict"
    assert_same_weights(src, m)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", bytes(range(256)) * 8])
def test_unreadable_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(DynPoseError, match="not a readable PyTorch checkpoint") as e:
        load_weights(create_model("router"), path)
    # torch's own advice (load with weights_only=False) is not passed on: trust is what --trust-checkpoint is for
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_no_state_dict_inside(tmp_path: Path) -> None:
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "perf": 0.7}, path)
    with pytest.raises(DynPoseError, match="no state_dict found"):
        load_weights(create_model("router"), path)


def test_missing_file_lists_aliases(tmp_path: Path) -> None:
    with pytest.raises(DynPoseError, match=r"file not found.*\(mmpose, official\)"):
        load_weights(create_model("resnet_50"), tmp_path / "nope.pth")


@pytest.mark.parametrize("name", ["hrnet_w32", "resnet_50", "router"])
def test_official_alias_explains_manual_download(name: str) -> None:
    with pytest.raises(DynPoseError, match=r"no direct download link.*github.com.*pass the downloaded file's path"):
        create_model(name, weights="official")


# -- downloads from a real local HTTP server ----------------------------------------------------------------------
class Server:
    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        log = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                log.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    s = Server(root)
    yield s, root
    s.stop()


def saved_router(root: Path, name: str | None = None) -> tuple[torch.nn.Module, str]:
    """Save a router checkpoint; name=None gives an MMPose-style name carrying its real sha256 prefix."""
    src = random_model("router")
    tmp = root / "tmp.pth"
    torch.save({"state_dict": {"backbone." + k: v for k, v in src.state_dict().items()}}, tmp)
    if name is None:
        name = f"router-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}_20250101.pth"
    tmp.rename(root / name)
    return src, name


def test_download_then_cache_hit_without_network(server: tuple[Server, Path], dynpose_home: Path) -> None:
    srv, root = server
    src, name = saved_router(root)
    url = f"{srv.base}/{name}"

    m = create_model("router", weights=url)
    assert_same_weights(src, m)
    assert srv.requests == [f"/{name}"]
    assert m.checkpoint.url == url and m.checkpoint.path == dynpose_home / "checkpoints" / name
    assert cache_dir() == dynpose_home / "checkpoints"
    assert sorted(p.name for p in cache_dir().iterdir()) == [name]  # no temp files left beside it

    srv.stop()  # the second load must not touch the network at all
    m2 = create_model("router", weights=url)
    assert_same_weights(src, m2)
    assert len(srv.requests) == 1


def test_download_name_without_hash_is_cached_per_url(server: tuple[Server, Path]) -> None:
    srv, root = server
    src, name = saved_router(root, "backbone.pth")
    path = download(f"{srv.base}/{name}", progress=False)
    assert path.parent == cache_dir() and path.name.endswith("_backbone.pth")
    assert download(f"{srv.base}/{name}", progress=False) == path
    assert len(srv.requests) == 1
    m = create_model("router")
    load_weights(m, path)
    assert_same_weights(src, m)


def test_download_sha_mismatch_leaves_nothing(server: tuple[Server, Path]) -> None:
    srv, root = server
    _, name = saved_router(root, "router-deadbeef_20250101.pth")  # promises a hash the content does not have
    with pytest.raises(DynPoseError, match=r"sha256 [0-9a-f]{16}\.\.\. does not match the expected deadbeef"):
        create_model("router", weights=f"{srv.base}/{name}")
    assert not cache_dir().exists() or list(cache_dir().iterdir()) == []


def test_download_full_sha256_argument(server: tuple[Server, Path]) -> None:
    srv, root = server
    _, name = saved_router(root, "plain.pth")
    digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
    assert download(f"{srv.base}/{name}", sha256=digest, progress=False).is_file()
    with pytest.raises(DynPoseError, match="does not match"):
        download(f"{srv.base}/{name}?v=2", sha256="0" * 64, progress=False)


def test_download_http_error(server: tuple[Server, Path]) -> None:
    srv, _ = server
    with pytest.raises(DynPoseError, match=r"HTTP 404.*pass its local path"):
        download(f"{srv.base}/missing-0123abcd_20250101.pth", progress=False)
    assert not cache_dir().exists() or list(cache_dir().iterdir()) == []


def test_download_offline_is_a_clear_error() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DynPoseError, match=r"cannot download http://127\.0\.0\.1.*offline.*local path"):
        create_model("router", weights=f"http://127.0.0.1:{port}/backbone.pth")


def test_sha256_prefix_from_name() -> None:
    assert sha256_prefix_from_name("td-hm_hrnet-w32_8xb64-210e_coco-256x192-81c58e40_20220909.pth") == "81c58e40"
    assert sha256_prefix_from_name("resnet50-0676ba61.pth") == "0676ba61"
    assert sha256_prefix_from_name("pose_resnet_50_256x192.pth.tar") is None
    assert sha256_prefix_from_name("epoch-12345678.pth") is None  # digits only: a counter, not a hash
    assert sha256_prefix_from_name("backbone.pth") is None


def test_card_alias_downloads_and_sets_its_color_order(server: tuple[Server, Path]) -> None:
    srv, root = server
    src, name = saved_router(root)
    m = create_model("router")
    # Point the card's alias at the local server; the real aliases point at MMPose/GitHub, unreachable from tests.
    m.card = m.card.with_(sources={"mine": {"url": f"{srv.base}/{name}", "color_order": "bgr"}})
    info = load_weights(m, "mine", progress=False)
    assert info.alias == "mine" and info.format == "dynpose_router"
    assert m.card.color_order == "bgr"
    assert_same_weights(src, m)


def test_corrupt_cache_file_is_reported(server: tuple[Server, Path]) -> None:
    srv, root = server
    _, name = saved_router(root)
    path = download(f"{srv.base}/{name}", progress=False)
    path.write_bytes(b"tampered")
    with pytest.raises(DynPoseError, match=r"cached checkpoint .* has sha256 .*delete it"):
        download(f"{srv.base}/{name}", progress=False)
    assert len(srv.requests) == 1
