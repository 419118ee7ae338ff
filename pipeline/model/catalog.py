"""The model facts an extraction config is checked against, without torch: the registered backbones' feature
channels and the global pools.

pipeline.config validates its presets when imported, and the CLI imports it for ``--help``: importing torch
there costs seconds. pipeline.model.backbones builds the networks and takes their channels from here.
"""

from __future__ import annotations

# Backbone name → (channels of the local feature map, channels of the global feature map).
BACKBONE_CHANNELS: dict[str, tuple[int, int]] = {
    "resnet50": (1024, 2048),  # torchvision layer3, layer4
    "resnet101": (1024, 2048),
    "mobilenet_v2": (96, 1280),  # features.13 (stride 16), the final 1×1 conv
    "resnet50-ref": (1024, 2048),  # the DELG reference layout, base width 64
    "resnet101-ref": (1024, 2048),
    "resnet50-slim": (1024, 2048),  # tf-slim resnet_v1 (the released DELG files), block3, block4
    "resnet101-slim": (1024, 2048),
}

GLOBAL_POOLS = ("gem", "mac", "spoc", "rmac", "netvlad")


def pooled_dim(pool: str, channels: int, clusters: int) -> int:
    """Output dimension of global pool ``pool`` over ``channels`` (NetVLAD: ``clusters`` per channel)."""
    return channels * clusters if pool == "netvlad" else channels
