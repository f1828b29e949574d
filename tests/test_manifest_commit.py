"""Engine-dir commits and ONNX external data, on real ONNX files (TinyPose), real ONNX Runtime and real crashes.

A crash is stood for in two ways: `on_step` raising at a step (the process lives on, so `commit_staged` rolls the
moved files back), and a child process that dies with `os._exit` at that step (no clean-up runs at all). A real
write failure comes from a file-size limit (RLIMIT_FSIZE) in a child process, hit by the manifest write.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest

from dynpose.engines.lock import LOCK_NAME
from dynpose.engines.manifest import (
    MANIFEST_NAME,
    Entry,
    Manifest,
    commit_staged,
    content_name,
    describe_file,
    onnx_external_data,
)
from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard

CARD = ModelCard(name="tinypose_128x96", input_width=96, input_height=128)


def entry(file: str, role: str = "small", fmt: str = "onnx", **kw: object) -> Entry:
    return Entry(role=role, model="tinypose", file=file, format=fmt, precision="fp32", card=CARD, **kw)  # type: ignore[arg-type]


def stage_onnx(stage: Path, name: str, src: Path, external: bool, tag: str = "") -> None:
    """Write `src` into the stage as `name`, optionally with its weights in `name.data`; `tag` (one letter) changes
    the weights' bytes but not the outputs."""
    stage.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(src))
    if tag:  # an unused 2 KB initializer: other weights (an external data file of its own), same outputs
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.full(512, ord(tag), np.float32), "test_tag"))
    onnx.save(m, str(stage / name), save_as_external_data=external, location=f"{name}.data")


def run_model(path: Path) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: np.full((1, 3, 128, 96), 0.5, np.float32)})[0]


def names_in(engine_dir: Path) -> list[str]:
    """The engine dir's files, less staging folders and the write lock's file (`dynpose.engines.lock`)."""
    return sorted(p.name for p in engine_dir.iterdir() if not p.name.startswith(".stage") and p.name != LOCK_NAME)


def test_content_names() -> None:
    sha = "0123456789abcdef" * 4
    assert content_name("large.onnx", sha) == "large.0123456789ab.onnx"
    assert content_name("large.onnx.data", sha) == "large.0123456789ab.onnx.data"
    assert content_name("large.fp16.onnx", sha) == "large.fp16.0123456789ab.onnx"
    assert content_name("sub/large.plan", sha) == "sub/large.0123456789ab.plan"
    assert content_name("large.fedcba987654.onnx", sha) == "large.0123456789ab.onnx"  # one tag, not two


def test_external_data_is_hashed_and_verified(tmp_path: Path, tinypose_128: Path) -> None:
    eng = tmp_path / "engines"
    stage = eng / ".stage-a"
    stage_onnx(stage, "small.onnx", tinypose_128, external=True)
    assert onnx_external_data(stage / "small.onnx") == ["small.onnx.data"]
    info = describe_file(stage, "small.onnx")
    assert list(info["data_files"]) == ["small.onnx.data"] and info["data_files"]["small.onnx.data"]["size"] > 1_000_000
    assert describe_file(tinypose_128.parent, tinypose_128.name)["data_files"] == {}

    m = commit_staged(eng, stage, [entry("small.onnx")])
    e = m.entries[0]
    (data_name,) = e.data_files
    assert e.file.startswith("small.") and data_name.endswith(".onnx.data") and data_name != "small.onnx.data"
    assert names_in(eng) == sorted([MANIFEST_NAME, e.file, data_name])
    saved = json.loads((eng / MANIFEST_NAME).read_text())["entries"][0]
    assert saved["data_files"] == e.data_files
    # the renamed data file is what the committed ONNX reads, and it runs as the original does
    assert onnx_external_data(eng / e.file) == [data_name]
    Manifest.load(eng, verify=True)
    np.testing.assert_array_equal(run_model(eng / e.file), run_model(tinypose_128))

    data = eng / data_name
    original = data.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    data.write_bytes(bytes(flipped))  # same size, other weights
    with pytest.raises(DynPoseError, match=rf"{data_name} sha256 .* does not match the manifest"):
        Manifest.load(eng, verify=True)
    data.unlink()
    with pytest.raises(DynPoseError, match=rf"small data file {data_name} is missing"):
        Manifest.load(eng, verify=True)
    data.write_bytes(original)

    # a manifest that does not list the data files (as written before they were hashed) is refused on load
    saved = json.loads((eng / MANIFEST_NAME).read_text())
    del saved["entries"][0]["data_files"]
    (eng / MANIFEST_NAME).write_text(json.dumps(saved))
    with pytest.raises(DynPoseError, match=r"reads external data \[.*\] that the manifest does not list"):
        Manifest.load(eng, verify=True)


def test_external_data_outside_the_dir_is_refused(tmp_path: Path, tinypose_128: Path) -> None:
    stage_onnx(tmp_path, "small.onnx", tinypose_128, external=True)
    m = onnx.load(str(tmp_path / "small.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "../elsewhere/weights.bin"
    (tmp_path / "evil.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(DynPoseError, match=r"external data location .* '../elsewhere/weights.bin' points outside"):
        onnx_external_data(tmp_path / "evil.onnx")
    (tmp_path / "small.onnx.data").unlink()
    with pytest.raises(DynPoseError, match="external data file small.onnx.data is missing"):
        describe_file(tmp_path, "small.onnx")


def two_states(tmp_path: Path, tinypose_128: Path) -> tuple[Path, Manifest]:
    """An engine dir committed once (state A), and a stage holding a different small model plus a plan (state B)."""
    eng = tmp_path / "engines"
    stage_onnx(eng / ".stage-a", "small.onnx", tinypose_128, external=True, tag="A")
    old = commit_staged(eng, eng / ".stage-a", [entry("small.onnx")])
    shutil.rmtree(eng / ".stage-a")
    stage_onnx(eng / ".stage-b", "small.onnx", tinypose_128, external=True, tag="B")
    (eng / ".stage-b" / "small.plan").write_bytes(b"a serialized plan")
    return eng, old


def new_entries() -> list[Entry]:
    return [entry("small.onnx"), entry("small.plan", fmt="tensorrt", source="small.onnx")]


def test_commit_switches_files_and_manifest_together(tmp_path: Path, tinypose_128: Path) -> None:
    eng, old = two_states(tmp_path, tinypose_128)
    old_files = set(old.entries[0].files())
    m = commit_staged(eng, eng / ".stage-b", new_entries())
    onnx_e, plan_e = m.get("small", "onnx"), m.get("small", "tensorrt")
    assert onnx_e is not None and plan_e is not None and plan_e.source == onnx_e.file  # the plan follows its ONNX
    assert set(names_in(eng)) == {MANIFEST_NAME, *onnx_e.files(), plan_e.file}
    assert not old_files & set(names_in(eng))  # replaced files are gone once the manifest names the new ones
    loaded = Manifest.load(eng, verify=True)
    assert [e.to_dict() for e in loaded.entries] == [e.to_dict() for e in m.entries]

    # committing identical content again names the same files and keeps them
    stage_onnx(eng / ".stage-c", "small.onnx", tinypose_128, external=True, tag="B")
    again = commit_staged(eng, eng / ".stage-c", [entry("small.onnx")])
    assert again.get("small", "onnx").files() == onnx_e.files()  # type: ignore[union-attr]
    Manifest.load(eng, verify=True)


@pytest.mark.parametrize("step,at", [("move", 0), ("move", 2), ("manifest", 0), ("remove", 0), ("remove", 1)])
def test_failure_at_any_step_leaves_a_loadable_dir(tmp_path: Path, tinypose_128: Path, step: str, at: int) -> None:
    eng, old = two_states(tmp_path, tinypose_128)
    before = names_in(eng)
    seen: list[tuple[str, str]] = []

    def crash(s: str, name: str) -> None:
        seen.append((s, name))
        if s == step and sum(1 for x in seen if x[0] == step) == at + 1:
            raise RuntimeError(f"injected failure at {s} {name}")

    with pytest.raises(RuntimeError, match="injected failure"):
        commit_staged(eng, eng / ".stage-b", new_entries(), on_step=crash)
    loaded = Manifest.load(eng, verify=True)  # loads either way
    if step == "remove":  # the manifest was switched: the new state, an old file or two left over
        assert loaded.get("small", "tensorrt") is not None
        assert set(loaded.get("small", "onnx").files()) <= set(names_in(eng))  # type: ignore[union-attr]
    else:  # not switched: the old state, exactly as it was (what was moved in is removed again)
        assert [e.to_dict() for e in loaded.entries] == [e.to_dict() for e in old.entries]
        assert names_in(eng) == before
    np.testing.assert_array_equal(run_model(eng / loaded.require("small", "onnx").file), run_model(tinypose_128))


CHILD = """
import os, resource, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_manifest_commit import new_entries
from dynpose.engines.manifest import commit_staged
eng = Path({eng!r})
mode, step, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
count = {{}}

def hook(s, name):
    count[s] = count.get(s, 0) + 1
    if mode == "kill" and s == step and count[s] == at + 1:
        os._exit(9)  # dies on the spot: no rollback, no finally
    if mode == "fsize" and s == "manifest":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))  # the manifest (~2 KB) cannot be written

try:
    commit_staged(eng, eng / ".stage-b", new_entries(), on_step=hook)
except Exception as e:
    print(type(e).__name__ + ":", e)
    sys.exit(3)
"""


@pytest.mark.parametrize("step,at", [("move", 1), ("manifest", 0), ("remove", 0)])
def test_killed_commit_leaves_a_loadable_dir(tmp_path: Path, tinypose_128: Path, step: str, at: int) -> None:
    eng, old = two_states(tmp_path, tinypose_128)
    code = CHILD.format(tests=str(Path(__file__).parent), eng=str(eng))
    r = subprocess.run([sys.executable, "-B", "-c", code, "kill", step, str(at)], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    loaded = Manifest.load(eng, verify=True)
    switched = step == "remove"
    assert (loaded.get("small", "tensorrt") is not None) == switched
    if not switched:
        assert [e.to_dict() for e in loaded.entries] == [e.to_dict() for e in old.entries]
    run_model(eng / loaded.require("small", "onnx").file)


def test_manifest_write_failure_keeps_the_old_state(tmp_path: Path, tinypose_128: Path) -> None:
    """A real failed write of the manifest after the new files were moved in: EFBIG from a file-size limit."""
    eng, old = two_states(tmp_path, tinypose_128)
    before = names_in(eng)
    code = CHILD.format(tests=str(Path(__file__).parent), eng=str(eng))
    r = subprocess.run([sys.executable, "-B", "-c", code, "fsize", "-", "0"], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert r.stdout.startswith("DynPoseError: cannot write") and "file too large" in r.stdout, r.stdout
    loaded = Manifest.load(eng, verify=True)
    assert [e.to_dict() for e in loaded.entries] == [e.to_dict() for e in old.entries]
    assert names_in(eng) == before  # the moved-in files were taken out again


def test_commit_into_a_dir_with_an_unreadable_manifest(tmp_path: Path, tinypose_128: Path) -> None:
    eng = tmp_path / "engines"
    eng.mkdir()
    (eng / MANIFEST_NAME).write_text("{ not json")
    (eng / "keep.txt").write_text("a user's file")
    stage_onnx(eng / ".stage", "small.onnx", tinypose_128, external=False)
    m = commit_staged(eng, eng / ".stage", [entry("small.onnx")])
    assert m.entries[0].data_files == {} and (eng / "keep.txt").exists()  # unknown files are never removed
    Manifest.load(eng, verify=True)
