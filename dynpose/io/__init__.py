"""What goes into and out of a run: frame sources (images, folders, videos, webcams), box sources (detections
files, ground truth, the detector), result sinks (COCO results, JSON lines, PoseTrack, drawings) and drawing.

- `sources`: `open_source`, `FrameSource`, `Frame`, `ReadAhead`, `read_image`, the header size check;
- `box_sources`: `BoxSource`, `FileBoxes`, `DetectorBoxes`;
- `sinks`: `ResultSink`, `CocoJsonSink`, `JsonLinesSink`, `PoseTrackSink`, `DrawingSink`, `Outputs`;
- `vis`: `draw_persons`, `VideoWriter`, `write_image`.
"""
