"""LPN, "Simple and Lightweight Human Pose Estimation" (Zhang et al. 2019), as in the official `lib/models/lpn.py`.

A SimpleBaseline-shaped network made light: bottlenecks with a depthwise 3x3 and no channel expansion, each
followed by a global-context (GC) attention block, layer4 without stride (output stride 16), and two grouped
deconvolutions of 256 channels (each followed by a 1x1 conv) back to stride 4. Module names follow the official
code (conv1, bn1, layer1..4 with `att.conv_mask` / `att.channel_add_conv`, deconv_layers.0..11, final_layer), so
its plain state_dict checkpoints load as they are.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Bottleneck blocks per stage, as in ResNet-50/101/152.
LPN_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class GCBlock(nn.Module):
    """Global context block (GCNet) with attention pooling and the channel-add fusion only (LPN's 'GC')."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add_conv = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Softmax over all positions gives one attention-weighted mean feature vector per crop.
        weights = self.conv_mask(x).flatten(2).softmax(dim=2)  # N x 1 x HW
        context = torch.matmul(x.flatten(2), weights.transpose(1, 2)).unsqueeze(-1)  # N x C x 1 x 1
        return x + self.channel_add_conv(context)


class LWBottleneck(nn.Module):
    """1x1 -> depthwise 3x3 (carries the stride) -> 1x1, GC attention, residual; expansion 1."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        # Registered before `att`, as in the official block: the checkpoint lists downsample first.
        self.downsample = downsample
        self.att = GCBlock(planes, max(planes // 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.att(self.bn3(self.conv3(out)))
        return self.relu(out + residual)


class LPN(nn.Module):
    """N x 3 x H x W crop -> N x num_joints x H/4 x W/4 heatmaps (COCO configs: 256x192 -> 64x48)."""

    def __init__(self, depth: int = 50, num_joints: int = 17, deconv_channels: int = 256) -> None:
        super().__init__()
        if depth not in LPN_BLOCKS:
            raise ValueError(f"LPN depth must be one of {sorted(LPN_BLOCKS)}, got {depth}")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        blocks = LPN_BLOCKS[depth]
        self.layer1 = self._make_layer(64, blocks[0])
        self.layer2 = self._make_layer(128, blocks[1], stride=2)
        self.layer3 = self._make_layer(256, blocks[2], stride=2)
        self.layer4 = self._make_layer(512, blocks[3], stride=1)  # LPN keeps stride 16 here

        # Two x2 upsamplings (the configs' gd256x2): grouped deconv (groups = gcd of the widths), BN, ReLU, then a
        # 1x1 conv mixing the groups, BN, ReLU.
        deconv: list[nn.Module] = []
        for _ in range(2):
            deconv += [
                nn.ConvTranspose2d(
                    self.inplanes,
                    deconv_channels,
                    kernel_size=4,
                    stride=2,
                    padding=1,
                    groups=math.gcd(self.inplanes, deconv_channels),
                    bias=False,
                ),
                nn.BatchNorm2d(deconv_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(deconv_channels, deconv_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(deconv_channels),
                nn.ReLU(inplace=True),
            ]
            self.inplanes = deconv_channels
        self.deconv_layers = nn.Sequential(*deconv)
        self.final_layer = nn.Conv2d(deconv_channels, num_joints, kernel_size=1)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [LWBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [LWBottleneck(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.final_layer(self.deconv_layers(x))
