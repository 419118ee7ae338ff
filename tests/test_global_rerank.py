"""Global re-ranking (α-QE, DBA, SuperGlobal): hand-computed examples, batched = per query, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.rerank.global_rerank import (
    GlobalRerankConfig,
    alpha_qe_scores,
    database_augmentation,
    parse_method,
    refined_order,
    refined_scores,
    superglobal_scores,
)

# Three unit vectors in the plane used by the hand-computed examples.
A, B, C = (1.0, 0.0), (0.6, 0.8), (0.0, 1.0)


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_alpha_qe_hand_computed() -> None:
    # q = (1, 0); candidates x1 = (0.6, 0.8) sim 0.6, x2 = (0, 1) sim 0, x3 = (0.8, -0.6) sim 0.8, x4 padding.
    # k = 2, α = 3: the top two are x3 (weight 0.8³ = 0.512) and x1 (0.6³ = 0.216):
    # q' ∝ (1, 0) + 0.512 (0.8, -0.6) + 0.216 (0.6, 0.8) = (1.5392, -0.1344), |q'|² = 2.3872.
    cands = tensor([[B, C, (0.8, -0.6), (0.0, 0.0)]])
    valid = torch.tensor([[True, True, True, False]])
    scores = alpha_qe_scores(tensor([A]), cands, valid, k=2, alpha=3.0)[0]
    norm = math.sqrt(2.3872)
    expected = [(1.5392 * 0.6 - 0.1344 * 0.8) / norm, -0.1344 / norm, (1.5392 * 0.8 + 0.1344 * 0.6) / norm]
    np.testing.assert_allclose(scores[:3].numpy(), expected, rtol=1e-12)
    assert scores[3] == float("-inf")


def test_alpha_qe_alpha_zero_is_average_qe() -> None:
    # α = 0: plain average of q and its top k = 1 neighbour x1 = (0.6, 0.8): q' ∝ (1.6, 0.8).
    scores = alpha_qe_scores(tensor([A]), tensor([[B, C]]), torch.tensor([[True, True]]), k=1, alpha=0.0)
    norm = math.sqrt(1.6**2 + 0.8**2)
    np.testing.assert_allclose(scores[0].numpy(), [(0.96 + 0.64) / norm, 0.8 / norm], rtol=1e-12)


def test_database_augmentation_hand_computed() -> None:
    # k = 1, α = 1. a's nearest other row is b (0.6): a' ∝ (1, 0) + 0.6 (0.6, 0.8) = (1.36, 0.48);
    # b's is c (0.8): b' ∝ (0.6, 0.8) + 0.8 (0, 1) = (0.6, 1.6); c's is b (0.8): c' ∝ (0.48, 1.64).
    refined = database_augmentation(tensor([A, B, C]), k=1, alpha=1.0, chunk=2)  # chunked: 2 + 1 rows
    expected = np.array([[1.36, 0.48], [0.6, 1.6], [0.48, 1.64]])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(refined.numpy(), expected, rtol=1e-12)


def test_superglobal_hand_computed() -> None:
    # K = 1, β = 0.5; q = (1, 0); shortlist a, b, c (+ one padding entry).
    # Refined (self weight 1, best other neighbour weight β·sim):
    #   a' = (a + 0.3 b) / 1.3 = (1.18, 0.24) / 1.3;  b' = (b + 0.4 c) / 1.4 = (0.6, 1.2) / 1.4;
    #   c' = (c + 0.4 b) / 1.4 = (0.24, 1.32) / 1.4.
    # First scores q·d': 1.18/1.3, 0.6/1.4, 0.24/1.4. The K + 1 = 2 best are a', b':
    #   q' = max(a', b') = (1.18/1.3, 1.2/1.4). Final = (q·d' + q'·d') / 2.
    cands = tensor([[A, B, C, (0.0, 0.0)]])
    valid = torch.tensor([[True, True, True, False]])
    scores = superglobal_scores(tensor([A]), cands, valid, k=1, beta=0.5)[0].numpy()
    refined = np.array([[1.18 / 1.3, 0.24 / 1.3], [0.6 / 1.4, 1.2 / 1.4], [0.24 / 1.4, 1.32 / 1.4]])
    first = refined[:, 0]
    expanded = np.array([1.18 / 1.3, 1.2 / 1.4])
    np.testing.assert_allclose(scores[:3], (first + refined @ expanded) / 2, rtol=1e-12)
    np.testing.assert_allclose(scores[:3], [0.944920, 0.776138, 0.567598], atol=1e-6)  # by hand, 6 places
    assert scores[3] == float("-inf")


def random_batch(
    seed: int, lengths: list[int], dim: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c = max(lengths)
    queries = torch.nn.functional.normalize(torch.randn(len(lengths), dim, generator=gen), dim=-1)
    cands = torch.nn.functional.normalize(torch.randn(len(lengths), c, dim, generator=gen), dim=-1)
    valid = torch.arange(c)[None, :] < torch.tensor(lengths)[:, None]
    return queries, cands * valid[..., None], valid


@pytest.mark.parametrize("refinement", ["qe", "dba", "dba+qe", "superglobal"])
def test_batched_equals_one_query_at_a_time(refinement: str) -> None:
    config = GlobalRerankConfig(qe_k=3, sg_m=6, sg_k=2)
    lengths = [9, 4, 1, 7]
    queries, cands, valid = random_batch(0, lengths)
    batched = refined_scores(refinement, queries, cands, valid, config)
    for b, n in enumerate(lengths):
        alone = refined_scores(
            refinement, queries[b : b + 1], cands[b : b + 1, :n], valid[b : b + 1, :n], config
        )
        torch.testing.assert_close(batched[b, :n], alone[0], rtol=1e-6, atol=1e-6)
        assert torch.isinf(batched[b, n:]).all()
    if refinement == "superglobal":  # beyond sg_m: not refined
        assert torch.isinf(batched[:, 6:]).all()


def test_database_augmentation_chunking_and_device_agnostic() -> None:
    gen = torch.Generator().manual_seed(1)
    vectors = torch.nn.functional.normalize(torch.randn(50, 16, generator=gen), dim=-1)
    whole = database_augmentation(vectors, k=5, chunk=4096)
    torch.testing.assert_close(database_augmentation(vectors, k=5, chunk=7), whole)
    if torch.cuda.is_available():
        torch.testing.assert_close(
            database_augmentation(vectors.cuda(), k=5).cpu(), whole, rtol=1e-4, atol=1e-5
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("refinement", ["qe", "superglobal"])
def test_cuda_matches_cpu(refinement: str) -> None:
    queries, cands, valid = random_batch(2, [9, 4, 7])
    cpu = refined_scores(refinement, queries, cands, valid)
    gpu = refined_scores(refinement, queries.cuda(), cands.cuda(), valid.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5)


def test_refined_order_puts_refined_first_and_scores_non_increasing() -> None:
    refined = np.array([0.2, 1.6, -np.inf, 0.8, -np.inf])  # SuperGlobal may exceed 1: scaled by 1.6
    order, scores = refined_order(refined, np.array([0.9, 0.8, 0.7, 0.6, 0.1]))
    assert order.tolist() == [1, 3, 0, 2, 4]
    np.testing.assert_allclose(scores, [1.0, 0.5, 0.125, 0.125, 0.1])


def test_parse_method() -> None:
    assert parse_method("verify") == (None, True)
    assert parse_method("superglobal") == ("superglobal", False)
    assert parse_method("dba+qe+verify") == ("dba+qe", True)
    with pytest.raises(ValueError, match="allowed"):
        parse_method("qe+dba")


@pytest.mark.parametrize(
    "bad", [{"qe_k": 0}, {"dba_k": 0}, {"sg_m": 0}, {"sg_k": 0}, {"qe_alpha": -1}, {"sg_beta": 0}]
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        GlobalRerankConfig(**bad)


def test_bad_shapes_rejected() -> None:
    queries, cands, valid = random_batch(3, [3, 2])
    with pytest.raises(ValueError, match="must be"):
        alpha_qe_scores(queries, cands[:1], valid[:1])
    with pytest.raises(ValueError, match="bool"):
        superglobal_scores(queries, cands, valid.int())
    with pytest.raises(ValueError, match="allowed"):
        refined_scores("diffusion", queries, cands, valid)
