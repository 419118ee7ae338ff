"""ResNet in the layout of the DELG reference's Keras ResNet (tensorflow/models research/delf, resnet50.py).

It differs from torchvision's ResNet in ways that change the features, so weights trained in one layout do
not work in the other:
- each downsampling block strides its FIRST 1×1 conv (and the 1×1 shortcut), not the 3×3;
- the 7×7/2 stem conv pads like TF 'same' (asymmetric: one more pixel at the end on even input sizes);
  the 3×3/2 max-pool after it pads nothing ('valid');
- every conv has a bias; BatchNorm epsilon is 1e-3 (Keras) instead of 1e-5;
- ``block3_strides``: a 1×1 max-pool of stride 2 subsamples block3 (conv4) before the local head and
  block4, whose first block then has stride 1 — the local features sit on a stride-32 grid.

Module names are the reference's attribute names (conv1, bn_conv1, l2a … l5c, conv2a, bn2a, conv_shortcut …),
so the TF → PyTorch table in pipeline/convert/ maps one name to the same name.
"""

from __future__ import annotations

import math
import string

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # Keras BatchNormalization default


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TF 'same' along one axis: output ceil(size / stride), the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class TFSameConv2d(nn.Conv2d):
    """Conv2d with TF 'same' padding computed from the input size (asymmetric where TF's is)."""

    def left_padding(self, size: int) -> int:
        """Padding before the first pixel for an input of ``size`` pixels (square kernels and strides)."""
        return tf_same_padding(size, self.kernel_size[0], self.stride[0])[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, out, ceil(H / s), ceil(W / s))."""
        top, bottom = tf_same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = tf_same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class Bottleneck(nn.Module):
    """The reference's _ConvBlock (``shortcut=True``: 1×1 conv + BN on the shortcut) or _IdentityBlock."""

    def __init__(self, in_channels: int, width: int, stride: int, shortcut: bool) -> None:
        super().__init__()
        out_channels = 4 * width
        self.conv2a = nn.Conv2d(in_channels, width, 1, stride=stride)  # the stride sits here
        self.bn2a = _bn(width)
        self.conv2b = nn.Conv2d(width, width, 3, padding=1)  # 'same' of a 3×3/1 is symmetric
        self.bn2b = _bn(width)
        self.conv2c = nn.Conv2d(width, out_channels, 1)
        self.bn2c = _bn(out_channels)
        if shortcut:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride)
            self.bn_shortcut = _bn(out_channels)
        else:
            self.conv_shortcut = self.bn_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, 4·width, H / stride, W / stride)."""
        y = F.relu(self.bn2a(self.conv2a(x)))
        y = F.relu(self.bn2b(self.conv2b(y)))
        y = self.bn2c(self.conv2c(y))
        shortcut = x if self.conv_shortcut is None else self.bn_shortcut(self.conv_shortcut(x))
        return F.relu(y + shortcut)


def block_names(stage: int, count: int) -> list[str]:
    """The reference's block attribute names: l2a, l2b, … (stage 2 = conv2)."""
    return [f"l{stage}{letter}" for letter in string.ascii_lowercase[:count]]


class ReferenceResNet(nn.Module):
    """Stem + stages 2–5 with the reference's names; ``block_counts`` (3, 4, 6, 3) is ResNet50,
    (3, 4, 23, 3) ResNet101. ``base_width`` 64 is the real network (smaller only for tests).

    Forward order: conv1 → bn_conv1 → relu → max_pool → l2* → l3* → l4* → subsampling (block3) → l5* (block4).
    """

    def __init__(self, block_counts: tuple[int, int, int, int], base_width: int = 64) -> None:
        super().__init__()
        self.conv1 = TFSameConv2d(3, base_width, 7, stride=2)
        self.bn_conv1 = _bn(base_width)
        self.relu = nn.ReLU()
        self.max_pool = nn.MaxPool2d(3, stride=2)  # 'valid'
        in_channels = base_width
        for stage, count in zip((2, 3, 4, 5), block_counts, strict=True):
            width = base_width * 2 ** (stage - 2)
            # block3_strides: stage 5 keeps stride 1, the subsampling layer before it strides instead
            stride = 2 if stage in (3, 4) else 1
            for i, name in enumerate(block_names(stage, count)):
                block = Bottleneck(in_channels, width, stride if i == 0 else 1, shortcut=i == 0)
                self.add_module(name, block)
                in_channels = 4 * width
            if stage == 4:
                self.subsampling_layer = nn.MaxPool2d(1, stride=2)
        self.block_counts = block_counts

    def stage_blocks(self, stage: int) -> list[str]:
        return block_names(stage, self.block_counts[stage - 2])

    def local_layers(self) -> tuple[str, ...]:
        """Sub-module names from the image to (subsampled) block3, in forward order."""
        blocks = [name for stage in (2, 3, 4) for name in self.stage_blocks(stage)]
        return ("conv1", "bn_conv1", "relu", "max_pool", *blocks, "subsampling_layer")

    def global_layers(self) -> tuple[str, ...]:
        return tuple(self.stage_blocks(5))


RESNET50_BLOCKS = (3, 4, 6, 3)
# The reference's TF2 code defines ResNet50 only; the released R101 continues its naming (l4a … l4w).
RESNET101_BLOCKS = (3, 4, 23, 3)
