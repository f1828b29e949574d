"""The HTTP service on a real local Ray cluster: `dynpose-serve` runs as a subprocess joined to a cluster this module
starts (2 CPUs), real HTTP on 127.0.0.1, real TinyPose models; answers are checked against an in-process Pipeline.

One service for the whole module (Ray and Serve start once); the last test stops it with SIGTERM and checks that it
drains and exits, and the module's teardown checks that Ray left no process behind.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
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
        "not JSON": (_raw(client, "POST", "/v1/pose", b"{image:", js), 400, "not JSON"),
        "text body": (_raw(client, "POST", "/v1/pose", b"hello", {"Content-Type": "text/plain"}), 415, "Content-Type"),
        "body over --max-body-mb": (
            _raw(client, "POST", "/v1/pose", b"x" * (MAX_BODY_MB * 2**20 + 1), js),
            413,
            "--max-body-mb",
        ),
        "form without image": (_raw(client, "POST", "/v1/pose", *_form({"route": (None, b"all-large")})), 400, "image"),
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


def _form(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, dict[str, str]]:
    body, ctype = _multipart(fields)
    return body, {"Content-Type": ctype}


def test_sigterm_drains_and_exits(service, coco, expected) -> None:
    """Last: SIGTERM while requests are in flight. Each request ends in a whole answer, or (once the service is
    stopping) a refused connection or a 503; never a 500 or a cut-off answer. The command exits 0."""
    proc, client, log_path = service
    files, _, _ = coco
    _, _, lightly = expected
    quick = Client(client.url, timeout=60, retries=0)
    outcomes: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(k: int) -> None:
        while not stop.is_set():
            iid = IDS[k % len(IDS)]
            try:
                ans = quick.pose_file(files[iid], boxes=lightly[iid][0])
                _same(ans.persons, lightly[iid][1])
                what = "ok"
            except AssertionError:
                what = "wrong answer"
            except ServiceError as e:
                what = f"http {e.status}" if e.status is not None else "refused"
            with lock:
                outcomes.append(what)
            if what != "ok":
                return

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, log_path.read_text()[-3000:]
    stop.set()
    for t in threads:
        t.join(timeout=60)
    print(f"\nSIGTERM under load: {', '.join(f'{outcomes.count(o)} {o}' for o in sorted(set(outcomes)))}")
    assert "ok" in outcomes
    assert set(outcomes) <= {"ok", "refused", "http 503", "http 404"}, outcomes
    assert "dynpose-serve: stopped" in log_path.read_text()


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
