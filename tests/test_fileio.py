"""Atomic writes on real files and real filesystems: modes, symlinks, full and read-only disks, non-JSON numbers.

Disk-full and read-only cases use a small tmpfs mounted for the test (root with CAP_SYS_ADMIN, as in the dev
container; skipped with the reason elsewhere) and a file-size limit (`ulimit -f`, anyone) in a child process.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from dynpose.errors import DynPoseError
from dynpose.fileio import atomic_path, write_bytes_atomic, write_json_atomic


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name)


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_new_files_get_the_umask_mode(tmp_path: Path, umask: None) -> None:
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    os.umask(0o027)
    write_bytes_atomic(tmp_path / "b.bin", b"x")
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o640
    with atomic_path(tmp_path / "c.txt") as tmp:
        tmp.write_text("c")
    assert stat.S_IMODE((tmp_path / "c.txt").stat().st_mode) == 0o640


def test_replacing_a_file_keeps_its_mode(tmp_path: Path, umask: None) -> None:
    f = tmp_path / "keep.json"
    f.write_text("{}")
    f.chmod(0o600)
    write_json_atomic(f, [1, 2])
    assert f.read_text() == "[\n  1,\n  2\n]\n" and stat.S_IMODE(f.stat().st_mode) == 0o600


def test_symlink_is_kept_and_its_target_replaced(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "results.json"
    target.write_text("old")
    link = tmp_path / "results.json"
    link.symlink_to(Path("real") / "results.json")  # relative, as users make them
    write_json_atomic(link, {"new": True})
    assert link.is_symlink() and os.readlink(link) == str(Path("real") / "results.json")
    assert target.read_text().startswith('{\n  "new": true')
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "real") == []
    dangling = tmp_path / "later.json"
    dangling.symlink_to(tmp_path / "real" / "made_by_write.json")
    write_bytes_atomic(dangling, b"{}")
    assert dangling.is_symlink() and (tmp_path / "real" / "made_by_write.json").read_bytes() == b"{}"


def test_a_failing_writer_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out.json"
    dest.write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer crashed")
    assert dest.read_text() == "previous" and leftovers(tmp_path) == []


def test_file_size_limit_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    """A real EFBIG: the child process may write at most 64 KiB per file (RLIMIT_FSIZE), then writes 1 MiB."""
    dest = tmp_path / "big.bin"
    dest.write_bytes(b"previous")
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        from dynpose.errors import DynPoseError
        from dynpose.fileio import write_bytes_atomic
        try:
            write_bytes_atomic({str(dest)!r}, b"x" * (1 << 20))
        except DynPoseError as e:
            print("DynPoseError:", e)
        """
    )
    r = subprocess.run([sys.executable, "-B", "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("DynPoseError: cannot write") and "file too large" in r.stdout, r.stdout
    assert len(r.stdout.strip().splitlines()) == 1 and "nothing was written" in r.stdout
    assert dest.read_bytes() == b"previous" and leftovers(tmp_path) == []


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmpfs: Path) -> None:
    dest = tmpfs / "results.json"
    write_json_atomic(dest, {"kept": 1})
    with pytest.raises(DynPoseError, match=r"cannot write .*results.json: no space left on the device") as e:
        write_json_atomic(dest, {"data": "x" * 400_000})
    assert len(str(e.value).splitlines()) == 1
    assert dest.read_text() == '{\n  "kept": 1\n}\n' and leftovers(tmpfs) == []
    with pytest.raises(DynPoseError, match="no space left"), atomic_path(tmpfs / "video.mp4", suffix=".tmp.mp4") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"\0" * 400_000)
    assert leftovers(tmpfs) == [] and not (tmpfs / "video.mp4").exists()


def test_read_only_filesystem_is_a_clear_error(tmpfs: Path) -> None:
    (tmpfs / "old.json").write_text("{}")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(DynPoseError, match="read-only filesystem; write elsewhere"):
        write_json_atomic(tmpfs / "old.json", {"x": 1})
    with pytest.raises(DynPoseError, match="read-only filesystem"):
        write_json_atomic(tmpfs / "sub" / "new.json", {"x": 1})
    assert (tmpfs / "old.json").read_text() == "{}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; run as a normal user to check EACCES")
def test_permission_denied_is_a_clear_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(DynPoseError, match="permission denied"):
            write_json_atomic(ro / "x.json", {})
    finally:
        ro.chmod(0o755)


def test_eval_json_to_dev_full_fails_cleanly(shared: Path, tmp_path: Path) -> None:
    """`dynpose-eval --json /dev/full` used to replace the device node with a regular file."""
    from dynpose.cli.eval import main

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    gt = shared / "data" / "coco" / "test_coco.json"
    results = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
        for a in json.loads(gt.read_text())["annotations"]
        if a["num_keypoints"] > 0
    ]
    res = tmp_path / "results.json"
    res.write_text(json.dumps(results))
    r = CliRunner().invoke(main, ["--gt", str(gt), "--results", str(res), "--json", "/dev/full"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write /dev/full: it is a device, not a regular file"), r.stderr
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
