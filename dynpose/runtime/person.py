"""`Person`: one person's answer, the value every caller gets back (Pipeline, service, video loop, sinks).

It carries the row of the box it came from (`index`, in the boxes the caller gave or the detector found), the box,
the keypoints (K,3) x, y in image pixels and score, the instance score, which model answered (`Role.SMALL` /
`Role.LARGE`) and why (`Decision`), the signals the policy read, and the track id when the person is tracked.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from dynpose.roles import POSE_ROLES, Role


class Decision(str, Enum):
    """Why the model that answered for a person was chosen."""

    POLICY = "policy"  # the routing policy decided (router, box, fixed share, or the cascade kept the small answer)
    KEPT = "kept"  # the caller kept an earlier decision (a tracked person between reroutes)
    ESCALATED = "escalated"  # the cascade ran the small model first, then the large one, whose answer replaced it

    def __str__(self) -> str:
        return self.value


@dataclass
class Person:
    """One person: box x,y,w,h and keypoints (K,3) x,y,score in image pixels, the instance score, who answered."""

    index: int  # row of the frame's input boxes (detections given, or the detector's output)
    box: np.ndarray  # (4,)
    score: float  # instance score: rescored keypoint confidence x box score
    keypoints: np.ndarray  # (K,3)
    model: Role
    decision: Decision = Decision.POLICY
    box_score: float = 1.0
    router_score: float = float("nan")  # router score[1]; NaN when the policy ran no router for this person
    confidence: float = float("nan")  # the small model's confidence; NaN unless the cascade ran it first
    track_id: int | None = None  # set by the video loop's tracker (None: untracked or not yet confirmed)

    def to_coco(self, image_id: int, category_id: int = 1) -> dict[str, Any]:
        """A COCO keypoint result record (a non-finite score, from a broken engine, is written as 0)."""
        kp = np.nan_to_num(self.keypoints.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        return {
            "image_id": int(image_id),
            "category_id": category_id,
            "keypoints": [round(float(v), 3) for v in kp.reshape(-1)],
            "score": float(self.score) if np.isfinite(self.score) else 0.0,
        }

    def to_dict(self, exact: bool = False) -> dict[str, Any]:
        """A JSON-ready record; non-finite numbers become null (JSON has no NaN). Numbers are rounded (0.01 px)
        unless `exact`, which keeps every digit (the service answers so, equal to in-process results)."""
        d = None if exact else 2
        s = None if exact else 5
        out: dict[str, Any] = {
            "index": int(self.index),
            "box": [_finite(v, d) for v in self.box],
            "score": _finite(self.score, s),
            "box_score": _finite(self.box_score, s),
            "keypoints": [[_finite(x, d), _finite(y, d), _finite(c, None if exact else 4)] for x, y, c in self.keypoints],
            "model": self.model.value,
            "decision": self.decision.value,
            "router_score": _finite(self.router_score, s),
            "confidence": _finite(self.confidence, s),
            "track_id": self.track_id,
        }
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Person:
        """A person from its `to_dict()` record (null numbers back to NaN), e.g. a service answer."""
        kps = np.array([[_nan(v) for v in kp] for kp in d["keypoints"]], dtype=np.float32).reshape(-1, 3)
        return cls(
            index=int(d.get("index", -1)),
            box=np.array([_nan(v) for v in d["box"]], dtype=np.float64),
            score=_nan(d["score"]),
            box_score=_nan(d.get("box_score", 1.0)),
            keypoints=kps,
            model=Role.parse(d["model"], "person record 'model'", allowed=POSE_ROLES),
            decision=Decision(d.get("decision", Decision.POLICY.value)),
            router_score=_nan(d.get("router_score")),
            confidence=_nan(d.get("confidence")),
            track_id=d.get("track_id"),
        )


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _finite(v: Any, digits: int | None) -> float | None:
    f = float(v)
    if not np.isfinite(f):
        return None
    return f if digits is None else round(f, digits)
