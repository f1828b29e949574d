"""SimDR / SimCC (Li et al. 2021): HRNet features -> per-keypoint 1-D classification of x and of y.

The HRNet backbone is `dynpose/models/hrnet.py`'s, under `backbone.` as in the `sithu31296/pose-estimation`
release (`pose/models/simdr.py`); the head is the 1x1 heatmap conv (`final_layer`), each keypoint's map flattened,
and two linear layers to `input_width * split_ratio` x bins and `input_height * split_ratio` y bins. At 256x192 and
split ratio 2 the outputs are (N,17,384) and (N,17,512); `dynpose.runtime.decode.decode_simdr` reads them.

The authors' own release (`leeyegy/SimCC`, `lib/models/pose_hrnet.py`) holds the same tensors with the backbone's
names at the top level; `adapt_state_dict` moves them under `backbone.` so both load strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from dynpose.models.hrnet import HighResolutionBackbone

HEAD_NAMES = ("final_layer.", "mlp_head_x.", "mlp_head_y.")


class SimDR(nn.Module):
    """N x 3 x H x W crop -> (N x K x W*split_ratio x logits, N x K x H*split_ratio y logits)."""

    def __init__(
        self,
        width: int = 32,
        num_joints: int = 17,
        input_size: tuple[int, int] = (192, 256),
        split_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        in_w, in_h = input_size
        if in_w % 4 or in_h % 4:
            raise ValueError(f"SimDR input size must be a multiple of 4, got {input_size}")
        self.split_ratio = split_ratio
        self.backbone = HighResolutionBackbone(width)
        self.final_layer = nn.Conv2d(width, num_joints, kernel_size=1)
        # Each keypoint's stride-4 map, flattened, is the head's input (3072 = 64 x 48 at 256x192).
        features = (in_h // 4) * (in_w // 4)
        self.mlp_head_x = nn.Linear(features, int(in_w * split_ratio))
        self.mlp_head_y = nn.Linear(features, int(in_h * split_ratio))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.final_layer(self.backbone(x)).flatten(2)
        return self.mlp_head_x(maps), self.mlp_head_y(maps)

    @staticmethod
    def adapt_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The authors' flat layout (HRNet tensors at the top level) -> this model's `backbone.` names."""
        if any(k.startswith("backbone.") for k in sd):
            return sd
        return {k if k.startswith(HEAD_NAMES) else "backbone." + k: v for k, v in sd.items()}
