"""Stacked hourglass network (Newell et al. 2016) in MMPose's form: `HourglassNet` backbone + `CPMHead`.

MMPose's backbone (`mmpose/models/backbones/hourglass.py`, the CornerNet variant) is a 7x7/2 conv and a stride-2
residual block, then `num_stacks` recursive hourglass modules of BasicBlocks (5 halvings; widths 256, 256, 384,
384, 384, 512), with a 3x3 conv after each and 1x1 remaps between stacks. The head, as MMPose's COCO configs use it
(`CPMHead`, no deconvs), is one 1x1 conv per stack; the last stack's heatmaps are the output. Tensor names follow
MMPose (`stem`, `hourglass_modules`, `inters`, `conv1x1s`, `out_convs`, `remap_convs` in the backbone,
`multi_final_layers` in the head), so MMPose checkpoints load once their `backbone.` / `head.` /
`keypoint_head.` prefixes are removed. `hourglass_1` is MMPose's Hourglass-52, `hourglass_2` its Hourglass-104.

Five halvings from stride 4 need input sides that are multiples of 128 (MMPose trains it at 256x256 and 384x384).
"""

from __future__ import annotations

import torch
from torch import nn

STAGE_CHANNELS = (256, 256, 384, 384, 384, 512)
STAGE_BLOCKS = (2, 2, 2, 2, 2, 4)
DOWNSAMPLE_TIMES = 5


class ConvModule(nn.Module):
    """mmcv's `ConvModule` with BN: conv (no bias), `bn`, optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x if self.activate is None else self.activate(x)


class BasicBlock(nn.Module):
    """MMPose's ResNet `BasicBlock`: two 3x3 convs with BN (`bn1`, `bn2`), residual, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def res_layer(num_blocks: int, cin: int, cout: int, stride: int = 1, downsample_first: bool = True) -> nn.Sequential:
    """MMPose's `ResLayer` of BasicBlocks: the width change (and stride) sits on the first block, or on the last
    with `downsample_first=False` (hourglass decoders). Like MMPose it builds one block even for num_blocks=0."""
    if downsample_first:
        blocks = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(1, num_blocks)]
    else:
        blocks = [BasicBlock(cin, cin) for _ in range(num_blocks - 1)] + [BasicBlock(cin, cout, stride)]
    return nn.Sequential(*blocks)


class HourglassModule(nn.Module):
    """up1(x) + upsample(low3(low2(low1(x)))), low2 being the next-deeper hourglass (or blocks at the bottom)."""

    def __init__(self, depth: int, channels: tuple[int, ...], blocks: tuple[int, ...]) -> None:
        super().__init__()
        cur, nxt = channels[0], channels[1]
        self.up1 = res_layer(blocks[0], cur, cur)
        self.low1 = res_layer(blocks[0], cur, nxt, stride=2)
        self.low2: nn.Module = (
            HourglassModule(depth - 1, channels[1:], blocks[1:]) if depth > 1 else res_layer(blocks[1], nxt, nxt)
        )
        self.low3 = res_layer(blocks[0], nxt, cur, downsample_first=False)
        self.up2 = nn.Upsample(scale_factor=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up1(x) + self.up2(self.low3(self.low2(self.low1(x))))


class PoseHourglass(nn.Module):
    """N x 3 x H x W crop -> N x num_joints x H/4 x W/4 heatmaps of the last stack (H, W multiples of 128)."""

    def __init__(self, num_stacks: int = 1, num_joints: int = 17, feat_channel: int = 256) -> None:
        super().__init__()
        if num_stacks < 1:
            raise ValueError(f"num_stacks must be >= 1, got {num_stacks}")
        self.num_stacks = num_stacks
        cur = STAGE_CHANNELS[0]
        self.stem = nn.Sequential(ConvModule(3, 128, 7, stride=2), res_layer(1, 128, 256, stride=2))
        self.hourglass_modules = nn.ModuleList(
            HourglassModule(DOWNSAMPLE_TIMES, STAGE_CHANNELS, STAGE_BLOCKS) for _ in range(num_stacks)
        )
        # num_stacks - 1 blocks between stacks; MMPose's ResLayer still makes one (unused) for a single stack.
        self.inters = res_layer(num_stacks - 1, cur, cur)
        self.conv1x1s = nn.ModuleList(ConvModule(cur, cur, 1, relu=False) for _ in range(num_stacks - 1))
        self.out_convs = nn.ModuleList(ConvModule(cur, feat_channel, 3) for _ in range(num_stacks))
        self.remap_convs = nn.ModuleList(ConvModule(feat_channel, cur, 1, relu=False) for _ in range(num_stacks - 1))
        self.relu = nn.ReLU(inplace=True)
        # CPMHead without deconvs: one 1x1 conv per stack (the intermediate ones only supervise training).
        self.multi_final_layers = nn.ModuleList(
            nn.Conv2d(feat_channel, num_joints, kernel_size=1) for _ in range(num_stacks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inter = self.stem(x)
        last = self.num_stacks - 1
        for i in range(last):
            feat = self.out_convs[i](self.hourglass_modules[i](inter))
            inter = self.inters[i](self.relu(self.conv1x1s[i](inter) + self.remap_convs[i](feat)))
        return self.multi_final_layers[last](self.out_convs[last](self.hourglass_modules[last](inter)))
