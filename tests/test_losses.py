"""Each loss against values computed by hand on tiny examples."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.model.losses import (
    ArcFace,
    MarginLoss,
    arcface_logits,
    contrastive_loss,
    distance_weighted_negatives,
    hardest_negatives,
    ordered_positives,
    pairwise_distances,
    quadruplet_loss,
    reconstruction_error,
    triplet_loss,
)


def at_angle(radians: float) -> list[float]:
    return [math.cos(radians), math.sin(radians)]


def test_arcface_widens_the_label_angle_by_the_margin():
    embeddings = torch.tensor([at_angle(0.5)])  # 0.5 rad from class 0 (x axis), π/2 − 0.5 from class 1
    weights = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # lengths must not matter: cosine classifier
    logits = arcface_logits(embeddings, weights, torch.tensor([0]), margin=0.1, scale=4.0)
    assert logits[0].tolist() == pytest.approx([4 * math.cos(0.6), 4 * math.sin(0.5)], abs=1e-6)


def test_arcface_skips_the_margin_beyond_pi_minus_margin():
    embeddings = torch.tensor([at_angle(math.pi - 0.05)])  # θ = π − 0.05 > π − 0.1 from class 0
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = arcface_logits(embeddings, weights, torch.tensor([0]), margin=0.1, scale=4.0)
    assert logits[0, 0].item() == pytest.approx(4 * math.cos(math.pi - 0.05), abs=1e-6)


def test_arcface_loss_is_cross_entropy_of_the_margin_logits():
    head = ArcFace(dim=2, num_classes=2, margin=0.1, scale=4.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    loss = head(torch.tensor([at_angle(0.5), at_angle(1.2)]), torch.tensor([0, 1]))
    first = -4 * math.cos(0.6) + math.log(math.exp(4 * math.cos(0.6)) + math.exp(4 * math.sin(0.5)))
    # second image: θ to class 1 is π/2 − 1.2 = 0.3708 → widened to 0.4708; cos to class 0 is cos 1.2
    widened = 4 * math.cos(math.pi / 2 - 1.2 + 0.1)
    second = -widened + math.log(math.exp(4 * math.cos(1.2)) + math.exp(widened))
    assert loss.tolist() == pytest.approx([first, second], abs=1e-5)


def test_arcface_defaults_are_the_reference_ones():
    head = ArcFace(dim=8, num_classes=3)
    assert head.margin == 0.1
    assert head.scale == pytest.approx(45.2548, abs=1e-4)


def test_reconstruction_error_is_the_mean_square_per_image():
    target = torch.zeros(2, 2, 1, 2)
    reconstruction = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]], [[[3.0, 0.0]], [[0.0, 0.0]]]])
    assert reconstruction_error(reconstruction, target).tolist() == [(1 + 4 + 0 + 1) / 4, 9 / 4]


# Three points on the unit circle: a = (1, 0), b = (0, 1) share label 0; c = (−1, 0) has label 1.
# d(a, b) = √2, d(a, c) = 2, d(b, c) = √2.
POINTS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
LABELS = torch.tensor([0, 0, 1])
R2 = math.sqrt(2)


def test_pairwise_distances():
    expected = [0, R2, 2, R2, 0, R2, 2, R2, 0]
    assert pairwise_distances(POINTS).flatten().tolist() == pytest.approx(expected, abs=1e-5)


def test_hardest_negative_is_the_nearest_other_label():
    distances = pairwise_distances(POINTS)
    assert hardest_negatives(distances, LABELS).tolist() == [2, 2, 1]
    assert hardest_negatives(distances, torch.tensor([0, 0, 0])).tolist() == [-1, -1, -1]


def test_contrastive_loss_by_hand():
    distances = pairwise_distances(POINTS)
    loss = contrastive_loss(distances, LABELS, hardest_negatives(distances, LABELS), margin=2.5)
    a = (0.5 * 2 + 0.5 * (2.5 - 2) ** 2) / 2  # positive b at √2, negative c at 2
    b = (0.5 * 2 + 0.5 * (2.5 - R2) ** 2) / 2  # positive a at √2, negative c at √2
    c = 0.5 * (2.5 - R2) ** 2  # no positive; negative b at √2
    assert loss.tolist() == pytest.approx([a, b, c], abs=1e-5)


def test_triplet_loss_by_hand():
    distances = pairwise_distances(POINTS)
    loss = triplet_loss(distances, LABELS, hardest_negatives(distances, LABELS), margin=1.0)
    # a: max(0, √2 − 2 + 1); b: max(0, √2 − √2 + 1); c has no positive
    assert loss.tolist() == pytest.approx([R2 - 1, 1.0, 0.0], abs=1e-5)


def test_losses_are_zero_without_pairs():
    distances = pairwise_distances(POINTS)
    none = torch.tensor([-1, -1, -1])
    assert contrastive_loss(distances, torch.tensor([0, 1, 2]), none, 0.7).tolist() == [0, 0, 0]
    assert triplet_loss(distances, torch.tensor([0, 1, 2]), none, 0.1).tolist() == [0, 0, 0]


def test_distance_weighted_sampling_follows_inverse_density():
    # dim = 3: q(d) ∝ d (the (1 − d²/4) factor has exponent 0), so P(negative) ∝ 1/max(d, 0.5), and
    # negatives at ≥ 1.4 are never drawn while a nearer one exists.
    block = torch.full((5, 5), 1.9)
    block.fill_diagonal_(0.0)
    block[0, 1:] = torch.tensor([0.2, 0.6, 1.2, 1.5])  # 0.2 is clipped to 0.5
    copies = 600  # independent draws in one call: other blocks' rows are far (1.9) negatives, never drawn
    distances = torch.block_diag(*[block] * copies)
    distances[distances == 0] = 1.9
    distances.fill_diagonal_(0.0)
    labels = torch.arange(5 * copies)
    sampled = distance_weighted_negatives(distances, labels, 3, torch.Generator().manual_seed(0))
    offsets = sampled[::5] - torch.arange(0, 5 * copies, 5)  # anchor 0 of each copy → 1..4 in its block
    frequencies = torch.bincount(offsets, minlength=5)[1:].float() / copies
    weights = torch.tensor([1 / 0.5, 1 / 0.6, 1 / 1.2, 0.0])
    assert frequencies.tolist() == pytest.approx((weights / weights.sum()).tolist(), abs=0.04)


def test_distance_weighted_falls_back_to_far_negatives_and_marks_anchors_without_any():
    distances = torch.tensor([[0.0, 1.0, 1.8], [1.0, 0.0, 1.9], [1.8, 1.9, 0.0]])
    generator = torch.Generator().manual_seed(0)
    sampled = distance_weighted_negatives(distances, torch.tensor([0, 0, 1]), 3, generator)
    assert sampled[:2].tolist() == [2, 2]  # the only negative, though ≥ 1.4 away
    assert sampled[2].item() in (0, 1)
    alone = distance_weighted_negatives(distances, torch.tensor([0, 0, 0]), 3, generator)
    assert alone.tolist() == [-1, -1, -1]


def line_distances(positions: list[float]) -> torch.Tensor:
    """(B, B) distances between points on a line: every entry differentiable w.r.t. ``positions``."""
    x = torch.tensor(positions, requires_grad=True)
    return x, (x[:, None] - x[None, :]).abs()


def test_margin_loss_by_hand_with_its_gradient():
    # a=0, b=0.5 (label 0); c=1.0 (label 1). α = 0.2, β = 1.2 (paper defaults).
    x, distances = line_distances([0.0, 0.5, 1.0])
    labels = torch.tensor([0, 0, 1])
    negatives = torch.tensor([2, 2, 1])
    loss = MarginLoss(num_classes=2)(distances, labels, negatives)
    # a: positive b at 0.5 → (0.2 + 0.5 − 1.2)₊ = 0; negative c at 1.0 → (0.2 − (1.0 − 1.2))₊ = 0.4; mean 0.2
    # b: positive a at 0.5 → 0; negative c at 0.5 → (0.2 − (0.5 − 1.2))₊ = 0.9; mean 0.45
    # c: no positive; negative b at 0.5 → 0.9
    assert loss.tolist() == pytest.approx([0.2, 0.45, 0.9], abs=1e-6)
    loss.sum().backward()
    # d/dx of −d(a, c)/2 − d(b, c)/2 − d(c, b): a gets +½ (pushing away from c lowers the loss by moving
    # left), b gets ½ + 1, c gets −½ − ½ − 1.
    assert x.grad.tolist() == pytest.approx([0.5, 1.5, -2.0], abs=1e-6)


def test_margin_loss_learns_beta_per_class():
    _, distances = line_distances([0.0, 0.5, 1.0])
    head = MarginLoss(num_classes=2, per_class=True)
    with torch.no_grad():
        head.beta.copy_(torch.tensor([1.2, 0.4]))
    loss = head(distances, torch.tensor([0, 0, 1]), torch.tensor([2, 2, 1]))
    # c's class has β = 0.4: (0.2 − (0.5 − 0.4))₊ = 0.1
    assert loss[2].item() == pytest.approx(0.1, abs=1e-6)
    loss.sum().backward()
    # β₀ gets −(number of active positive terms, averaged) + (active negative terms, averaged):
    # a: negative term active (½ · +1), b: negative active (½ · +1) → +1; β₁: c's negative active → +1
    assert head.beta.grad.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_ordered_positives_by_view_keys_and_by_distance_without_them():
    # anchor 0 with positives 1, 2, 3 of one place; 4 is another place.
    _, distances = line_distances([0.0, 0.9, 0.3, 0.6, 5.0])
    labels = torch.tensor([0, 0, 0, 0, 1])
    closer, farther = ordered_positives(distances, labels)
    assert (closer[0].item(), farther[0].item()) == (2, 1)  # by distance: 0.3 nearest, 0.9 farthest
    views = torch.tensor([10.0, 11.0, 30.0, 20.0, 0.0])  # by view: 11 closest to 10, 30 farthest
    closer, farther = ordered_positives(distances, labels, views)
    assert (closer[0].item(), farther[0].item()) == (1, 2)
    unknown = torch.tensor([10.0, float("nan"), 30.0, 20.0, 0.0])  # a positive's key unknown: distance
    closer, farther = ordered_positives(distances, labels, unknown)
    assert (closer[0].item(), farther[0].item()) == (2, 1)
    assert (closer[4].item(), farther[4].item()) == (-1, -1)  # no positive


def test_quadruplet_loss_by_hand_with_its_gradient():
    # anchor a=0, positives p=0.2 (view 1) and q=0.55 (view 3), negative n=0.7; δ₂ = 0.5, δ₁ = 0.25
    x, distances = line_distances([0.0, 0.2, 0.55, 0.7])
    labels = torch.tensor([0, 0, 0, 1])
    views = torch.tensor([0.0, 1.0, 3.0, 0.0])
    loss = quadruplet_loss(distances, labels, torch.tensor([3, 3, 3, 2]), margin=0.5, views=views)
    # a: p₁ = p (view gap 1), p₂ = q (3): [0.2 − 0.55 + 0.25]₊ = 0, [0.55 − 0.7 + 0.5]₊ = 0.35
    # p: p₁ = a (gap 1), p₂ = q (2): [0.2 − 0.35 + 0.25]₊ = 0.1, [0.35 − 0.5 + 0.5]₊ = 0.35
    # q: p₁ = p (gap 2), p₂ = a (3): [0.35 − 0.55 + 0.25]₊ = 0.05, [0.55 − 0.15 + 0.5]₊ = 0.9
    # n: no positive
    assert loss.tolist() == pytest.approx([0.35, 0.45, 0.95, 0.0], abs=1e-6)
    loss.sum().backward()
    # a's loss d(a,q) − d(a,n): ∂q +1, ∂n −1. p's: d(p,a) − d(p,n) (the d(p,q) terms cancel): ∂p +2,
    # ∂a −1, ∂n −1. q's: d(q,p) − d(q,n) (the d(q,a) terms cancel): ∂q +2, ∂p −1, ∂n −1.
    assert x.grad.tolist() == pytest.approx([-1.0, 1.0, 3.0, -3.0], abs=1e-6)
