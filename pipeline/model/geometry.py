"""Receptive-field geometry of a feature map, traced from the layers that actually run.

Pixel coordinates: pixel i of a tensor row has its centre at i (so the image spans [−0.5, W − 0.5]).
Feature (row r, col c) of a map with receptive field ``rf`` is centred at ``rf.offset + rf.stride * (r, c)``
in the input tensor's pixel coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

_SPATIAL_LAYERS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class ReceptiveField:
    size: int  # pixels covered along one axis
    stride: int  # input pixels between neighbouring features
    offset: float  # centre of feature 0 in input pixels (negative: it lies in the zero padding)

    @property
    def padding(self) -> float:
        """The TF reference's convention: centre = stride · i − padding + (size − 1) / 2."""
        return (self.size - 1) / 2 - self.offset


def _square(value: int | tuple[int, ...], what: str, layer: nn.Module) -> int:
    values = value if isinstance(value, tuple) else (value, value)
    if any(isinstance(v, str) for v in values) or len(set(values)) != 1:
        raise ValueError(f"{what}={value!r} of {layer} is not supported; only square integer {what} are")
    return int(values[0])


def _compose(rf: ReceptiveField, layer: nn.Module, input_width: int) -> ReceptiveField:
    """The receptive field after applying ``layer`` to a map (``input_width`` wide) whose features have
    field ``rf``. Layers that pad from the input size (TF 'same') say how much via ``left_padding``."""
    kernel = _square(layer.kernel_size, "kernel_size", layer)
    stride = _square(layer.stride, "stride", layer)
    if hasattr(layer, "left_padding"):
        padding = layer.left_padding(input_width)
    else:
        padding = _square(layer.padding, "padding", layer)
    dilation = _square(getattr(layer, "dilation", 1), "dilation", layer)
    span = dilation * (kernel - 1)  # extent of the kernel minus one, in input features
    return ReceptiveField(
        size=rf.size + span * rf.stride,
        stride=rf.stride * stride,
        offset=rf.offset + (span / 2 - padding) * rf.stride,
    )


def trace_main_path(modules: Sequence[nn.Module], channels: int = 3, side: int = 64) -> list[nn.Module]:
    """Spatial layers (conv / pooling) on the main path, in the order they run."""
    return [layer for layer, _ in _trace(modules, channels, side)]


def _trace(modules: Sequence[nn.Module], channels: int, side: int) -> list[tuple[nn.Module, int]]:
    """(layer, input width) of the spatial layers on the main path of a ``side`` × ``side`` input.

    A layer whose input tensor already fed an earlier layer is a parallel branch (a residual shortcut
    like ResNet's ``downsample``) and is left out: the main path sees that input first.
    """
    seen_inputs: list[torch.Tensor] = []  # keeps tensors alive so identity checks stay valid
    main_path: list[tuple[nn.Module, int]] = []

    def record(layer: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        x = inputs[0]
        if not any(x is earlier for earlier in seen_inputs):
            main_path.append((layer, x.shape[-1]))
        seen_inputs.append(x)

    handles = [
        layer.register_forward_hook(record)
        for module in modules
        for layer in module.modules()
        if isinstance(layer, _SPATIAL_LAYERS)
    ]
    was_training = [m.training for m in modules]
    try:
        first = next(p for m in modules for p in m.parameters())
        x = torch.zeros(1, channels, side, side, dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for module in modules:
                x = module.eval()(x)  # eval: a trace must not update BatchNorm statistics
    finally:
        for handle in handles:
            handle.remove()
        for module, training in zip(modules, was_training, strict=True):
            module.train(training)
    return main_path


def receptive_field(modules: Sequence[nn.Module], channels: int = 3, side: int = 64) -> ReceptiveField:
    """Receptive field of the output of ``modules`` (run in sequence) w.r.t. a ``side``-pixel input (the
    side matters only where padding depends on the input size, like TF 'same' with stride 2)."""
    rf = ReceptiveField(size=1, stride=1, offset=0.0)
    for layer, width in _trace(modules, channels, side):
        rf = _compose(rf, layer, width)
    return rf
