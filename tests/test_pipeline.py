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

from dynpose import Person, Pipeline, Role
from dynpose.data import gt_boxes, image_id_map, load_coco, load_detections
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.fileio import write_json_atomic
from dynpose.runtime.boxes import Boxes
from dynpose.runtime.person import Decision


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
            assert all(isinstance(x, Person) and x.model is Role.LARGE for x in persons)
            results.extend(x.to_coco(iid) for x in persons)
        st = p.stats
    n = sum(len(d) for d in dets.values())
    assert st.frames == 4 and st.crops == {Role.ROUTER: 0, Role.SMALL: 0, Role.LARGE: n}
    # OKS-NMS (detections carry scores) removed duplicates
    assert st.persons == len(results) < st.crops[Role.LARGE]
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
    got: list[list[Person] | None] = [None] * len(ids)
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


def test_boxes_drop_and_count_what_cannot_be_cropped() -> None:
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
    kept = Boxes.of(boxes, (100, 200, 3))
    assert kept.dropped == 6 and kept.scores.tolist() == [0.9, 0.8] and kept.rows.tolist() == [0, 1]
    kept = Boxes.of(boxes[:2, :4], (100, 200, 3))
    assert kept.dropped == 0 and kept.scores.tolist() == [1.0, 1.0] and not kept.scored
    with pytest.raises(DynPoseError, match="boxes must be"):
        Boxes.of(np.zeros((2, 3)), (100, 200, 3))


def test_persons_carry_the_row_of_their_box_and_kept_decisions(tinypose_engine_dir: Path, coco) -> None:
    """A caller finds its box by `Person.index` (dropped boxes leave gaps, never a shift), and a kept decision
    skips the router for that box."""
    images, gt, _ = coco
    img, boxes = images[197388], gt[197388]
    given = np.concatenate([[[0, 0, 0, 10]], boxes])  # row 0 is unusable
    with Pipeline.from_engine_dir(tinypose_engine_dir, route="threshold:2") as p:  # nobody large by the router
        keep = [None, Role.LARGE] + [None] * (len(boxes) - 1)
        persons = p.run_batch([img], [given], keep=[keep])[0]
        assert p.stats.crops[Role.ROUTER] == len(boxes) - 1  # the kept box skipped the router
    assert [x.index for x in persons] == list(range(1, len(given)))
    for x in persons:
        np.testing.assert_array_equal(x.box, given[x.index])
    first = persons[0]
    assert first.model is Role.LARGE and first.decision is Decision.KEPT and np.isnan(first.router_score)
    assert all(x.model is Role.SMALL and x.decision is Decision.POLICY for x in persons[1:])


def test_one_manifest_read_and_one_policy_parse_per_pipeline(tinypose_engine_dir: Path) -> None:
    """Following `route` and the manifest through `from_engine_dir`: each is read or parsed once (spies count
    the real functions' calls)."""
    import dynpose.engines.manifest as manifest_mod
    import dynpose.runtime.pipeline as pipeline_mod
    import dynpose.runtime.policy as policy_mod

    calls = {"load": 0, "parse": 0}
    real_load, real_parse = manifest_mod.Manifest.load.__func__, policy_mod.parse_policy  # type: ignore[attr-defined]

    def load(cls, *a, **k):
        calls["load"] += 1
        return real_load(cls, *a, **k)

    def parse(text):
        calls["parse"] += isinstance(text, str)  # a Policy passed through is not parsed again
        return real_parse(text)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(manifest_mod.Manifest, "load", classmethod(load))
        mp.setattr(pipeline_mod, "parse_policy", parse)
        with Pipeline.from_engine_dir(tinypose_engine_dir, route="fraction:0.5") as p:
            assert str(p.policy) == "fraction:0.5"
    finally:
        mp.undo()
    assert calls == {"load": 1, "parse": 1}


def test_dropped_boxes_counted_in_stats(tinypose_engine_dir: Path, coco) -> None:
    images, gt, _ = coco
    img = images[785]
    boxes = np.concatenate([gt[785][:1], [[0, 0, 0, 10], [5000, 5000, 10, 10]]])
    with Pipeline.from_engine_dir(tinypose_engine_dir, route="all-small") as p:
        persons = p(img, boxes)
        assert len(persons) == 1 and persons[0].model is Role.SMALL and np.isnan(persons[0].router_score)
        assert p.stats.dropped_boxes == 2
        assert p(img, np.zeros((0, 4))) == []


def test_batched_frames_equal_per_frame(tinypose_engine_dir: Path, coco) -> None:
    images, gt, _ = coco
    ids = sorted(images)
    # box:AREA routes per crop, so planning frames together must not change any result
    with Pipeline.from_engine_dir(tinypose_engine_dir, route="box:20000") as p:
        single = {iid: p(images[iid], gt[iid]) for iid in ids}
        n0 = p.stats.batches
        together = next(p.run_frames([[p.prepare(images[iid], gt[iid]) for iid in ids]]))
        assert p.stats.batches == n0 + 1  # all four frames in one plan
        pairs = list(p.run_frames([[p.prepare(images[i], gt[i]) for i in ids[k : k + 2]] for k in (0, 2)], depth=2))
        assert p.stats.batches == n0 + 3
    models = {x.model for persons in single.values() for x in persons}
    assert models == {Role.SMALL, Role.LARGE}
    for got in (together, pairs[0] + pairs[1]):
        for iid, persons in zip(ids, got, strict=True):  # input order kept
            assert [x.model for x in persons] == [x.model for x in single[iid]]
            for x, y in zip(persons, single[iid], strict=True):
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
        Pipeline.from_engine_dir(tinypose_engine_dir, backend="tensorflow")
    # registered ONNX pose models have no torch state_dict: asking the torch backend for them is an error, not a
    # silent switch to ONNX Runtime
    with pytest.raises(DynPoseError, match="no torch 'small' entry"):
        Pipeline.from_engine_dir(tinypose_engine_dir, backend="torch")
    # tampered engine dir: the manifest's sha256 no longer matches
    bad = tmp_path / "engines"
    shutil.copytree(tinypose_engine_dir, bad)
    small = bad / Manifest.load(bad).require(Role.SMALL).file
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
