"""Routing checked without labels (issue 20): label-free calibration on the shared footage, per policy family, with
the held-out agreement, the accuracy on the labelled samples, and crops/s against large-only.

    python benchmarks/route_agreement.py                       # agreement + AP/PCKh (load-independent), timing
    python benchmarks/route_agreement.py --no-timing           # only the load-independent figures
    python benchmarks/route_agreement.py --signals --self      # the confidence statistics; the large model's noise floor
    python benchmarks/route_agreement.py --pair                # + LPN-50 / HRNet-W32 (random weights) speed
    python benchmarks/route_agreement.py --json out.json       # also write the figures

What runs (TinyPose 128x96 small, 256x192 large, ONNX Runtime CPU, fp32; router with random weights):
1. Footage: every image of ../shared/data/{coco,crowdpose,mpii,exlpose} and the 5 frames of street.mp4; boxes from the
   COCO and CrowdPose detection files where they cover an image, else PP-PicoDet-S 320, score >= 0.3
   (`router.footage.footage_data`: both models on every person).
2. For each target (0.95, 0.93): `labelfree.calibrate_label_free` (held-out half by frames, seed 0): each family's
   cheapest policy on the fit half and its held-out share to the large model and agreement with a 95% frame-bootstrap
   interval; `--seeds N` repeats the split N times to show how much a split moves the figures.
3. The same policies on the labelled samples through the Pipeline (ground-truth boxes): COCO AP, CrowdPose AP (12
   limb joints), MPII PCKh@0.5 (12 limb joints), against large-only and small-only. The labelled images are part of
   the footage (the shared data has nothing else), so these are not independent of the calibration.
4. Timing (`bench.crops.crop_benchmark`): every footage person, calls of 8, interleaved rounds with 95% intervals
   against the faster large-only; each family's policy at each target. The CPU is shared: quote only a quiet run.
5. `--pair`: an LPN-50 small / HRNet-W32 large engine dir with random weights (`dynpose-export --model all --small
   lpn_50 --large hrnet_w32 --weights random`), timed on the same persons with each family's policy moved to the
   share the TinyPose calibration chose (random weights agree on nothing: speed only).
`--signals`: Spearman of each candidate confidence statistic of the small model with its OKS to the large model,
with a paired frame-bootstrap interval of its difference to the mean keypoint score. `--self`: the large model
against itself on the mirrored crop and on boxes shifted by 2% / scaled by 5% (what the 0.95 default rests on).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
CARDS = REPO / "examples" / "cards"
TARGETS = (0.95, 0.93)


# -- set-up ----------------------------------------------------------------------------------------------------------
def spec() -> Any:
    from dynpose.router.unlabelled import UnlabelledSpec

    return UnlabelledSpec(
        sources=(DATA / "coco", DATA / "crowdpose", DATA / "mpii", DATA / "exlpose", DATA / "video" / "street.mp4"),
        detections=(DATA / "coco" / "test_coco_det_AP_H_56.json", DATA / "crowdpose" / "test_crowdpose_det_AP_40.json"),
        detector=SHARED / "models" / "picodet_s_320_pedestrian.onnx",
        det_score=0.3,
    )


def tinypose_engine_dir(engine_dir: Path) -> Path:
    import torch

    from dynpose.export.api import export_model, register_onnx
    from dynpose.models.card import ModelCard
    from dynpose.roles import Role

    for role, (w, h) in ((Role.SMALL, (96, 128)), (Role.LARGE, (192, 256))):
        card = ModelCard.from_json_file(CARDS / f"tinypose_{h}x{w}.json")
        register_onnx(SHARED / "models" / f"tinypose_{h}x{w}.onnx", card, engine_dir, role=role, progress=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(Role.ROUTER, engine_dir, weights="random", progress=False)
    return engine_dir


def footage_frames(outputs: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, boxes) of every footage frame with persons, as the calibration saw them."""
    from dynpose.router.unlabelled import _frames

    by_frame = {int(f): outputs.boxes[outputs.frame == f] for f in np.unique(outputs.frame)}
    return [(fr.image_bgr, by_frame[i]) for i, fr in enumerate(_frames(spec())) if i in by_frame]


# -- 2. calibration per target ----------------------------------------------------------------------------------------
def calibrations(engine_dir: Path, seeds: int) -> dict[float, Any]:
    from dynpose.router.footage import FootageOptions
    from dynpose.router.labelfree import LabelFreeOptions, calibrate_label_free, report_lines

    out = {}
    for target in TARGETS:
        runs = [
            calibrate_label_free(
                engine_dir, spec(), LabelFreeOptions(target=target, seed=s, save=False, run=FootageOptions(progress=False))
            )
            for s in range(max(1, seeds))
        ]
        out[target] = runs
        print(f"\n## target agreement {target} (split seed 0)")
        for line in report_lines(runs[0]):
            print(line)
        if len(runs) > 1:
            print(f"over {len(runs)} split seeds, per family: held-out share to large / agreement (min-max)")
            for fam in runs[0].figures.per_family:
                f = [r.figures.per_family[fam] for r in runs if fam in r.figures.per_family]
                print(
                    f"  {fam:<15} share {min(x.share for x in f):.0%}-{max(x.share for x in f):.0%}, agreement "
                    f"{min(x.agreement.value for x in f):.3f}-{max(x.agreement.value for x in f):.3f}, target within "
                    f"or below the interval in {sum(x.agreement.hi >= target for x in f)}/{len(f)}"
                )
    return out


# -- 3. labelled accuracy ---------------------------------------------------------------------------------------------
def _run(pipe: Any, image: np.ndarray, boxes: Any) -> Any:
    (person,) = pipe(image, boxes=np.asarray(boxes, np.float64).reshape(-1, 4), nms=False)
    return person


def _image(path: Any) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path))
    if image is None:
        raise SystemExit(f"{path}: not a readable image; check ../shared/data")
    return image


def labelled_persons() -> list[tuple[str, Any, np.ndarray, Any]]:
    """(set, key, box, image path) of every labelled person: COCO and CrowdPose ground-truth boxes, MPII's
    centre/scale boxes (person height = scale x 200)."""
    from dynpose.data import gt_boxes, image_id_map, load_coco
    from dynpose.eval.mpii import load_mpii

    out = []
    for name, ann in (("coco", "test_coco.json"), ("crowdpose", "test_crowdpose.json")):
        ds = load_coco(DATA / name / ann)
        paths = image_id_map(DATA / name, ds)
        out += [(name, iid, np.asarray(box[:4], np.float64), paths[iid]) for iid, box, _ in gt_boxes(ds)]
    for i, r in enumerate(load_mpii(DATA / "mpii" / "test_mpii.json")):
        h = float(r["scale"]) * 200.0
        cx, cy = (float(v) for v in r["center"])
        out.append(("mpii", i, np.array([cx - h * 0.375, cy - h * 0.5, h * 0.75, h]), DATA / "mpii" / r["image"]))
    return out


def labelled(engine_dir: Path, policy: str, large_kp: np.ndarray | None) -> tuple[dict[str, float], np.ndarray]:
    """A policy on the labelled persons: COCO AP, CrowdPose AP (12 limb joints), MPII PCKh@0.5 (12 limb joints), the
    share sent large and the agreement with the large model's keypoints (`large_kp`); and its keypoints."""

    from dynpose import Pipeline
    from dynpose.eval.coco import evaluate_results, quiet
    from dynpose.eval.mpii import load_mpii, pckh
    from dynpose.keypoints import COCO17
    from dynpose.roles import Role
    from dynpose.router.calibrate import agreement, small_large_oks

    persons = labelled_persons()
    with Pipeline.from_engine_dir(engine_dir, route=policy) as pipe:
        answers = [_run(pipe, _image(path), box) for _, _, box, path in persons]
    kp = np.stack([p.keypoints for p in answers])
    large = np.array([p.model == Role.LARGE for p in answers])
    out = {"share_large": float(large.mean())}
    if large_kp is not None:
        boxes = np.stack([b for _, _, b, _ in persons])
        out["agreement"] = float(agreement(small_large_oks(kp, large_kp, boxes, COCO17.sigmas), large).mean())
    for name, ann in (("coco", "test_coco.json"), ("crowdpose", "test_crowdpose.json")):
        res = [p.to_coco(key) for (s, key, _, _), p in zip(persons, answers, strict=True) if s == name]
        with quiet():
            out[f"{name}_AP"] = float(evaluate_results(res, DATA / name / ann)["AP"])
    mpii = np.stack([p.keypoints for (s, _, _, _), p in zip(persons, answers, strict=True) if s == "mpii"])
    out["mpii_PCKh"] = float(pckh(mpii, load_mpii(DATA / "mpii" / "test_mpii.json"))["stats"][-2])
    return out, kp


def accuracy_table(engine_dir: Path, cals: dict[float, Any]) -> dict[str, dict[str, float]]:
    import logging

    logging.getLogger("dynpose.eval").setLevel(logging.ERROR)  # the COCO-17 -> MPII / CrowdPose mapping notes
    policies = [w.policy for runs in cals.values() for w in runs[0].figures.per_family.values()]
    large_figures, large_kp = labelled(engine_dir, "all-large", None)
    table = {"all-large": large_figures | {"agreement": 1.0}}
    for p in dict.fromkeys(["all-small", *policies]):
        if p != "all-large":
            table[p] = labelled(engine_dir, p, large_kp)[0]
    n = len(large_kp)
    print(f"\n## labelled samples ({n} annotated persons, ground-truth boxes): the same policies")
    print("| policy | share large | agreement | COCO AP | CrowdPose AP | MPII PCKh@0.5 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for p, f in table.items():
        print(
            f"| {p} | {f['share_large']:.0%} | {f['agreement']:.3f} | {f['coco_AP']:.3f} | {f['crowdpose_AP']:.3f} | "
            f"{f['mpii_PCKh']:.1f} |"
        )
    return table


# -- 4/5. timing --------------------------------------------------------------------------------------------------------
def timing(engine_dir: Path, frames: list[tuple[np.ndarray, np.ndarray]], policies: dict[str, str], args: Any) -> list[dict]:
    """crops/s of each policy (name -> what it is, e.g. "cascade @ 0.95") against large-only, with 95% intervals."""
    from dynpose.bench.crops import crop_benchmark
    from dynpose.bench.options import BenchOptions
    from dynpose.bench.timing import RoundSpec
    from dynpose.runtime.engine_set import EngineSet, LoadOptions

    rounds = RoundSpec(min_rounds=args.repeats, max_rounds=args.repeats, warmup=1)
    opts = BenchOptions(batches=(8,), fractions=(), policies=tuple(policies), rounds=rounds)
    with EngineSet.load(engine_dir, LoadOptions()) as engines:
        rows, timing_info = crop_benchmark(engines, opts, frames=frames, log=lambda m: print(f"  {m}", flush=True))
    print(f"{timing_info[0]['rounds']} interleaved rounds, calls of 8 persons")
    print("| policy | family @ target | share large | escalated | crops/s | vs large-only [95% CI] |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ci = r["ratio_ci"]
        esc = "-" if r["escalated_share"] is None else f"{r['escalated_share']:.0%}"
        ratio = f"{r['ratio_vs_large']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else " [?]")
        what = policies.get(r["config"], "baseline")
        print(f"| {r['config']} | {what} | {r['large_share']:.0%} | {esc} | {r['crops_per_s']:.1f} | {ratio} |")
    return rows


def pair_policies(pair_dir: Path, cals: dict[float, Any]) -> dict[str, str]:
    """Each family's TinyPose policy moved to the same share on the LPN/HRNet pair: box cuts carry over as they are
    (the same boxes); the cascades' and the router's cuts are placed again on this pair's signals."""
    from dynpose.router.footage import FootageOptions, footage_data
    from dynpose.router.labelfree import person_set, sweeps

    data = footage_data(pair_dir, spec(), FootageOptions(progress=False))
    ps = person_set(data, [0.1] * data.outputs.kpts_small.shape[1])  # OKS unused: only the signals are
    out: dict[str, str] = {}
    for target, runs in cals.items():
        for fam, w in runs[0].figures.per_family.items():
            if fam == "fixed":
                continue
            if fam in ("box", "box-below"):
                out.setdefault(w.policy, f"{fam} @ {target:g}")
                continue
            # random weights score every joint low, so the visible-joint mean is 0 for all: the plain cascade's mean
            # keypoint score places the same share (both cascades cost the same at a given share)
            for sw in sweeps(ps, "cascade" if fam == "cascade-visible" else fam)[:1]:
                k = int(np.clip(round(w.share * len(ps)), 0, len(ps) - 1))
                out.setdefault(str(sw.make(k)), f"{fam} @ {target:g} (share {w.share:.0%})")
    return out


def pair_engine_dir(engine_dir: Path) -> Path:
    import torch

    from dynpose.export.api import export_all
    from dynpose.roles import Role

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_all(engine_dir, models={Role.SMALL: "lpn_50", Role.LARGE: "hrnet_w32"}, progress=False)
    return engine_dir


# -- the studies behind the defaults -------------------------------------------------------------------------------------
def signals(outputs: Any) -> None:
    from scipy.stats import spearmanr

    from dynpose.keypoints import COCO17
    from dynpose.router.calibrate import small_large_oks
    from dynpose.runtime.policy import Cascade

    oks = small_large_oks(outputs.kpts_small, outputs.kpts_large, outputs.boxes, COCO17.sigmas)
    ok = np.isfinite(oks)
    kp, o, frame = outputs.kpts_small[ok], oks[ok], outputs.frame[ok]
    s = kp[:, :, 2]
    stats = {
        "mean keypoint score (cascade)": Cascade(0).confidence(kp),
        "visible-joint mean, S 0.3 (cascade-visible)": Cascade(0, 0.3).confidence(kp),
        "visible-joint mean, S 0.2": Cascade(0, 0.2).confidence(kp),
        "median keypoint score": np.median(s, axis=1),
        "share of joints above 0.5": (s > 0.5).mean(axis=1),
        "lowest keypoint score": s.min(axis=1),
        "box area": outputs.areas[ok],
        "box score": outputs.boxes[ok, 4],
    }
    groups = [np.flatnonzero(frame == f) for f in np.unique(frame)]
    rng = np.random.default_rng(0)
    draws = [np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))]) for _ in range(2000)]
    base = stats["mean keypoint score (cascade)"]
    print(f"\n## confidence statistics: Spearman with OKS(small | large) over {ok.sum()} persons, {len(groups)} frames")
    print("| statistic | Spearman | minus the mean score's [95% frame bootstrap] |")
    print("| --- | --- | --- |")
    for name, v in stats.items():
        d = [spearmanr(v[i], o[i]).statistic - spearmanr(base[i], o[i]).statistic for i in draws]
        lo, hi = np.percentile(d, [2.5, 97.5])
        print(f"| {name} | {spearmanr(v, o).statistic:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")


def self_agreement(engine_dir: Path, frames: list[tuple[np.ndarray, np.ndarray]]) -> None:
    from dynpose.keypoints import COCO17
    from dynpose.roles import Role
    from dynpose.router.calibrate import small_large_oks
    from dynpose.runtime.engine_set import EngineSet, LoadOptions
    from dynpose.runtime.plan import crop_boxes

    rng = np.random.default_rng(0)
    res: dict[str, list[np.ndarray]] = {"mirrored crop": [], "box shifted by up to 2%": [], "box scaled by up to 5%": []}
    with EngineSet.load(engine_dir, LoadOptions(), roles=[Role.LARGE]) as es:
        large = es.require(Role.LARGE)

        def run(img: np.ndarray, b: np.ndarray, flip: bool = False) -> np.ndarray:
            u8, c, s = crop_boxes([img], np.zeros(len(b), np.int64), b[:, :4], large.card)
            return large.run(u8, c, s, flip=flip)  # type: ignore[attr-defined]

        for img, b in frames:
            base = run(img, b)
            shift = b.copy()
            shift[:, :2] += rng.uniform(-0.02, 0.02, (len(b), 2)) * b[:, 2:4]
            f = rng.uniform(0.95, 1.05, len(b))[:, None]
            scale = b.copy()
            scale[:, :2] -= (f - 1) * b[:, 2:4] / 2
            scale[:, 2:4] *= f
            for key, kp in zip(res, (run(img, b, True), run(img, shift), run(img, scale)), strict=True):
                res[key].append(small_large_oks(kp, base, b, COCO17.sigmas))
    print("\n## the large model against itself (the noise floor of agreement)")
    for key, v in res.items():
        a = np.concatenate(v)
        a = a[np.isfinite(a)]
        print(f"- {key}: mean OKS {a.mean():.3f}, {np.mean(a >= 0.9):.0%} of {len(a)} persons at OKS >= 0.9")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", type=Path, default=None, help="TinyPose engine dir [default: built in a temp dir]")
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds (interleaved)")
    ap.add_argument("--seeds", type=int, default=1, help="split seeds to repeat the calibration with")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--pair", action="store_true", help="also time the LPN-50 / HRNet-W32 pair (random weights)")
    ap.add_argument("--signals", action="store_true")
    ap.add_argument("--self", dest="self_", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here (nothing is written otherwise)")
    args = ap.parse_args()

    from dynpose.router.footage import FootageOptions, footage_data

    with tempfile.TemporaryDirectory() as tmp:
        eng = args.engine_dir or tinypose_engine_dir(Path(tmp) / "tinypose")
        outputs = footage_data(eng, spec(), FootageOptions(progress=False)).outputs
        frames = footage_frames(outputs)
        if args.signals:
            signals(outputs)
        if args.self_:
            self_agreement(eng, frames)
        cals = calibrations(eng, args.seeds)
        acc = accuracy_table(eng, cals)
        figures: dict[str, Any] = {
            "calibrations": {str(t): [r.figures.to_dict() | {"policy": r.policy} for r in runs] for t, runs in cals.items()},
            "labelled": acc,
        }
        policies: dict[str, str] = {}
        for target, runs in cals.items():
            for fam, w in runs[0].figures.per_family.items():
                if fam != "fixed":
                    policies.setdefault(w.policy, f"{fam} @ {target:g}")
        if not args.no_timing:
            print(f"\n## TinyPose pair: crops/s on the {sum(len(b) for _, b in frames)} footage persons")
            figures["timing"] = timing(eng, frames, policies, args)
        if args.pair:
            pair = pair_engine_dir(Path(tmp) / "lpn_pair")
            print("\n## LPN-50 / HRNet-W32 (random weights) at the TinyPose calibration's shares")
            figures["pair_timing"] = timing(pair, frames, pair_policies(pair, cals), args)
        if args.json:
            from dynpose.fileio import write_json_atomic

            write_json_atomic(args.json, figures)
            print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
