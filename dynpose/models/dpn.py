"""Dual-Path Network for pose estimation, as in `ps259685/Dual-Path-Network-for-human-pose-estimation`
(`DPN/exps/DPN.coco/network.py`, class `RSN`, 4 stages, 256 upsample channels).

An RSN/MSPN-style multi-stage network: a shared stem (`top`), then per stage a ResNet-like encoder of
multi-branch blocks (MBSAC: chained asymmetric k x 1 / 1 x k convs of kernel 3/5/7/9; MBIRAC: inverted-residual
depthwise versions) and a 4-level upsampling decoder whose three coarser levels pass half their channels through a
pose feature extractor (PFE, channel + spatial attention). Stages hand skips and a cross-stage feature to the next.

Module names follow the official code so its checkpoints (saved as `{"model": state_dict}`) load strictly. As
there, every conv has a bias and every `conv_bn_relu` owns a BatchNorm even where its forward skips it.
Deployment needs only the last stage's finest heatmaps (what the official forward returns without labels), so the
intermediate heatmap heads (`res_conv1/2` of the other units) keep their tensors but are not run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCKS_PER_LAYER = 2  # blocks in each of layer1..4 (the official `self.layers = [2, 2, 2, 2]`)
ENCODER_WIDTHS = (64, 128, 256, 512)
# (kernel, expansion of the inverted-residual branch) of the four branch pairs, in the official order.
BRANCHES = ((3, 4), (5, 4), (7, 3), (9, 3))


class ConvBNReLU(nn.Module):
    """The official `conv_bn_relu`: conv with bias, a BatchNorm that exists even when `has_bn` is off, ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        groups: int = 1,
        has_bn: bool = True,
        has_relu: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=kernel, stride=stride, padding=padding, groups=groups)
        self.has_bn = has_bn
        self.has_relu = has_relu
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.has_bn:
            x = self.bn(x)
        if self.has_relu:
            x = self.relu(x)
        return x


def _asymmetric(channels: int, k: int, groups: int) -> tuple[ConvBNReLU, ConvBNReLU]:
    """k x 1 conv (no BN, no ReLU), then 1 x k conv + BN + ReLU: a k x k receptive field at 2k weights."""
    return (
        ConvBNReLU(channels, channels, (k, 1), padding=(k // 2, 0), groups=groups, has_bn=False, has_relu=False),
        ConvBNReLU(channels, channels, (1, k), padding=(0, k // 2), groups=groups),
    )


class AsymBranch(nn.Module):
    """MBSAC branch (`Branch_3x3`, `branch_5x5`, ...): the attribute names carry the kernel size."""

    def __init__(self, channels: int, k: int) -> None:
        super().__init__()
        self.k = k
        first, second = _asymmetric(channels, k, groups=1)
        setattr(self, f"conv_{k}x{k}_1", first)
        setattr(self, f"conv_{k}x{k}_2", second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        return getattr(self, f"conv_{k}x{k}_2")(getattr(self, f"conv_{k}x{k}_1")(x))


class InvertedAsymBranch(nn.Module):
    """MBIRAC branch (`branch_3x3_2`, ...): 1x1 expansion, depthwise asymmetric pair, 1x1 projection, residual."""

    def __init__(self, channels: int, k: int, expansion: int) -> None:
        super().__init__()
        self.k = k
        wide = channels * expansion
        # The official 3x3 branch calls its expansion `exp_conv`, the others `expansion_conv`.
        self.expand_name = "exp_conv" if k == 3 else "expansion_conv"
        setattr(self, self.expand_name, ConvBNReLU(channels, wide, 1, has_bn=False))
        first, second = _asymmetric(wide, k, groups=wide)
        setattr(self, f"conv_{k}x{k}_1", first)
        setattr(self, f"conv_{k}x{k}_2", second)
        self.conv_projection = ConvBNReLU(wide, channels, 1, has_bn=False, has_relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        out = getattr(self, self.expand_name)(x)
        out = getattr(self, f"conv_{k}x{k}_2")(getattr(self, f"conv_{k}x{k}_1")(out))
        return self.conv_projection(out) + x


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    _, c, h, w = x.shape
    return x.reshape(-1, groups, c // groups, h, w).transpose(1, 2).reshape(-1, c, h, w)


class DualPathBlock(nn.Module):
    """The official `Bottleneck`: a 1x1 conv to 8 slices; 4 chained MBSAC branches (dense path) and 4 chained MBIRAC
    branches (residual path), concatenated, channel-shuffled, 1x1 back to `planes`, residual."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.branch_ch = in_planes * 26 // 64
        c = self.branch_ch
        self.conv_bn_relu1 = ConvBNReLU(in_planes, 8 * c, 1, stride=stride)
        self.seq = ConvBNReLU(8 * c, planes, 1, has_relu=False)
        # Per kernel k (BRANCHES): the dense branch, its conv_std, the inverted-residual branch (official order).
        self.branch_3x3 = AsymBranch(c, 3)
        self.conv_std_1 = ConvBNReLU(c, c, 3, padding=1)
        self.branch_3x3_2 = InvertedAsymBranch(c, *BRANCHES[0])
        self.branch_5x5 = AsymBranch(c, 5)
        self.conv_std_2 = ConvBNReLU(c, c, 3, padding=1)
        self.branch_5x5_2 = InvertedAsymBranch(c, *BRANCHES[1])
        self.branch_7x7 = AsymBranch(c, 7)
        self.conv_std_3 = ConvBNReLU(c, c, 3, padding=1)
        self.branch_7x7_2 = InvertedAsymBranch(c, *BRANCHES[2])
        self.branch_9x9 = AsymBranch(c, 9)
        self.conv_std_4 = ConvBNReLU(c, c, 3, padding=1)
        self.branch_9x9_2 = InvertedAsymBranch(c, *BRANCHES[3])
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spx = torch.split(self.conv_bn_relu1(x), self.branch_ch, 1)
        # Dense path: each branch feeds the next, each conv_std mixes a branch with its predecessor's result.
        o3 = self.branch_3x3(spx[0])
        o5 = self.branch_5x5(spx[1] + o3)
        o3 = self.conv_std_1(o3)
        o7 = self.branch_7x7(spx[2] + o5)
        o5 = self.conv_std_2(o5 + o3)
        o9 = self.branch_9x9(spx[3] + o7)
        o7 = self.conv_std_3(o7 + o5)
        o9 = self.conv_std_4(o9 + o7)
        # Residual path: inverted-residual branches, each summed with the previous one, plus its own slice.
        r3 = self.branch_3x3_2(spx[4])
        r5 = self.branch_5x5_2(spx[5]) + r3
        r7 = self.branch_7x7_2(spx[6]) + r5
        r9 = self.branch_9x9_2(spx[7]) + r7
        out = torch.cat((o3, o5, o7, o9, r3 + spx[4], r5 + spx[5], r7 + spx[6], r9 + spx[7]), 1)
        out = self.seq(channel_shuffle(out, 2))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class PFE(nn.Module):
    """Pose feature extractor: out * (1 + channel attention * spatial attention)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.channels = channels
        self.conv_bn_relu_pfe_1 = ConvBNReLU(channels, channels, 3, padding=1)
        self.conv_bn_relu_pfe_2_2 = ConvBNReLU(channels, channels, 1)
        self.sigmoid2 = nn.Sigmoid()
        self.conv_bn_relu_pfe_3_1 = ConvBNReLU(channels, channels, 1)
        self.conv_std_1 = ConvBNReLU(half, half, 3, padding=1)
        self.conv_std_2 = ConvBNReLU(half, half, 3, padding=1)
        self.conv_std_3 = ConvBNReLU(half, half, 3, padding=1)
        self.conv_std_4 = ConvBNReLU(half, half, 3, padding=1)
        self.conv_bn_relu_pfe_4 = ConvBNReLU(channels * 2, channels, 1)
        self.sigmoid3 = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_bn_relu_pfe_1(x)
        channel = self.sigmoid2(self.conv_bn_relu_pfe_2_2(F.adaptive_avg_pool2d(out, (1, 1))))
        a, b = _halves(self.conv_bn_relu_pfe_3_1(out), self.channels)
        b1 = self.conv_std_2(self.conv_std_1(b))
        b2 = self.conv_std_4(self.conv_std_3(b1))
        spatial = self.sigmoid3(self.conv_bn_relu_pfe_4(torch.cat((a, b, b1, b2), dim=1)))
        return out * (1 + channel * spatial)


def _halves(x: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official `split`: first round(channels / 2) channels, the rest (channels known here, not read from the
    tensor, so tracing keeps plain slices)."""
    c1 = round(channels * 0.5)
    return x[:, :c1], x[:, c1:]


def _encoder_layer(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = ConvBNReLU(in_planes, planes, 1, stride=stride, has_relu=False)
    blocks = [DualPathBlock(in_planes, planes, stride, downsample)]
    blocks += [DualPathBlock(planes, planes) for _ in range(1, BLOCKS_PER_LAYER)]
    return nn.Sequential(*blocks)


class Encoder(nn.Module):
    """The official `ResNet_downsample_module`: layer1..4 of two blocks each; later stages add the skips."""

    def __init__(self, has_skip: bool) -> None:
        super().__init__()
        self.has_skip = has_skip
        self.layer1 = _encoder_layer(64, ENCODER_WIDTHS[0], 1)
        self.layer2 = _encoder_layer(ENCODER_WIDTHS[0], ENCODER_WIDTHS[1], 2)
        self.layer3 = _encoder_layer(ENCODER_WIDTHS[1], ENCODER_WIDTHS[2], 2)
        self.layer4 = _encoder_layer(ENCODER_WIDTHS[2], ENCODER_WIDTHS[3], 2)

    def forward(
        self, x: torch.Tensor, skip1: list[torch.Tensor] | None, skip2: list[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        """-> [x4, x3, x2, x1], coarsest first (the decoder's order)."""
        feats = []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            if self.has_skip and skip1 is not None and skip2 is not None:
                x = x + skip1[i] + skip2[i]
            feats.append(x)
        return feats[::-1]


class UpsampleUnit(nn.Module):
    """One decoder level (`Upsample_unit`): lateral 1x1 + upsampled coarser level, its heatmap head, the skips."""

    def __init__(
        self,
        ind: int,
        in_planes: int,
        up_size: tuple[int, int],
        num_joints: int,
        output_shape: tuple[int, int],
        chl_num: int,
        gen_skip: bool,
        gen_cross_conv: bool,
    ) -> None:
        super().__init__()
        self.ind, self.up_size, self.output_shape = ind, up_size, output_shape
        self.u_skip = ConvBNReLU(in_planes, chl_num, 1, has_relu=False)
        self.relu = nn.ReLU(inplace=True)
        if ind > 0:
            self.up_conv = ConvBNReLU(chl_num, chl_num, 1, has_relu=False)
        self.gen_skip = gen_skip
        if gen_skip:
            self.skip1 = ConvBNReLU(in_planes, in_planes, 1)
            self.skip2 = ConvBNReLU(chl_num, in_planes, 1)
        self.gen_cross_conv = ind == 3 and gen_cross_conv
        if self.gen_cross_conv:
            self.cross_conv = ConvBNReLU(chl_num, 64, 1)
        self.res_conv1 = ConvBNReLU(chl_num, chl_num, 1)
        self.res_conv2 = ConvBNReLU(chl_num, num_joints, 3, padding=1, has_relu=False)

    def forward(self, x: torch.Tensor, up_x: torch.Tensor | None) -> torch.Tensor:
        out = self.u_skip(x)
        if self.ind > 0 and up_x is not None:
            up_x = F.interpolate(up_x, size=self.up_size, mode="bilinear", align_corners=True)
            out = out + self.up_conv(up_x)
        return self.relu(out)

    def heatmaps(self, out: torch.Tensor) -> torch.Tensor:
        res = self.res_conv2(self.res_conv1(out))
        if tuple(res.shape[-2:]) != tuple(self.output_shape):  # the finest level is already at output size
            res = F.interpolate(res, size=self.output_shape, mode="bilinear", align_corners=True)
        return res


class Decoder(nn.Module):
    """The official `Upsample_module`: up1 (coarsest) .. up4 (finest), PFE on half the channels of up1..up3."""

    def __init__(
        self, num_joints: int, output_shape: tuple[int, int], chl_num: int, gen_skip: bool, gen_cross_conv: bool
    ) -> None:
        super().__init__()
        h, w = output_shape
        self.chl_num = chl_num
        up_sizes = [(h // 8, w // 8), (h // 4, w // 4), (h // 2, w // 2), (h, w)]
        units = [
            UpsampleUnit(i, in_planes, up_sizes[i], num_joints, output_shape, chl_num, gen_skip, gen_cross_conv)
            for i, in_planes in enumerate(ENCODER_WIDTHS[::-1])
        ]
        self.up1, self.up2, self.up3, self.up4 = units
        self.PFE_for_out1 = PFE(chl_num // 2)
        self.PFE_for_out2 = PFE(chl_num // 2)
        self.PFE_for_out3 = PFE(chl_num // 2)

    def forward(
        self, feats: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[torch.Tensor] | None, torch.Tensor | None]:
        """[x4, x3, x2, x1] -> (finest level's features, skip1, skip2 (finest first), cross-stage features)."""
        units = (self.up1, self.up2, self.up3, self.up4)
        pfes = (self.PFE_for_out1, self.PFE_for_out2, self.PFE_for_out3)
        skip1, skip2 = [], []
        up: torch.Tensor | None = None
        out = feats[0]
        for i, (unit, x) in enumerate(zip(units, feats, strict=True)):
            out = unit(x, up)
            if unit.gen_skip:
                skip1.append(unit.skip1(x))
                skip2.append(unit.skip2(out))
            if i < 3:
                a, b = _halves(out, self.chl_num)
                up = torch.cat((pfes[i](a), b), 1)
        cross = self.up4.cross_conv(out) if self.up4.gen_cross_conv else None
        if not skip1:
            return out, None, None, cross
        return out, skip1[::-1], skip2[::-1], cross


class SingleStage(nn.Module):
    """The official `Single_stage_module`: encoder (`downsample`) + decoder (`upsample`)."""

    def __init__(self, num_joints: int, output_shape: tuple[int, int], chl_num: int, first: bool, last: bool) -> None:
        super().__init__()
        self.downsample = Encoder(has_skip=not first)
        self.upsample = Decoder(num_joints, output_shape, chl_num, gen_skip=not last, gen_cross_conv=not last)


class Stem(nn.Module):
    """The official `ResNet_top`: 7x7 stride-2 conv + BN + ReLU, 3x3 stride-2 max pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = ConvBNReLU(3, 64, 7, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.conv(x))


class DPN(nn.Module):
    """N x 3 x H x W BGR crop -> N x num_joints x H/4 x W/4 heatmaps of the last stage's finest level."""

    def __init__(
        self,
        num_joints: int = 17,
        input_size: tuple[int, int] = (192, 256),
        stages: int = 4,
        upsample_channels: int = 256,
    ) -> None:
        super().__init__()
        in_w, in_h = input_size
        if in_w % 32 or in_h % 32:
            raise ValueError(f"DPN input size must be a multiple of 32 (five stride-2 steps), got {input_size}")
        self.stages = stages
        output_shape = (in_h // 4, in_w // 4)
        self.top = Stem()
        for i in range(stages):
            stage = SingleStage(num_joints, output_shape, upsample_channels, first=i == 0, last=i == stages - 1)
            setattr(self, f"stage{i}", stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.top(x)
        skip1: list[torch.Tensor] | None = None
        skip2: list[torch.Tensor] | None = None
        out = x
        for i in range(self.stages):
            stage = getattr(self, f"stage{i}")
            out, skip1, skip2, cross = stage.upsample(stage.downsample(x, skip1, skip2))
            if cross is not None:
                x = cross
        return getattr(self, f"stage{self.stages - 1}").upsample.up4.heatmaps(out)
