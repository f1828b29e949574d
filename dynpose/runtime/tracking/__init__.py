"""Video: person tracking, key-frame detection, temporal routing, one-euro smoothing, many streams at once.

- `tracker`: `Tracker` (IoU + OKS similarity, Hungarian matching, birth after `confirm` frames, death after
  `max_missed`), `Track`, `TrackerConfig`, `box_from_keypoints` (box IoU: `postprocess.iou_matrix`, exported here too);
- `smoothing`: `OneEuroFilter`, `OneEuroConfig`, `parse_smoothing` (`--smooth one-euro[:MIN_CUTOFF,BETA]`);
- `stream`: `VideoOptions`, `VideoTracker` (many streams over one Pipeline, one dispatch per step),
  `StreamTracker` (one stream's schedule and tracks), `TrackedPose` (a PersonPose with `track_id`);
- `agreement`: `pose_agreement` (mean OKS of one run's poses against another's, e.g. detection every 3rd frame
  against every frame).

`dynpose.runtime.process.process_video` runs sources into sinks with these.
"""

from dynpose.runtime.postprocess import iou_matrix
from dynpose.runtime.tracking.agreement import pose_agreement
from dynpose.runtime.tracking.smoothing import OneEuroConfig, OneEuroFilter, parse_smoothing
from dynpose.runtime.tracking.stream import StreamStats, StreamTracker, TrackedPose, VideoOptions, VideoTracker
from dynpose.runtime.tracking.tracker import Track, Tracker, TrackerConfig, box_from_keypoints

__all__ = [
    "OneEuroConfig",
    "OneEuroFilter",
    "StreamStats",
    "StreamTracker",
    "Track",
    "TrackedPose",
    "Tracker",
    "TrackerConfig",
    "VideoOptions",
    "VideoTracker",
    "box_from_keypoints",
    "iou_matrix",
    "parse_smoothing",
    "pose_agreement",
]
