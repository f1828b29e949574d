"""Video runs end to end: `dynpose-run --track`, many sources at once, outputs, and sources that break.

Real engine dir, real detector, real videos (street.mp4 and clips written with OpenCV in tmp_path); the broken
inputs are real files too (truncated bytes, an empty file), and a source that fails mid-stream is a FrameSource
whose reads start failing, as a camera or a disk does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from clips import pan, write_clip

from dynpose.cli.run import main
from dynpose.errors import DynPoseError
from dynpose.io.box_sources import DetectorBoxes
from dynpose.io.sinks import JsonLinesSink, Outputs
from dynpose.io.sources import Frame, FrameSource, open_source
from dynpose.runtime.engine_set import EngineSet, LoadOptions
from dynpose.runtime.pipeline import Pipeline
from dynpose.video import LoopOptions, StreamError, VideoOptions, run


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def count_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    return n


@pytest.fixture(scope="module")
def street(shared: Path) -> Path:
    return shared / "data" / "video" / "street.mp4"


@pytest.fixture(scope="module")
def detector(shared: Path) -> Path:
    return shared / "models" / "picodet_s_320_pedestrian.onnx"


@pytest.fixture(scope="module")
def engines(tinypose_engine_dir: Path, detector: Path) -> Iterator[EngineSet]:
    with EngineSet.load(tinypose_engine_dir, LoadOptions(detector=detector, threads=2)) as e:
        yield e


@pytest.fixture(scope="module")
def pan_video(coco_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = cv2.imread(str(coco_dir / "000000197388.jpg"))
    return write_clip(tmp_path_factory.mktemp("pan") / "pan.mp4", pan(img, 12, (400, 300), 0, 120, 40))


def test_done_command(tinypose_engine_dir: Path, street: Path, detector: Path, tmp_path: Path) -> None:
    """The issue's command: ids per person in JSON lines, a drawn video, the detector on 2 of the 5 frames."""
    out, vis = tmp_path / "tracks.jsonl", tmp_path / "out"
    code, stdout, stderr = run_cli(
        "--engine-dir", tinypose_engine_dir, "--source", street, "--detector", detector,
        "--det-every", "3", "--track", "--out", out, "--vis", vis,
    )  # fmt: skip
    assert code == 0, stderr
    lines = read_lines(out)
    assert [ln["frame"] for ln in lines] == [0, 1, 2, 3, 4]
    assert all("track_id" in p for ln in lines for p in ln["persons"])
    ids = [p["track_id"] for ln in lines for p in ln["persons"] if p["track_id"] is not None]
    assert ids and max(ids.count(i) for i in set(ids)) >= 4  # someone keeps one id over 4+ frames
    assert count_frames(vis / "street.mp4") == 5
    assert "detector calls 2" in stdout and "router crops" in stdout and "crops small" in stdout
    assert "street: frames 5" in stdout and "FPS" in stdout


def test_posetrack_output(tinypose_engine_dir: Path, street: Path, detector: Path, tmp_path: Path) -> None:
    out = tmp_path / "tracks.json"
    code, _, stderr = run_cli(
        "--engine-dir", tinypose_engine_dir, "--source", street, "--detector", detector,
        "--track", "--reroute-every", "5", "--smooth", "one-euro", "--out", out, "--format", "posetrack",
    )  # fmt: skip
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    assert [im["frame_id"] for im in doc["images"]] == [0, 1, 2, 3, 4]
    assert {im["vid_id"] for im in doc["images"]} == {1}
    cat = doc["categories"][0]
    assert len(cat["keypoints"]) == 17 and cat["keypoints"][0] == "nose" and [16, 14] in cat["skeleton"]
    anns = doc["annotations"]
    assert anns and all(isinstance(a["track_id"], int) and len(a["keypoints"]) == 51 for a in anns)
    assert {a["image_id"] for a in anns} <= {im["id"] for im in doc["images"]}


def test_keyframes_detect_where_the_tracks_do_not_explain_the_frame(
    tinypose_engine_dir: Path, street: Path, detector: Path, tmp_path: Path
) -> None:
    """`--track --keyframes`: the key-frame planner runs inside the stream's tracking (people walking in on
    street.mp4 call the detector on 4 of the 5 frames; plain --det-every 3 on 2)."""
    out = tmp_path / "kf.jsonl"
    code, stdout, stderr = run_cli(
        "--engine-dir", tinypose_engine_dir, "--source", street, "--detector", detector,
        "--track", "--keyframes", "--det-every", "3", "--out", out, "--route", "all-large",
    )  # fmt: skip
    assert code == 0, stderr
    assert len(read_lines(out)) == 5 and "detector calls 4" in stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--keyframes"], "add --track"),
        (["--det-every", "3"], "add --track"),
        (["--smooth", "one-euro"], "add --track"),
        (["--track", "--smooth", "kalman"], "--smooth 'kalman'"),
        (["--out", "x.json", "--format", "posetrack"], "needs --track|add --track"),
        (["--track", "--out", "x.jsonl", "--format", "posetrack"], "JSON lines go to a .jsonl"),
        (["--track", "--det-every", "40"], "--track-max-missed 30 is under --det-every 40"),
        (["--track", "--det-every", "2", "--gt-boxes", "gt.json"], "--det-every saves detector calls"),
        (["--source", "x.mp4", "--eval", "gt.json"], "give one --source"),
    ],
)
def test_video_flags_refused_before_loading(tinypose_engine_dir: Path, street: Path, flags: list, message: str) -> None:
    code, _, stderr = run_cli("--engine-dir", tinypose_engine_dir, "--source", street, *flags)
    assert code == 2 and stderr.startswith("error: ")
    assert any(m in stderr for m in message.split("|")), stderr


def _run_video(engines: EngineSet, sources: list[Path], out_dir: Path, options: VideoOptions) -> tuple[list, int]:
    """The run loop over `sources` (JSON lines per source into out_dir) -> the lines, the count of plans."""
    with Pipeline.from_engine_set(engines, route="threshold:0.50874") as pipe:
        srcs = [open_source(s) for s in sources]
        sinks = [[JsonLinesSink(out_dir / f"{s.stem}.jsonl")] for s in sources]
        run(pipe, srcs, sinks, options=LoopOptions(video=options, progress=False))
        return [read_lines(out_dir / f"{s.stem}.jsonl") for s in sources], pipe.stats.batches


def test_two_sources_at_once_give_the_one_at_a_time_results(
    engines: EngineSet, street: Path, pan_video: Path, tmp_path: Path
) -> None:
    """Two videos (5 and 12 frames) tracked with key-frame detection and temporal routing: one batch per frame
    pair, and per source the very results each gives alone."""
    opts = VideoOptions(track=True, det_every=3, reroute_every=4)
    (tmp_path / "both").mkdir(), (tmp_path / "alone").mkdir()
    both, dispatches = _run_video(engines, [street, pan_video], tmp_path / "both", opts)
    assert dispatches == 12  # 12 steps: frames of both sources were planned together
    for i, src in enumerate([street, pan_video]):
        (alone,), _ = _run_video(engines, [src], tmp_path / "alone", opts)
        assert len(alone) == len(both[i])
        for a, b in zip(alone, both[i], strict=True):
            assert [p["track_id"] for p in a["persons"]] == [p["track_id"] for p in b["persons"]]
            assert [p["model"] for p in a["persons"]] == [p["model"] for p in b["persons"]]
            for p, q in zip(a["persons"], b["persons"], strict=True):
                np.testing.assert_allclose(np.array(p["keypoints"], float), np.array(q["keypoints"], float), atol=0.02)


def test_cli_many_sources_write_per_source_outputs(
    tinypose_engine_dir: Path, street: Path, detector: Path, tmp_path: Path
) -> None:
    """Two sources with the same file name: outputs named by source (street, street-2), a summary line each. (A
    per-crop policy: `fraction:F` ranks the crops of a whole batch, so batched sources would sway each other.)"""
    a, b = tmp_path / "a" / "street.mp4", tmp_path / "b" / "street.mp4"
    for p in (a, b):
        p.parent.mkdir()
        shutil.copy(street, p)
    out, vis = tmp_path / "t.jsonl", tmp_path / "vis"
    code, stdout, stderr = run_cli(
        "--engine-dir", tinypose_engine_dir, "--source", a, "--source", b, "--detector", detector, "--track",
        "--det-every", "5", "--route", "threshold:0.50874", "--out", out, "--vis", vis,
    )  # fmt: skip
    assert code == 0, stderr
    assert read_lines(tmp_path / "t_street.jsonl") == read_lines(tmp_path / "t_street-2.jsonl")
    assert sorted(p.name for p in vis.iterdir()) == ["street-2.mp4", "street.mp4"]
    assert "street: frames 5" in stdout and "street-2: frames 5" in stdout and "frames 10" in stdout
    assert "detector calls 2" in stdout  # one key frame per source


def test_truncated_video_keeps_the_frames_read(
    tinypose_engine_dir: Path, detector: Path, pan_video: Path, tmp_path: Path
) -> None:
    """An AVI cut in half (its header still says 12 frames): the frames before the cut are processed and written,
    and the run says the file ended early."""
    with open_source(pan_video) as src:
        frames = [f.image_bgr for f in src]
    full = write_clip(tmp_path / "clip.avi", frames)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    out, vis = tmp_path / "t.jsonl", tmp_path / "vis"
    code, _, stderr = run_cli(
        "--engine-dir", tinypose_engine_dir, "--source", cut, "--detector", detector, "--track",
        "--out", out, "--vis", vis, "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    n = len(read_lines(out))
    assert 0 < n < 12 and count_frames(vis / "cut.mp4") == n
    assert f"ended after {n} of the 12 frames its header declares" in stderr


@pytest.mark.parametrize("case", ["empty", "truncated-mp4", "empty-second-source"])
def test_unreadable_video_fails_clearly_and_keeps_old_outputs(
    tinypose_engine_dir: Path, street: Path, detector: Path, tmp_path: Path, case: str
) -> None:
    bad = tmp_path / "bad.mp4"
    if case == "truncated-mp4":  # an mp4 whose index (moov, at the end) is cut off
        bad.write_bytes(street.read_bytes()[: street.stat().st_size // 2])
    else:
        bad.write_bytes(b"")
    out = tmp_path / "t.jsonl"
    out.write_text("earlier results\n")
    sources = ["--source", street, "--source", bad] if case == "empty-second-source" else ["--source", bad]
    code, _, stderr = run_cli("--engine-dir", tinypose_engine_dir, *sources, "--detector", detector, "--track", "--out", out)
    assert code == 2
    expected = "cannot be opened by OpenCV" if case == "truncated-mp4" else "empty file (0 bytes)"
    assert stderr.startswith(f"error: video {bad}: {expected}"), stderr
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad.mp4", "t.jsonl"])  # no temp files left


class FailingSource(FrameSource):
    """A real video source whose reads fail after `ok` frames (a camera unplugged, a disk error)."""

    def __init__(self, source: str, ok: int) -> None:
        super().__init__(source)
        self.ok = ok
        self.given = 0

    def __next__(self) -> Frame:
        if self.given == self.ok:
            raise OSError(5, "Input/output error")
        self.given += 1
        return super().__next__()


def test_source_failing_mid_stream_keeps_what_was_written(engines: EngineSet, street: Path, tmp_path: Path) -> None:
    """Of two sources the first fails after 3 frames: its 3 frames are written, the other source runs to its end,
    and the run ends with an error naming the failed source."""
    with Pipeline.from_engine_set(engines, route="all-large") as pipe:
        srcs = [FailingSource(str(street), ok=3), open_source(street)]
        outputs = Outputs(out=str(tmp_path / "t.jsonl"), vis=str(tmp_path / "vis"))
        sinks = [outputs.sinks(s, pipe.keypoint_set, stem=n) for s, n in zip(srcs, ["bad", "good"], strict=True)]
        with pytest.raises(StreamError, match=rf"source {street}: reading failed after 3 frame\(s\) \(.*Input/output") as e:
            run(pipe, srcs, sinks, options=LoopOptions(video=VideoOptions(track=True, det_every=2), progress=False))
    assert [ln["frame"] for ln in read_lines(tmp_path / "t_bad.jsonl")] == [0, 1, 2]
    assert len(read_lines(tmp_path / "t_good.jsonl")) == 5
    assert count_frames(tmp_path / "vis" / "bad.mp4") == 3 and count_frames(tmp_path / "vis" / "good.mp4") == 5
    report = e.value.report
    assert [s.frames for s in report.streams] == [3, 5] and report.streams[0].error and not report.streams[1].error


def test_single_source_run_failing_mid_stream_keeps_what_was_written(
    engines: EngineSet, street: Path, tmp_path: Path
) -> None:
    """The plain (untracked, micro-batched) path too: frames before the failure are written, then a clear error."""
    out = tmp_path / "t.jsonl"
    with Pipeline.from_engine_set(engines, route="all-large") as pipe:
        with pytest.raises(StreamError, match="reading failed after 2 frame") as e:
            src = FailingSource(str(street), ok=2)
            run(pipe, [src], [[JsonLinesSink(out)]], [DetectorBoxes()], LoopOptions(progress=False))
        assert [ln["frame"] for ln in read_lines(out)] == [0, 1]
        assert e.value.report.frames == 2
        with pytest.raises(DynPoseError, match="sink lists"):
            run(pipe, [open_source(street)], [], options=LoopOptions(progress=False))


def test_an_image_folder_takes_the_same_loop_batched_by_boxes(tinypose_engine_dir: Path, coco_dir: Path) -> None:
    """A folder of images is a stream of unrelated frames to the loop: untracked, its frames are planned together
    until a plan holds `max_batch` boxes, and its persons equal a per-image Pipeline call."""
    from dynpose.io.box_sources import FileBoxes
    from dynpose.io.sinks import CocoJsonSink

    dets = FileBoxes.detections(coco_dir / "test_coco_det_AP_H_56.json", coco_dir)
    with Pipeline.from_engine_dir(tinypose_engine_dir, route="box:17734") as pipe:
        coco = CocoJsonSink(None)
        report = run(pipe, [open_source(coco_dir)], [[coco]], [dets], LoopOptions(max_batch=70, progress=False))
        assert report.frames == 4 and pipe.stats.batches == 2  # 118 boxes in plans of >= 70
        single = []
        with open_source(coco_dir) as src:
            for f in src:
                single += [p.to_coco(f.image_id) for p in pipe(f.image_bgr, dets.boxes(f))]
    assert coco.results == single
