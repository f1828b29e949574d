"""ViTPose (Xu et al. 2022): a plain ViT backbone and the classic deconvolution heatmap head, one definition for
both checkpoint formats users hold.

The module tree is MMPose 1.x's (mmpretrain `VisionTransformer` with `with_cls_token=False`, `out_type='featmap'`,
patch padding 2, + MMPose `HeatmapHead`), under `backbone.` and `head.`, so the model's state_dict is exactly an
MMPose 1.x release's (`../shared/layouts/vitpose_*.mmpose.json`). The official ViTPose release
(`ViTAE-Transformer/ViTPose`, `mmpose/models/backbones/vit.py` + `TopdownHeatmapSimpleHead`; layouts
`vitpose_*.official.json`) names the same tensors differently and keeps a class-token slot in `pos_embed`
(1, 1 + 192, C) that its forward adds to every patch token (`x + pos_embed[:, 1:] + pos_embed[:, :1]`);
`official_to_mmpose` folds that slot into the 192 patch positions, which is the same sum, and renames the rest.
`dynpose.models.weights.load_weights` reads either format through `checkpoint_formats` / `from_checkpoint`.

At 256x192 the 16x16 patches with padding 2 give a 16x12 token grid; two stride-2 deconvolutions bring it to the
64x48 heatmaps. The configs' dropout and drop path are training-only and not built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# Patch side of every ViTPose config (16x16 patches, padding 2: a 16 x 12 token grid at 256x192).
PATCH = 16


@dataclass(frozen=True)
class ViTSize:
    """One ViTPose config's backbone (configs .../td-hm_ViTPose-{small,base,large,huge}_8xb64-210e_coco-256x192.py)."""

    dims: int
    layers: int
    heads: int


SIZES = {
    "s": ViTSize(dims=384, layers=12, heads=12),
    "b": ViTSize(dims=768, layers=12, heads=12),
    "l": ViTSize(dims=1024, layers=24, heads=16),
    "h": ViTSize(dims=1280, layers=32, heads=16),
}


class PatchEmbed(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, dims, kernel_size=PATCH, stride=PATCH, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


class Attention(nn.Module):
    """Multi-head self-attention with one qkv projection (bias) and an output projection."""

    def __init__(self, dims: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.qkv = nn.Linear(dims, dims * 3)
        self.proj = nn.Linear(dims, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class FFN(nn.Module):
    """mmcv FFN: `layers.0.0` Linear + GELU, `layers.1` Linear (the mmpretrain names)."""

    def __init__(self, dims: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dims, hidden), nn.GELU()), nn.Linear(hidden, dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class EncoderLayer(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6), MLP ratio 4."""

    def __init__(self, dims: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dims, eps=1e-6)
        self.attn = Attention(dims, heads)
        self.ln2 = nn.LayerNorm(dims, eps=1e-6)
        self.ffn = FFN(dims, 4 * dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class VisionTransformer(nn.Module):
    """Patch tokens + learned positions -> encoder layers -> final LayerNorm -> a C x H/16 x W/16 feature map."""

    def __init__(self, size: ViTSize, input_size: tuple[int, int]) -> None:
        super().__init__()
        w, h = input_size
        # Output side of the padded patch conv: floor((side + 4 - 16) / 16) + 1.
        self.grid = ((h + 4 - PATCH) // PATCH + 1, (w + 4 - PATCH) // PATCH + 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], size.dims))
        self.patch_embed = PatchEmbed(size.dims)
        self.layers = nn.ModuleList(EncoderLayer(size.dims, size.heads) for _ in range(size.layers))
        self.ln1 = nn.LayerNorm(size.dims, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.patch_embed(x)
        b, c, gh, gw = feats.shape
        tokens = feats.flatten(2).transpose(1, 2) + self.pos_embed
        for layer in self.layers:
            tokens = layer(tokens)
        return self.ln1(tokens).transpose(1, 2).reshape(b, c, gh, gw)


class HeatmapHead(nn.Module):
    """Two ConvTranspose2d(4, stride 2) + BN + ReLU of 256 channels, then a 1x1 conv to one map per keypoint."""

    def __init__(self, in_channels: int, num_joints: int, channels: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin in (in_channels, channels):
            layers += [
                nn.ConvTranspose2d(cin, channels, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        self.deconv_layers = nn.Sequential(*layers)
        self.final_layer = nn.Conv2d(channels, num_joints, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.deconv_layers(x))


class ViTPose(nn.Module):
    """N x 3 x H x W crop -> N x K x H/4 x W/4 heatmaps. `size`: s, b, l or h (or a `ViTSize` of your own: the
    tests build a tiny one to run the whole export and runtime path in seconds)."""

    def __init__(self, size: str | ViTSize = "s", num_joints: int = 17, input_size: tuple[int, int] = (192, 256)) -> None:
        super().__init__()
        if not isinstance(size, ViTSize) and size not in SIZES:
            raise ValueError(f"ViTPose size must be one of {sorted(SIZES)}, got {size!r}")
        w, h = input_size
        if w % PATCH or h % PATCH:
            raise ValueError(f"ViTPose input size must be a multiple of {PATCH}, got {input_size}")
        arch = size if isinstance(size, ViTSize) else SIZES[size]
        self.backbone = VisionTransformer(arch, input_size)
        self.head = HeatmapHead(arch.dims, num_joints)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    # -- checkpoint formats (read by dynpose.models.weights.load_weights) ---------------------------------------
    def checkpoint_formats(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """format -> the tensors (name -> shape) a checkpoint of this model holds in it: "mmpose1" is the model's own
        state_dict, "official" the ViTPose repository's names with the class-token slot in `pos_embed`."""
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        official = {mmpose_to_official_name(k): s for k, s in own.items()}
        n, c = own["backbone.pos_embed"][1:]
        official["backbone.pos_embed"] = (1, n + 1, c)
        return {"mmpose1": own, "official": official}

    @staticmethod
    def from_checkpoint(sd: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
        """A checkpoint's tensors in `fmt` (already checked against `checkpoint_formats()[fmt]`) -> this model's."""
        return official_to_mmpose(sd) if fmt == "official" else dict(sd)


# Official ViTPose name part -> MMPose 1.x name part (`N` stands for a block index), one row per tensor group.
_NAMES = (
    ("backbone.patch_embed.proj.", "backbone.patch_embed.projection."),
    ("backbone.blocks.N.norm1.", "backbone.layers.N.ln1."),
    ("backbone.blocks.N.norm2.", "backbone.layers.N.ln2."),
    ("backbone.blocks.N.attn.", "backbone.layers.N.attn."),
    ("backbone.blocks.N.mlp.fc1.", "backbone.layers.N.ffn.layers.0.0."),
    ("backbone.blocks.N.mlp.fc2.", "backbone.layers.N.ffn.layers.1."),
    ("backbone.last_norm.", "backbone.ln1."),
    ("keypoint_head.", "head."),
)


def _table(forward: bool) -> list[tuple[re.Pattern[str], str]]:
    def pattern(prefix: str) -> re.Pattern[str]:
        return re.compile("^" + re.escape(prefix).replace("N", r"(\d+)"))

    return [(pattern(a), b.replace("N", r"\1")) if forward else (pattern(b), a.replace("N", r"\1")) for a, b in _NAMES]


_TO_MMPOSE, _TO_OFFICIAL = _table(True), _table(False)


def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, repl in table:
        new, n = pattern.subn(repl, name)
        if n:
            return new
    return name


def official_to_mmpose_name(name: str) -> str:
    return _rename(name, _TO_MMPOSE)


def mmpose_to_official_name(name: str) -> str:
    return _rename(name, _TO_OFFICIAL)


def official_to_mmpose(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official ViTPose state_dict -> MMPose 1.x names, the class-token position folded into the patch positions
    (the official forward adds `pos_embed[:, :1]` to every patch token: the same sum, done once)."""
    out = {official_to_mmpose_name(k): v for k, v in sd.items()}
    pos = out["backbone.pos_embed"]
    out["backbone.pos_embed"] = pos[:, 1:] + pos[:, :1]
    return out
