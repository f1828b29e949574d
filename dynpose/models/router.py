"""The DynPose image router (CVPR 2025): a ~0.85 M-parameter CNN scoring how hard a person crop is.

It sees the same normalised 256x192 crop as the pose models, reduces it to one grey channel (channel mean) at half
resolution, and runs a small conv stack with spatial-group attention (SGE) and partial convolutions. Module
names match the released `backbone.pth` (minus its `backbone.` prefix). The release returns `(input, scores)` for
MMPose; here the forward returns only the N x 3 sigmoid scores, which is all the runtime needs.
"""

from __future__ import annotations

import torch
from torch import nn


class SpatialGroupEnhance(nn.Module):
    """SGE attention (Li et al. 2019): per channel group, gate each position by its normalised similarity to the
    group's global descriptor."""

    def __init__(self, groups: int = 8) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, groups, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        g = self.groups
        # -1 for the batch axis keeps the ONNX graph free of a fixed batch size.
        xg = x.reshape(-1, c // g, h, w)
        t = (xg * xg.mean(dim=(2, 3), keepdim=True)).sum(dim=1).flatten(1)
        t = t - t.mean(dim=1, keepdim=True)
        t = t / (t.std(dim=1, keepdim=True) + 1e-5)
        t = t.reshape(-1, g, h, w) * self.weight + self.bias
        xg = xg * torch.sigmoid(t.reshape(-1, 1, h, w))
        return xg.reshape(-1, c, h, w)


class PartialConv3(nn.Module):
    """FasterNet partial convolution: a 3x3 conv over the first quarter of the channels, the rest pass through."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim_conv = dim // 4
        self.partial_conv3 = nn.Conv2d(self.dim_conv, self.dim_conv, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.partial_conv3(x[:, : self.dim_conv]), x[:, self.dim_conv :]), dim=1)


class DynPoseRouter(nn.Module):
    """N x 3 x 256 x 192 normalised crop -> N x 3 routing scores in (0, 1)."""

    # added with add_module in a loop (the release's numbering); declared for the type checker
    bn1: nn.BatchNorm2d
    bn2: nn.BatchNorm2d
    bn3: nn.BatchNorm2d
    bn4: nn.BatchNorm2d
    bn5: nn.BatchNorm2d
    bn6: nn.BatchNorm2d
    bn7: nn.BatchNorm2d
    bn8: nn.BatchNorm2d

    def __init__(self) -> None:
        super().__init__()
        self.avg_pool = nn.AvgPool2d(kernel_size=2)
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, stride=1, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1)
        self.pconv3 = PartialConv3(64)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=1)
        self.conv3_1 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=3, stride=2, padding=1)
        self.pconv5 = PartialConv3(128)
        self.conv5 = nn.Conv2d(128, 128, kernel_size=1)
        self.conv5_1 = nn.Conv2d(128, 128, kernel_size=3, stride=2, padding=1)
        self.conv6 = nn.Conv2d(128, 128, kernel_size=3, stride=2, padding=1)
        # bnK numbering follows the release, not the order of use (bn7/bn8 follow conv3_1/conv5_1).
        for k, c in enumerate((32, 64, 64, 128, 128, 128, 64, 128), start=1):
            self.add_module(f"bn{k}", nn.BatchNorm2d(c))
        # 128 channels x 4 x 3 after five stride-2 steps from 128x96: the flat 1536 features.
        self.layer1 = nn.Conv2d(1536, 256, kernel_size=1)
        self.layer2 = nn.Conv2d(256, 3, kernel_size=1)
        self.sge1 = SpatialGroupEnhance(groups=8)
        self.sge2 = SpatialGroupEnhance(groups=8)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.relu
        x = self.avg_pool(x.mean(dim=1, keepdim=True))
        x = r(self.bn1(self.conv1(x)))
        x = r(self.bn2(self.sge1(self.conv2(x))))
        x = r(self.bn7(self.conv3_1(x)))
        x = r(self.bn3(self.conv3(self.pconv3(x))))
        x = r(self.bn4(self.sge2(self.conv4(x))))
        x = r(self.bn8(self.conv5_1(x)))
        x = r(self.bn5(self.conv5(self.pconv5(x))))
        x = r(self.bn6(self.conv6(x)))
        x = x.flatten(1)[:, :, None, None]
        x = self.layer2(r(self.layer1(x)))
        return torch.sigmoid(x.flatten(1))
