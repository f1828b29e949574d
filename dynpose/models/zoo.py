"""The model-name table: one builder and one card (plain data) per name, plus `create_model` / `list_models`.

Cards' `sources` list the known checkpoints per alias. `color_order` is per source because it depends on who
trained the weights, not on the architecture: the official SimpleBaseline (ResNet) release was trained on BGR
crops, the official HRNet release and every MMPose release on RGB crops.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from dynpose.errors import DynPoseError
from dynpose.keypoints import get_keypoint_set
from dynpose.models.card import IMAGENET_MEAN_255, IMAGENET_STD_255, ModelCard
from dynpose.models.dpn import DPN
from dynpose.models.hourglass import PoseHourglass
from dynpose.models.hrnet import PoseHighResolutionNet
from dynpose.models.lpn import LPN
from dynpose.models.resnet import PoseResNet
from dynpose.models.router import DynPoseRouter
from dynpose.models.rtmpose import RTMPose
from dynpose.models.simdr import SimDR
from dynpose.models.vitpose import ViTPose
from dynpose.roles import Role

MMPOSE_COCO = "https://download.openmmlab.com/mmpose/v1/body_2d_keypoint/topdown_heatmap/coco/"
HRNET_OFFICIAL = (
    "the official HRNet release (https://github.com/leoxiaobin/deep-high-resolution-net.pytorch, 'pretrained "
    "models' links to Google Drive / OneDrive: models/pytorch/pose_coco/{file})"
)
SIMPLEBASELINE_OFFICIAL = (
    "the official SimpleBaseline release (https://github.com/microsoft/human-pose-estimation.pytorch, 'pretrained "
    "models' links to Google Drive / OneDrive: models/pytorch/pose_coco/{file})"
)
LPN_OFFICIAL = (
    "the official LPN release (https://github.com/zhang943/lpn-pytorch, README 'model zoo' links to a Google Drive "
    "folder: models/pytorch/pose_coco/{file})"
)
SIMCC_OFFICIAL = (
    "the SimDR authors' release (https://github.com/leeyegy/SimCC, README 'pretrained models' links to a Google Drive "
    "folder: pretrained_model/coco/simdr/{file})"
)
SIMDR_SITHU = (
    "the sithu31296/pose-estimation release (https://github.com/sithu31296/pose-estimation, README model-zoo table, "
    "'SimDR {file}' download link to Google Drive)"
)
DPN_OFFICIAL = (
    "no released weights: train with https://github.com/ps259685/Dual-Path-Network-for-human-pose-estimation "
    "(DPN/exps/DPN.coco, `python -m train.py`), which saves model_logs/<user>/DPN.coco/{file} as "
    "{{'model': state_dict, ...}}; pass that file"
)
# MMPose 0.x model zoo (configs/body_2d_keypoint/topdown_heatmap/coco/hourglass_coco.md): Hourglass-52 at 256x256.
MMPOSE_HOURGLASS52 = (
    "https://download.openmmlab.com/mmpose/top_down/hourglass/hourglass52_coco_256x256-4ec713ba_20200709.pth"
)
# MMPose 1.x releases of RTMPose (projects/rtmpose/README.md and configs/body_2d_keypoint/rtmpose/{coco,body8}/*.yml).
MMPOSE_RTMPOSE = "https://download.openmmlab.com/mmpose/v1/projects/rtmposev1/"
RTMPOSE_FILES = {  # name -> alias -> file: "mmpose" the AIC+COCO files MMPose recommends, "mmpose-coco" COCO only
    "rtmpose_t": {
        "mmpose": "rtmpose-tiny_simcc-aic-coco_pt-aic-coco_420e-256x192-cfc8f33d_20230126.pth",
        "mmpose-coco": "rtmpose-tiny_simcc-coco_pt-aic-coco_420e-256x192-e613ba3f_20230127.pth",
        "body7": "rtmpose-t_simcc-body7_pt-body7_420e-256x192-026a1439_20230504.pth",
    },
    "rtmpose_s": {
        "mmpose": "rtmpose-s_simcc-aic-coco_pt-aic-coco_420e-256x192-fcb2599b_20230126.pth",
        "mmpose-coco": "rtmpose-s_simcc-coco_pt-aic-coco_420e-256x192-8edcf0d7_20230127.pth",
        "body7": "rtmpose-s_simcc-body7_pt-body7_420e-256x192-acd4a1ef_20230504.pth",
    },
    "rtmpose_m": {
        "mmpose": "rtmpose-m_simcc-aic-coco_pt-aic-coco_420e-256x192-63eb25f7_20230126.pth",
        "mmpose-coco": "rtmpose-m_simcc-coco_pt-aic-coco_420e-256x192-d8dd5ca4_20230127.pth",
        "body7": "rtmpose-m_simcc-body7_pt-body7_420e-256x192-e48f03d0_20230504.pth",
    },
    "rtmpose_l": {
        "mmpose": "rtmpose-l_simcc-aic-coco_pt-aic-coco_420e-256x192-f016ffe0_20230126.pth",
        "mmpose-coco": "rtmpose-l_simcc-coco_pt-aic-coco_420e-256x192-1352a4d2_20230127.pth",
        "body7": "rtmpose-l_simcc-body7_pt-body7_420e-256x192-4dba18fc_20230504.pth",
    },
    "rtmpose_m_384x288": {
        "mmpose": "rtmpose-m_simcc-aic-coco_pt-aic-coco_420e-384x288-a62a0b32_20230228.pth",
        "body7": "rtmpose-m_simcc-body7_pt-body7_420e-384x288-65e718c4_20230504.pth",
    },
    "rtmpose_l_384x288": {
        "mmpose": "rtmpose-l_simcc-aic-coco_pt-aic-coco_420e-384x288-97d6cb0f_20230228.pth",
        "body7": "rtmpose-l_simcc-body7_pt-body7_420e-384x288-3f5a1437_20230504.pth",
    },
}
# MMPose 1.x ViTPose (configs/body_2d_keypoint/topdown_heatmap/coco/vitpose_coco.yml, the classic-decoder models).
VITPOSE_FILES = {
    "s": "td-hm_ViTPose-small_8xb64-210e_coco-256x192-62d7a712_20230314.pth",
    "b": "td-hm_ViTPose-base_8xb64-210e_coco-256x192-216eae50_20230314.pth",
    "l": "td-hm_ViTPose-large_8xb64-210e_coco-256x192-53609f55_20230314.pth",
    "h": "td-hm_ViTPose-huge_8xb64-210e_coco-256x192-e32adcd4_20230314.pth",
}
VITPOSE_OFFICIAL = (
    "the official ViTPose release (https://github.com/ViTAE-Transformer/ViTPose, README 'MS COCO' table, "
    "{file} row, OneDrive link)"
)
# The DPN repository normalises BGR crops with the ImageNet statistics listed in BGR order (config.py INPUT.MEANS).
DPN_MEAN_255 = (103.53, 116.28, 123.675)
DPN_STD_255 = (57.375, 57.12, 58.395)


def _mmpose(file: str) -> dict[str, Any]:
    return {"url": MMPOSE_COCO + file, "color_order": "rgb", "format": "mmpose1"}


def _official(where: str, file: str, color_order: str) -> dict[str, Any]:
    # No stable direct URL exists (Drive/OneDrive share links), so the alias only explains where to get the file.
    return {"url": None, "manual": where.format(file=file), "color_order": color_order, "format": "official"}


def _pose_card(name: str, sources: dict[str, dict[str, Any]], **fields: Any) -> ModelCard:
    """A COCO-17 pose card; `fields` override the 256x192 / RGB / ImageNet / msra defaults.

    blur_kernel / heatmap_sigma (read by the dark and udp decoders): the heatmap models here (but DPN) are trained at
    256x192 or 256x256 with sigma-2 targets, and every reference that decodes such a model with DARK or UDP blurs with
    11: MMPose's
    HRNet-W32/W48 and ResNet-50/101/152 `*_dark*_coco-256x192` and `*_udp*` configs, its MPII 256x256 DARK configs,
    DarkPose's `w32/w48_256x192`, `res*_256x192` and MPII `*_256x256` experiments (docs/runtime.md).
    """
    card: dict[str, Any] = {
        "name": name,
        "arch": name,
        "input_width": 192,
        "input_height": 256,
        "color_order": "rgb",
        "mean": IMAGENET_MEAN_255,
        "std": IMAGENET_STD_255,
        "keypoints": "coco17",
        "decoder": "msra",
        "task": "pose",
        "sources": sources,
        "blur_kernel": 11,
        "heatmap_sigma": 2.0,
    }
    card.update(fields)
    return ModelCard(**card)


def _lpn_row(depth: int) -> tuple[Callable[..., nn.Module], ModelCard]:
    # The LPN configs set COLOR_RGB false: BGR crops, normalised with the ImageNet mean/std as listed (RGB order),
    # as in SimpleBaseline. The official test decodes with a soft-argmax (beta 160); msra is the nearest decoder here.
    name = f"lpn_{depth}"
    official = _official(LPN_OFFICIAL, f"{name}_256x192.pth", "bgr")
    return (lambda **kw: LPN(depth=depth, **kw)), _pose_card(name, {"official": official}, color_order="bgr")


def _simdr_row(width: int) -> tuple[Callable[..., nn.Module], ModelCard]:
    name = f"simdr_hrnet_w{width}"
    sources = {
        "official": _official(SIMCC_OFFICIAL, f"pose_hrnet_w{width}_256x192.pth", "rgb"),
        "sithu31296": _official(SIMDR_SITHU, f"HRNet-w{width} 256x192", "rgb"),
    }
    # 1-D classification outputs: no heatmap to blur, so no kernel or heatmap sigma
    card = _pose_card(name, sources, decoder="simdr", simdr_split_ratio=2.0, blur_kernel=None, heatmap_sigma=None)
    return (lambda **kw: SimDR(width=width, input_size=card.input_size, split_ratio=card.simdr_split_ratio, **kw)), card


def _hourglass_row(stacks: int) -> tuple[Callable[..., nn.Module], ModelCard]:
    # MMPose trains its hourglass on RGB crops at 256x256 (five halvings need sides that are multiples of 128).
    sources = {"mmpose": {"url": MMPOSE_HOURGLASS52, "color_order": "rgb", "format": "mmpose0"}} if stacks == 1 else {}
    card = _pose_card(f"hourglass_{stacks}", sources, input_width=256, input_height=256)
    return (lambda **kw: PoseHourglass(num_stacks=stacks, **kw)), card


def _dpn_row() -> tuple[Callable[..., nn.Module], ModelCard]:
    official = _official(DPN_OFFICIAL, "iter-<N>.pth", "bgr")
    # No DARK/UDP reference decodes DPN: its own COCO test blurs with 5 (dataset/attribute.py TEST.GAUSSIAN_KERNEL)
    # before its shift post-process, and its targets are point maps blurred with fixed kernels, not a sigma.
    card = _pose_card(
        "dpn",
        {"official": official},
        color_order="bgr",
        mean=DPN_MEAN_255,
        std=DPN_STD_255,
        blur_kernel=5,
        heatmap_sigma=None,
    )
    return (lambda **kw: DPN(input_size=card.input_size, **kw)), card


def _rtmpose_row(name: str) -> tuple[Callable[..., nn.Module], ModelCard]:
    # RTMPose configs: RGB (bgr_to_rgb), ImageNet mean/std on 0-255, SimCCLabel with split ratio 2 decoded by MMPose's
    # rule (raw logits, smaller maximum as score), flip test on (logits averaged, no shift).
    size = name.split("_")[1]
    w, h = (288, 384) if name.endswith("_384x288") else (192, 256)
    sources = {
        alias: {"url": MMPOSE_RTMPOSE + file, "color_order": "rgb", "format": "mmpose1"}
        for alias, file in RTMPOSE_FILES[name].items()
    }
    card = _pose_card(
        name,
        sources,
        input_width=w,
        input_height=h,
        decoder="simdr",
        simdr_split_ratio=2.0,
        simdr_rule="mmpose",
        blur_kernel=None,  # SimCC vectors: no heatmap to blur
        heatmap_sigma=None,
    )
    return (lambda **kw: RTMPose(size, input_size=card.input_size, split_ratio=card.simdr_split_ratio, **kw)), card


def _vitpose_row(size: str) -> tuple[Callable[..., nn.Module], ModelCard]:
    # Both configs: RGB, ImageNet mean/std, UDP crops and heatmaps (sigma 2), UDP decoding with an 11-pixel blur
    # (official test_cfg modulate_kernel=11; MMPose UDPHeatmap's blur_kernel_size default 11), flip without shift. The
    # card is MMPose 1.x's (zero-padded blur); loading an official file sets the official blur border.
    sources = {
        "mmpose": _mmpose(VITPOSE_FILES[size]),
        # The official evaluation's UDP blur (MMPose 0.x post_dark_udp) comes with the official weights.
        "official": {
            **_official(VITPOSE_OFFICIAL, f"ViTPose-{size.upper()} 256x192", "rgb"),
            "card": {"blur_border": "reflect"},
        },
    }
    card = _pose_card(f"vitpose_{size}", sources, decoder="udp", blur_kernel=11)
    return (lambda **kw: ViTPose(size, input_size=card.input_size, **kw)), card


# name -> (builder, card). The only registry in the package; add a model by adding a row.
MODELS: dict[str, tuple[Callable[..., nn.Module], ModelCard]] = {
    "hrnet_w32": (
        lambda **kw: PoseHighResolutionNet(width=32, **kw),
        _pose_card(
            "hrnet_w32",
            {
                "mmpose": _mmpose("td-hm_hrnet-w32_8xb64-210e_coco-256x192-81c58e40_20220909.pth"),
                "official": _official(HRNET_OFFICIAL, "pose_hrnet_w32_256x192.pth", "rgb"),
            },
        ),
    ),
    "hrnet_w48": (
        lambda **kw: PoseHighResolutionNet(width=48, **kw),
        _pose_card(
            "hrnet_w48",
            {
                "mmpose": _mmpose("td-hm_hrnet-w48_8xb32-210e_coco-256x192-0e67c616_20220913.pth"),
                "official": _official(HRNET_OFFICIAL, "pose_hrnet_w48_256x192.pth", "rgb"),
            },
        ),
    ),
    "resnet_50": (
        lambda **kw: PoseResNet(depth=50, **kw),
        _pose_card(
            "resnet_50",
            {
                "mmpose": _mmpose("td-hm_res50_8xb64-210e_coco-256x192-04af38ce_20220923.pth"),
                "official": _official(SIMPLEBASELINE_OFFICIAL, "pose_resnet_50_256x192.pth.tar", "bgr"),
            },
        ),
    ),
    "resnet_101": (
        lambda **kw: PoseResNet(depth=101, **kw),
        _pose_card(
            "resnet_101",
            {
                "mmpose": _mmpose("td-hm_res101_8xb64-210e_coco-256x192-065d3625_20220926.pth"),
                "official": _official(SIMPLEBASELINE_OFFICIAL, "pose_resnet_101_256x192.pth.tar", "bgr"),
            },
        ),
    ),
    "resnet_152": (
        lambda **kw: PoseResNet(depth=152, **kw),
        _pose_card(
            "resnet_152",
            {
                # URL as listed in MMPose's ResNet COCO model-zoo table (configs/.../coco/resnet_coco.md).
                "mmpose": _mmpose("td-hm_res152_8xb32-210e_coco-256x192-0345f330_20220928.pth"),
                "official": _official(SIMPLEBASELINE_OFFICIAL, "pose_resnet_152_256x192.pth.tar", "bgr"),
            },
        ),
    ),
    "lpn_50": _lpn_row(50),
    "lpn_101": _lpn_row(101),
    "lpn_152": _lpn_row(152),
    "simdr_hrnet_w32": _simdr_row(32),
    "simdr_hrnet_w48": _simdr_row(48),
    "hourglass_1": _hourglass_row(1),
    "hourglass_2": _hourglass_row(2),
    "dpn": _dpn_row(),
    **{name: _rtmpose_row(name) for name in RTMPOSE_FILES},
    **{f"vitpose_{size}": _vitpose_row(size) for size in VITPOSE_FILES},
    Role.ROUTER.value: (
        DynPoseRouter,
        ModelCard(
            # DynPose trains the router inside MMPose with the pose models' data preprocessor (bgr_to_rgb, ImageNet
            # mean/std), so it is fed exactly the crop the pose models get.
            name=Role.ROUTER.value,
            arch=Role.ROUTER.value,
            input_width=192,
            input_height=256,
            color_order="rgb",
            mean=IMAGENET_MEAN_255,
            std=IMAGENET_STD_255,
            keypoints="coco17",
            decoder="msra",
            task=Role.ROUTER.value,
            sources={
                "dynpose": {
                    # `backbone.pth` at the root of the authors' repository; raw/HEAD follows its default branch.
                    "url": "https://github.com/Aritoria/DynPose/raw/HEAD/backbone.pth",
                    "color_order": "rgb",
                    "format": "dynpose_router",
                },
                "official": {
                    "url": None,
                    "color_order": "rgb",
                    "format": "dynpose_router",
                    "manual": "the DynPose repository (https://github.com/Aritoria/DynPose, file backbone.pth)",
                },
            },
        ),
    ),
}


def list_models() -> list[str]:
    """Names `create_model` accepts."""
    return list(MODELS)


def get_card(name: str) -> ModelCard:
    """The zoo card of `name` (colour order of its default source, MMPose/RGB for the pose models)."""
    return _entry(name)[1]


def _entry(name: str) -> tuple[Callable[..., nn.Module], ModelCard]:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise DynPoseError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def create_model(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    keypoints: str = "coco17",
    trust_pickle: bool = False,
    seed: int | None = 0,
    **kw: Any,
) -> nn.Module:
    """Build zoo model `name` in eval mode, with its card attached as `model.card`.

    weights:
      - None: PyTorch's default random initialisation and *no* warning. Meant for layout/shape work only (the
        state_dict names, parameter counts, a later `load_weights`). `model.weights_source` is None so exporters
        can refuse such a model.
      - "random": the same random initialisation, with a warning that outputs are meaningless; for pipeline tests
        that need a runnable model without a checkpoint. `model.weights_source == "random"`. Drawn from torch's
        generator seeded with `seed` (default 0) in a forked RNG state, so a random-weight export reproduces and the
        caller's RNG is untouched; `seed=None` draws from the global generator.
      - anything else: a checkpoint source for `load_weights` (path, http(s) URL, or a card alias such as
        "mmpose"); `model.checkpoint` holds the `LoadedCheckpoint` and the card's colour order follows the source.
    keypoints: the pose models' keypoint set ("coco17", "crowdpose14"); the card's checkpoint sources are COCO-17
    only, so another set drops them. kw go to the architecture's constructor.
    trust_pickle: passed to `load_weights` (only for checkpoints from a source you trust).
    """
    builder, card = _entry(name)
    if card.task == "pose" and keypoints != card.keypoints:
        kw["num_joints"] = get_keypoint_set(keypoints).num
        card = card.with_(keypoints=keypoints, sources={})
    try:
        if isinstance(weights, str) and weights == "random" and seed is not None:
            import torch

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = builder(**kw)
        else:
            model = builder(**kw)
    except TypeError as e:
        raise DynPoseError(f"create_model({name!r}): bad keyword argument ({e})") from None
    from dynpose.models.weights import attach, load_weights  # weights imports zoo for cards

    attach(model, card=card, weights_source=None, checkpoint=None)
    if weights is None:
        pass
    elif isinstance(weights, str) and weights == "random":
        warnings.warn(
            f"{name}: random weights; its outputs are meaningless (use a checkpoint for real predictions)",
            UserWarning,
            stacklevel=2,
        )
        attach(model, weights_source="random")
    else:
        load_weights(model, weights, trust_pickle=trust_pickle)
    return model.eval()
