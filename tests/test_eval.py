"""dynpose.eval on the real samples in ../shared: numbers must be pycocotools' own, bad input one clear error."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from eval_fixtures import closed_form_results, humanart_doc, ochuman_doc, write
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dynpose.cli.eval import main as eval_main
from dynpose.data import load_coco
from dynpose.errors import DynPoseError
from dynpose.eval.coco import evaluate_results
from dynpose.eval.mpii import head_sizes, load_mpii, pckh


@pytest.fixture(scope="module")
def coco_gt(shared: Path) -> Path:
    return shared / "data" / "coco" / "test_coco.json"


@pytest.fixture(scope="module")
def crowd_gt(shared: Path) -> Path:
    return shared / "data" / "crowdpose" / "test_crowdpose.json"


@pytest.fixture(scope="module")
def mpii_gt(shared: Path) -> Path:
    return shared / "data" / "mpii" / "test_mpii.json"


def gt_as_results(gt: Path) -> list[dict]:
    """Every scorable GT person as a result with score 1 (persons without keypoints are ignored by COCOeval)."""
    d = json.loads(gt.read_text())
    return [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": list(a["keypoints"]), "score": 1.0}
        for a in d["annotations"]
        if a["num_keypoints"] > 0 and not a.get("iscrowd", 0)
    ]


def perturbed(results: list[dict], seed: int = 0, px: float = 6.0) -> list[dict]:
    """Gaussian keypoint noise, varied scores and one false positive per image: AP well below 1, above 0."""
    rng = np.random.default_rng(seed)
    out = []
    for r in results:
        kp = np.asarray(r["keypoints"], dtype=np.float64).reshape(-1, 3)
        kp[:, :2] += rng.normal(0, px, size=(len(kp), 2))
        kp[:, 2] = 1.0
        out.append({**r, "keypoints": kp.ravel().tolist(), "score": float(rng.uniform(0.3, 1.0))})
    for iid in sorted({r["image_id"] for r in results}):
        src = next(r for r in out if r["image_id"] == iid)
        kp = np.asarray(src["keypoints"]).reshape(-1, 3)
        kp[:, :2] += 80.0
        out.append({**src, "keypoints": kp.ravel().tolist(), "score": 0.95})
    return out


def direct_pycocotools(gt: Path, results: list[dict], crowdpose: bool = False) -> tuple[np.ndarray, COCOeval]:
    """pycocotools run by hand, the way its README does it (CrowdPose: crowdposetools' settings, see coco.py)."""
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO(str(gt))
        if crowdpose:
            for a in cg.dataset["annotations"]:
                a["area"] = a["bbox"][2] * a["bbox"][3] * 0.53
        cd = cg.loadRes(copy.deepcopy(results))
        ev = COCOeval(cg, cd, "keypoints")
        if crowdpose:
            ev.params.kpt_oks_sigmas = (
                np.array([0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89, 0.79, 0.79]) / 10.0
            )
            ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats), ev


def test_coco_gt_as_results_is_perfect(coco_gt: Path) -> None:
    r = evaluate_results(gt_as_results(coco_gt), coco_gt)
    assert r["kind"] == "coco"
    assert r["names"] == ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
    assert r["stats"] == [1.0] * 10
    assert r["AP"] == 1.0 and "Average Precision" in r["summary"]


def test_coco_perturbed_equals_pycocotools(coco_gt: Path, tmp_path: Path) -> None:
    res = perturbed(gt_as_results(coco_gt))
    want, _ = direct_pycocotools(coco_gt, res)
    f = tmp_path / "res.json"
    f.write_text(json.dumps(res))
    got = evaluate_results(f, coco_gt)
    assert 0.05 < got["AP"] < 0.95
    assert got["stats"] == want.tolist()  # exactly, not approximately
    assert got["num_results"] == len(res)


def test_coco_eval_is_quiet_unless_verbose(coco_gt: Path, capsys: pytest.CaptureFixture) -> None:
    evaluate_results(gt_as_results(coco_gt), coco_gt)
    assert capsys.readouterr().out == ""
    evaluate_results(gt_as_results(coco_gt), coco_gt, verbose=True)
    assert "Accumulating evaluation results" in capsys.readouterr().out


def test_crowdpose_gt_as_results_and_direct(crowd_gt: Path) -> None:
    r = evaluate_results(gt_as_results(crowd_gt), crowd_gt)
    assert r["kind"] == "crowdpose"
    assert r["names"] == ["AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP(easy)", "AP(medium)", "AP(hard)"]
    # both sample images have crowdIndex 0.33 / 0.39: all medium, no easy or hard images (-1, as crowdposetools)
    assert r["stats"] == [1.0] * 6 + [-1.0, 1.0, -1.0]

    res = perturbed(gt_as_results(crowd_gt), seed=1)
    want, ev = direct_pycocotools(crowd_gt, res, crowdpose=True)
    got = evaluate_results(res, crowd_gt)
    assert 0.05 < got["AP"] < 0.95
    assert got["stats"][:6] == [want[0], want[1], want[2], want[5], want[6], want[7]]
    # crowdposetools' type figure: mean over the whole precision array of the subset, rounded to 4 places
    assert got["AP(medium)"] == round(float(np.mean(ev.eval["precision"][:, :, :, 0, :])), 4)


def test_crowdpose_easy_hard_split(crowd_gt: Path, tmp_path: Path) -> None:
    d = json.loads(crowd_gt.read_text())
    d["images"][0]["crowdIndex"], d["images"][1]["crowdIndex"] = 0.05, 0.9
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(d))
    res = perturbed(gt_as_results(gt), seed=2)
    r = evaluate_results(res, gt)
    assert r["AP(medium)"] == -1.0
    for name, img in (("AP(easy)", d["images"][0]["id"]), ("AP(hard)", d["images"][1]["id"])):
        sub = [x for x in res if x["image_id"] == img]
        with contextlib.redirect_stdout(io.StringIO()):
            _, ev = direct_pycocotools(gt, res, crowdpose=True)
            ev.params.imgIds = [img]
            ev.evaluate()
            ev.accumulate()
        assert sub and r[name] == round(float(np.mean(ev.eval["precision"][:, :, :, 0, :])), 4)


def test_exlpose_auto_kind_and_id_zero_warning(shared: Path, caplog: pytest.LogCaptureFixture) -> None:
    gt = shared / "data" / "exlpose" / "test_exlpose.json"
    r = evaluate_results(gt_as_results(gt), gt)
    assert r["kind"] == "crowdpose" and "id 0" in caplog.text


def test_empty_results_are_handled(coco_gt: Path, crowd_gt: Path, caplog: pytest.LogCaptureFixture) -> None:
    r = evaluate_results([], coco_gt)
    assert r["stats"] == [0.0] * 10 and r["num_results"] == 0 and "no results" in caplog.text
    caplog.clear()
    r = evaluate_results([], crowd_gt)
    assert "no results" in caplog.text
    assert r["stats"] == [0.0] * 6 + [-1.0, 0.0, -1.0]


def test_bad_results_are_one_clear_error(coco_gt: Path, crowd_gt: Path, tmp_path: Path) -> None:
    res = gt_as_results(coco_gt)
    bad = [{**r, "image_id": 900000 + i} for i, r in enumerate(res)]
    with pytest.raises(DynPoseError, match=r"12 image id\(s\) not in the ground truth \(900000, 900001, .*\.\.\.\)"):
        evaluate_results(bad + res, coco_gt)
    # COCO-17 results on CrowdPose are mapped to its 14 joints (so these fail on their COCO image ids instead)
    with pytest.raises(DynPoseError, match=r"image id\(s\) not in the ground truth"):
        evaluate_results(res, crowd_gt)
    with pytest.raises(DynPoseError, match=r"30 keypoint values, the ground truth needs 42 \(14 keypoints x 3\)"):
        evaluate_results([{**res[0], "keypoints": [1.0] * 30}], crowd_gt)
    with pytest.raises(DynPoseError, match="kind 'crowdpose' needs 14"):
        evaluate_results(res, coco_gt, kind="crowdpose")
    with pytest.raises(DynPoseError, match="file not found"):
        evaluate_results(tmp_path / "missing.json", coco_gt)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DynPoseError, match="not valid JSON"):
        evaluate_results(tmp_path / "broken.json", coco_gt)
    with pytest.raises(DynPoseError, match="needs image_id, keypoints and score"):
        evaluate_results([{"image_id": 785}], coco_gt)


def test_mpii_pckh(mpii_gt: Path) -> None:
    anns = load_mpii(mpii_gt)
    gt = np.asarray([a["joints"] for a in anns])
    r = pckh(gt, anns)
    assert r["kind"] == "mpii"
    assert r["names"] == ["Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean", "Mean@0.1"]
    assert r["stats"] == [100.0] * 9
    # move every joint by 0.3 head sizes: still right at 0.5, wrong at 0.1
    size = head_sizes(anns)
    off = gt + np.array([0.3, 0.0])[None, None, :] * size[:, None, None]
    r = pckh(off, anns)
    assert r["Mean"] == 100.0 and r["Mean@0.1"] == 0.0
    # one wrist far off in one person: only the Wrist figure and the Mean drop
    far = gt.copy()
    far[0, 15] += 1000.0
    r = pckh(far, anns)
    n_lwri = sum(a["joints_vis"][15] for a in anns)
    assert r["Wrist"] == pytest.approx(0.5 * (100.0 * (n_lwri - 1) / n_lwri + 100.0))
    assert r["Head"] == 100.0 and r["Mean"] < 100.0


def test_mpii_headbox_and_files(mpii_gt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    anns = load_mpii(mpii_gt)
    boxed = [dict(a, headbox=[[0, 0], [30, 40]]) for a in anns]
    assert head_sizes(boxed).tolist() == [0.6 * 50.0] * len(anns)
    gt = np.asarray([a["joints"] for a in anns])
    (tmp_path / "p.json").write_text(json.dumps({"preds": gt.tolist()}))
    np.save(tmp_path / "p.npy", np.concatenate([gt, np.ones((len(gt), 16, 1))], axis=2))
    assert pckh(tmp_path / "p.json", mpii_gt)["Mean"] == 100.0
    assert pckh(tmp_path / "p.npy", mpii_gt)["Mean"] == 100.0
    with pytest.raises(DynPoseError, match="4 persons but the annotations have 5"):
        pckh(gt[:4], anns)
    with pytest.raises(DynPoseError, match="expected \\(N,16,2\\)"):
        pckh(gt[:, :14], anns)
    noneck = [dict(a, joints_vis=[0] * 9 + [1] * 7) if i == 0 else a for i, a in enumerate(anns)]
    r = pckh(gt, noneck)
    assert r["num_scored"] == len(anns) - 1 and "left out" in caplog.text


def test_cli_eval(coco_gt: Path, mpii_gt: Path, tmp_path: Path) -> None:
    res = perturbed(gt_as_results(coco_gt))
    (tmp_path / "res.json").write_text(json.dumps(res))
    out = tmp_path / "out" / "ap.json"
    run = CliRunner().invoke(eval_main, ["--gt", str(coco_gt), "--results", str(tmp_path / "res.json"), "--json", str(out)])
    assert run.exit_code == 0, run.output
    assert "AP50" in run.stdout and "ARl" in run.stdout
    saved = json.loads(out.read_text())
    want, _ = direct_pycocotools(coco_gt, res)
    assert saved["stats"] == want.tolist() and saved["kind"] == "coco"

    bad = [{**r, "image_id": 4242} for r in res]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    run = CliRunner().invoke(eval_main, ["--gt", str(coco_gt), "--results", str(tmp_path / "bad.json")])
    assert run.exit_code == 2
    assert run.stderr.strip().count("\n") == 0 and "4242" in run.stderr

    (tmp_path / "empty.json").write_text("[]")
    run = CliRunner().invoke(eval_main, ["--gt", str(coco_gt), "--results", str(tmp_path / "empty.json")])
    assert run.exit_code == 0 and "warning: " in run.stderr

    np.save(tmp_path / "p.npy", np.asarray([a["joints"] for a in load_mpii(mpii_gt)]))
    run = CliRunner().invoke(eval_main, ["--gt", str(mpii_gt), "--results", str(tmp_path / "p.npy")])
    assert run.exit_code == 0 and "Mean@0.1" in run.stdout and "100.00" in run.stdout

    run = CliRunner().invoke(eval_main, ["--help"])
    assert run.exit_code == 0 and "Examples" in run.output


def test_real_model_results_match_pycocotools(tinypose_engine_dir: Path, coco_gt: Path) -> None:
    """TinyPose 256x192 through the runtime on the sample's GT boxes: a real result file, scored both ways."""
    from dynpose.data import gt_boxes, load_coco, resolve_image
    from dynpose.io.sources import read_image
    from dynpose.runtime.pipeline import Pipeline

    ds = load_coco(coco_gt)
    results = []
    with Pipeline.from_engine_dir(tinypose_engine_dir, route="all-large") as pipe:
        for iid, im in ds.images.items():
            boxes = np.asarray([b for i, b, _ in gt_boxes(ds) if i == iid])
            if len(boxes):
                image = read_image(resolve_image(coco_gt.parent, im.file_name))
                results += [p.to_coco(iid) for p in pipe(image, boxes, nms=False)]
    want, _ = direct_pycocotools(coco_gt, results)
    got = evaluate_results(results, coco_gt)
    assert got["stats"] == want.tolist()
    assert got["AP"] > 0.7  # TinyPose-256 on GT boxes (0.81 measured); a broken crop or decode falls far below


def as_jsonl(results: list[dict], path: Path, names: dict[int, str] | None = None) -> Path:
    """The `.jsonl` `dynpose-run --out` writes (one line per frame) holding these COCO records, plus a frame without
    an image id as a video or a non-COCO file name gives."""
    by_image: dict[int, list[dict]] = {}
    for r in results:
        kp = np.asarray(r["keypoints"], dtype=np.float64).reshape(-1, 3).tolist()
        by_image.setdefault(r["image_id"], []).append({"box": [0, 0, 1, 1], "score": r["score"], "keypoints": kp})
    lines = [
        {"frame": i, "name": (names or {}).get(iid, f"{iid}.jpg"), "image_id": iid, "persons": persons}
        for i, (iid, persons) in enumerate(sorted(by_image.items()))
    ]
    lines.append({"frame": len(lines), "name": "holiday.jpg", "image_id": None, "persons": []})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_dynpose_run_jsonl_scores_as_its_coco_records(
    coco_gt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    res = perturbed(gt_as_results(coco_gt))
    want = evaluate_results(res, coco_gt)
    got = evaluate_results(as_jsonl(res, tmp_path / "run.jsonl"), coco_gt)
    sniffed = evaluate_results(as_jsonl(res, tmp_path / "run_lines.json"), coco_gt)  # lines, whatever the suffix
    assert got["stats"] == want["stats"] == sniffed["stats"] and got["num_results"] == len(res)
    assert "1 frame(s) have no image id (e.g. holiday.jpg)" in caplog.text
    r = CliRunner().invoke(eval_main, ["--gt", str(coco_gt), "--results", str(tmp_path / "run.jsonl")])
    assert r.exit_code == 0 and "COCO keypoint AP/AR" in r.stdout, r.output


def test_real_dynpose_run_jsonl_is_accepted(tinypose_engine_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    """What dynpose-run really writes: its .jsonl and its .json give the same AP (to the .jsonl's rounding)."""
    from dynpose.cli.run import main as run_main

    args = ["--engine-dir", str(tinypose_engine_dir), "--source", str(coco_dir), "--route", "fraction:0.5"]
    args += ["--detections", str(coco_dir / "test_coco_det_AP_H_56.json")]
    for out in ("r.json", "r.jsonl"):
        r = CliRunner().invoke(run_main, [*args, "--out", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    a = evaluate_results(tmp_path / "r.json", coco_gt := coco_dir / "test_coco.json")
    b = evaluate_results(tmp_path / "r.jsonl", coco_gt)
    assert a["num_results"] == b["num_results"] > 0 and 0.2 < a["AP"]
    assert np.allclose(a["stats"], b["stats"], atol=0.01)


def coco17_from(gt: Path, mapping: tuple) -> list[dict]:
    """COCO-17 results placing each GT joint where a COCO-17 model would put it (joints COCO lacks: score 0)."""
    out = []
    for a in json.loads(gt.read_text())["annotations"]:
        k = np.asarray(a["keypoints"], dtype=np.float64).reshape(-1, 3)
        if a.get("iscrowd") or not (k[[j for j, s in enumerate(mapping) if s is not None], 2] > 0).any():
            continue
        c = np.zeros((17, 3))
        for j, src in enumerate(mapping):
            if src is not None:
                c[src] = (k[j, 0], k[j, 1], 1.0)
        out.append({"image_id": a["image_id"], "category_id": 1, "keypoints": c.ravel().tolist(), "score": 1.0})
    return out


def test_coco17_results_on_crowdpose_are_mapped(crowd_gt: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dynpose.keypoints import COCO17_TO_CROWDPOSE14

    r = evaluate_results(coco17_from(crowd_gt, COCO17_TO_CROWDPOSE14), crowd_gt)
    assert r["kind"] == "crowdpose" and r["mapped_from"] == "coco17" and r["joints_scored"] == 12
    assert r["AP"] == 1.0  # the 12 limb joints exactly right; head and neck not held against it
    assert "head and neck have no COCO joint" in caplog.text
    mixed = coco17_from(crowd_gt, COCO17_TO_CROWDPOSE14)[:1] + gt_as_results(crowd_gt)[:1]
    with pytest.raises(DynPoseError, match="mapped to CrowdPose-14 only when every record has 51 values"):
        evaluate_results(mixed, crowd_gt)


def test_coco17_predictions_on_mpii_are_mapped(mpii_gt: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dynpose.keypoints import COCO17_TO_MPII16

    anns = load_mpii(mpii_gt)
    joints = np.asarray([a["joints"] for a in anns], dtype=np.float64)
    coco = np.zeros((len(anns), 17, 3))
    for j, src in enumerate(COCO17_TO_MPII16):
        if src is not None:
            coco[:, src, :2] = joints[:, j]
    r = pckh(coco, anns)
    assert r["Head"] == -1.0 and r["joints_scored"] == 12
    assert all(r[n] == 100.0 for n in ("Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean", "Mean@0.1"))
    assert [v for v in r["per_joint"] if v == -1.0] == [-1.0] * 4
    assert "no prediction for pelvis, thorax, upper_neck, head_top" in caplog.text
    with pytest.raises(DynPoseError, match="cannot be matched to that order"):
        pckh(mpii_gt.with_suffix(".jsonl"), anns)


# -- HumanArt, OCHuman, CrowdPose as xtcocotools (MMPose's CocoMetric) scores them ---------------------------------
# Frozen xtcocotools 1.14.3 figures for eval_fixtures.closed_form_results on each file, made by running the real
# package (its pure-Python COCO / COCOeval; the compiled mask module is not used for keypoints) the way MMPose's
# CocoMetric calls it: COCOeval(gt, dt, 'keypoints', None, use_area=True) for COCO / OCHuman / HumanArt,
# ('keypoints_crowd', CrowdPose sigmas, use_area=False) for CrowdPose, use_area=False for a file without 'area'.
XTCOCOTOOLS = {
    "humanart": [0.4381215622, 0.7722772277, 0.4871287129, 0.397029703, 0.5139376438]
    + [0.6583333333, 1.0, 0.75, 0.44, 0.8142857143],
    "ochuman": [0.4381215622, 0.7722772277, 0.4871287129, 0.397029703, 0.5139376438]
    + [0.6583333333, 1.0, 0.75, 0.44, 0.8142857143],
    "coco_no_area": [0.4349394939, 0.5913091309, 0.501650165, 0.3653465347, 0.5676810648]
    + [0.725, 0.9166666667, 0.8333333333, 0.3666666667, 0.8444444444],
    # AP AP50 AP75 AR AR50 AR75 AP(easy) AP(medium) AP(hard)
    "crowdpose": [0.6301650165, 0.8, 0.6666666667, 0.95, 1.0, 1.0, -1.0, 0.6302, -1.0],
    "crowdpose_split": [0.6301650165, 0.8, 0.6666666667, 0.95, 1.0, 1.0, 0.7, -1.0, 0.6],
}


@pytest.fixture(scope="module")
def coco_doc(coco_gt: Path) -> dict:
    return json.loads(coco_gt.read_text())


def test_humanart_scores_its_17_joints(coco_doc: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    doc = humanart_doc(coco_doc)
    gt = write(doc, tmp_path / "test_humanart.json")
    with caplog.at_level(logging.INFO, logger="dynpose"):
        perfect = evaluate_results(gt_as_results(gt), gt)
    assert perfect["stats"][:3] == [1.0, 1.0, 1.0] and perfect["kind"] == "coco"
    assert perfect["keypoints_per_person"] == 17 and perfect["keypoints_from"] == "annotations"
    assert "the category lists 21 keypoint names, the persons' 'keypoints' hold 17" in caplog.text
    assert "'keypoints_21' not read" in caplog.text
    res = closed_form_results(doc)
    got = evaluate_results(res, gt, kind="coco")  # an explicit kind agrees with the 17 joints
    want, _ = direct_pycocotools(gt, res)
    assert got["stats"] == want.tolist()
    np.testing.assert_allclose(got["stats"], XTCOCOTOOLS["humanart"], atol=1e-9)
    (tmp_path / "r.json").write_text(json.dumps(res))
    run = CliRunner().invoke(eval_main, ["--gt", str(gt), "--results", str(tmp_path / "r.json"), "--kind", "coco"])
    assert run.exit_code == 0 and "scoring 17 keypoints per person" in run.stderr, run.output
    ds = load_coco(gt)  # the runtime's reader takes the same count
    assert len(ds.keypoint_names) == 17 and all(p.keypoints.shape == (17, 3) for p in ds.images[785].persons)


def test_ochuman_and_a_file_without_area(coco_doc: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    doc = ochuman_doc(coco_doc)
    gt = write(doc, tmp_path / "ochuman.json")
    res = closed_form_results(doc)
    got = evaluate_results(res, gt)
    assert got["keypoints_from"] == "category"
    assert got["stats"] == direct_pycocotools(gt, res)[0].tolist()
    np.testing.assert_allclose(got["stats"], XTCOCOTOOLS["ochuman"], atol=1e-9)
    for a in doc["annotations"]:  # pycocotools would raise KeyError; xtcocotools' use_area=False scores it
        del a["area"], a["num_keypoints"]
    bare = write(doc, tmp_path / "no_area.json")
    got = evaluate_results(closed_form_results(doc), bare)
    np.testing.assert_allclose(got["stats"], XTCOCOTOOLS["coco_no_area"], atol=1e-9)
    assert "14 person(s) without 'area'; their OKS scale is bbox w*h*0.53" in caplog.text


def test_crowdpose_matches_xtcocotools(crowd_gt: Path, tmp_path: Path) -> None:
    doc = json.loads(crowd_gt.read_text())
    np.testing.assert_allclose(
        evaluate_results(closed_form_results(doc), crowd_gt)["stats"], XTCOCOTOOLS["crowdpose"], atol=1e-9
    )
    doc["images"][0]["crowdIndex"], doc["images"][1]["crowdIndex"] = 0.05, 0.9
    split = write(doc, tmp_path / "split.json")
    np.testing.assert_allclose(
        evaluate_results(closed_form_results(doc), split)["stats"], XTCOCOTOOLS["crowdpose_split"], atol=1e-9
    )


def test_keypoint_count_rule(coco_doc: dict, tmp_path: Path) -> None:
    from dynpose.data import keypoint_layout

    extended = copy.deepcopy(coco_doc)  # a COCO-17 file whose category names one joint more
    extended["categories"][0]["keypoints"] = [*extended["categories"][0]["keypoints"], "head_top"]
    layout = keypoint_layout(extended, "gt")
    assert (layout.num, layout.source, layout.listed) == (17, "annotations", 18)
    assert evaluate_results(gt_as_results(write(extended, tmp_path / "x.json")), tmp_path / "x.json")["AP"] == 1.0
    renamed = copy.deepcopy(extended)  # longer list, but not beginning with COCO's names: the category's count stands
    renamed["categories"][0]["keypoints"] = [f"k{i}" for i in range(18)]
    assert keypoint_layout(renamed, "gt").num == 18
    with pytest.raises(DynPoseError, match=r"annotation 0: 51 keypoint values, the category's 18 keypoints need 54"):
        evaluate_results([], write(renamed, tmp_path / "y.json"))
    with pytest.raises(
        DynPoseError, match=r"kind 'crowdpose' needs 14 keypoints per person, the file has 17; use --kind coco"
    ):
        evaluate_results([], tmp_path / "x.json", kind="crowdpose")
