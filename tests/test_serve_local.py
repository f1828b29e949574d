"""Ctrl-C to `dynpose-serve --address local` in a terminal, for real: the command runs in its own session and process
group (as a shell's foreground job) and starts its own Ray cluster, whose processes (GCS, raylet, agents) are in that
group too; SIGINT goes to the whole group, as a terminal sends it. Every request in flight must be answered (the
drain), Ray's processes must stay up for it (Ray starts them with SIGINT blocked) and all go afterwards, and the
output holds dynpose's own lines, not Ray's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the service needs Ray Serve: pip install -e '.[serve]'")

from dynpose.data import load_detections  # noqa: E402
from dynpose.runtime.pipeline import Pipeline  # noqa: E402
from dynpose.serve.client import Client, ServiceError  # noqa: E402

IDS = (785, 40083, 196141, 197388)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group(pgid: int) -> dict[int, str]:
    """pid -> command line of every live process in the process group."""
    out = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rpartition(")")[2].split()[2]) == pgid:
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:80]
        except (OSError, IndexError, ValueError):
            continue
    return out


def _blocks_sigint(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigBlk:", "SigIgn:")) and int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)):
            return True
    return False


def test_ctrl_c_to_the_process_group_drains(tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    dets = load_detections(coco_dir / "test_coco_det_AP_H_56.json")
    images = {iid: cv2.imread(str(coco_dir / f"{iid:012d}.jpg")) for iid in IDS}
    with Pipeline.from_engine_dir(tinypose_engine_dir, threads=1) as pipe:
        want = {iid: pipe(images[iid], dets[iid]) for iid in IDS}
    port = _free_port()
    log_path = tmp_path / "serve.log"
    cmd = [
        sys.executable, "-c", "from dynpose.cli.serve import main; main()", "--engine-dir", str(tinypose_engine_dir),
        "--port", str(port), "--replica-cpus", "0.25", "--threads", "1",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pgid = proc.pid
    try:
        deadline = time.monotonic() + 240
        while "ready at" not in log_path.read_text():  # the banner: its signal handlers are in place
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        ray_procs = {p: c for p, c in _group(pgid).items() if p != proc.pid}
        assert any("raylet" in c for c in ray_procs.values()), ray_procs  # Ray's processes share the group
        assert all(_blocks_sigint(p) for p in ray_procs), ray_procs

        client = Client(f"http://127.0.0.1:{port}", timeout=120, retries=0)
        answers: dict[int, str] = {}
        start = threading.Barrier(9)

        def in_flight(k: int) -> None:
            iid = IDS[k % len(IDS)]
            start.wait()
            try:
                got = client.pose_file(coco_dir / f"{iid:012d}.jpg", boxes=dets[iid]).persons
                assert len(got) == len(want[iid])
                for g, w in zip(got, want[iid], strict=True):
                    np.testing.assert_allclose(g.keypoints, w.keypoints, atol=1e-3)
                answers[k] = "ok"
            except (ServiceError, AssertionError) as e:
                answers[k] = str(e)[:200]

        threads = [threading.Thread(target=in_flight, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        start.wait()
        time.sleep(0.3)
        os.killpg(pgid, signal.SIGINT)  # what Ctrl-C in the terminal does
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
        assert list(answers.values()) == ["ok"] * 8, answers
        deadline = time.monotonic() + 30
        while _group(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group(pgid), _group(pgid)  # Ray went with the service
    finally:
        if proc.poll() is None:
            os.killpg(pgid, signal.SIGKILL)
    text = log_path.read_text()
    assert "drained: every request in flight was answered" in text and "dynpose-serve: stopped" in text, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    noisy = [ln for ln in lines if " INFO " in ln or "(raylet)" in ln or "will not be applied" in ln or "WARNING" in ln]
    assert not noisy, noisy  # Ray's own lines stay in Ray's log folder unless --log-level debug
    assert len(lines) <= 8, lines
