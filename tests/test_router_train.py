"""Router training and routing calibration on the real COCO samples with the TinyPose pair (issue 6)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from dynpose.cli.train_router import main
from dynpose.engines.manifest import Manifest
from dynpose.errors import DynPoseError
from dynpose.router.calibrate import policy_for_fraction, threshold_at
from dynpose.router.targets import (
    DYNPOSE_JOINT_WEIGHTS_COCO17,
    crop_error,
    joint_distances,
    make_targets,
    router_loss,
)


@pytest.fixture()
def engine_dir(tinypose_engine_dir: Path, tmp_path: Path) -> Path:
    """A private copy: training and calibration rewrite the manifest."""
    return Path(shutil.copytree(tinypose_engine_dir, tmp_path / "engines"))


def _cli(*args: str) -> Result:
    """The real CLI, in process (click's runner keeps stdout and stderr apart and returns the exit code)."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# -- targets and losses on arrays ------------------------------------------------------------------------------------
def test_joint_distances_and_crop_error_formula():
    gt = np.zeros((1, 17, 3))
    gt[0, :, 2] = 2
    gt[0, 3:, 2] = 0  # only the first three joints labelled
    pred = np.zeros((1, 17, 2))
    pred[0, 0] = (10.0, 0.0)  # 10 px off in x on a 100 x 200 crop -> 0.1
    pred[0, 1] = (0.0, 20.0)  # 20 px off in y -> 0.1
    d = joint_distances(pred, gt, np.array([[100.0, 200.0]]))
    assert d[0, :3] == pytest.approx([0.1, 0.1, 0.0])
    assert np.isnan(d[0, 3:]).all()
    sig = np.full(17, 0.05)
    e = crop_error(d, sig)
    # 100 * mean_j(w_j d_j / (2 sigma)^2) over the 3 labelled joints, DynPose weights (1 for the face)
    assert e[0] == pytest.approx(100 * (0.1 + 0.1 + 0.0) / 0.01 / 3)
    assert DYNPOSE_JOINT_WEIGHTS_COCO17[9] == 2.0
    assert np.isnan(crop_error(np.full((1, 17), np.nan), sig)[0])


def test_targets_skip_rule_and_values(caplog: pytest.LogCaptureFixture):
    e_s = np.array([10.0, 10.0, 10.0, 10.0, 10.0, 4.0])
    e_l = np.array([5.0, 12.0, 2.0, 9.0, 1.0, 4.0])
    o_s = np.array([0.6, 0.7, 0.5, 0.8, 0.3, 0.9])
    o_l = np.array([0.7, 0.6, 0.7, 0.81, 0.9, 0.9])  # gaps 0.1, 0.1, 0.2, 0.01 (skip), 0.6 (skip), 0 (skip)
    t = make_targets(e_s, e_l, o_s, o_l, min_kept=2)
    assert t.keep.tolist() == [True, True, True, False, False, False]
    assert t.t1[:3] == pytest.approx([0.5, 0.0, 0.8])  # (e_s - e_l) / e_s clipped to [0, 1]
    assert t.t0[0] == pytest.approx(10 / 15)
    assert t.t2 == pytest.approx(np.clip(2 * (1 - o_s), 0, 1))
    assert not t.kept_all
    # too few crops inside the band: all kept, with a warning
    t = make_targets(e_s, e_l, o_s, o_l)  # min_kept 4 > 3 kept
    assert t.keep.all() and t.kept_all and "router targets: only 3 of 6" in caplog.text


def test_router_loss_masks_and_gradients():
    t = make_targets(np.array([10.0, 10.0]), np.array([5.0, 8.0]), np.array([0.6, 0.6]), np.array([0.7, 0.8]))
    tg = torch.from_numpy(t.as_array())
    scores = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], requires_grad=True)
    total, (l0, l1, l2) = router_loss(scores, tg)
    assert l1.item() == pytest.approx(((0.5 - 0.5) ** 2 + (0.5 - 0.2) ** 2) / 2)
    assert l2.item() == pytest.approx(((0.5 - 0.8) ** 2) * 2 / 2)
    total.backward()
    assert scores.grad is not None and torch.all(scores.grad[:, 0] != 0)  # score[0] is trained (DynPose's is not)


def test_threshold_and_fraction():
    s = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    assert threshold_at(s, 2) == pytest.approx(0.6)
    for f, want in ((0.0, 0.0), (0.4, 0.4), (0.6, 0.6), (1.0, 1.0)):
        policy, achieved = policy_for_fraction(s, f)
        assert policy.startswith("threshold:") and achieved == pytest.approx(want)
    with pytest.raises(DynPoseError, match="target-fraction"):
        policy_for_fraction(s, 1.5)


# -- end to end on the real COCO samples --------------------------------------------------------------------------------
def test_train_end_to_end_from_release_checkpoint(engine_dir: Path, coco_dir: Path, tmp_path: Path, shared: Path):
    from dynpose.models.weights import load_weights
    from dynpose.models.zoo import create_model

    # a checkpoint in the DynPose release layout, built from a random router
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = create_model("router", weights="random")
    layout = json.loads((shared / "layouts" / "dynpose_router.json").read_text())["tensors"]
    release = {"backbone." + k: v for k, v in start.state_dict().items()}
    assert {k: list(v.shape) for k, v in release.items()} == layout
    init = tmp_path / "backbone.pth"
    torch.save(release, init)

    out = tmp_path / "trained.pth"
    old_router = Manifest.load(engine_dir).require("router", "onnx").sha256
    r = _cli(
        "--engine-dir",
        str(engine_dir),
        "--ann",
        str(coco_dir / "test_coco.json"),
        "--images",
        str(coco_dir),
        "--epochs",
        "4",
        "--batch",
        "12",
        "--lr",
        "2e-3",
        "--out",
        str(out),
        "--init",
        str(init),
        "--quiet",
    )
    assert r.exit_code == 0, r.stderr
    # the per-epoch loss table: the loss falls
    rows = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("│")]
    losses = [float(ln.split("│")[2]) for ln in rows]
    assert len(losses) == 4 and losses[-1] < losses[0], r.stdout
    assert "12 crops" in r.stdout
    assert f"start: {init} (dynpose_router format" in r.stdout, r.stdout

    # the checkpoint is in the release format and loads back through load_weights
    sd = torch.load(out, map_location="cpu", weights_only=True)
    assert {k: list(v.shape) for k, v in sd.items()} == layout
    # it trained, starting from --init: 8 Adam steps of lr 2e-3 move a weight by about 0.016 at most, while two random
    # inits of this layer differ by up to 2/sqrt(256) = 0.125
    step = (sd["backbone.layer2.weight"] - release["backbone.layer2.weight"]).abs().max().item()
    assert 0 < step < 0.03
    fresh = create_model("router")
    load_weights(fresh, out)
    assert torch.equal(fresh.state_dict()["layer2.weight"], sd["backbone.layer2.weight"])
    png = out.with_suffix(".loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # exported into the engine dir as the router entry (the manifest verifies its sha256 on load)
    m = Manifest.load(engine_dir)
    assert m.require("router", "onnx").sha256 != old_router
    # a freshly trained router gets fraction:0.5 (not the release band) until --calibrate, and the CLI says so
    assert m.route == "fraction:0.5" and "fraction:0.5 for the freshly trained router" in r.stdout, r.stdout
    # per-crop outputs cached, keyed by the pose entries + data
    assert len(list((engine_dir / "cache").glob("router-outputs-*.npz"))) == 1


def test_collect_cache_hit_and_invalidation(engine_dir: Path, coco_dir: Path, tmp_path: Path):
    from dynpose.router.collect import collect_outputs

    ann = coco_dir / "test_coco.json"
    a, crops = collect_outputs(engine_dir, ann, coco_dir, cache_dir=tmp_path / "c", progress=False)
    assert len(a) == len(crops) == 12
    # the README's TinyPose figures (mean OKS over the 12 persons)
    assert a.oks_large.mean() == pytest.approx(0.893, abs=0.01)
    assert a.oks_small.mean() == pytest.approx(0.793, abs=0.01)
    (f,) = (tmp_path / "c").glob("*.npz")
    stamp = f.stat().st_mtime_ns
    b, _ = collect_outputs(engine_dir, ann, coco_dir, cache_dir=tmp_path / "c", progress=False)
    assert f.stat().st_mtime_ns == stamp  # read, not rewritten
    np.testing.assert_array_equal(a.kpts_large, b.kpts_large)
    # another annotation file (one person fewer) -> another key, another file
    d = json.loads(ann.read_text())
    d["annotations"] = d["annotations"][1:]
    ann2 = tmp_path / "ann2.json"
    ann2.write_text(json.dumps(d))
    c, _ = collect_outputs(engine_dir, ann2, coco_dir, cache_dir=tmp_path / "c", progress=False)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 2 and len(c) < 12
    # a corrupt cache file is recomputed, not trusted
    f.write_bytes(b"not an npz")
    e, _ = collect_outputs(engine_dir, ann, coco_dir, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_allclose(e.oks_large, a.oks_large)


def test_lazy_router_crops_match_in_memory_and_train(coco_dir: Path):
    from dynpose.data import load_coco
    from dynpose.models.zoo import create_model
    from dynpose.router.collect import LazyRouterCrops, gt_crops, router_crops
    from dynpose.router.train import TrainConfig, train_router

    crops = gt_crops(load_coco(coco_dir / "test_coco.json"), coco_dir)
    model = create_model("router")
    eager = router_crops(crops, model.card)
    lazy = router_crops(crops, model.card, max_bytes=0)
    assert isinstance(eager, np.ndarray) and isinstance(lazy, LazyRouterCrops)
    idx = np.array([11, 0, 5, 5])
    np.testing.assert_array_equal(lazy[idx], eager[idx])
    t = np.tile(np.array([[0.5, 0.5, 0.5, 1.0, 1.0]], dtype=np.float32), (len(crops), 1))
    res = train_router(model, lazy, t, model.card, TrainConfig(epochs=1, batch=12, flip=False), progress=False)
    assert len(res.epoch_loss) == 1 and np.isfinite(res.epoch_loss[0])


@pytest.mark.parametrize("fraction", ["0.25", "0.5"])
def test_calibrate_hits_target_fraction(engine_dir: Path, coco_dir: Path, fraction: str):
    from dynpose.data import load_coco
    from dynpose.router.calibrate import router_scores
    from dynpose.router.collect import gt_crops
    from dynpose.runtime.policy import Signals, Threshold, parse_policy

    ann = coco_dir / "test_coco.json"
    r = _cli(
        "--calibrate",
        "--engine-dir",
        str(engine_dir),
        "--ann",
        str(ann),
        "--images",
        str(coco_dir),
        "--target-fraction",
        fraction,
        "--quiet",
    )
    assert r.exit_code == 0, r.stderr
    assert "policy threshold:" in r.stdout and "AP " in r.stdout
    m = Manifest.load(engine_dir)
    policy = parse_policy(m.route)
    assert isinstance(policy, Threshold)
    # re-apply the stored policy to the router's scores on the same data: the fraction is hit
    crops = gt_crops(load_coco(ann), coco_dir)
    scores = router_scores(engine_dir, crops)
    achieved = policy.decide(Signals(crops.areas, router=scores[:, 1])).large.mean()
    assert abs(achieved - float(fraction)) <= 0.05
    assert m.calibration is not None and m.calibration.fraction == pytest.approx(achieved)


def test_calibrate_ap_drop(engine_dir: Path, coco_dir: Path):
    from dynpose.router.calibrate import calibrate

    ann = coco_dir / "test_coco.json"
    res = calibrate(engine_dir, ann, coco_dir, target_ap_drop=0.0, progress=False)
    assert res.ap >= res.ap_large - 1e-9
    assert res.ap_large > res.ap_small  # TinyPose 256 beats 128 on these persons
    loose = calibrate(engine_dir, ann, coco_dir, target_ap_drop=1.0, progress=False)
    assert loose.fraction == 0.0 and loose.ap == pytest.approx(loose.ap_small)
    assert Manifest.load(engine_dir).route == loose.policy


# -- CLI errors: exit 2, one line ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--engine-dir", "{tmp}/missing"], "engine dir"),
        (["--calibrate", "--target-fraction", "1.5"], "--target-fraction"),
        (["--calibrate", "--target-fraction", "0.3", "--target-ap-drop", "0.01"], "exactly one"),
        (["--target-fraction", "0.3"], "--calibrate"),
        (["--epochs", "0"], "--epochs"),
        (["--init", "{tmp}/nope.pth"], "--init"),
    ],
)
def test_cli_errors(engine_dir: Path, coco_dir: Path, tmp_path: Path, extra: list[str], needle: str):
    args = [
        "--engine-dir",
        str(engine_dir),
        "--ann",
        str(coco_dir / "test_coco.json"),
        "--images",
        str(coco_dir),
        "--quiet",
        "--out",
        str(tmp_path / "r.pth"),
    ]
    args += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    r = _cli(*args)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
