"""Pipeline from an engine dir (real TinyPose models, real COCO images and detections)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from dynpose import PersonPose, Pipeline
from dynpose.data import gt_boxes, image_id_map, load_coco, load_detections
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.fileio import write_json_atomic
from dynpose.runtime.pipeline import clean_boxes


@pytest.fixture(scope="module")
def coco(coco_dir: Path):
    ann = load_coco(coco_dir / "test_coco.json")
    ids = image_id_map(coco_dir, ann)
    images = {iid: cv2.imread(str(p)) for iid, p in ids.items()}
    gt: dict[int, list[np.ndarray]] = {}
    for iid, box, _ in gt_boxes(ann):
        gt.setdefault(iid, []).append(box)
    dets = load_detections(coco_dir / "test_coco_det_AP_H_56.json")
    return images, {k: np.asarray(v) for k, v in gt.items()}, dets


@pytest.fixture(scope="module")
def pipe(tinypose_engine_dir: Path):
    with Pipeline.from_engine_dir(tinypose_engine_dir, route="fraction:0.5") as p:
        yield p


def coco_ap(results: list[dict], gt_path: Path) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(results), "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_coco_detections_to_results_json(tinypose_engine_dir: Path, coco, coco_dir: Path, tmp_path: Path) -> None:
    images, _, dets = coco
    with Pipeline.from_engine_dir(tinypose_engine_dir, route="all-large") as p:
        results = []
        for iid, img in images.items():
            persons = p(img, dets[iid])
            assert all(isinstance(x, PersonPose) and x.model == "large" for x in persons)
            results.extend(x.to_coco(iid) for x in persons)
        st = p.stats
    assert st.frames == 4 and st.crops == {"small": 0, "large": sum(len(d) for d in dets.values())}
    # OKS-NMS (detections carry scores) removed duplicates
    assert st.persons == len(results) < st.crops["large"]
    out = tmp_path / "results.json"
    write_json_atomic(out, results)
    back = json.loads(out.read_text())
    assert len(back[0]["keypoints"]) == 51 and back[0]["category_id"] == 1
    ap = coco_ap(back, coco_dir / "test_coco.json")
    print(f"TinyPose 256x192 large-only AP on the 4-image COCO sample: {ap:.3f}")
    assert ap > 0.6  # README: mean OKS 0.89 with GT boxes


def test_eight_threads_equal_serial(pipe: Pipeline, coco) -> None:
    images, gt, _ = coco
    ids = sorted(images) * 2
    serial = [pipe(images[i], gt[i]) for i in ids]
    got: list[list[PersonPose] | None] = [None] * len(ids)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(ids))

    def work(k: int) -> None:
        try:
            barrier.wait()
            got[k] = pipe(images[ids[k]], gt[ids[k]])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for a, b in zip(serial, got, strict=True):
        assert b is not None and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert x.model == y.model
            np.testing.assert_allclose(x.keypoints, y.keypoints, atol=1e-4)
            np.testing.assert_allclose(x.box, y.box)


def test_gt_boxes_skip_nms_and_detection_scores_enable_it(pipe: Pipeline, coco) -> None:
    images, gt, _ = coco
    iid = 785
    box = gt[iid][:1]
    twice = np.concatenate([box, box])
    assert len(pipe(images[iid], twice)) == 2  # GT boxes (no scores): every box is a person
    with_scores = np.concatenate([twice, [[0.9], [0.8]]], axis=1)
    persons = pipe(images[iid], with_scores)
    assert len(persons) == 1 and persons[0].score > 0  # detections: the duplicate is suppressed
    assert len(pipe(images[iid], with_scores, nms=False)) == 2


def test_clean_boxes_drops_and_counts() -> None:
    boxes = np.array(
        [
            [10, 10, 50, 80, 0.9],  # fine
            [-20, -20, 40, 40, 0.8],  # partly outside: kept
            [10, 10, 0, 50, 0.9],  # zero width
            [10, 10, 30, -5, 0.9],  # negative height
            [500, 10, 30, 30, 0.9],  # right of a 200 px wide image
            [10, -100, 30, 50, 0.9],  # above it
            [10, 10, 30, 30, np.nan],  # NaN score
            [np.nan, 10, 30, 30, 0.9],  # NaN coordinate
        ]
    )
    kept, dropped = clean_boxes(boxes, (100, 200, 3))
    assert dropped == 6 and kept[:, 4].tolist() == [0.9, 0.8]
    kept, dropped = clean_boxes(boxes[:2, :4], (100, 200, 3))
    assert dropped == 0 and kept[:, 4].tolist() == [1.0, 1.0]
    with pytest.raises(DynPoseError, match="boxes must be"):
        clean_boxes(np.zeros((2, 3)), (100, 200, 3))


def test_dropped_boxes_counted_in_stats(tinypose_engine_dir: Path, coco) -> None:
    images, gt, _ = coco
    img = images[785]
    boxes = np.concatenate([gt[785][:1], [[0, 0, 0, 10], [5000, 5000, 10, 10]]])
    with Pipeline.from_engine_dir(tinypose_engine_dir, route="all-small") as p:
        persons = p(img, boxes)
        assert len(persons) == 1 and persons[0].model == "small" and np.isnan(persons[0].router_score)
        assert p.stats.dropped_boxes == 2
        assert p(img, np.zeros((0, 4))) == []


def test_run_many_micro_batches_equal_per_frame(tinypose_engine_dir: Path, coco) -> None:
    images, gt, _ = coco
    ids = sorted(images)
    frames = [(iid, images[iid], gt[iid]) for iid in ids]
    # box:AREA routes per crop, so batching frames together must not change any result
    with Pipeline.from_engine_dir(tinypose_engine_dir, route="box:20000") as p:
        single = {iid: p(img, b) for iid, img, b in frames}
        n0 = p.stats.dispatches
        batched = dict(p.run_many(frames, max_batch=1000))
        assert p.stats.dispatches == n0 + 1  # all four frames in one dispatch
        per_frame = dict(p.run_many(frames, max_batch=1000, max_latency_ms=0))
        assert p.stats.dispatches == n0 + 1 + len(frames)
        by_crops = list(p.run_many(frames, max_batch=10))
    assert [t for t, _ in by_crops] == ids  # input order kept
    models = {x.model for persons in single.values() for x in persons}
    assert models == {"small", "large"}
    for res in (batched, per_frame, dict(by_crops)):
        for iid in ids:
            assert [x.model for x in res[iid]] == [x.model for x in single[iid]]
            for x, y in zip(res[iid], single[iid], strict=True):
                np.testing.assert_allclose(x.keypoints, y.keypoints, atol=1e-3)


def test_detector_pipeline(tinypose_engine_dir: Path, shared: Path, coco) -> None:
    images, _, _ = coco
    det = shared / "models" / "picodet_s_320_pedestrian.onnx"
    with Pipeline.from_engine_dir(tinypose_engine_dir, route="all-large", detector=det) as p:
        persons = p(images[196141])
    assert 2 <= len(persons) <= 10
    assert all(p.box[2] > 0 and p.keypoints.shape == (17, 3) for p in persons)


def test_errors(tinypose_engine_dir: Path, tmp_path: Path, coco) -> None:
    images, gt, _ = coco
    with Pipeline.from_engine_dir(tinypose_engine_dir, route="all-large") as p:
        with pytest.raises(DynPoseError, match="no detector"):
            p(images[785])
        with pytest.raises(DynPoseError, match="uint8"):
            p(images[785].astype(np.float32), gt[785])
        with pytest.raises(DynPoseError, match="numpy array"):
            p("image.jpg", gt[785])  # type: ignore[arg-type]
    with pytest.raises(DynPoseError, match="routing policy"):
        Pipeline.from_engine_dir(tinypose_engine_dir, route="median")
    with pytest.raises(DynPoseError, match="unknown backend"):
        Pipeline.from_engine_dir(tinypose_engine_dir, backend="openvino")
    # registered ONNX pose models have no torch state_dict: asking the torch backend for them is an error, not a
    # silent switch to ONNX Runtime
    with pytest.raises(DynPoseError, match="no torch 'small' entry"):
        Pipeline.from_engine_dir(tinypose_engine_dir, backend="torch")
    # tampered engine dir: the manifest's sha256 no longer matches
    bad = tmp_path / "engines"
    shutil.copytree(tinypose_engine_dir, bad)
    small = bad / Manifest.load(bad).require("small").file
    data = bytearray(small.read_bytes())
    data[-1] ^= 0xFF
    small.write_bytes(bytes(data))
    with pytest.raises(DynPoseError, match="altered"):
        Pipeline.from_engine_dir(bad)
    with pytest.raises(DynPoseError, match="not a directory"):
        Pipeline.from_engine_dir(tmp_path / "nope")
    closed = Pipeline.from_engine_dir(tinypose_engine_dir, route="all-large")
    closed.close()
    with pytest.raises(DynPoseError, match="closed"):
        closed(images[785], gt[785])
