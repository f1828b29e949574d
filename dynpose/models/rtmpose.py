"""RTMPose (Jiang et al. 2023) as in MMPose 1.x: a CSPNeXt backbone, the RTMCC head (a 7x7 keypoint conv, each
keypoint's stride-32 map flattened through ScaleNorm + a linear layer into a 256-wide token, one gated attention
unit across the keypoint tokens, and two linear classifiers) and SimCC outputs: per keypoint, x logits over
`input_width * 2` bins and y logits over `input_height * 2` bins ((N,17,384) and (N,17,512) at 256x192).

Module names are MMPose 1.x's own (`mmpose/models/backbones/cspnext.py` CSPNeXt with mmcv ConvModules `.conv` /
`.bn`, `mmpose/models/utils/csp_layer.py`, `mmpose/models/heads/coord_cls_heads/rtmcc_head.py`,
`mmpose/models/utils/rtmcc_block.py`), under `backbone.` and `head.` as in a released checkpoint's state_dict, so
the model's state_dict is exactly the released one (`../shared/layouts/rtmpose_*.mmpose.json`). Only the inference
path of the configs is built: SyncBN is BatchNorm (eps 1e-5), and the GAU's options the configs switch off
(relative position bias, rotary encoding, dropout, drop path) are not there.

Every operation exports to standard ONNX ops (opset 17): ScaleNorm is ReduceL2 / Max / Div, the GAU is MatMul,
Split, ReLU, Mul; CSPNeXt's channel attention is GlobalAveragePool + HardSigmoid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# CSPNeXt P5 stages: (in channels, out channels, blocks, shortcut in the blocks, SPP) before widen/deepen factors.
P5 = ((64, 128, 3, True, False), (128, 256, 6, True, False), (256, 512, 6, True, False), (512, 1024, 3, False, True))


@dataclass(frozen=True)
class RTMPoseSize:
    """One RTMPose config's backbone factors (configs/body_2d_keypoint/rtmpose/coco/rtmpose-{t,s,m,l}_*.py)."""

    deepen: float
    widen: float


SIZES = {
    "t": RTMPoseSize(deepen=0.167, widen=0.375),
    "s": RTMPoseSize(deepen=0.33, widen=0.5),
    "m": RTMPoseSize(deepen=0.67, widen=0.75),
    "l": RTMPoseSize(deepen=1.0, widen=1.0),
}


class ConvModule(nn.Module):
    """mmcv ConvModule as the configs build it: conv (no bias) -> BatchNorm -> SiLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """mmcv DepthwiseSeparableConvModule: a depthwise ConvModule, then a pointwise (1x1) one."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, kernel, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class CSPNeXtBlock(nn.Module):
    """3x3 ConvModule, then a 5x5 depthwise-separable one; the input added back when `shortcut`."""

    def __init__(self, channels: int, shortcut: bool) -> None:
        super().__init__()
        self.conv1 = ConvModule(channels, channels, 3)
        self.conv2 = DepthwiseSeparableConvModule(channels, channels, 5)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.shortcut else out


class ChannelAttention(nn.Module):
    """Global average -> 1x1 conv (with bias) -> hard sigmoid, multiplied onto the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))


class CSPLayer(nn.Module):
    """Cross-stage partial layer with CSPNeXt blocks and channel attention (expand ratio 0.5)."""

    def __init__(self, channels: int, num_blocks: int, shortcut: bool) -> None:
        super().__init__()
        mid = channels // 2
        self.main_conv = ConvModule(channels, mid, 1)
        self.short_conv = ConvModule(channels, mid, 1)
        self.final_conv = ConvModule(2 * mid, channels, 1)
        self.blocks = nn.Sequential(*[CSPNeXtBlock(mid, shortcut) for _ in range(num_blocks)])
        self.attention = ChannelAttention(2 * mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = torch.cat((self.blocks(self.main_conv(x)), self.short_conv(x)), dim=1)
        return self.final_conv(self.attention(both))


class SPPBottleneck(nn.Module):
    """1x1 ConvModule to half the channels, the map and its 5/9/13 stride-1 max pools stacked, 1x1 ConvModule."""

    def __init__(self, channels: int, kernels: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        mid = channels // 2
        self.conv1 = ConvModule(channels, mid, 1)
        self.poolings = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernels)
        self.conv2 = ConvModule(mid * (len(kernels) + 1), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.poolings], dim=1))


class CSPNeXt(nn.Module):
    """CSPNeXt P5 backbone, stride 32, returning the last stage (out_indices (4,))."""

    def __init__(self, size: RTMPoseSize) -> None:
        super().__init__()
        first = int(P5[0][0] * size.widen)
        self.stem = nn.Sequential(
            ConvModule(3, first // 2, 3, stride=2), ConvModule(first // 2, first // 2, 3), ConvModule(first // 2, first, 3)
        )
        for i, (cin, cout, blocks, shortcut, spp) in enumerate(P5):
            cin, cout = int(cin * size.widen), int(cout * size.widen)
            stage: list[nn.Module] = [ConvModule(cin, cout, 3, stride=2)]
            if spp:
                stage.append(SPPBottleneck(cout))
            stage.append(CSPLayer(cout, max(round(blocks * size.deepen), 1), shortcut))
            self.add_module(f"stage{i + 1}", nn.Sequential(*stage))
        self.out_channels = int(P5[-1][1] * size.widen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(len(P5)):
            x = getattr(self, f"stage{i + 1}")(x)
        return x


class ScaleNorm(nn.Module):
    """x / max(||x|| / sqrt(dim), eps) * g over the last axis (MMPose `ScaleNorm`, eps 1e-5)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class Scale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class GatedAttentionUnit(nn.Module):
    """MMPose `RTMCCBlock` in self-attention mode, as the RTMPose configs set it (SiLU, no relative position bias,
    no rotary encoding): tokens -> ScaleNorm -> one linear layer split into u, v and a shared base that two
    per-dimension affine maps turn into q and k -> relu(q k^T / sqrt(s))^2 mixes v across tokens -> gated by u ->
    output linear, added to the learned-scaled input."""

    def __init__(self, dims: int = 256, s: int = 128, expansion: int = 2) -> None:
        super().__init__()
        self.e, self.s = dims * expansion, s
        self.gamma = nn.Parameter(torch.rand((2, s)))
        self.beta = nn.Parameter(torch.rand((2, s)))
        self.o = nn.Linear(self.e, dims, bias=False)
        self.uv = nn.Linear(dims, 2 * self.e + s, bias=False)
        self.ln = ScaleNorm(dims)
        self.res_scale = Scale(dims)
        self.sqrt_s = math.sqrt(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        uv = F.silu(self.uv(self.ln(x)))
        u, v, base = torch.split(uv, [self.e, self.e, self.s], dim=2)
        q = base * self.gamma[0] + self.beta[0]
        k = base * self.gamma[1] + self.beta[1]
        kernel = torch.square(F.relu(torch.bmm(q, k.transpose(1, 2)) / self.sqrt_s))
        return self.res_scale(x) + self.o(u * torch.bmm(kernel, v))


class RTMCCHead(nn.Module):
    """Stride-32 features -> SimCC x and y logits per keypoint (MMPose `RTMCCHead.forward`)."""

    def __init__(self, in_channels: int, num_joints: int, input_size: tuple[int, int], split_ratio: float = 2.0) -> None:
        super().__init__()
        w, h = input_size
        tokens = (w // 32) * (h // 32)
        self.final_layer = nn.Conv2d(in_channels, num_joints, kernel_size=7, padding=3)
        self.mlp = nn.Sequential(ScaleNorm(tokens), nn.Linear(tokens, 256, bias=False))
        self.gau = GatedAttentionUnit(256)
        self.cls_x = nn.Linear(256, int(w * split_ratio), bias=False)
        self.cls_y = nn.Linear(256, int(h * split_ratio), bias=False)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.gau(self.mlp(self.final_layer(feats).flatten(2)))
        return self.cls_x(tokens), self.cls_y(tokens)


class RTMPose(nn.Module):
    """N x 3 x H x W crop -> (N x K x W*2 x logits, N x K x H*2 y logits). `size`: t, s, m or l."""

    def __init__(
        self, size: str = "t", num_joints: int = 17, input_size: tuple[int, int] = (192, 256), split_ratio: float = 2.0
    ) -> None:
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"RTMPose size must be one of {sorted(SIZES)}, got {size!r}")
        w, h = input_size
        if w % 32 or h % 32:
            raise ValueError(f"RTMPose input size must be a multiple of 32 (the backbone's stride), got {input_size}")
        self.backbone = CSPNeXt(SIZES[size])
        self.head = RTMCCHead(self.backbone.out_channels, num_joints, input_size, split_ratio)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.backbone(x))

    # -- checkpoint formats (read by dynpose.models.weights.load_weights) ---------------------------------------
    def checkpoint_formats(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """format -> tensors (name -> shape): MMPose 1.x releases hold exactly this model's state_dict."""
        return {"mmpose1": {k: tuple(v.shape) for k, v in self.state_dict().items()}}

    @staticmethod
    def from_checkpoint(sd: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
        return dict(sd)
