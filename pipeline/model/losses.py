"""Training losses: DELG's (ArcFace, attention cross-entropy, reconstruction) and metric-learning ones.

Pure torch. Per-image losses come back unreduced (``(B,)``) where the batch can be split across workers,
so the caller can weight each worker's share by its image count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError

ARCFACE_MARGIN = 0.1  # the reference's arcface_margin
ARCFACE_SCALE = math.sqrt(2048)  # the reference's scale_factor_init (45.25), fixed, not learned
MINING = ("hard", "distance-weighted")
_COS_LIMIT = 1.0 - 1e-7  # acos' gradient is infinite at ±1


def arcface_logits(
    embeddings: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, margin: float, scale: float
) -> torch.Tensor:
    """(B, D) embeddings, (K, D) class weights, (B,) labels → (B, K) scaled cosine logits, the label's
    angle widened by ``margin``. As the reference does, the margin is skipped where θ > π − margin:
    there, cos(θ + margin) would be larger than cos θ and reward the wrong direction."""
    cosine = F.normalize(embeddings, dim=1) @ F.normalize(weights, dim=1).T  # (B, K)
    theta = torch.acos(cosine.clamp(-_COS_LIMIT, _COS_LIMIT))
    target = F.one_hot(labels, weights.shape[0]).bool() & (theta <= math.pi - margin)
    return scale * torch.where(target, torch.cos(theta + margin), cosine)


class ArcFace(nn.Module):
    """Cosine classifier with an additive angular margin (Deng et al. 2019), DELG's global loss."""

    def __init__(
        self, dim: int, num_classes: int, margin: float = ARCFACE_MARGIN, scale: float = ARCFACE_SCALE
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))  # (K, D)
        nn.init.xavier_uniform_(self.weight)  # the reference's GlorotUniform
        self.margin = margin
        self.scale = scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, D), (B,) → (B,) cross-entropy per image."""
        logits = arcface_logits(embeddings, self.weight, labels, self.margin, self.scale)
        return F.cross_entropy(logits, labels, reduction="none")


def reconstruction_error(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) each → (B,) mean squared error per image (the reference's MSE over channels, averaged
    over locations)."""
    return (reconstruction - target).pow(2).mean(dim=(1, 2, 3))


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, D) → (B, B) Euclidean distances (clamped away from 0, where sqrt has no gradient)."""
    squared = torch.cdist(embeddings, embeddings).pow(2)
    return squared.clamp(min=1e-12).sqrt()


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) labels → (B, B) positive mask (same label, not itself) and negative mask (other label)."""
    same = labels[:, None] == labels[None, :]
    itself = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~itself, ~same


def hardest_negatives(distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, B) distances, (B,) labels → (B,) index of each anchor's nearest negative, −1 where none."""
    _, negative = _masks(labels)
    masked = distances.detach().masked_fill(~negative, math.inf)
    nearest = masked.argmin(dim=1)
    return torch.where(negative.any(dim=1), nearest, -1)


def distance_weighted_negatives(
    distances: torch.Tensor,
    labels: torch.Tensor,
    dim: int,
    generator: torch.Generator,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
) -> torch.Tensor:
    """(B, B) distances between L2-normalised D-dim embeddings → (B,) one sampled negative per anchor
    (−1 where none), drawn with probability ∝ 1 / q(d) (Wu et al. 2017), q(d) ∝ d^(D−2) (1 − d²/4)^((D−3)/2)
    being the density of distances between uniform points on the sphere: negatives spread over all
    distances instead of crowding at √2. Distances below ``cutoff`` are clipped (bounded weights);
    negatives beyond ``nonzero_loss_cutoff`` get weight 0 unless no closer one exists."""
    _, negative = _masks(labels)
    d = distances.detach().clamp(min=cutoff, max=2.0 - 1e-4)
    log_q = (dim - 2) * d.log() + (dim - 3) / 2 * (1 - d.pow(2) / 4).log()
    near = negative & (distances.detach() < nonzero_loss_cutoff)
    allowed = torch.where(near.any(dim=1, keepdim=True), near, negative)
    log_weights = (-log_q).masked_fill(~allowed, -math.inf)
    has_negative = negative.any(dim=1)
    probabilities = torch.softmax(log_weights[has_negative], dim=1)  # rows without negatives would be NaN
    sampled = torch.full_like(labels, -1)
    if has_negative.any():
        drawn = torch.multinomial(probabilities.cpu(), 1, generator=generator).squeeze(1)
        sampled[has_negative] = drawn.to(labels.device)
    return sampled


def mine_negatives(
    distances: torch.Tensor, labels: torch.Tensor, mining: str, dim: int, generator: torch.Generator
) -> torch.Tensor:
    """One negative per anchor by ``mining`` ("hard" or "distance-weighted"); −1 where none."""
    if mining == "hard":
        return hardest_negatives(distances, labels)
    if mining == "distance-weighted":
        return distance_weighted_negatives(distances, labels, dim, generator)
    raise ConfigError(f"mining {mining!r}; allowed: {list(MINING)}")


def contrastive_loss(
    distances: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor, margin: float
) -> torch.Tensor:
    """Siamese contrastive loss (Hadsell et al. 2006, as Radenović et al. train retrieval CNNs) → (B,)
    per anchor: the mean over its pairs — every positive (½ d²) and its mined negative (½ max(0, m − d)²);
    0 for an anchor without pairs."""
    positive, _ = _masks(labels)
    anchor = torch.arange(len(labels), device=labels.device)
    has_negative = negatives >= 0
    negative_distance = distances[anchor, negatives.clamp(min=0)]  # (B,)
    positive_terms = (0.5 * distances.pow(2) * positive).sum(dim=1)
    negative_terms = 0.5 * F.relu(margin - negative_distance).pow(2) * has_negative
    pairs = positive.sum(dim=1) + has_negative
    return (positive_terms + negative_terms) / pairs.clamp(min=1)


def triplet_loss(
    distances: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor, margin: float
) -> torch.Tensor:
    """Triplet margin loss → (B,) per anchor: the mean over its positives p of max(0, d(a, p) − d(a, n) + m)
    with its mined negative n; 0 for an anchor without a positive or a negative."""
    positive, _ = _masks(labels)
    anchor = torch.arange(len(labels), device=labels.device)
    negative_distance = distances[anchor, negatives.clamp(min=0)][:, None]  # (B, 1)
    violations = F.relu(distances - negative_distance + margin) * positive  # (B, B)
    usable = (negatives >= 0) & positive.any(dim=1)
    return torch.where(usable, violations.sum(dim=1) / positive.sum(dim=1).clamp(min=1), 0.0)


class MarginLoss(nn.Module):
    """Margin-based loss (Wu, Manmatha, Smola, Krähenbühl 2017, "Sampling Matters in Deep Embedding
    Learning"): ℓ(i, j) = (α + y_ij (D_ij − β))₊, y = +1 for a positive pair, −1 for a negative one.

    β, the boundary between positive and negative distances, is learned: one value for all classes, or one
    per class (indexed by the anchor's class) with ``per_class``. The paper pairs the loss with the
    distance-weighted negatives of :func:`distance_weighted_negatives`. As the other pair losses here, the
    result is per anchor — the mean over its pairs (every positive and its mined negative), 0 for an anchor
    without pairs — so each worker's share of a batch can be weighted by its image count; the paper divides
    the batch's sum by the number of pairs with a non-zero loss instead.
    """

    def __init__(self, num_classes: int, margin: float = 0.2, beta: float = 1.2, per_class: bool = False):
        super().__init__()
        self.margin = margin  # α: the paper's 0.2
        self.beta = nn.Parameter(torch.full((num_classes if per_class else 1,), beta))  # β₀ = 1.2 (paper)
        self.per_class = per_class

    def forward(self, distances: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """(B, B) distances, (B,) labels, (B,) mined negative per anchor (−1: none) → (B,) loss."""
        positive, _ = _masks(labels)
        beta = self.beta[labels] if self.per_class else self.beta.expand(len(labels))  # (B,)
        anchor = torch.arange(len(labels), device=labels.device)
        has_negative = negatives >= 0
        negative_distance = distances[anchor, negatives.clamp(min=0)]  # (B,)
        positive_terms = (F.relu(self.margin + distances - beta[:, None]) * positive).sum(dim=1)
        negative_terms = F.relu(self.margin - (negative_distance - beta)) * has_negative
        pairs = positive.sum(dim=1) + has_negative
        return (positive_terms + negative_terms) / pairs.clamp(min=1)


def ordered_positives(
    distances: torch.Tensor, labels: torch.Tensor, views: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, B) distances, (B,) labels, optional (B,) view keys → (B,) closer and (B,) farther positive of
    each anchor (−1 where it has fewer than two positives).

    With view keys (a view index, a capture time: NaN where unknown), the closer positive is the one whose key
    is nearest the anchor's, the farther one the most distant; an anchor whose own or whose positives' keys
    are unknown falls back to the embedding: its nearest and its farthest positive by current distance.
    """
    positive, _ = _masks(labels)
    enough = positive.sum(dim=1) >= 2
    gap = distances.detach()
    if views is not None:
        view_gap = (views[:, None] - views[None, :]).abs()  # (B, B)
        known = ~torch.isnan(view_gap).masked_fill(~positive, False).any(dim=1) & ~torch.isnan(views)
        gap = torch.where(known[:, None], view_gap.nan_to_num(0.0), gap)
    closer = gap.masked_fill(~positive, math.inf).argmin(dim=1)
    farther = gap.masked_fill(~positive, -math.inf).argmax(dim=1)
    return torch.where(enough, closer, -1), torch.where(enough, farther, -1)


def quadruplet_loss(
    distances: torch.Tensor,
    labels: torch.Tensor,
    negatives: torch.Tensor,
    margin: float,
    views: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quadruplet loss with an order among positives → (B,) per anchor a:
    [d(a, p₁) − d(a, p₂) + δ₁]₊ + [d(a, p₂) − d(a, n) + δ₂]₊, p₁ the closer and p₂ the farther positive
    (:func:`ordered_positives`), n the mined negative; δ₂ = ``margin`` and δ₁ = margin / 2 (an order among
    views of one place is a weaker signal than place identity). 0 for an anchor with fewer than two
    positives or no negative. (Chen et al. 2017, "Beyond triplet loss", build the second term from a second,
    anchor-free negative pair; this variant spends it on ranking views of the same place instead.)"""
    closer, farther = ordered_positives(distances, labels, views)
    anchor = torch.arange(len(labels), device=labels.device)
    d_closer = distances[anchor, closer.clamp(min=0)]
    d_farther = distances[anchor, farther.clamp(min=0)]
    d_negative = distances[anchor, negatives.clamp(min=0)]
    loss = F.relu(d_closer - d_farther + margin / 2) + F.relu(d_farther - d_negative + margin)
    return torch.where((closer >= 0) & (negatives >= 0), loss, 0.0)
