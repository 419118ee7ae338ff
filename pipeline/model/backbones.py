"""Backbone registry: networks split into a local part (→ local head) and a global part.

Each entry names, in forward order, the sub-modules of the network that lead to the local layer and those
that continue to the global layer. torchvision entries keep torchvision's parameter names, so torchvision /
ImageNet state dicts load into them directly. The ``-ref`` entries are the DELG reference's Keras ResNet
layout (pipeline/model/resnet_ref.py); the ``-slim`` entries tf-slim's resnet_v1 (pipeline/model/resnet_slim.py),
the layout of the released DELG SavedModels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models

from pipeline.errors import ConfigError
from pipeline.model.catalog import BACKBONE_CHANNELS
from pipeline.model.geometry import ReceptiveField
from pipeline.model.resnet_ref import RESNET50_BLOCKS, RESNET101_BLOCKS, ReferenceResNet
from pipeline.model.resnet_slim import SLIM_RESNET50_UNITS, SLIM_RESNET101_UNITS, SlimResNet


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[], nn.Module]  # constructor, random init
    local_layers: tuple[str, ...]  # sub-module names, input image → local feature map
    global_layers: tuple[str, ...]  # sub-module names, local feature map → global feature map
    local_channels: int
    global_channels: int
    classifier: str | None = None  # ImageNet classifier sub-module, dropped from the backbone
    imagenet_weights: str | None = None  # torchvision weights enum, for models.get_weight
    # Keypoint geometry when it is a convention rather than the traced field: the reference hard-codes the
    # receptive box (291, 32, 145), i.e. centres at 32·i, while its TF-'same' stem puts the true centres at
    # 32·i + 3 on even input sizes (+2 on odd ones). Reference-exact keypoints follow the convention.
    keypoint_field: ReceptiveField | None = None
    # The TF layout whose checkpoints convert into it (pipeline/convert/): "keras" (the TF2 reference) or
    # "slim" (TF1, the released files; its DELG heads are slim convs too: bias-free, BatchNorm ε 1e-5), and
    # its depth, e.g. ("slim", 50).
    tf_layout: tuple[str, int] | None = None


def _channels(name: str) -> dict[str, int]:
    local, global_ = BACKBONE_CHANNELS[name]
    return {"local_channels": local, "global_channels": global_}


_RESNET_LOCAL = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")

# The reference's receptive box for block3 with block3_strides (export_model_utils: rf, stride, padding).
REFERENCE_BOX = ReceptiveField(size=291, stride=32, offset=0.0)


def reference_backbone(
    name: str, block_counts: tuple[int, int, int, int], base_width: int = 64
) -> BackboneSpec:
    """A spec for the reference layout; ``base_width`` below 64 only for small test networks."""

    def build() -> ReferenceResNet:
        return ReferenceResNet(block_counts, base_width)

    net = build()
    return BackboneSpec(
        name=name,
        build=build,
        local_layers=net.local_layers(),
        global_layers=net.global_layers(),
        local_channels=16 * base_width,
        global_channels=32 * base_width,
        keypoint_field=REFERENCE_BOX,
        tf_layout=("keras", 3 * sum(block_counts) + 2),
    )


def slim_backbone(name: str, units: tuple[int, int, int, int], base_width: int = 64) -> BackboneSpec:
    """A spec for tf-slim's resnet_v1 layout; ``base_width`` below 64 only for small test networks.

    Its traced block3 field is 291 px at stride 32 with centres at 32·i (+2 when the stem's output side is
    even: the 'SAME' max-pool pads after, not before); keypoints follow the reference's box, centres 32·i."""

    def build() -> SlimResNet:
        return SlimResNet(units, base_width)

    return BackboneSpec(
        name=name,
        build=build,
        local_layers=SlimResNet.local_layers(),
        global_layers=SlimResNet.global_layers(),
        local_channels=16 * base_width,
        global_channels=32 * base_width,
        keypoint_field=REFERENCE_BOX,
        tf_layout=("slim", 3 * sum(units) + 2),
    )


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(
        name="resnet50",
        build=models.resnet50,
        local_layers=_RESNET_LOCAL,
        global_layers=("layer4",),
        **_channels("resnet50"),
        classifier="fc",
        imagenet_weights="ResNet50_Weights.IMAGENET1K_V2",
    ),
    "resnet101": BackboneSpec(
        name="resnet101",
        build=models.resnet101,
        local_layers=_RESNET_LOCAL,
        global_layers=("layer4",),
        **_channels("resnet101"),
        classifier="fc",
        imagenet_weights="ResNet101_Weights.IMAGENET1K_V2",
    ),
    # features.0–13 end at stride 16 (96 ch); 14–18 go to stride 32 and the final 1280-ch 1×1 conv.
    "mobilenet_v2": BackboneSpec(
        name="mobilenet_v2",
        build=models.mobilenet_v2,
        local_layers=tuple(f"features.{i}" for i in range(14)),
        global_layers=tuple(f"features.{i}" for i in range(14, 19)),
        **_channels("mobilenet_v2"),
        classifier="classifier",
        imagenet_weights="MobileNet_V2_Weights.IMAGENET1K_V2",
    ),
    # The DELG reference layout (block3_strides: local features at stride 32); no torchvision weights.
    "resnet50-ref": reference_backbone("resnet50-ref", RESNET50_BLOCKS),
    "resnet101-ref": reference_backbone("resnet101-ref", RESNET101_BLOCKS),
    # tf-slim resnet_v1_50 / resnet_v1_101: the released DELG files; no torchvision weights.
    "resnet50-slim": slim_backbone("resnet50-slim", SLIM_RESNET50_UNITS),
    "resnet101-slim": slim_backbone("resnet101-slim", SLIM_RESNET101_UNITS),
}


def get_backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ConfigError(f"backbone {name!r} is not registered; allowed: {sorted(BACKBONES)}")
    return BACKBONES[name]


class Backbone(nn.Module):
    """A network run in two parts: image → local features → global features."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        self.net = spec.build()
        if spec.classifier is not None:  # no classifier weights in the state dict
            self.net.set_submodule(spec.classifier, nn.Identity())

    def local_modules(self) -> list[nn.Module]:
        return [self.net.get_submodule(name) for name in self.spec.local_layers]

    def global_modules(self) -> list[nn.Module]:
        return [self.net.get_submodule(name) for name in self.spec.global_layers]

    def forward_local(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, local_channels, h, w)."""
        x = images
        for module in self.local_modules():
            x = module(x)
        return x

    def forward_global(self, local_features: torch.Tensor) -> torch.Tensor:
        """(B, local_channels, h, w) → (B, global_channels, h', w')."""
        x = local_features
        for module in self.global_modules():
            x = module(x)
        return x
