"""Frame sources and drawing, on real files written in tmp_path."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from dynpose.errors import DynPoseError
from dynpose.io.sources import open_source
from dynpose.io.vis import VideoWriter, draw_persons, model_color, write_image
from dynpose.keypoints import COCO17


@dataclass
class P:
    box: tuple
    score: float
    keypoints: np.ndarray
    model: str


def test_folder_source_sorted_recursive_and_skips_corrupt(coco_dir, tmp_path, caplog):
    shutil.copy(coco_dir / "000000000785.jpg", tmp_path / "000000000785.jpg")
    (tmp_path / "sub").mkdir()
    shutil.copy(coco_dir / "000000040083.jpg", tmp_path / "sub" / "b_frame.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        src = open_source(str(tmp_path))
        frames = list(src)
    assert src.kind == "folder" and src.total == 4
    assert [f.name for f in frames] == ["000000000785.jpg", "sub/b_frame.jpg"]
    assert [f.index for f in frames] == [0, 1]
    assert [f.image_id for f in frames] == [785, None]
    assert frames[0].image_bgr.shape == (425, 640, 3) and frames[0].image_bgr.dtype == np.uint8
    assert src.skipped == 2
    assert sum("skipping" in r.message for r in caplog.records) == 2


def test_single_image_and_errors(coco_dir, tmp_path):
    frames = list(open_source(coco_dir / "000000196141.jpg"))
    assert len(frames) == 1 and frames[0].image_id == 196141
    with pytest.raises(DynPoseError, match="no such file"):
        open_source(str(tmp_path / "missing.jpg"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DynPoseError, match="no images"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 2048)
    with pytest.raises(DynPoseError, match="video"):
        open_source(str(tmp_path / "clip.mp4"))
    if not Path("/dev/video97").exists():
        with pytest.raises(DynPoseError, match="webcam 97"):
            open_source("97")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    src = open_source(str(tmp_path / "bad.jpg"))
    assert list(src) == [] and src.skipped == 1


def test_video_roundtrip(coco_dir, tmp_path):
    base = cv2.resize(cv2.imread(str(coco_dir / "000000000785.jpg")), (160, 128))
    out = tmp_path / "out" / "clip.mp4"
    with VideoWriter(out, fps=10) as vw:
        for i in range(6):
            vw.write(np.roll(base, 8 * i, axis=1))
        assert not out.exists()  # only the temp file exists until close
    assert out.is_file() and vw.frames == 6
    assert [p.name for p in out.parent.iterdir()] == ["clip.mp4"]
    src = open_source(str(out))
    frames = list(src)
    assert src.kind == "video" and src.fps == pytest.approx(10, abs=0.5)
    assert len(frames) == 6
    assert [f.name for f in frames] == [f"clip_{i:06d}" for i in range(6)]
    assert all(f.image_id is None and f.image_bgr.shape == (128, 160, 3) for f in frames)
    # lossy codec: close to what was written, not identical
    assert np.abs(frames[2].image_bgr.astype(int) - np.roll(base, 16, axis=1)).mean() < 20


def test_video_writer_discards_on_error(tmp_path):
    out = tmp_path / "x.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(out) as vw:
            vw.write(np.zeros((32, 32, 3), np.uint8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    VideoWriter(out).close()  # no frames: no file
    assert list(tmp_path.iterdir()) == []


def test_draw_persons(coco_dir, tmp_path):
    img = cv2.imread(str(coco_dir / "000000000785.jpg"))
    rng = np.random.default_rng(0)
    kp = np.concatenate([rng.uniform([250, 50], [400, 400], (17, 2)), np.full((17, 1), 0.9)], 1)
    bad = kp.copy()
    bad[3] = [np.nan, np.inf, 0.9]
    bad[5, 2] = 0.1
    persons = [
        P((250, 40, 160, 370), 0.93, kp, "small"),
        P((np.nan, 0, 10, 10), 0.5, bad, "large"),
        P((10, 10, -5, 30), 0.2, bad, "hrnet_w32"),
    ]
    out = draw_persons(img, persons, "coco17")
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)
    assert np.array_equal(cv2.imread(str(coco_dir / "000000000785.jpg")), img)  # input untouched
    # the small model's colour appears along its limbs
    assert (np.abs(out.astype(int) - model_color("small")).sum(axis=2) < 30).sum() > 100
    assert model_color("small") != model_color("large")
    assert model_color("hrnet_w32") == model_color("hrnet_w32")
    assert np.array_equal(draw_persons(img, [], COCO17), img)
    with pytest.raises(DynPoseError, match="keypoint"):
        draw_persons(img, [P((0, 0, 5, 5), 1.0, kp[:14], "small")], COCO17)
    write_image(tmp_path / "vis" / "a.jpg", out)
    assert cv2.imread(str(tmp_path / "vis" / "a.jpg")).shape == img.shape


def test_header_sizes_match_the_decoder(coco_dir, shared, tmp_path):
    """Every format this OpenCV encodes (and so decodes) is sized from its header as the decoder sizes it, or is
    one of the few refused as unsizable; the shared fixtures too."""
    import io

    from dynpose.io.imagesize import UNSIZED, read_header

    img = np.random.default_rng(0).integers(0, 255, (36, 52, 3), dtype=np.uint8)
    exts = [
        ".jpg",
        ".png",
        ".bmp",
        ".tif",
        ".webp",
        ".avif",
        ".jp2",
        ".gif",
        ".pbm",
        ".pgm",
        ".ppm",
        ".sr",
        ".pfm",
        ".hdr",
        ".pam",
    ]
    seen = set()
    for ext in exts:
        src = img.astype(np.float32) / 255 if ext in (".pfm", ".hdr") else img
        src = img[..., 0] if ext in (".pbm", ".pgm") else src
        ok, buf = cv2.imencode(ext, src)
        assert ok, ext
        h = read_header(io.BytesIO(buf.tobytes()))
        assert cv2.imdecode(buf, cv2.IMREAD_COLOR).shape[:2] == (36, 52), ext
        if h.format in {n for _, n in UNSIZED}:
            assert h.width is None, ext
        else:
            assert (h.width, h.height) == (52, 36), (ext, h)
        seen.add(h.format)
    assert {"PFM", "Radiance HDR", "PAM"} <= seen and len(seen) == len(exts) - 2  # .pbm/.pgm/.ppm are Pillow's PPM
    for f in [*shared.glob("data/*/*.jpg"), *shared.glob("data/*/*.png")]:
        rows, cols = cv2.imread(str(f)).shape[:2]
        with open(f, "rb") as fp:
            assert (read_header(fp).width, read_header(io.BytesIO(f.read_bytes())).height) == (cols, rows), f
    assert read_header(io.BytesIO(b"GIF89a....")).width is None and read_header(io.BytesIO(b"\xff\xd8\xff")).width is None


def test_oversized_images_are_skipped_before_decoding(coco_dir, tmp_path, caplog):
    from test_bad_inputs import bigtiff_claiming, tiny_gif_claiming, tiny_jpeg_claiming, tiny_png_claiming

    shutil.copy(coco_dir / "000000000785.jpg", tmp_path / "000000000785.jpg")
    (tmp_path / "bomb.jpg").write_bytes(tiny_jpeg_claiming(65000, 65000))  # 629 bytes
    (tmp_path / "blank.png").write_bytes(tiny_png_claiming(20000, 20000))
    (tmp_path / "wide.gif").write_bytes(tiny_gif_claiming(12000, 12000))  # 144 MP in 29 bytes
    (tmp_path / "gif.png").write_bytes(tiny_gif_claiming(12000, 12000))  # OpenCV decodes by content, so do we
    (tmp_path / "big.tiff").write_bytes(bigtiff_claiming(20000, 20000))
    with caplog.at_level(logging.WARNING):
        src = open_source(str(tmp_path))
        frames = list(src)
    assert [f.name for f in frames] == ["000000000785.jpg"] and src.skipped == 5
    warned = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warned) == 5 and all("over the limit of 50,000,000" in m for m in warned)
    assert any("bomb.jpg: 65000 x 65000" in m for m in warned) and any("blank.png: 20000 x 20000" in m for m in warned)
    assert any("wide.gif: 12000 x 12000" in m for m in warned) and any("gif.png: 12000 x 12000" in m for m in warned)
    # the limit is a parameter: 640 x 425 = 272,000 pixels is over 100,000
    src = open_source(str(tmp_path / "000000000785.jpg"), max_pixels=100_000)
    assert list(src) == [] and src.skipped == 1
    assert len(list(open_source(str(tmp_path / "000000000785.jpg"), max_pixels=None))) == 1
    # without a limit the 65000 x 65000 claim reaches OpenCV, whose error is a skip too, not a cv2.error
    for bomb in ("wide.gif", "gif.png", "big.tiff"):  # these OpenCV would decode into GBs: not tried here
        (tmp_path / bomb).unlink()
    src = open_source(str(tmp_path), max_pixels=None)
    assert [f.name for f in src] == ["000000000785.jpg"] and src.skipped == 2


def test_read_image_returns_none_and_says_why(tmp_path, caplog):
    from test_bad_inputs import tiny_jpeg_claiming

    from dynpose.io.sources import read_image

    (tmp_path / "bomb.jpg").write_bytes(tiny_jpeg_claiming(65000, 65000))
    with caplog.at_level(logging.WARNING):
        assert read_image(tmp_path / "bomb.jpg") is None
    assert "over the limit" in caplog.text
