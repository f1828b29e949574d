"""The HTTP service on a real local Ray cluster: `dynpose-serve` runs as a subprocess joined to a cluster this module
starts (2 CPUs), real HTTP on 127.0.0.1, real TinyPose models; answers are checked against an in-process Pipeline.

One service for the whole module (Ray and Serve start once); the last test stops it with SIGTERM and checks that it
drains (every request in flight answered) and exits, and the module's teardown checks that Ray left no process
behind. Ctrl-C to a service that started its own cluster: tests/test_serve_local.py.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the service needs Ray Serve: pip install -e '.[serve]'")
serve = pytest.importorskip("ray.serve", reason="the service needs Ray Serve: pip install -e '.[serve]'")

from dynpose.data import load_detections  # noqa: E402
from dynpose.runtime.pipeline import Pipeline  # noqa: E402
from dynpose.serve.client import Client, ServiceError  # noqa: E402
from dynpose.serve.loadgen import format_report, load_items, run_load  # noqa: E402

IDS = (785, 40083, 196141, 197388)
MAX_BODY_MB = 2
BODY_TIMEOUT_S = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children() -> dict[int, int]:
    """pid -> parent pid of every process we can see (from /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            out[int(d.name)] = int(stat.rpartition(")")[2].split()[1])
    return out


def _descendants(pid: int) -> set[int]:
    parents = _children()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def engine_dir(tinypose_engine_dir: Path, tmp_path_factory: pytest.TempPathFactory, shared: Path) -> Path:
    """The TinyPose engine dir with the PicoDet person detector registered (a copy: the session fixture stays as is)."""
    from dynpose.export.api import register_detector

    d = tmp_path_factory.mktemp("serve") / "engines"
    shutil.copytree(tinypose_engine_dir, d)
    register_detector(shared / "models" / "picodet_s_320_pedestrian.onnx", d, progress=False)
    return d


DETS = "test_coco_det_AP_H_56.json"
LIGHT = 0.9  # detection score for the load tests: 1-5 persons per image, so the module stays quick on 2 cores


@pytest.fixture(scope="module")
def coco(coco_dir: Path):
    dets = load_detections(coco_dir / DETS)
    files = {iid: coco_dir / f"{iid:012d}.jpg" for iid in IDS}
    images = {iid: cv2.imread(str(p)) for iid, p in files.items()}
    return files, images, dets


@pytest.fixture(scope="module")
def expected(engine_dir: Path, coco):
    """What the in-process Pipeline gives: per image with its detections, and with the detector."""
    files, images, dets = coco
    light = load_detections(files[IDS[0]].parent / DETS, score_thr=LIGHT)
    with Pipeline.from_engine_dir(engine_dir, threads=1) as pipe:
        with_boxes = {iid: pipe(images[iid], dets[iid]) for iid in IDS}
        detected = {iid: pipe(images[iid]) for iid in IDS[:2]}
        lightly = {iid: (light[iid], pipe(images[iid], light[iid])) for iid in IDS}
    return with_boxes, detected, lightly


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs; Serve and Ray shut down at the end, and no Ray process may outlive them."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    yield address
    spawned = _descendants(os.getpid())
    serve.shutdown()
    ray.shutdown()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in spawned) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = sorted(p for p in spawned if _alive(p))
    assert not left, f"processes left after ray.shutdown(): {left}"


@pytest.fixture(scope="module")
def service(cluster: str, engine_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`dynpose-serve` joined to the module's cluster: 2 small-model replicas (one is killed below), batching on."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "dynpose-serve.log"
    cmd = [
        sys.executable, "-c", "from dynpose.cli.serve import main; main()",
        "--engine-dir", str(engine_dir), "--port", str(port), "--address", cluster,
        "--small-replicas", "2", "--replica-cpus", "0.25", "--threads", "2",
        "--max-batch", "16", "--batch-wait-ms", "50", "--max-body-mb", str(MAX_BODY_MB),
        "--body-timeout-s", str(BODY_TIMEOUT_S),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    client = Client(f"http://127.0.0.1:{port}", timeout=60, retries=8)
    try:
        deadline = time.monotonic() + 180
        while not client.healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dynpose-serve did not come up (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield proc, client, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _same(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.model == w.model
        np.testing.assert_allclose(g.box, w.box, atol=1e-6)
        np.testing.assert_allclose(g.keypoints, w.keypoints, atol=1e-3)
        np.testing.assert_allclose(g.score, w.score, atol=1e-5)
        np.testing.assert_allclose(g.router_score, w.router_score, atol=1e-5, equal_nan=True)


def test_healthz_and_info(service) -> None:
    _, client, _ = service
    status, body = _raw(client, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok"
    assert set(body["deployments"]) == {"ingress", "small", "large", "detector"}
    info = client.info()
    assert set(info["models"]) == {"small", "large", "router", "detector"}
    assert info["cards"]["small"]["input_height"] == 128 and info["cards"]["large"]["input_height"] == 256
    assert info["route"] == "fraction:0.5"  # the manifest's
    assert info["versions"]["ray"] == ray.__version__ and info["versions"]["dynpose"]
    assert info["replicas"]["small"] == "2" and info["replicas"]["large"] == "1"
    assert info["batching"] == {"max_batch": 16, "batch_wait_ms": 50.0}


def test_answers_equal_pipeline(service, coco, expected) -> None:
    """Both models and the router run (route fraction:0.5); every number equals the in-process Pipeline's."""
    _, client, _ = service
    files, images, dets = coco
    with_boxes, detected, _ = expected
    models = set()
    for iid in IDS:
        _same(client.pose(images[iid], boxes=dets[iid]), with_boxes[iid])  # PNG: exactly these pixels
        ans = client.pose_file(files[iid], boxes=dets[iid])  # the JPEG as it is, decoded by the service
        _same(ans.persons, with_boxes[iid])
        assert ans.crops["small"] + ans.crops["large"] == len(dets[iid])
        models |= {p.model for p in ans.persons}
    assert models == {"small", "large"}
    for iid in detected:  # no boxes: the detector deployment finds them
        _same(client.pose(images[iid]), detected[iid])
    # a route of the request's own
    ans = client.pose_file(files[785], boxes=dets[785], route="all-large")
    assert ans.route == "all-large" and {p.model for p in ans.persons} == {"large"}


def test_concurrent_clients_form_batches(service, coco) -> None:
    """16 clients x 25 requests: no errors, and the pose deployments run crops of several requests together."""
    _, client, _ = service
    files, _, _ = coco
    folder = files[IDS[0]].parent
    items = load_items(folder, folder / DETS, det_score=LIGHT)
    report = run_load(client, items, concurrency=16, requests=16 * 25, warmup=4)
    print("\n" + format_report(report))
    assert report["errors"] == 0 and report["ok"] == 400, report["error_samples"]
    batches = report["batches"]
    assert batches["small"]["crops"] + batches["large"]["crops"] == report["crops"]
    for m, b in batches.items():  # batches made of more than one request's crops, in both models
        assert b["max_calls_per_batch"] > 1, (m, b)
    assert max(b["mean_calls_per_batch"] for b in batches.values()) > 1, batches


def _stalled_uploads(port: int, n: int) -> list[socket.socket]:
    """`n` connections that send a request's headers and 11 bytes of its 200 kB body, then nothing (slowloris)."""
    head = b"POST /v1/pose HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200000\r\n\r\n"
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(head + b'{"image": "')
        socks.append(s)
    return socks


def _until_closed(socks: list[socket.socket], timeout_s: float) -> dict[str, int]:
    """Read every connection until the service closes it: {status line: count}; those still open count as 'open'."""
    sel = selectors.DefaultSelector()
    got: dict[socket.socket, bytes] = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        got[s] = b""
    closed: dict[str, int] = {}
    deadline = time.monotonic() + timeout_s
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data = sock.recv(65536)
            if data:
                got[sock] += data
                continue
            sel.unregister(sock)
            status = got[sock].split(b"\r\n", 1)[0].decode()
            closed[status] = closed.get(status, 0) + 1
            if status.startswith("HTTP/1.1 408"):
                body = json.loads(got[sock].partition(b"\r\n\r\n")[2])
                assert "request body" in body["error"] and "\n" not in body["error"], body
    closed["open"] = len(sel.get_map())
    for s in socks:
        s.close()
    return closed


def test_stalled_uploads_do_not_starve_good_clients(service, coco, expected) -> None:
    """80 connections stall their request bodies (more than the ingress's 64 slots): clients that send whole requests
    are still answered, well before the body deadline (the slowest uploads beyond 16 are cut within seconds), and
    every stalled connection is answered 408 and closed by the service."""
    _, client, _ = service
    files, _, _ = coco
    _, _, lightly = expected
    port = int(client.url.rsplit(":", 1)[1])
    t0 = time.monotonic()
    socks = _stalled_uploads(port, 80)
    good = Client(client.url, timeout=BODY_TIMEOUT_S * 0.8, retries=0)  # must not wait for the deadline to free slots
    for iid in IDS:
        _same(good.pose_file(files[iid], boxes=lightly[iid][0]).persons, lightly[iid][1])
    answered_s = time.monotonic() - t0
    closed = _until_closed(socks, BODY_TIMEOUT_S + 30)
    print(f"\n80 stalled uploads: good requests answered after {answered_s:.1f} s; stalled ones closed: {closed}")
    assert closed == {"HTTP/1.1 408 Request Timeout": 80, "open": 0}, closed


def _small_replicas() -> list[str]:
    """The actor names of the small-model replicas (Serve names its replica actors in the `serve` namespace)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["namespace"] == "serve" and "#small#" in a["name"])


def test_replica_killed_mid_load(service, coco, expected) -> None:
    """One small-model replica is killed while 8 clients send requests: every request ends with its own image's
    correct answer (a 503 from the dead replica is retried by the client); Serve brings the replica back."""
    _, client, _ = service
    files, _, _ = coco
    _, _, lightly = expected
    names = _small_replicas()
    assert len(names) == 2, names
    answers: dict[tuple[int, int], object] = {}
    failures: list[str] = []
    lock = threading.Lock()
    started = threading.Event()

    def worker(k: int) -> None:
        for j in range(12):
            iid = IDS[(k + j) % len(IDS)]
            try:
                ans = client.pose_file(files[iid], boxes=lightly[iid][0])
            except ServiceError as e:
                with lock:
                    failures.append(str(e))
                continue
            with lock:
                answers[(k, j)] = (iid, ans)
            started.set()

    retried0 = client.retried
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    assert started.wait(60)
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures[:3]
    assert len(answers) == 8 * 12  # none lost
    for iid, ans in answers.values():
        _same(ans.persons, lightly[iid][1])  # none answered with another image's result
    retried = client.retried - retried0
    unavailable = client.stats()["requests"]["unavailable"]
    print(f"\nkilled {names[0]}: {retried} client retries, {unavailable} 503s answered so far")
    deadline = time.monotonic() + 120
    while (client.info()["replicas_running"] or {}).get("small") != 2:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(1)


def _raw(client: Client, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", int(client.url.rsplit(":", 1)[1]), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(raw)


def _multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    boundary = "dynposeboundary7"
    parts = []
    for name, (filename, data) in fields.items():
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_bad_inputs_get_one_line_4xx(service, coco, expected) -> None:
    _, client, _ = service
    files, _, dets = coco
    with_boxes, _, _ = expected
    jpeg = files[785].read_bytes()
    good = base64.b64encode(jpeg).decode()
    js = {"Content-Type": "application/json"}

    def post(payload) -> tuple[int, dict]:
        return _raw(client, "POST", "/v1/pose", json.dumps(payload).encode(), js)

    cases = {
        "undecodable image": (post({"image": base64.b64encode(b"not an image at all").decode()}), 400, "readable"),
        "image not base64": (post({"image": "%%% not base64 %%%"}), 400, "base64"),
        "image over max pixels": (post({"image": base64.b64encode(_png_header(60000, 60000)).decode()}), 413, "pixels"),
        "boxes of 3 numbers": (post({"image": good, "boxes": [[1, 2, 3]]}), 400, "4 or 5 numbers"),
        "ragged boxes": (post({"image": good, "boxes": [[1, 2, 3, 4], [1, 2, 3, 4, 5]]}), 400, "same length"),
        "boxes not a list": (post({"image": good, "boxes": "many"}), 400, "boxes"),
        "unknown route": (post({"image": good, "boxes": dets[785].tolist(), "route": "median"}), 400, "routing policy"),
        "unknown field": (post({"image": good, "box": [[1, 2, 3, 4]]}), 400, "unknown field"),
        "not JSON": (_raw(client, "POST", "/v1/pose", b"{image:", js), 400, "not valid JSON"),
        "text body": (_raw(client, "POST", "/v1/pose", b"hello", {"Content-Type": "text/plain"}), 415, "Content-Type"),
        "body over --max-body-mb": (
            _raw(client, "POST", "/v1/pose", b"x" * (MAX_BODY_MB * 2**20 + 1), js),
            413,
            "--max-body-mb",
        ),
        "form without image": (_raw(client, "POST", "/v1/pose", *_form({"route": (None, b"all-large")})), 400, "image"),
        "JSON nested 100k deep": (
            _raw(client, "POST", "/v1/pose", b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", js),
            400,
            "nested too deeply",
        ),
        "5000-digit integer": (
            _raw(client, "POST", "/v1/pose", b'{"image": "aGk=", "boxes": [[' + b"7" * 5000 + b", 1, 1, 1]]}", js),
            400,
            "a number in the JSON is too long",
        ),
        "boxes field nested 100k deep": (
            _raw(client, "POST", "/v1/pose", *_form({"image": ("p.jpg", jpeg), "boxes": (None, b"[" * 100_000)})),
            400,
            "boxes",
        ),
        "GET /v1/pose": (_raw(client, "GET", "/v1/pose"), 405, "POST"),
        "unknown path": (_raw(client, "GET", "/v2/everything"), 404, "/v1/pose"),
    }
    for what, ((status, body), want, words) in cases.items():
        assert status == want, (what, status, body)
        assert list(body) == ["error"] and words in body["error"], (what, body)
        assert "\n" not in body["error"] and "Traceback" not in body["error"], (what, body)
    # the service still serves: a multipart upload (as curl -F sends it) and the raw image as the body
    status, body = _raw(
        client,
        "POST",
        "/v1/pose",
        *_form({"image": ("photo.jpg", jpeg), "boxes": (None, json.dumps(dets[785].tolist()).encode())}),
    )
    assert status == 200 and len(body["persons"]) == len(with_boxes[785])
    status, body = _raw(client, "POST", "/v1/pose", jpeg, {"Content-Type": "image/jpeg"})
    assert status == 200 and body["persons"]  # no boxes: the detector
    assert client.stats()["requests"]["internal_errors"] == 0


def _ingress_rss_mb() -> float:
    """Resident memory of the ingress replica's process (its private heap and the object-store pages it wrote)."""
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes().startswith(b"ray::ServeReplica:dynpose:ingress"):
                rss = next(ln for ln in (d / "status").read_text().splitlines() if ln.startswith("VmRSS"))
                return int(rss.split()[1]) / 1024
        except OSError:
            continue
    raise AssertionError("no ingress replica process found")


def test_a_rejected_image_bomb_leaves_no_memory_behind(service) -> None:
    """A 60 kB GIF of 9000 x 9000 pixels (81 MP, over the 50 MP limit) without boxes: refused with 413 before its
    pixels go anywhere. (It used to be decoded and sent to the detector: the ingress then held the 243 MB image's
    object-store pages, and a 20000 x 20000 one 1.2 GB.)"""
    from PIL import Image

    _, client, _ = service
    buf = io.BytesIO()
    Image.new("P", (9000, 9000), 1).save(buf, format="GIF")
    before = _ingress_rss_mb()
    for _ in range(2):
        status, body = _raw(client, "POST", "/v1/pose", buf.getvalue(), {"Content-Type": "image/gif"})
        assert status == 413 and "pixels" in body["error"], (status, body)
    grown = _ingress_rss_mb() - before
    print(f"\ningress memory after two refused 81 MP GIFs: {grown:+.0f} MB")
    assert grown < 60, f"the ingress kept {grown:.0f} MB after refusing the image"


def _form(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, dict[str, str]]:
    body, ctype = _multipart(fields)
    return body, {"Content-Type": ctype}


def test_sigterm_drains_and_exits(service, coco, expected) -> None:
    """Last: SIGTERM to dynpose-serve with 8 requests in flight. Every one of them is answered in full (the drain:
    before, all 8 lost their connection); requests sent after the signal get a 503 or a refused connection, never
    a 500 or a cut-off answer. The command exits 0 and says it drained."""
    proc, client, log_path = service
    files, _, dets = coco
    with_boxes, _, _ = expected
    quick = Client(client.url, timeout=60, retries=0)
    answers: dict[int, tuple[str, float]] = {}
    start = threading.Barrier(9)

    def in_flight(k: int) -> None:
        iid = IDS[k % len(IDS)]
        start.wait()
        try:
            ans = quick.pose_file(files[iid], boxes=dets[iid])  # every box: long enough to be in flight at the signal
            _same(ans.persons, with_boxes[iid])
            answers[k] = ("ok", time.monotonic())
        except (ServiceError, AssertionError) as e:
            answers[k] = (str(e)[:200], time.monotonic())

    threads = [threading.Thread(target=in_flight, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(0.3)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    later = []
    while proc.poll() is None and len(later) < 50:  # requests sent while it drains and stops
        try:
            quick.pose_file(files[785], boxes=dets[785])
            later.append("ok")
        except ServiceError as e:
            later.append(f"http {e.status}" if e.status is not None else "refused")
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=60)
    assert proc.wait(timeout=90) == 0, log_path.read_text()[-3000:]
    print(f"\nSIGTERM with 8 in flight: {[a for a, _ in answers.values()]}; sent after it: {sorted(set(later))}")
    assert [a for a, _ in answers.values()] == ["ok"] * 8, answers
    assert max(at for _, at in answers.values()) > signalled  # some were still in flight: the drain answered them
    assert set(later) <= {"ok", "refused", "http 503", "http 404"}, later
    text = log_path.read_text()
    assert "drained: every request in flight was answered" in text and "dynpose-serve: stopped" in text


def test_a_replica_that_cannot_open_its_model_fails_the_start(cluster: str, engine_dir: Path, tmp_path: Path) -> None:
    """After the service above stopped: an engine dir whose file changed after export passes the up-front checks
    (no hashing there) but every replica refuses it; the command exits 2 with the reason instead of waiting."""
    bad = tmp_path / "engines"
    shutil.copytree(engine_dir, bad)
    from dynpose.engines.manifest import Manifest

    large = bad / Manifest.load(bad).require("large").file
    data = bytearray(large.read_bytes())
    data[-100] ^= 1
    large.write_bytes(bytes(data))
    cmd = [
        sys.executable, "-c", "from dynpose.cli.serve import main; main()", "--engine-dir", str(bad),
        "--port", str(_free_port()), "--address", cluster, "--replica-cpus", "0.25",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the service failed to start: ") and "does not match the manifest" in last, last


def test_audit_on_stats(service, cluster: str, engine_dir: Path, coco, expected, tmp_path: Path) -> None:
    """After the service above stopped, one started with `--audit 1` (on its port: Serve's HTTP proxy outlives the
    app and keeps its port): every small-model answer also runs on the large model after the answer went out; the
    answers are the Pipeline's, and /v1/stats shows the agreement and the large crops it spent."""
    files, _, _ = coco
    _, _, lightly = expected
    port, log_path = int(service[1].url.rsplit(":", 1)[1]), tmp_path / "serve.log"
    cmd = [
        sys.executable, "-c", "from dynpose.cli.serve import main; main()", "--engine-dir", str(engine_dir),
        "--port", str(port), "--address", cluster, "--replica-cpus", "0.25", "--threads", "2", "--audit", "1",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    client = Client(f"http://127.0.0.1:{port}", timeout=60, retries=8)
    try:
        deadline = time.monotonic() + 180
        while not client.healthy():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        small = persons = 0
        for iid in IDS:
            ans = client.pose_file(files[iid], boxes=lightly[iid][0])
            _same(ans.persons, lightly[iid][1])  # the audit changes no answer
            small, persons = small + ans.crops["small"], persons + ans.crops["small"] + ans.crops["large"]
        deadline = time.monotonic() + 60
        while (audit := client.stats()["audit"])["audited"] < small or audit["pending"]:
            assert time.monotonic() < deadline, audit
            time.sleep(0.5)
        assert audit["share"] == 1.0 and audit["route"] == "fraction:0.5" and audit["persons"] == persons
        assert audit["answered_small"] == audit["audited"] == audit["large_crops"] == small > 0
        assert 0.0 < audit["small_agreement"] <= 1.0 and audit["small_agreement"] <= audit["agreement"] <= 1.0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- refused before Ray starts (no service needed) ---------------------------------------------------------------------
def test_cli_refuses_bad_flags_before_starting_ray(engine_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dynpose.cli.serve import main

    runner = CliRunner()
    cases = [
        ([], "--engine-dir"),
        (["--engine-dir", str(tmp_path / "missing")], "not a directory"),
        (["--engine-dir", str(engine_dir), "--small-replicas", "0"], "--small-replicas"),
        (["--engine-dir", str(engine_dir), "--large-replicas", "4-2"], "--large-replicas"),
        (["--engine-dir", str(engine_dir), "--route", "median"], "routing policy"),
        (["--engine-dir", str(engine_dir), "--max-batch", "0"], "--max-batch"),
        (["--engine-dir", str(engine_dir), "--batch-wait-ms", "nan"], "--batch-wait-ms"),
        (["--engine-dir", str(engine_dir), "--max-body-mb", "0"], "--max-body-mb"),
        (["--engine-dir", str(engine_dir), "--body-timeout-s", "0"], "--body-timeout-s"),
        (["--engine-dir", str(engine_dir), "--drain-timeout-s", "nan"], "--drain-timeout-s"),
        (["--engine-dir", str(engine_dir), "--request-timeout-s", "-1"], "--request-timeout-s"),
        (["--engine-dir", str(engine_dir), "--backend", "tensorrt"], "no tensorrt 'small' entry"),
        (["--engine-dir", str(engine_dir), "--replica-gpus", "0.5"], "--device cuda"),
        (["--engine-dir", str(engine_dir), "--detector", str(tmp_path / "det.onnx")], "--detector"),
        (["--engine-dir", str(engine_dir), "--audit", "1.5"], "--audit 1.5: the audit share must be a number in [0, 1]"),
        (["--engine-dir", str(engine_dir), "--audit-target", "0.9"], "--audit-target steers by the audit's figures"),
    ]
    for args, words in cases:
        res = runner.invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.output.startswith("error: ") and words in res.output, (args, res.output)
    res = runner.invoke(main, ["bench", "--url", f"http://127.0.0.1:{_free_port()}", "--images", str(engine_dir)])
    assert res.exit_code == 2 and "--images" in res.output, res.output  # a folder without images
    res = runner.invoke(main, ["bench", "--url", f"http://127.0.0.1:{_free_port()}", "--images", str(coco_dir)])
    assert res.exit_code == 2 and "not answering /healthz" in res.output, res.output


def test_replica_counts_and_autoscaling() -> None:
    from dynpose.errors import DynPoseError
    from dynpose.serve.config import Replicas, parse_replicas

    assert parse_replicas("2", "--x") == Replicas(2, 2) and parse_replicas("2", "--x").options(4) == {"num_replicas": 2}
    auto = parse_replicas("1-4", "--x").options(8)
    assert auto["num_replicas"] == "auto"
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert parse_replicas("0-2", "--x").min == 0  # scale to zero is allowed with a range
    for bad in ("0", "x", "3-1", "-1", "1-"):
        with pytest.raises(DynPoseError, match="--x"):
            parse_replicas(bad, "--x")
