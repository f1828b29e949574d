"""Which shipped file (relative to `dynpose/demo/assets/`) plays which part in the demo."""

from __future__ import annotations

from dynpose.roles import Role

# The demo pair (TinyPose 128x96 small, 256x192 large; PaddleDetection) and the PicoDet-S 320 pedestrian detector
# (11 of the 11 large COCO sample persons found, the 192 one 10; ../shared/models/README.md), fp16-packed.
PACKED: dict[Role, str] = {
    Role.SMALL: "models/tinypose_128x96.onnx.f16",
    Role.LARGE: "models/tinypose_256x192.onnx.f16",
    Role.DETECTOR: "models/picodet_s_320_pedestrian.onnx.f16",
}
PACKED_MODELS: tuple[str, ...] = tuple(PACKED.values())
# The pose models' cards: the same files as examples/cards/ (tests/test_demo_assets.py checks it).
CARD: dict[Role, str] = {Role.SMALL: "cards/tinypose_128x96.json", Role.LARGE: "cards/tinypose_256x192.json"}
CARDS: tuple[str, ...] = tuple(CARD.values())
# MMPose's COCO test sample: 4 val2017 images, 14 annotated persons (licences in assets/README.md).
COCO_DIR = "coco"
COCO_IMAGES: tuple[str, ...] = tuple(
    f"{COCO_DIR}/{stem}.jpg" for stem in ("000000000785", "000000040083", "000000196141", "000000197388")
)
COCO_ANN = f"{COCO_DIR}/test_coco.json"
# 5 frames (960x540, 5 fps) of a street from MMPose's demo video.
VIDEO = "video/street.mp4"
