"""Aggregated local features (VLAD, ASMK's kernel): reference formulas by hand, store = in memory, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import store
from pipeline.aggregate import (
    AggregateConfig,
    aggregate_store,
    asmk_similarity,
    read_codebook,
    train_codebook,
    vlad,
)
from pipeline.store import LocalFeatures, StoreSettings

CODEBOOK = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)


def test_vlad_by_hand():
    # (0.9, 0.2) and (0.8, −0.1) go to word 0: residuals (−0.1, 0.2) + (−0.2, −0.1) = (−0.3, 0.1);
    # (0.1, 0.7) goes to word 1: residual (0.1, −0.3). Signed square roots, then L2 over all four values.
    x = np.array([[0.9, 0.2], [0.8, -0.1], [0.1, 0.7]])
    raw = np.array([-0.3, 0.1, 0.1, -0.3])
    powered = np.sign(raw) * np.sqrt(np.abs(raw))
    np.testing.assert_allclose(vlad(x, CODEBOOK), powered / np.linalg.norm(powered), rtol=1e-6)
    np.testing.assert_allclose(vlad(x, CODEBOOK, power=1.0), raw / np.linalg.norm(raw), rtol=1e-6)


def test_vlad_of_no_features_is_zero():
    assert not vlad(np.zeros((0, 2)), CODEBOOK).any()


def test_asmk_kernel_by_hand():
    query = np.array([[1.0, 0.5], [0.5, 1.0]])  # word 0: (0, 0.5) → (0, 1); word 1: (0.5, 0) → (1, 0)
    candidate = np.array([[1.0, 0.3]])  # word 0 only: (0, 0.3) → (0, 1)
    # shared word 0: u = 1 → σ = 1; self-similarities: query 2 (two words), candidate 1
    assert asmk_similarity(query, candidate, CODEBOOK) == pytest.approx(1 / np.sqrt(2))
    opposite = np.array([[1.0, -0.3]])  # word 0 residual (0, −1): u = −1 is below the threshold 0
    assert asmk_similarity(query, opposite, CODEBOOK) == 0.0
    assert asmk_similarity(query, query, CODEBOOK) == pytest.approx(1.0)


def features(rng: np.random.Generator, n: int) -> LocalFeatures:
    descriptors = rng.standard_normal((n, 128)).astype(np.float32)
    return LocalFeatures(
        rng.uniform(0, 100, (n, 2)).astype(np.float32),
        np.ones(n, np.float32),
        np.ones(n, np.float32),
        descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True),
    )


@pytest.fixture
def local_store(tmp_path) -> tuple[str, dict[str, LocalFeatures]]:
    """Two shards of float32 local features (stored exactly); one image has none."""
    rng = np.random.default_rng(0)
    url, everything = str(tmp_path / "store"), {}
    for shard in range(2):
        ids = [f"s{shard}-{i}" for i in range(6)]
        local = [features(rng, 0 if (shard, i) == (1, 3) else 40 + i) for i in range(6)]
        everything |= dict(zip(ids, local, strict=True))
        vectors = rng.standard_normal((6, 8)).astype(np.float32)
        settings = StoreSettings(local_dtype="float32")
        store.write_shard(url, shard, ids, vectors, local, settings=settings)
    return url, everything


def test_vlad_from_a_store_equals_vlad_in_memory_and_resumes(local_store, tmp_path):
    url, everything = local_store
    config = AggregateConfig(clusters=8, sample_images=12)
    codebook = train_codebook(url, config)
    assert codebook.shape == (8, 128)
    out = str(tmp_path / "vlad")
    summary = aggregate_store(url, out, codebook, config)
    assert (summary.shards, summary.images, summary.images_without_local_features) == (2, 12, 1)
    ids, vectors = store.read_global(out)
    expected = np.stack([vlad(everything[i].descriptors, codebook) for i in ids])
    np.testing.assert_allclose(vectors, expected, rtol=1e-6, atol=1e-7)
    assert sorted(ids) == sorted(everything)
    np.testing.assert_array_equal(read_codebook(out), codebook)
    assert json.loads((tmp_path / "vlad" / "_run.json").read_text())["aggregate"]["clusters"] == 8
    again = aggregate_store(url, out, codebook, config)  # every shard committed: nothing redone
    assert again.shards == 0


def test_the_codebook_is_seeded_and_needs_enough_descriptors(local_store):
    url, _ = local_store
    config = AggregateConfig(clusters=4, sample_images=5, seed=3)
    np.testing.assert_array_equal(train_codebook(url, config), train_codebook(url, config))
    with pytest.raises(ValueError, match="needs at least clusters=100000"):
        train_codebook(url, AggregateConfig(clusters=100_000, sample_images=2))


def test_bad_settings_are_clear():
    with pytest.raises(ValueError, match="method 'fisher'"):
        AggregateConfig(method="fisher")
    with pytest.raises(ValueError, match="power=0"):
        AggregateConfig(power=0)
