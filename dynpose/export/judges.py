"""Judging a lower-precision model (fp16, INT8) against its fp32 source, where it matters to a user.

A pose model is judged on decoded keypoints: both models run on the same real person crops, all their outputs (one
heatmap tensor, or SimDR's x and y vectors) are decoded to image pixels with the runtime's own decoder
(`decode.decode_outputs`, as `PoseModel.decode`), and the candidate's keypoints are scored with OKS against the fp32
keypoints (`PoseJudge`). A router gives three scores, not heatmaps, so it is judged on routing: the
fraction of crops the candidate routes as fp32 does under the engine dir's route (`RouterJudge`). Speed is compared
too (`compare_speed`: time per batch on ONNX Runtime CPU), as advice rather than a gate.

Every comparison returns a `Check`: truthy when its gate holds, carrying the figures the manifest entry stores in
`checks`, and the one-line message to raise or log when it does not. Export and INT8 calibration both import
this module; it imports neither.
"""

from __future__ import annotations

import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.models.card import ModelCard
from dynpose.onnx_utils import open_session, rel_l2, run_session_all
from dynpose.roles import Role
from dynpose.runtime.decode import decode_outputs
from dynpose.runtime.policy import Signals, parse_policy
from dynpose.runtime.postprocess import oks

log = logging.getLogger(__name__)

SPEED_BATCH = 8
WARN_SPEEDUP = 1.1

# A model's outputs on a batch: every output in graph order, or one array (a single-output model's).
Outputs = np.ndarray | Sequence[np.ndarray]


def as_outputs(out: Outputs) -> list[np.ndarray]:
    """Outputs as a list of arrays (one array -> a list of one)."""
    return [out] if isinstance(out, np.ndarray) else list(out)


class Crops(Protocol):
    """Real person crops with what scoring keypoints in image pixels needs (e.g. `calibration.crops.CropSet`)."""

    x: np.ndarray  # (N,3,H,W) fp32, normalised
    centers: np.ndarray  # (N,2)
    scales: np.ndarray  # (N,2)
    areas: np.ndarray  # (N,) person area for OKS
    mask: np.ndarray  # (N,K) bool: keypoints that count in OKS

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Check:
    """The result of one check: `passed` (also its truth value), the figures for the manifest entry's `checks`,
    and a one-line message saying what failed (empty when it passed)."""

    name: str
    passed: bool
    figures: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    def __bool__(self) -> bool:
        return self.passed

    def require(self) -> Check:
        """The check itself when it passed; else its message as a `DynPoseError`."""
        if not self.passed:
            raise DynPoseError(self.message or f"{self.name} check failed")
        return self


# -- figures -----------------------------------------------------------------------------------------------------------
def decode_keypoints(outputs: Outputs, centers: np.ndarray, scales: np.ndarray, card: ModelCard) -> np.ndarray:
    """(N,K,2) keypoints in image pixels from all of a model's outputs, with the runtime's own decoder (the card's
    msra/dark/udp on the heatmaps, simdr on the x and y vectors)."""
    return np.asarray(decode_outputs(as_outputs(outputs), centers, scales, card))[..., :2]


def oks_between(
    test_xy: np.ndarray, ref_xy: np.ndarray, areas: np.ndarray, sigmas: Sequence[float], mask: np.ndarray | None = None
) -> np.ndarray:
    """Per-crop OKS of `test_xy` against `ref_xy` (N,K,2) as ground truth, over the keypoints in `mask`."""
    m = np.ones(np.shape(ref_xy)[:2], bool) if mask is None else np.asarray(mask, bool)
    gt = np.concatenate([np.asarray(ref_xy, np.float64), m[..., None].astype(np.float64)], axis=-1)
    return np.array([oks(test_xy[i], gt[i], float(areas[i]), sigmas) for i in range(len(gt))])


def outputs_rel_l2(test_out: Outputs, ref_out: Outputs) -> float:
    """`rel_l2` over all outputs together (their concatenation)."""
    test, ref = as_outputs(test_out), as_outputs(ref_out)
    if len(test) != len(ref):
        raise DynPoseError(f"comparing outputs: {len(test)} outputs against {len(ref)}")
    flat = [np.concatenate([np.ravel(o) for o in outs]) for outs in (test, ref)]
    return rel_l2(flat[0], flat[1])


def keypoint_agreement(test_out: Outputs, ref_out: Outputs, crops: Crops, card: ModelCard) -> dict[str, Any]:
    """Mean/min OKS and relative L2 of a lower-precision model's outputs (all of them: `heatmap_rel_l2` is over
    SimDR's two vectors for a SimDR model) against fp32's on the same crops."""
    finite = all(bool(np.isfinite(o).all()) for o in as_outputs(test_out))
    if not finite:
        return {"finite": False, "oks_mean": 0.0, "oks_min": 0.0, "heatmap_rel_l2": float("inf"), "crops": len(crops)}
    a = decode_keypoints(test_out, crops.centers, crops.scales, card)
    b = decode_keypoints(ref_out, crops.centers, crops.scales, card)
    o = oks_between(a, b, crops.areas, card.keypoint_set.sigmas, crops.mask)
    return {
        "finite": True,
        "oks_mean": float(o.mean()),
        "oks_min": float(o.min()),
        "heatmap_rel_l2": outputs_rel_l2(test_out, ref_out),
        "crops": len(o),
    }


def gate_policy(route: str) -> str:
    """The policy whose decisions a lower-precision router must reproduce: the route itself when it reads the
    router's scores, else `fraction:0.5` (box:/all-* decide without the router, which would make any router pass)."""
    policy = parse_policy(route)
    return str(policy) if policy.needs_router else "fraction:0.5"


def router_agreement(test_out: Outputs, ref_out: Outputs, route: str) -> dict[str, Any]:
    """Router scores (the first output) of a lower-precision model against fp32 on the same crops: max/mean |score
    difference| and the fraction of crops routed the same way under `gate_policy(route)` (all crops in one call, as
    one batch)."""
    test = np.asarray(as_outputs(test_out)[0], np.float64)
    ref = np.asarray(as_outputs(ref_out)[0], np.float64)
    policy = gate_policy(route)
    if not np.isfinite(test).all():
        return {"finite": False, "policy": policy, "crops": len(ref)}
    diff = np.abs(test - ref)
    areas = np.zeros(len(ref))  # only box policies read areas, and those are replaced above
    p = parse_policy(policy)
    same = p.decide(Signals(areas, router=test[:, 1])).large == p.decide(Signals(areas, router=ref[:, 1])).large
    return {
        "finite": True,
        "policy": policy,
        "crops": len(ref),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "agreement": float(same.mean()),
    }


# -- judges ------------------------------------------------------------------------------------------------------------
class Judge(ABC):
    """Judges a candidate's outputs (all of them, graph order) against the fp32 outputs on the same real crops."""

    card: ModelCard

    @abstractmethod
    def __call__(self, test_out: Outputs, ref_out: Outputs, crops: Crops, precision: str) -> Check:
        """The check of `precision` outputs `test_out` against fp32's `ref_out` on `crops`."""

    @abstractmethod
    def summary(self, check: Check) -> str:
        """One line with a check's figures, for the export's progress log."""

    def files(self, test: str | os.PathLike, ref: str | os.PathLike, crops: Crops, precision: str) -> Check:
        """Run both ONNX files on the crops (ONNX Runtime CPU, every output) and judge."""
        test_out = run_session_all(open_session(test), crops.x)
        return self(test_out, run_session_all(open_session(ref), crops.x), crops, precision)


@dataclass(frozen=True)
class PoseJudge(Judge):
    """A pose model passes when its decoded keypoints reach mean OKS `min_oks` against fp32's (0 disables the gate;
    NaN/inf outputs always fail). Figures: `<precision>_oks`, `_oks_min`, `_heatmap_rel_l2`, `_crops`."""

    card: ModelCard
    min_oks: float

    def __call__(self, test_out: Outputs, ref_out: Outputs, crops: Crops, precision: str) -> Check:
        a = keypoint_agreement(test_out, ref_out, crops, self.card)
        p = precision
        figures = {f"{p}_oks": a["oks_mean"], f"{p}_oks_min": a["oks_min"], f"{p}_heatmap_rel_l2": a["heatmap_rel_l2"]}
        figures[f"{p}_crops"] = a["crops"]
        where = f"{p} check failed for {self.card.name}"
        if not a["finite"]:
            return Check(p, False, figures, f"{where}: NaN/inf in the outputs on real crops")
        if a["oks_mean"] < self.min_oks:
            return Check(p, False, figures, f"{where}: mean OKS vs fp32 {a['oks_mean']:.4f} < --min-oks {self.min_oks}")
        return Check(p, True, figures)

    def summary(self, check: Check) -> str:
        f, p = check.figures, check.name
        if not math.isfinite(f.get(f"{p}_heatmap_rel_l2", math.inf)):
            return check.message
        return f"{self.card.name}: {p} vs fp32 mean keypoint OKS {f[f'{p}_oks']:.4f} on {f[f'{p}_crops']} real crops"


@dataclass(frozen=True)
class RouterJudge(Judge):
    """A router passes when at least `min_agreement` of the crops are routed as fp32 routes them under
    `gate_policy(route)` (0 disables the gate; NaN/inf scores always fail). Figures: `router_score_max_abs_diff`,
    `router_score_mean_abs_diff`, `router_decision_agreement`, `router_gate_policy`, `router_gate_crops`,
    `router_min_agreement`."""

    card: ModelCard
    min_agreement: float
    route: str

    def __call__(self, test_out: Outputs, ref_out: Outputs, crops: Crops, precision: str) -> Check:
        a = router_agreement(test_out, ref_out, self.route)
        where = f"{precision} check failed for {self.card.name}"
        if not a["finite"]:
            return Check(precision, False, {}, f"{where}: NaN/inf in the router scores on real crops")
        figures = {
            "router_score_max_abs_diff": a["max_abs_diff"],
            "router_score_mean_abs_diff": a["mean_abs_diff"],
            "router_decision_agreement": a["agreement"],
            "router_gate_policy": a["policy"],
            "router_gate_crops": a["crops"],
            "router_min_agreement": self.min_agreement,
        }
        if self.min_agreement > 0 and a["agreement"] < self.min_agreement:
            return Check(
                precision,
                False,
                figures,
                f"{where}: {a['agreement']:.1%} of {a['crops']} crops routed as in fp32 under {a['policy']} < --min-oks "
                f"{self.min_agreement} (for the router it is the decision agreement); use fp32, or --min-oks 0 for "
                "random weights",
            )
        return Check(precision, True, figures)

    def summary(self, check: Check) -> str:
        f = check.figures
        if "router_decision_agreement" not in f:
            return check.message
        return (
            f"{self.card.name}: {check.name} vs fp32 on {f['router_gate_crops']} real crops: score |diff| max "
            f"{f['router_score_max_abs_diff']:.2e} mean {f['router_score_mean_abs_diff']:.2e}; same decision under "
            f"{f['router_gate_policy']} for {f['router_decision_agreement']:.1%} of crops"
        )


def judge_for(card: ModelCard, min_score: float, route: str | None = None) -> Judge:
    """The judge for the card's task: `RouterJudge` under `route` for a router, `PoseJudge` otherwise."""
    if card.task == Role.ROUTER:
        if route is None:
            raise DynPoseError(f"router {card.name}: judging a lower-precision router needs the route it runs under")
        return RouterJudge(card, min_score, route)
    return PoseJudge(card, min_score)


# -- speed -------------------------------------------------------------------------------------------------------------
def measure_speedup(
    fp32: str | os.PathLike,
    other: str | os.PathLike,
    x: np.ndarray,
    precision: str = "int8",
    batch: int = SPEED_BATCH,
    repeats: int = 5,
    threads: int = 0,
) -> dict[str, Any]:
    """fp32 vs `other` time per batch on ORT CPU, interleaved (a, b, a, b, ...) so load changes hit both; medians.
    Keys: `fp32_ms`, `<precision>_ms`, `speedup`, `batch`, `repeats`."""
    xb = np.ascontiguousarray(x[np.arange(batch) % len(x)], np.float32)
    sa, sb = open_session(fp32, threads=threads), open_session(other, threads=threads)
    name = sa.get_inputs()[0].name
    for s in (sa, sb):
        s.run(None, {name: xb})  # warm-up: first runs allocate and pick kernels
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(repeats):
        for s, acc in ((sa, ta), (sb, tb)):
            t0 = time.perf_counter()
            s.run(None, {name: xb})
            acc.append(time.perf_counter() - t0)
    a, b = float(np.median(ta)), float(np.median(tb))
    return {"fp32_ms": a * 1e3, f"{precision}_ms": b * 1e3, "speedup": a / b, "batch": batch, "repeats": repeats}


def compare_speed(
    fp32: str | os.PathLike, other: str | os.PathLike, x: np.ndarray, precision: str, name: str, hint: str
) -> Check:
    """`measure_speedup` at batch 8, logged; falsy (and a warning with `hint`) when `other` is under 1.1x faster.
    Figures: `<precision>_speedup_b8`, `<precision>_ms_b8`, `fp32_ms_b8`."""
    sp = measure_speedup(fp32, other, x, precision)
    msg = (
        f"{name}: {precision} vs fp32 on ONNX Runtime CPU at batch {sp['batch']}: {sp['speedup']:.2f}x "
        f"({sp['fp32_ms']:.1f} ms -> {sp[f'{precision}_ms']:.1f} ms)"
    )
    figures = {
        f"{precision}_speedup_b8": sp["speedup"],
        f"{precision}_ms_b8": sp[f"{precision}_ms"],
        "fp32_ms_b8": sp["fp32_ms"],
    }
    if sp["speedup"] < WARN_SPEEDUP:
        warning = f"{msg}: {precision} does not pay on this backend; {hint}"
        log.warning(warning)
        return Check(f"{precision}_speed", False, figures, warning)
    log.info(msg)
    return Check(f"{precision}_speed", True, figures)
