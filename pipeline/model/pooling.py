"""Global pooling heads from the retrieval literature: (B, C, H, W) feature maps → (B, D) vectors.

GeM (Radenović et al. 2018), MAC (max; Tolias et al. 2016), SPoC (sum; Babenko & Lempitsky 2015), R-MAC
(regional MAC over a multi-scale grid; Tolias et al. 2016) and NetVLAD (Arandjelović et al. 2016). The DELG
head L2-normalises (after its optional whitening FC) whatever they return; all pool in at least float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.catalog import GLOBAL_POOLS, pooled_dim

__all__ = ["GLOBAL_POOLS", "NetVLAD", "gem", "mac", "pooled_dim", "rmac", "rmac_regions", "spoc"]
RMAC_OVERLAP = 0.4  # target overlap of neighbouring R-MAC regions (Tolias et al.)


def _float(features: torch.Tensor) -> torch.Tensor:
    return features.to(torch.promote_types(features.dtype, torch.float32))


def gem(features: torch.Tensor, p: float | torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling: (B, C, H, W) → (B, C), (mean over H·W of clamp(x, eps)^p)^(1/p).

    Computed in at least float32: x³ of activations overflows fp16 and loses digits in bf16.
    """
    return _float(features).clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def mac(features: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions: (B, C, H, W) → (B, C), the max over locations."""
    return _float(features).amax(dim=(-2, -1))


def spoc(features: torch.Tensor) -> torch.Tensor:
    """Sum-pooled convolutional features: (B, C, H, W) → (B, C). The mean, i.e. the sum up to a constant
    factor that the L2 normalisation after it removes."""
    return _float(features).mean(dim=(-2, -1))


def rmac_regions(height: int, width: int, levels: int = 3) -> list[tuple[int, int, int]]:
    """R-MAC's square regions (top, left, side) on an ``height`` × ``width`` map.

    Level l = 1 … levels has regions of side ⌊2·min(H, W) / (l + 1)⌋ (level 1: the whole short side), l of
    them along the short side and l + extra along the long one, evenly spaced from edge to edge; ``extra``
    makes neighbouring level-1 regions overlap as close to 40 % as possible (1 to 6 extra regions).
    """
    short, long = min(height, width), max(height, width)
    extra = 0
    if long > short:  # overlap of m level-1 regions: (s − step) / s with step = (long − s) / (m − 1)
        extra = min(range(1, 7), key=lambda e: abs((short - (long - short) / e) / short - RMAC_OVERLAP))
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side == 0:
            continue
        n_rows = level + (extra if height > width else 0)
        n_cols = level + (extra if width > height else 0)
        for top in _spaced(height, side, n_rows):
            for left in _spaced(width, side, n_cols):
                regions.append((top, left, side))
    return regions


def _spaced(length: int, side: int, count: int) -> list[int]:
    """``count`` start positions of ``side``-long windows spread evenly over ``length`` (floored)."""
    if count == 1:
        return [0]
    step = (length - side) / (count - 1)
    return [math.floor(i * step) for i in range(count)]


def rmac(features: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """(B, C, H, W) → (B, C): the sum of the L2-normalised MACs of the rmac_regions."""
    x = _float(features)
    total = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
    for top, left, side in rmac_regions(x.shape[-2], x.shape[-1], levels):
        total = total + F.normalize(x[..., top : top + side, left : left + side].amax(dim=(-2, -1)), dim=-1)
    return total


class NetVLAD(nn.Module):
    """Trainable VLAD: soft-assign each (L2-normalised) local feature to K centroids with a 1×1 conv and
    softmax, sum the assignment-weighted residuals per centroid, intra-normalise each centroid's sum, flatten
    and L2-normalise. (B, C, H, W) → (B, K·C)."""

    def __init__(self, channels: int, clusters: int, alpha: float = 100.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.assign = nn.Conv2d(channels, clusters, kernel_size=1)  # (K, C, 1, 1) + (K,)
        self.centroids = nn.Parameter(torch.randn(clusters, channels) / math.sqrt(channels))  # (K, C)

    @torch.no_grad()
    def init_from_centroids(self, centroids: torch.Tensor) -> None:
        """Centroids (K, C) of normalised features (e.g. k-means): assignment ∝ exp(−α‖x − c_k‖²), i.e.
        conv weight 2α·c_k and bias −α‖c_k‖² (the paper's initialisation)."""
        self.centroids.copy_(centroids)
        self.assign.weight.copy_((2 * self.alpha * centroids)[..., None, None])
        self.assign.bias.copy_(-self.alpha * centroids.pow(2).sum(dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(_float(features), dim=1)  # (B, C, H, W)
        soft = F.softmax(self.assign(x), dim=1).flatten(2)  # (B, K, H·W)
        x = x.flatten(2)  # (B, C, H·W)
        # Σ_i a_k(x_i)(x_i − c_k) = Σ_i a_k(x_i) x_i − c_k Σ_i a_k(x_i)
        vlad = torch.einsum("bkn,bcn->bkc", soft, x) - soft.sum(dim=2).unsqueeze(-1) * self.centroids
        return F.normalize(F.normalize(vlad, dim=2).flatten(1), dim=1)  # (B, K·C)
