"""ResNet in tf-slim's ``resnet_v1_50`` / ``resnet_v1_101`` layout: the backbone of the released DELG models.

The released DELG SavedModels (r50/r101delg_gld_20200814, r50/r101delg_gldv2clean_20200914) are TF1 graphs
built on tf-slim's nets/resnet_v1.py under resnet_utils.resnet_arg_scope. That layout differs from both
torchvision's and the TF2 reference's Keras ResNet (pipeline/model/resnet_ref.py):
- each block downsamples on the 3×3 conv of its LAST unit (stride 2 for blocks 1–3, block4 keeps stride 1),
  and that unit's identity shortcut is subsampled by a 1×1 max-pool of the same stride;
- only unit_1 of a block has a projection shortcut (1×1 conv + BatchNorm), where the depth changes;
- strided convs are ``conv2d_same``: explicit symmetric padding (k − 1) / 2, then a 'VALID' conv; the
  3×3/2 max-pool after the 7×7/2 stem pads TF 'SAME' (from the input size);
- no conv biases (every conv is followed by BatchNorm), BatchNorm epsilon 1e-5.
So block3 ends at stride 32 (receptive field 291): the reference's local features come from there.

Module names follow the checkpoint: ``block2.unit_4.conv2.conv`` holds
``resnet_v1_50/block2/unit_4/bottleneck_v1/conv2/weights``, its ``.bn`` the ``.../conv2/BatchNorm/*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.resnet_ref import tf_same_padding

BN_EPS = 1e-5  # resnet_utils.resnet_arg_scope's batch_norm_epsilon

SLIM_RESNET50_UNITS = (3, 4, 6, 3)
SLIM_RESNET101_UNITS = (3, 4, 23, 3)


class ConvBN(nn.Module):
    """slim ``conv2d`` with ``normalizer_fn=batch_norm``: bias-free conv → BatchNorm → optional ReLU.
    ``padding`` is the symmetric padding of conv2d_same (``(kernel − 1) // 2``; 0 for 1×1 convs)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, H, W) → (B, cout, ceil(H / stride), ceil(W / stride))."""
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class SameMaxPool2d(nn.MaxPool2d):
    """Max-pool with TF 'SAME' padding computed from the input size (padded values never win)."""

    def left_padding(self, size: int) -> int:
        """Padding before the first pixel for an input of ``size`` pixels (read by the geometry trace)."""
        return tf_same_padding(size, self.kernel_size, self.stride)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, ceil(H / stride), ceil(W / stride))."""
        top, bottom = tf_same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = tf_same_padding(x.shape[-1], self.kernel_size, self.stride)
        return super().forward(F.pad(x, (left, right, top, bottom), value=float("-inf")))


class Unit(nn.Module):
    """slim ``bottleneck`` (v1): 1×1 → 3×3 (the unit's stride) → 1×1, plus the shortcut."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        depth = 4 * width
        self.conv1 = ConvBN(cin, width, 1)
        self.conv2 = ConvBN(width, width, 3, stride)
        self.conv3 = ConvBN(width, depth, 1, relu=False)
        # a projection where the depth changes, else the input subsampled to the unit's stride
        self.shortcut = ConvBN(cin, depth, 1, stride, relu=False) if cin != depth else None
        self.subsample = nn.MaxPool2d(1, stride) if cin == depth and stride > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, H, W) → (B, 4·width, ceil(H / stride), ceil(W / stride))."""
        residual = self.conv3(self.conv2(self.conv1(x)))  # first: the geometry trace follows this path
        if self.shortcut is not None:
            shortcut = self.shortcut(x)
        else:
            shortcut = x if self.subsample is None else self.subsample(x)
        return F.relu(shortcut + residual)


class Block(nn.Module):
    """``units`` bottlenecks named unit_1 … unit_N; the block's stride sits on the last one."""

    def __init__(self, cin: int, width: int, units: int, stride: int) -> None:
        super().__init__()
        for i in range(1, units + 1):
            self.add_module(f"unit_{i}", Unit(cin, width, stride if i == units else 1))
            cin = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.children():
            x = unit(x)
        return x


class SlimResNet(nn.Module):
    """tf-slim resnet_v1 without its classifier: conv1 → pool1 → block1 … block4. ``units`` (3, 4, 6, 3) is
    resnet_v1_50, (3, 4, 23, 3) resnet_v1_101; ``base_width`` below 64 only for small test networks."""

    def __init__(self, units: tuple[int, int, int, int], base_width: int = 64) -> None:
        super().__init__()
        self.conv1 = ConvBN(3, base_width, 7, stride=2)  # conv2d_same: symmetric padding 3
        self.pool1 = SameMaxPool2d(3, stride=2)
        cin = base_width
        for index, (count, stride) in enumerate(zip(units, (2, 2, 2, 1), strict=True)):
            width = base_width * 2**index
            self.add_module(f"block{index + 1}", Block(cin, width, count, stride))
            cin = 4 * width
        self.units = units

    @property
    def scope(self) -> str:
        """The checkpoint's root scope: resnet_v1_50 or resnet_v1_101."""
        return {SLIM_RESNET50_UNITS: "resnet_v1_50", SLIM_RESNET101_UNITS: "resnet_v1_101"}.get(
            self.units, f"resnet_v1_{3 * sum(self.units) + 2}"
        )

    def checkpoint_scope(self, module_name: str) -> str:
        """The checkpoint scope of a ConvBN sub-module: ``block1.unit_1.conv2`` →
        ``resnet_v1_50/block1/unit_1/bottleneck_v1/conv2``."""
        parts = module_name.split(".")
        if len(parts) == 3:  # blockB.unit_U.layer
            parts.insert(2, "bottleneck_v1")
        return "/".join([self.scope, *parts])

    @staticmethod
    def local_layers() -> tuple[str, ...]:
        return ("conv1", "pool1", "block1", "block2", "block3")

    @staticmethod
    def global_layers() -> tuple[str, ...]:
        return ("block4",)
