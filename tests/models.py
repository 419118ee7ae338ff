"""Test models: random weights with calibrated BatchNorm statistics.

Fresh torchvision init has running_var = 1 while activations shrink block after block, so every image gets
the same (constant) global descriptor and equality tests would compare constants. Estimating the BatchNorm
statistics on noise keeps images apart while staying deterministic.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ExtractionConfig
from pipeline.model.delg import Delg


def calibrated_model(config: ExtractionConfig, seed: int = 0) -> Delg:
    """A seeded random model for ``config`` with BatchNorm statistics estimated on random inputs, in eval mode."""
    torch.manual_seed(seed)
    model = Delg.from_config(config)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        model.train().extract(torch.randn(8, 3, 128, 128))
    return model.eval()


def calibrated_weights(config: ExtractionConfig, path: Path, seed: int = 0) -> str:
    """Save calibrated_model's state dict to ``path`` (for Ray actors to load); returns the path."""
    torch.save(calibrated_model(config, seed).state_dict(), path)
    return str(path)
