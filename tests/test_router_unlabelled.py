"""Label-free router training (issue 13): augmentation, the teacher's targets, the teacher pass on real images and
video with the TinyPose pair, the pooled router variant, cost-aware calibration and the held-out report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dynpose.cli.train_router import main
from dynpose.engines.manifest import Manifest
from dynpose.keypoints import COCO17
from dynpose.router.augment import AugmentConfig, jitter_boxes, photometric, sample_params, unflip_keypoints
from dynpose.router.targets import teacher_targets


@pytest.fixture()
def engine_dir(tinypose_engine_dir: Path, tmp_path: Path, shared: Path) -> Path:
    """A private copy of the TinyPose engine dir with the PicoDet detector registered (training rewrites it)."""
    from dynpose.export.api import register_detector

    eng = Path(shutil.copytree(tinypose_engine_dir, tmp_path / "engines"))
    register_detector(shared / "models" / "picodet_s_320_pedestrian.onnx", eng, progress=False)
    return eng


# -- augmentation and targets on arrays --------------------------------------------------------------------------------
def test_plain_copy_is_the_runtime_crop_and_variants_differ() -> None:
    cfg = AugmentConfig(copies=4, seed=3)
    p = sample_params(5, cfg, np.random.default_rng(0))
    assert len(p) == 20 and p.person.tolist()[:4] == [0, 0, 0, 0] and p.copy.tolist()[:4] == [0, 1, 2, 3]
    plain = p.copy == 0
    assert (
        (p.scale[plain] == 1).all() and not p.flip[plain].any() and (p.occ[plain] == 0).all() and (p.blur[plain] == 0).all()
    )
    boxes = np.tile([[10.0, 20.0, 40.0, 80.0]], (20, 1))
    jb = jitter_boxes(boxes, p)
    np.testing.assert_allclose(jb[plain], boxes[plain])
    assert not np.allclose(jb[~plain], boxes[~plain])
    crops = np.random.default_rng(1).integers(0, 255, (20, 32, 24, 3), dtype=np.uint8)
    out = photometric(crops, p)
    np.testing.assert_array_equal(out[plain], crops[plain])
    # the same variant at two resolutions gets the same change (crop-relative units): compare at the coarse size
    import cv2

    big = np.stack([cv2.resize(c, (48, 64), interpolation=cv2.INTER_NEAREST) for c in crops])
    out_big = photometric(big, p)
    small_again = np.stack([cv2.resize(c, (24, 32), interpolation=cv2.INTER_AREA) for c in out_big])
    assert np.abs(small_again.astype(int) - out.astype(int)).mean() < 12
    with pytest.raises(Exception, match="copies"):
        AugmentConfig(copies=0).validate()


def test_unflip_maps_mirrored_keypoints_back() -> None:
    import cv2
    from conftest import tinypose_card

    from dynpose.runtime.preprocess import box_to_center_scale, warp_matrix

    card = tinypose_card(192, 256)
    c, s = box_to_center_scale(np.array([[100.0, 50.0, 80.0, 200.0]]), card.aspect_ratio, card.padding)
    m = warp_matrix(c[0], s[0], card)
    inv = cv2.invertAffineTransform(m)
    truth = np.zeros((1, 17, 3), np.float32)
    truth[0, :, 0] = np.linspace(110, 170, 17)
    truth[0, :, 1] = np.linspace(60, 240, 17)
    truth[0, :, 2] = np.arange(17) / 17
    # what a model sees in the mirrored crop: joint j of the person at column W-1-u, labelled as its mirror joint
    u = truth[0, :, 0] * m[0, 0] + m[0, 2]
    seen = truth.copy()
    seen[0, :, 0] = (card.input_width - 1 - u) * inv[0, 0] + inv[0, 2]
    seen = seen[:, COCO17.flip_index()]
    back = unflip_keypoints(seen, np.array([True]), c, s, card)
    np.testing.assert_allclose(back, truth, atol=1e-3)
    np.testing.assert_array_equal(unflip_keypoints(seen, np.array([False]), c, s, card), seen)


def test_teacher_targets() -> None:
    rng = np.random.default_rng(0)
    large = np.zeros((4, 17, 3))
    large[..., :2] = rng.uniform(0, 100, (4, 17, 2))
    large[..., 2] = 0.9
    small = large.copy()
    small[1, :, :2] += 30.0  # far off: the large model would change this person
    small[2, :, :2] += 30.0
    large[3, :, 2] = 0.1  # the teacher is sure of no joint: nothing to learn from it
    small[3, :, :2] += 30.0
    boxes = np.array([[0, 0, 100, 100, 1.0], [0, 0, 100, 100, 1.0], [0, 0, 100, 100, 0.2], [0, 0, 100, 100, 1.0]])
    t, st = teacher_targets(small, large, boxes, np.full((4, 2), 100.0), COCO17.sigmas)
    assert t.t1[0] == pytest.approx(0.0, abs=1e-6) and t.t2[0] == pytest.approx(0.0, abs=1e-6)
    assert st.gain[1] == pytest.approx(0.9 * (1 - st.oks_sl[1]), rel=1e-5) and st.gain[1] > 0.5
    assert st.gain[2] == pytest.approx(0.2 * st.gain[1], rel=1e-5)  # a doubtful detection counts for less
    med = (st.gain[1] + st.gain[2]) / 2  # squashed by the median positive gain: order kept, median -> 0.5
    assert t.t1[1] == pytest.approx(st.gain[1] / (st.gain[1] + med), rel=1e-5) and t.t1[1] > t.t1[2] > 0
    assert np.isnan(st.oks_sl[3]) and t.t1[3] == 0 and t.keep.all()
    assert t.t0[1] == pytest.approx(0.5) and t.t0[0] == pytest.approx(0.0, abs=1e-6)  # equal errors: the median


def test_pooled_router_is_the_full_router_on_pooled_crops() -> None:
    from dynpose.router.variant import make_router

    torch.manual_seed(0)
    full = make_router("full")
    pooled = make_router("pooled")
    pooled.load_state_dict(full.state_dict())  # the same tensors: every checkpoint fits both
    assert pooled.card.input_size == (96, 128) and pooled.card.name == "router_pooled"
    x = torch.randn(3, 3, 256, 192)
    with torch.no_grad():
        a = full.eval()(x)
        b = pooled.eval()(torch.nn.functional.avg_pool2d(x, 2))  # pooling and the channel mean commute
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- the teacher pass on real images and video ---------------------------------------------------------------------------
def test_teacher_pass_real_images_and_video(engine_dir: Path, coco_dir: Path, shared: Path, tmp_path: Path) -> None:
    from dynpose.router.unlabelled import UnlabelledSpec, teacher_set
    from dynpose.router.variant import make_router

    card = make_router("pooled").card
    flip_only = AugmentConfig(copies=2, scale=0.0, shift=0.0, flip=1.0, blur=0.0, brightness=0.0, occlusion=0.0)
    spec = UnlabelledSpec(
        sources=(coco_dir, shared / "data" / "video" / "street.mp4"),
        detections=(coco_dir / "test_coco_det_AP_H_56.json",),
        det_score=0.5,
        max_frames=1,
        augment=flip_only,
    )
    ts = teacher_set(engine_dir, spec, card, cache_dir=tmp_path / "c", progress=False)
    dets = json.loads((coco_dir / "test_coco_det_AP_H_56.json").read_text())
    from_file = sum(1 for d in dets if d["score"] >= 0.5 and d["bbox"][2] >= 16 and d["bbox"][3] >= 16)
    assert ts.num_persons > from_file  # the COCO images' boxes from the file, the video frame's from the detector
    assert len(ts) == 2 * ts.num_persons and ts.crops.shape[1:] == (128, 96, 3) and ts.crops.dtype == np.uint8
    assert set(np.unique(ts.frame)) == set(range(5))  # 4 images + 1 video frame
    # a mirrored crop, mapped back, gives the plain crop's keypoints (up to the models' flip asymmetry)
    a, b = ts.copy == 0, ts.copy == 1
    assert ts.flipped[b].all() and not ts.flipped[a].any()
    d = np.abs(ts.kpts_large[a, :, :2] - ts.kpts_large[b, :, :2]) / ts.crop_wh[a, None, :]
    assert np.median(d) < 0.02
    # pooled router crops are the small model's crops (same card geometry): plain ones match the runtime's crop
    (f,) = (tmp_path / "c").glob("teacher-*.npz")
    stamp = f.stat().st_mtime_ns
    again = teacher_set(engine_dir, spec, card, cache_dir=tmp_path / "c", progress=False)
    assert f.stat().st_mtime_ns == stamp and np.array_equal(again.kpts_small, ts.kpts_small)
    spec3 = UnlabelledSpec(sources=spec.sources[:1], detections=spec.detections, det_score=0.5, augment=flip_only)
    teacher_set(engine_dir, spec3, card, cache_dir=tmp_path / "c", progress=False)
    assert len(list((tmp_path / "c").glob("teacher-*.npz"))) == 2  # other sources: another key


def test_cli_unlabelled_end_to_end_pooled(engine_dir: Path, coco_dir: Path, shared: Path, tmp_path: Path) -> None:
    args = ["--engine-dir", str(engine_dir), "--unlabelled", str(shared / "data" / "video" / "street.mp4")]
    args += ["--max-frames", "2", "--copies", "3", "--epochs", "1", "--batch", "8", "--router-input", "pooled"]
    args += ["--eval-ann", str(coco_dir / "test_coco.json"), "--eval-images", str(coco_dir), "--eval-fractions", "0.5"]
    args += ["--out", str(tmp_path / "r.pth"), "--quiet", "--threads", "1"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert "persons)" in r.stdout and "Spearman(router score[1], true OKS gain)" in r.stdout, r.stdout
    assert "50% large (6 crops): router AP" in r.stdout and "random" in r.stdout and "oracle" in r.stdout
    m = Manifest.load(engine_dir)
    routers = [e for e in m.entries if e.role == "router"]
    assert [(e.model, e.format) for e in routers] == [("router_pooled", "onnx")]  # the stale router.pt is gone
    assert routers[0].card.input_size == (96, 128) and m.route == "fraction:0.5"
    assert not [p for p in engine_dir.iterdir() if p.name.startswith("router.") and p.suffix == ".pt"]
    import cv2

    from dynpose.runtime.pipeline import Pipeline

    with Pipeline.from_engine_dir(engine_dir, route="fraction:0.5") as pipe:
        persons = pipe(cv2.imread(str(coco_dir / "000000000785.jpg")), boxes=np.array([[280.0, 44, 218, 346]]))
    assert len(persons) == 1 and np.isfinite(persons[0].router_score)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--unlabelled", "{tmp}/nothing"], "no such file"),
        (["--unlabelled", "{coco}", "--ann", "{coco}/test_coco.json", "--images", "{coco}"], "not both"),
        (["--unlabelled", "{coco}", "--copies", "0"], "--copies"),
        (["--unlabelled", "{coco}", "--eval-ann", "{coco}/test_coco.json"], "go together"),
        (["--unlabelled", "{coco}", "--precision", "int8"], "int8"),
        (["--calibrate", "--target-ap-drop", "0.01"], "--ann"),
    ],
)
def test_cli_unlabelled_errors(engine_dir: Path, coco_dir: Path, tmp_path: Path, extra: list[str], needle: str) -> None:
    args = ["--engine-dir", str(engine_dir), "--quiet", "--out", str(tmp_path / "r.pth")]
    args += [a.replace("{tmp}", str(tmp_path)).replace("{coco}", str(coco_dir)) for a in extra]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


# -- cost-aware calibration and the held-out report ------------------------------------------------------------------------
def test_calibrate_cheapest_policy_by_measured_costs(engine_dir: Path, coco_dir: Path) -> None:
    from dynpose.router.calibrate import calibrate

    ann, dets = coco_dir / "test_coco.json", coco_dir / "test_coco_det_AP_H_56.json"
    res = calibrate(engine_dir, ann, coco_dir, target_ap_drop=0.02, detections=dets, progress=False)
    # the Pipeline's large-only AP on the sample's detections (README: dynpose-run large-only AP 0.794)
    assert res.ap_large == pytest.approx(0.7935, abs=0.003) and res.ap >= res.ap_large - 0.02
    assert res.boxes == "detection boxes" and res.num_crops == 118
    # every family has a policy within the AP bound; the cascades and box-below join the router and box families
    assert set(res.per_family) == {"threshold", "box", "box-below", "box-threshold", "cascade", "cascade-visible"}
    cheapest = min(w["cost_ms"] for w in res.per_family.values())
    # agreement with the large model beside AP: 1 for the persons it answers, the small model's OKS to it elsewhere
    assert res.agreement is not None and res.agreement_above is not None and 0 < res.agreement <= 1
    assert all(0 < w["agreement"] <= 1 for w in res.per_family.values())
    assert res.cost_ms is not None and res.cost_ms <= cheapest + 1e-9 and res.speedup is not None
    m = Manifest.load(engine_dir)
    assert m.route == res.policy and m.notes["router_calibration"]["detections"] == str(dets)
    assert m.costs("ort", "cpu") is not None  # measured now (none were stored) and kept for the runtime
    # with a loose target the cheapest of all is the small model alone (no router either)
    loose = calibrate(engine_dir, ann, coco_dir, target_ap_drop=1.0, progress=False)
    assert loose.policy == "all-small" and loose.fraction == 0.0
    assert loose.agreement is not None and loose.agreement < 1.0  # the small model alone differs from the large one


def test_held_out_report(engine_dir: Path, coco_dir: Path) -> None:
    from dynpose.router.evaluate import evaluate_router

    dets = coco_dir / "test_coco_det_AP_H_56.json"
    ev = evaluate_router(
        engine_dir, coco_dir / "test_coco.json", coco_dir, fractions=(0.5,), progress=False, detections=dets
    )
    assert ev.num_crops == 12 and ev.ap_large > ev.ap_small
    (row,) = ev.rows
    assert row.k == 6 and row.ap_random_lo <= row.ap_random <= row.ap_random_hi
    assert row.ap_oracle >= row.ap_random  # knowing the true gain beats chance
    assert -1 <= ev.spearman <= 1
    # the label-free target tracks the true OKS gain of the large model on these labelled persons
    assert ev.spearman_teacher > 0.5
    assert any("Spearman" in line for line in ev.lines())
    # the run-time view: every detection box, a box on nobody gains nothing
    assert ev.det_boxes == 118 and 12 <= ev.det_matched < 118 and -1 <= ev.det_spearman <= 1
    r = CliRunner().invoke(
        main,
        ["--evaluate", "--engine-dir", str(engine_dir), "--eval-ann", str(coco_dir / "test_coco.json")]
        + ["--eval-images", str(coco_dir), "--eval-dets", str(dets), "--eval-fractions", "0.25", "--quiet"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0 and "on 118 detection boxes" in r.stdout and "25% large (3 crops)" in r.stdout, r.stdout


def test_int8_agreement_of_a_router_with_itself(engine_dir: Path) -> None:
    from dynpose.router.variant import int8_agreement

    x = np.random.default_rng(0).standard_normal((20, 3, 256, 192)).astype(np.float32)
    router = engine_dir / Manifest.load(engine_dir).require("router", "onnx").file
    a = int8_agreement(router, router, x)
    assert a["agreement"] == 1.0 and a["max_abs_diff"] == 0.0
