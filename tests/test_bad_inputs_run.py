"""The bad-input corpus, second half: what a user can hand the running system (the Python API, `dynpose-run`),
each expected to end in one `error: ...` line (exit 2) or a bounded, valid result — never a traceback, never a
half-written file. The low-level readers and writers have theirs in test_bad_inputs.py.

To grow it, add a case to a list: (id, arguments or input, regex the message must match).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from dynpose.cli.run import main as run_main
from dynpose.errors import DynPoseError
from dynpose.runtime.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str | Path) -> tuple[int, str, str]:
    r = CliRunner().invoke(run_main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def one_line_cli_error(match: str, *args: str | Path) -> str:
    code, _, err = cli(*args)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
    return lines[0]


# -- dynpose-run flags ----------------------------------------------------------------------------------------------
RUN_FLAG_CASES = [
    ("det-score-nan", ["--det-score", "nan"], r"--det-score nan: must be a finite number in \[0.0, 1.0\]"),
    ("det-score-negative", ["--det-score", "-1"], r"--det-score -1.0: must be a finite number"),
    ("vis-score-nan", ["--vis-score", "nan"], r"--vis-score nan"),
    ("max-latency-nan", ["--max-latency-ms", "nan"], r"--max-latency-ms nan"),
    ("max-latency-negative", ["--max-latency-ms", "-5"], r"--max-latency-ms -5.0"),
    ("threads-negative", ["--threads", "-1"], r"--threads -1: must be an integer >= 1"),
    ("threads-zero", ["--threads", "0"], r"--threads 0"),
    ("max-batch-zero", ["--max-batch", "0"], r"--max-batch must be >= 1"),
    ("bad-route", ["--route", "median"], r"routing policy 'median'"),
    ("out-suffix", ["--out", "x.csv"], r"use a .json"),
    ("two-box-sources", ["--detector", "a.onnx", "--gt-boxes", "b.json"], r"give one box source"),
]


@pytest.mark.parametrize("extra,match", [c[1:] for c in RUN_FLAG_CASES], ids=[c[0] for c in RUN_FLAG_CASES])
def test_bad_run_flags(tinypose_engine_dir: Path, coco_dir: Path, extra: list[str], match: str) -> None:
    one_line_cli_error(match, "--engine-dir", tinypose_engine_dir, "--source", coco_dir, *extra)


def test_empty_source_is_refused(tinypose_engine_dir: Path) -> None:
    one_line_cli_error(r"--source is empty", "--engine-dir", tinypose_engine_dir, "--source", "")


def test_vis_on_an_existing_file_and_out_in_unwritable_places(
    tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path
) -> None:
    common = [
        "--engine-dir",
        tinypose_engine_dir,
        "--source",
        coco_dir / "000000000785.jpg",
        "--gt-boxes",
        coco_dir / "test_coco.json",
    ]
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"x")
    one_line_cli_error(r"--vis .*exists and is not a folder", *common, "--vis", a_file)
    one_line_cli_error(r"--out .*cannot create", *common, "--out", a_file / "sub" / "r.json")
    (tmp_path / "a.json").mkdir()
    one_line_cli_error(r"--out .*is a directory", *common, "--out", tmp_path / "a.json")
    assert a_file.read_bytes() == b"x"


def test_out_on_a_read_only_filesystem_fails_before_the_run(tinypose_engine_dir: Path, coco_dir: Path, tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    one_line_cli_error(
        r"--out .*not writable",
        "--engine-dir",
        tinypose_engine_dir,
        "--source",
        coco_dir,
        "--gt-boxes",
        coco_dir / "test_coco.json",
        "--out",
        tmpfs / "r.json",
    )


def test_threads_above_the_cores_are_capped(tinypose_engine_dir: Path, coco_dir: Path) -> None:
    code, out, err = cli(
        "--engine-dir",
        tinypose_engine_dir,
        "--source",
        coco_dir / "000000000785.jpg",
        "--gt-boxes",
        coco_dir / "test_coco.json",
        "--threads",
        "1000",
        "--route",
        "all-large",
    )
    assert code == 0, err
    assert "--threads 1000: this machine has" in err and "frames 1" in out


def test_no_outputs_says_so(tinypose_engine_dir: Path, coco_dir: Path) -> None:
    code, _, err = cli(
        "--engine-dir",
        tinypose_engine_dir,
        "--source",
        coco_dir / "000000000785.jpg",
        "--gt-boxes",
        coco_dir / "test_coco.json",
        "--route",
        "all-large",
    )
    assert code == 0 and "results are not written" in err


# -- the Python API ---------------------------------------------------------------------------------------------------
API_BOX_CASES = [
    ("strings", [["a", "b", "c", "d"]], r"boxes must be numbers"),
    ("ragged", [[10, 10, 50, 80], [1, 2]], r"boxes must be numbers .*same length"),
    ("wrong-width", np.zeros((2, 3)), r"boxes must be an \(M,4\) or \(M,5\)"),
    ("dict", {"x": 1}, r"boxes must be"),
]


@pytest.fixture(scope="module")
def pipe(tinypose_engine_dir: Path):
    with Pipeline.from_engine_dir(tinypose_engine_dir, route="fraction:0.5", threads=2) as p:
        yield p


@pytest.mark.parametrize("boxes,match", [c[1:] for c in API_BOX_CASES], ids=[c[0] for c in API_BOX_CASES])
def test_bad_boxes_in_the_api(pipe: Pipeline, boxes: object, match: str) -> None:
    image = np.zeros((240, 320, 3), np.uint8)
    with pytest.raises(DynPoseError, match=match) as e:
        pipe(image, boxes)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_huge_boxes_are_dropped_and_results_stay_valid_json(pipe: Pipeline) -> None:
    image = np.zeros((240, 320, 3), np.uint8)
    boxes = np.array(
        [
            [10, 10, 60, 120, 0.9],
            [-5e14, -5e14, 1e15, 1e15, 0.9],
            [1e300, 1e300, 1e300, 1e300, 0.9],
            [-1e300, -1e300, 1e300, 2e300, 0.9],
        ]
    )
    before = pipe.stats.dropped_boxes
    persons = pipe(image, boxes)
    assert len(persons) <= 1 and pipe.stats.dropped_boxes - before == 3
    text = json.dumps([p.to_dict() for p in persons] + [p.to_coco(1) for p in persons], allow_nan=False)
    assert "Infinity" not in text and "NaN" not in text


API_LOAD_CASES = [
    ("engine-dir-none", {"engine_dir": None}, r"engine dir: none given"),
    ("threads-negative", {"threads": -4}, r"threads -4: must be an integer >= 1"),
    ("backend", {"backend": "tensorflow"}, r"unknown backend 'tensorflow'"),
]


@pytest.mark.parametrize("kw,match", [c[1:] for c in API_LOAD_CASES], ids=[c[0] for c in API_LOAD_CASES])
def test_bad_pipeline_arguments(tinypose_engine_dir: Path, kw: dict, match: str) -> None:
    kw = {"engine_dir": tinypose_engine_dir, **kw}
    with pytest.raises(DynPoseError, match=match):
        Pipeline.from_engine_dir(kw.pop("engine_dir"), route="all-large", **kw)


def test_close_while_other_threads_call_gives_every_caller_a_dynpose_error(
    tinypose_engine_dir: Path, coco_dir: Path
) -> None:
    image = cv2.imread(str(coco_dir / "000000197388.jpg"))
    boxes = np.tile([[20.0, 30.0, 150.0, 300.0, 0.9]], (24, 1))
    p = Pipeline.from_engine_dir(tinypose_engine_dir, route="fraction:0.5", threads=2)
    errors: list[BaseException] = []
    done = 0
    stop = threading.Event()

    def caller() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                p(image, boxes)
                done += 1
            except DynPoseError:
                return  # the expected end: the pipeline was closed under us
            except BaseException as e:  # anything else is the bug this test is about
                errors.append(e)
                return

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    p.close()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, [repr(e) for e in errors]
    with pytest.raises(DynPoseError, match="closed"):
        p(image, boxes)


def test_many_boxes_run_in_bounded_windows(pipe: Pipeline, coco_dir: Path) -> None:
    """Memory stays bounded whatever the box count: crops are made and run a window (the models' max batch) at a
    time, while the routing policy still sees every box of the call."""
    image = cv2.imread(str(coco_dir / "000000197388.jpg"))
    rng = np.random.default_rng(0)
    n = 200
    boxes = np.concatenate([rng.uniform(0, 200, (n, 2)), np.full((n, 2), 120.0)], axis=1)
    from dynpose.roles import MODEL_ROLES, Role
    from dynpose.runtime.execute import LocalExecutor, execute
    from dynpose.runtime.plan import LARGE, make_plan

    assert pipe.engines is not None
    models = {r: pipe.engines.require(r) for r in MODEL_ROLES}
    with LocalExecutor(models) as ex:
        res = execute(make_plan([pipe.prepare(image, boxes)], pipe.policy, pipe.cards), ex)
    assert int((res.model == LARGE).sum()) == n // 2  # fraction:0.5 over all 200 boxes, not per window
    for role in MODEL_ROLES:
        counts = [count for r, _, _, count in res.spans if r is role]
        window = models[role].runner.max_batch
        assert sum(counts) == (n if role is Role.ROUTER else n // 2) and max(counts) <= window < n


def test_sigterm_keeps_what_was_done_and_leaves_no_temp_files(
    tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path, shared: Path
) -> None:
    src = tmp_path / "clip.mp4"
    frame = cv2.resize(cv2.imread(str(coco_dir / "000000197388.jpg")), (320, 240))
    w = cv2.VideoWriter(str(src), cv2.VideoWriter.fourcc(*"mp4v"), 10.0, (320, 240))
    for i in range(400):
        w.write(np.roll(frame, i, axis=1))
    w.release()
    out, vis = tmp_path / "r.jsonl", tmp_path / "vis"
    cmd = [
        sys.executable,
        "-m",
        "dynpose.cli.run",
        "--engine-dir",
        str(tinypose_engine_dir),
        "--source",
        str(src),
        "--detector",
        str(shared / "models" / "picodet_s_192_pedestrian.onnx"),
        "--route",
        "all-small",
        "--max-batch",
        "1",
        "--out",
        str(out),
        "--vis",
        str(vis),
        "--quiet",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".r.jsonl.*.tmp")):
        time.sleep(0.2)
    time.sleep(2.0)  # some frames done
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "interrupted; frames" in stdout
    lines = out.read_text().splitlines()
    assert 0 < len(lines) < 400 and all(json.loads(ln)["frame"] == i for i, ln in enumerate(lines))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in vis.iterdir()] == ["clip.mp4"]
    cap = cv2.VideoCapture(str(vis / "clip.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == len(lines)
    cap.release()


# -- dynpose-export ---------------------------------------------------------------------------------------------------
def export_cli(*args: str | Path) -> tuple[int, str]:
    from dynpose.cli.export import main as export_main

    r = CliRunner().invoke(export_main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


EXPORT_CASES = [
    ("missing-file-not-an-alias", ["--model", "all", "--checkpoint", "ckpt/res50.pth"], r"ckpt/res50.pth: file not found"),
    ("role-pair-on-one-model", ["--model", "resnet_50", "--checkpoint", "small=mmpose"], r"ROLE=FILE checkpoints are for"),
    ("pair-without-all", ["--model", "resnet_50", "--small", "resnet_50", "--weights", "random"], r"choose the pair"),
    ("router-as-small", ["--model", "all", "--small", "router", "--weights", "random"], r"--small 'router': not a pose"),
    ("unknown-large", ["--model", "all", "--large", "hrnet_w99", "--weights", "random"], r"unknown model 'hrnet_w99'"),
    ("min-oks-nan", ["--model", "router", "--weights", "random", "--min-oks", "nan"], r"--min-oks nan"),
]


@pytest.mark.parametrize("args,match", [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES])
def test_bad_export_arguments(tmp_path: Path, args: list[str], match: str) -> None:
    code, out = export_cli(*args, "--engine-dir", tmp_path / "eng", "--quiet")
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in out, out
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "eng" / "manifest.json").exists()


def test_model_all_refuses_one_file_for_the_whole_set(tmp_path: Path) -> None:
    ckpt = tmp_path / "res50.pth"
    ckpt.write_bytes(b"x")
    code, out = export_cli("--model", "all", "--checkpoint", ckpt, "--engine-dir", tmp_path / "eng", "--quiet")
    assert code == 2 and "one file per role: --checkpoint small=" in out


def test_export_into_a_read_only_or_full_dir(tmpfs: Path, tinypose_128: Path) -> None:
    from dynpose.export.api import register_onnx
    from dynpose.models.card import ModelCard

    card = ModelCard.from_json_file(REPO / "examples" / "cards" / "tinypose_128x96.json")
    with pytest.raises(DynPoseError, match=r"No space left on device while exporting .*left as it was"):
        register_onnx(tinypose_128, card, tmpfs / "eng", role="small", progress=False)  # 5 MB into 256 KiB
    assert [p.name for p in (tmpfs / "eng").iterdir()] == []  # no staging folder, no manifest
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(DynPoseError, match=r"cannot write there .*Read-only"):
        register_onnx(tinypose_128, card, tmpfs / "eng", role="small", progress=False)


def test_killed_exports_leave_staging_that_the_next_export_removes(tmp_path: Path, tinypose_128: Path) -> None:
    from dynpose.engines.manifest import Manifest
    from dynpose.export.api import register_onnx
    from dynpose.models.card import ModelCard

    eng = tmp_path / "eng"
    card = ModelCard.from_json_file(REPO / "examples" / "cards" / "tinypose_128x96.json")
    register_onnx(tinypose_128, card, eng, role="small", progress=False)
    before = Manifest.load(eng).require("small").file
    from dynpose.export.commit import STALE_AFTER_S, _host_tag

    # a SIGKILLed export's folder (its process is gone) and a live one's (this process) on this host; another host's
    # export (a shared filesystem: its pid means nothing here) that must stay, and one that was left a day ago
    host = _host_tag()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (eng / f".staging-{host}-{dead.stdout.strip()}-abc").mkdir()
    live = f".staging-{host}-{os.getpid()}-live"
    (eng / live).mkdir()
    other = ".staging-0000beef-1-running"
    (eng / other).mkdir()
    (eng / ".staging-0000beef-2-killed").mkdir()
    old = time.time() - STALE_AFTER_S - 60
    os.utime(eng / ".staging-0000beef-2-killed", (old, old))
    # SIGTERM during an export: like Ctrl-C, the engine dir keeps its old state and no staging folder remains
    cmd = [
        sys.executable,
        "-m",
        "dynpose.cli.export",
        "--model",
        "hrnet_w32",
        "--weights",
        "random",
        "--role",
        "small",
        "--engine-dir",
        str(eng),
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    deadline = time.time() + 120
    while time.time() < deadline and not [p for p in eng.glob(f".staging-{host}-{proc.pid}-*")]:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "interrupted: the engine dir" in out, out
    assert sorted(p.name for p in eng.iterdir() if p.name.startswith(".staging")) == sorted([live, other])
    assert Manifest.load(eng).require("small").file == before  # verified: the old state, loadable


def test_max_pixels_skips_a_too_large_image(tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "000000000785.jpg").write_bytes((coco_dir / "000000000785.jpg").read_bytes())  # 640x425: 272,000 px
    (folder / "000000040083.jpg").write_bytes((coco_dir / "000000040083.jpg").read_bytes())  # 500x333: 166,500 px
    one_line_cli_error(r"--max-pixels -1", "--engine-dir", tinypose_engine_dir, "--source", folder, "--max-pixels", "-1")
    code, out, err = cli(
        "--engine-dir",
        tinypose_engine_dir,
        "--source",
        folder,
        "--gt-boxes",
        coco_dir / "test_coco.json",
        "--route",
        "all-large",
        "--max-pixels",
        "200000",
    )
    assert code == 0, err
    assert "000000000785.jpg" in err and "skipped" in err and "frames 1" in out  # 640x425 is over the limit


def test_a_card_that_disagrees_with_its_onnx_is_refused_at_load(tinypose_engine_dir: Path, tmp_path: Path) -> None:
    import shutil

    from dynpose.engines.manifest import MANIFEST_NAME

    bad = tmp_path / "engines"
    shutil.copytree(tinypose_engine_dir, bad)
    doc = json.loads((bad / MANIFEST_NAME).read_text())
    for e in doc["entries"]:
        if e["role"] == "small":
            e["card"]["input_width"], e["card"]["input_height"] = 192, 256  # the file is 96x128
    (bad / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(DynPoseError, match=r"small entry .*is \[None, 3, 128, 96\] but its card says N x 3 x 256 x 192"):
        Pipeline.from_engine_dir(bad, route="all-small")


def test_full_disk_under_vis_and_out_is_one_line_and_leaves_nothing(
    tinypose_engine_dir: Path, coco_dir: Path, tmpfs: Path, tmp_path: Path
) -> None:
    src = tmp_path / "clip.avi"
    frame = cv2.imread(str(coco_dir / "000000197388.jpg"))
    w = cv2.VideoWriter(str(src), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (frame.shape[1], frame.shape[0]))
    for i in range(12):
        w.write(np.roll(frame, 7 * i, axis=1))
    w.release()
    det = REPO.parent / "shared" / "models" / "picodet_s_192_pedestrian.onnx"
    common = ["--engine-dir", tinypose_engine_dir, "--source", src, "--detector", det, "--route", "all-small"]
    msg = one_line_cli_error(r"video .*(could be read back|No space left|nothing was written)", *common, "--vis", tmpfs)
    assert "Traceback" not in msg and [p.name for p in tmpfs.iterdir()] == []
    (tmpfs / "filler").write_bytes(b"x" * (250 * 1024))  # leave ~6 KB: the JSON lines do not fit
    msg = one_line_cli_error(r"--out .*(No space left|cannot write)", *common, "--out", tmpfs / "r.jsonl")
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"]
