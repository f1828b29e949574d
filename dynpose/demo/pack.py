"""Maintainers' tool: (re)make `dynpose/demo/assets/` from the project's fixtures and write its sha256 index.

    python -m dynpose.demo.pack ../shared

copies the COCO samples and the street video, packs the three ONNX models as lossless fp16 (`assets.pack_fp16`),
copies the TinyPose cards from `examples/cards/`, and writes `assets.json`. The assets' README is kept by hand.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from dynpose.demo.assets import ASSETS_DIR, Unpacked, pack_fp16, write_index
from dynpose.demo.layout import CARDS, COCO_ANN, COCO_IMAGES, PACKED_MODELS, VIDEO

REPO = Path(__file__).resolve().parents[2]
# shipped path -> path under ../shared (models: the fp32 file each packed model rebuilds)
FROM_SHARED = {
    **{rel: f"models/{Path(rel).name.removesuffix('.f16')}" for rel in PACKED_MODELS},
    **{rel: f"data/coco/{Path(rel).name}" for rel in (*COCO_IMAGES, COCO_ANN)},
    VIDEO: "data/video/street.mp4",
}


def pack_assets(shared: str | os.PathLike, root: str | os.PathLike = ASSETS_DIR) -> Path:
    """Fill `root` from `shared` (and `examples/cards/`) and write its index; returns the index file."""
    shared, root = Path(shared), Path(root)
    unpacked: dict[str, Unpacked] = {}
    for rel, src in FROM_SHARED.items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in PACKED_MODELS:
            unpacked[rel] = pack_fp16(shared / src, dst)
        else:
            shutil.copyfile(shared / src, dst)
    for rel in CARDS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / "examples" / rel, root / rel)
    return write_index(root, unpacked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shared", type=Path, help="the fixtures folder (../shared beside the checkout)")
    ap.add_argument("--root", type=Path, default=ASSETS_DIR, help="assets folder to fill (default: the package's)")
    a = ap.parse_args()
    print(f"wrote {pack_assets(a.shared, a.root)}")


if __name__ == "__main__":
    main()
