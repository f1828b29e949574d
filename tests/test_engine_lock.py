"""Concurrent writers of one engine dir, as real processes: the engine dir's write lock (`dynpose.engines.lock`)
makes a second writer wait and build on the first one's manifest, so every concurrent export lands and the dir loads.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from dynpose.engines.lock import LOCK_NAME, engine_dir_lock
from dynpose.engines.manifest import Manifest, updating_manifest

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "examples" / "cards"


# One writer: `rounds` exports of the given (onnx, card or "detector", role) jobs, one after another.
WRITER = """
import sys
from dynpose.export.api import register_detector, register_onnx
from dynpose.models.card import ModelCard
engine_dir, rounds, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for r in range(rounds):
    onnx_file, card, role = jobs[r % len(jobs)].split(",")
    if role == "detector":
        register_detector(onnx_file, engine_dir, progress=False)
    else:
        register_onnx(onnx_file, ModelCard.from_json_file(card), engine_dir, role=role, progress=False)
"""


def _writer(engine_dir: Path, rounds: int, *jobs: tuple[Path, str, str]) -> list[str]:
    return [sys.executable, "-c", WRITER, str(engine_dir), str(rounds), *(f"{m},{CARDS / c},{r}" for m, c, r in jobs)]


def _detector(onnx_file: Path, engine_dir: Path) -> list[str]:
    cli = "from dynpose.cli.export import main; main()"
    return [sys.executable, "-c", cli, "--detector", str(onnx_file), "--engine-dir", str(engine_dir)]


def test_concurrent_exports_all_land(tmp_path: Path, shared: Path) -> None:
    """Four processes export into one new engine dir at once, three times each (small, large, two detectors that
    replace each other): each exits 0, the manifest names all roles, every file it names is there with its hash,
    and no file is left that it does not name. (A stress test: without the lock about one run in three here lost a
    committed file; `test_second_writer_waits_then_builds_on_the_first` is the deterministic one.)"""
    eng = tmp_path / "engines"
    models = shared / "models"
    small = (models / "tinypose_128x96.onnx", "tinypose_128x96.json", "small")
    large = (models / "tinypose_256x192.onnx", "tinypose_256x192.json", "large")
    det320 = (models / "picodet_s_320_pedestrian.onnx", "-", "detector")
    det192 = (models / "picodet_s_192_pedestrian.onnx", "-", "detector")
    cmds = [_writer(eng, 3, small), _writer(eng, 3, large), _writer(eng, 3, det320, det192), _writer(eng, 3, det192, det320)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    m = Manifest.load(eng, verify=True)  # every named file present, sizes and sha256s as written
    assert {e.role for e in m.entries} == {"small", "large", "detector"}
    named = {f for e in m.entries for f in e.files()}
    left = {p.name for p in eng.iterdir()} - named - {"manifest.json", LOCK_NAME}
    assert not left, left  # the replaced detector's file went, nothing half-committed stayed


def test_second_writer_waits_then_builds_on_the_first(tmp_path: Path, tinypose_engine_dir: Path, shared: Path) -> None:
    """While this process holds the lock (a read-modify-write of its own), `dynpose-export --detector` waits with a
    note naming the holder; once released it commits on top of the manifest this process wrote."""
    import shutil

    eng = tmp_path / "engines"
    shutil.copytree(tinypose_engine_dir, eng)
    log = tmp_path / "export.log"
    with engine_dir_lock(eng, "the test's own change"):
        with open(log, "w") as f:
            proc = subprocess.Popen(_detector(shared / "models" / "picodet_s_320_pedestrian.onnx", eng), stdout=f, stderr=f)
        deadline = time.monotonic() + 120
        while "waiting for it to finish" not in log.read_text():
            assert proc.poll() is None, log.read_text()  # it must wait, not commit past the lock
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert "the test's own change" in log.read_text()  # the note names who holds the lock
        with updating_manifest(eng, "the test's own change") as m:  # re-entrant within this thread
            m.notes["written_while_locked"] = True
        assert proc.poll() is None
    assert proc.wait(timeout=120) == 0, log.read_text()
    m = Manifest.load(eng, verify=True)
    assert m.get("detector") is not None and m.notes.get("written_while_locked") is True  # both changes kept
    assert {e.role for e in m.entries} == {"router", "small", "large", "detector"}
