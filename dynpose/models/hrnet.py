"""HRNet pose network (Sun et al. 2019), structured like the official `pose_hrnet.py`.

The module tree (stem conv1/bn1/conv2/bn2, layer1, transition1..3, stage2..4 of HighResolutionModules with
branches/fuse_layers, final_layer) reproduces the official one so its state_dict names match official and
(after prefix removal) MMPose checkpoints exactly. W32 and W48 differ only in branch widths.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from dynpose.models.resnet import Bottleneck

# Per stage: (num_modules, blocks per branch); branch widths are width * 2**i. Identical for W32 and W48.
STAGES = {2: (1, 4), 3: (4, 4), 4: (3, 4)}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks, then every output branch sums all inputs resampled to its resolution."""

    def __init__(self, channels: list[int], num_blocks: int, multi_scale_output: bool = True) -> None:
        super().__init__()
        self.num_branches = len(channels)
        self.branches = nn.ModuleList(nn.Sequential(*[BasicBlock(c, c) for _ in range(num_blocks)]) for c in channels)
        n_out = self.num_branches if multi_scale_output else 1
        fuse_layers = []
        for i in range(n_out):
            row: list[nn.Module | None] = []
            for j in range(self.num_branches):
                if j > i:  # lower resolution: 1x1 conv to the width, then nearest upsampling
                    row.append(
                        nn.Sequential(
                            nn.Conv2d(channels[j], channels[i], kernel_size=1, bias=False),
                            nn.BatchNorm2d(channels[i]),
                            nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
                        )
                    )
                elif j == i:
                    row.append(None)
                else:  # higher resolution: a chain of stride-2 3x3 convs; only the last changes width, no ReLU
                    steps = [_conv_bn(channels[j], channels[j], 3, 2, relu=True) for _ in range(i - j - 1)]
                    steps.append(_conv_bn(channels[j], channels[i], 3, 2, relu=False))
                    row.append(nn.Sequential(*steps))
            # None keeps the official index positions (j == i has no fuse layer); ModuleList registers it as is
            fuse_layers.append(nn.ModuleList(row))  # type: ignore[arg-type]
        self.fuse_layers = nn.ModuleList(fuse_layers)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        x = [branch(xi) for branch, xi in zip(self.branches, x, strict=True)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = x[i]
            for j, fuse in enumerate(cast(nn.ModuleList, row)):
                if j != i:
                    y = y + fuse(x[j])
            out.append(self.relu(y))
        return out


def _transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
    """Adapt existing branches whose width changes and grow new ones by stride-2 convs from the lowest branch."""
    layers: list[nn.Module | None] = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(_conv_bn(pre[i], c, 3, 1, relu=True) if pre[i] != c else None)
        else:
            # Wrapped in an outer Sequential: the official code supports several steps here, hence `.0.0.` names.
            layers.append(nn.Sequential(_conv_bn(pre[-1], c, 3, 2, relu=True)))
    return nn.ModuleList(layers)  # type: ignore[arg-type]  # None: a branch that passes through unchanged


class HighResolutionBackbone(nn.Module):
    """N x 3 x H x W crop -> N x width x H/4 x W/4 features of the highest-resolution branch (no head).

    Shared by the heatmap HRNet below and SimDR (`dynpose/models/simdr.py`), whose checkpoints hold these tensors
    under `backbone.`.
    """

    # set with setattr per stage (the official names); declared for the type checker
    transition1: nn.ModuleList
    transition2: nn.ModuleList
    transition3: nn.ModuleList

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)

        downsample = nn.Sequential(nn.Conv2d(64, 256, kernel_size=1, bias=False), nn.BatchNorm2d(256))
        self.layer1 = nn.Sequential(Bottleneck(64, 64, downsample=downsample), *[Bottleneck(256, 64) for _ in range(3)])

        pre = [256]
        for stage in (2, 3, 4):
            num_modules, num_blocks = STAGES[stage]
            channels = [width * 2**i for i in range(stage)]
            setattr(self, f"transition{stage - 1}", _transition(pre, channels))
            modules = [
                # Only the highest-resolution output of the very last module is used, so it fuses just that one.
                HighResolutionModule(channels, num_blocks, multi_scale_output=not (stage == 4 and m == num_modules - 1))
                for m in range(num_modules)
            ]
            setattr(self, f"stage{stage}", nn.Sequential(*modules))
            pre = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        x = self.layer1(x)
        xs = [x]
        for stage, transition in ((2, self.transition1), (3, self.transition2), (4, self.transition3)):
            # Existing branches pass through (or get re-widthed); a new branch grows from the lowest resolution.
            xs = [xs[i] if t is None else t(xs[i] if i < len(xs) else xs[-1]) for i, t in enumerate(transition)]
            xs = getattr(self, f"stage{stage}")(xs)
        return xs[0]


class PoseHighResolutionNet(HighResolutionBackbone):
    """N x 3 x H x W crop -> N x num_joints x H/4 x W/4 heatmaps from the highest-resolution branch."""

    def __init__(self, width: int = 32, num_joints: int = 17) -> None:
        super().__init__(width)
        # Registered after the backbone, as in the official module: state_dict order = checkpoint order.
        self.final_layer = nn.Conv2d(width, num_joints, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer(super().forward(x))
