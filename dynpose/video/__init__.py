"""Frames in, persons out: the one run loop for images, folders, videos and webcams, and what follows persons
from frame to frame.

- `loop`: `run` (sources -> Pipeline -> sinks, many sources at once), `LoopOptions`, `RunReport`, `StreamError`;
- `tracking`: `StreamTracker` (one stream's key frames, boxes from tracks, temporal routing, smoothing),
  `VideoOptions`, `StreamStats`;
- `tracker`: `Tracker` (IoU + OKS similarity, Hungarian matching, birth after `confirm` frames, death after
  `max_missed`), `Track`, `TrackerConfig`, `box_from_keypoints`;
- `smoothing`: `OneEuroFilter`, `OneEuroConfig`, `parse_smoothing` (`--smooth one-euro[:MIN_CUTOFF,BETA]`);
- `agreement`: `pose_agreement` (mean OKS of one run's poses against another's, e.g. detection every 3rd frame
  against every frame).

An image folder is a stream of unrelated frames to this package: untracked, its frames are batched together.
"""

from dynpose.video.agreement import pose_agreement
from dynpose.video.loop import LoopOptions, RunReport, StreamError, StreamReport, run
from dynpose.video.smoothing import OneEuroConfig, OneEuroFilter, parse_smoothing
from dynpose.video.tracker import Track, Tracker, TrackerConfig, box_from_keypoints
from dynpose.video.tracking import StreamStats, StreamTracker, VideoOptions

__all__ = [
    "LoopOptions",
    "OneEuroConfig",
    "OneEuroFilter",
    "RunReport",
    "StreamError",
    "StreamReport",
    "StreamStats",
    "StreamTracker",
    "Track",
    "Tracker",
    "TrackerConfig",
    "VideoOptions",
    "box_from_keypoints",
    "parse_smoothing",
    "pose_agreement",
    "run",
]
