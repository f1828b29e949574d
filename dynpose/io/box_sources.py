"""Box sources: where a frame's person boxes come from, behind one small protocol.

    boxes(frame) -> (M,4|5) x,y,w,h[,score] array, or None to let the Pipeline run its detector

- `FileBoxes.detections(...)`: a COCO-format detections file (boxes with scores: the Pipeline applies OKS-NMS);
- `FileBoxes.ground_truth(...)`: the annotated persons of a COCO annotation file (boxes without scores, no NMS, as
  the official HRNet / MMPose GT-box evaluation);
- `DetectorBoxes()`: the Pipeline's detector (the engine dir's, or `--detector FILE.onnx`).

File sources name images by COCO image id: through the annotation file's `file_name`s when one is given (as MMPose
pairs its bbox_file with ann_file), else by numeric file stems (COCO's `000000000785.jpg` is id 785). A source
sets `frame.image_id`, which the COCO-results sink uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from dynpose.errors import DynPoseError
from dynpose.io.sources import Frame
from dynpose.roles import Role


class BoxSource(Protocol):
    """Where the person boxes of a frame come from."""

    name: str

    def boxes(self, frame: Frame) -> np.ndarray | None:
        """(M,4|5) x,y,w,h[,score] boxes of the frame, or None: the Pipeline's detector finds them."""
        ...


@dataclass
class DetectorBoxes:
    """Boxes from the Pipeline's detector."""

    name: str = Role.DETECTOR.value

    def boxes(self, frame: Frame) -> np.ndarray | None:
        return None


def _ids_by_path(source: str | os.PathLike, ann: str | os.PathLike) -> dict[Path, int]:
    """Resolved image path -> COCO image id, from an annotation file's file names."""
    from dynpose.data import image_id_map, load_coco

    root = Path(source) if Path(source).is_dir() else Path(source).parent
    return {p.resolve(): iid for iid, p in image_id_map(root, load_coco(ann)).items()}


@dataclass
class FileBoxes:
    """Boxes named by COCO image id. Counts what it could not place, for the run's summary."""

    by_id: dict[int, np.ndarray]
    source: Path  # the image or folder the frames come from (frame names are relative to it)
    name: str
    ids: dict[Path, int] | None = None  # from an annotation file; None: numeric file stems
    matched: int = 0  # frames whose image id has boxes
    no_id: list[str] = field(default_factory=list)  # frames without an image id

    @classmethod
    def detections(
        cls, path: str | os.PathLike, source: str | os.PathLike, score_thr: float = 0.0, ann: str | os.PathLike | None = None
    ) -> FileBoxes:
        """A COCO-format detections file (person boxes at or above `score_thr`)."""
        from dynpose.data import load_detections

        dets = load_detections(path, score_thr=score_thr)
        if not dets:
            raise DynPoseError(f"detections file {path}: no person boxes (at --det-score {score_thr})")
        return cls(dets, Path(source), f"detections file {path}", _ids_by_path(source, ann) if ann else None)

    @classmethod
    def ground_truth(cls, ann: str | os.PathLike, source: str | os.PathLike) -> FileBoxes:
        """Every non-crowd annotated person with a labelled keypoint, as (M,4) boxes (score 1, no OKS-NMS)."""
        from dynpose.data import gt_boxes, load_coco

        by_id: dict[int, list[np.ndarray]] = {}
        for iid, box, _ in gt_boxes(load_coco(ann)):
            by_id.setdefault(iid, []).append(box)
        if not by_id:
            raise DynPoseError(f"--gt-boxes {ann}: no annotated person with a labelled keypoint")
        boxes = {iid: np.asarray(b, dtype=np.float64) for iid, b in by_id.items()}
        return cls(boxes, Path(source), f"ground truth {ann}", _ids_by_path(source, ann))

    def boxes(self, frame: Frame) -> np.ndarray:
        if self.ids is not None:
            path = (self.source / frame.name if self.source.is_dir() else self.source).resolve()
            frame.image_id = self.ids.get(path)
        if frame.image_id is None:
            self.no_id.append(frame.name)
            return np.zeros((0, 5))
        self.matched += frame.image_id in self.by_id
        return self.by_id.get(frame.image_id, np.zeros((0, 5)))
