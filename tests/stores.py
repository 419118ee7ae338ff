"""Small synthetic descriptor stores for tests that need stores, not extraction."""

from __future__ import annotations

import numpy as np

from pipeline import store
from pipeline.store import LocalFeatures


def write_clustered_store(
    url: str, prefix: str, count: int, rng: np.random.Generator, centres: np.ndarray
) -> None:
    """`count` images near the given cluster centres, with a few local features each, in shards of 8."""
    for shard, start in enumerate(range(0, count, 8)):
        ids = [f"{prefix}{i:03d}" for i in range(start, min(start + 8, count))]
        vectors = centres[[i % len(centres) for i in range(start, start + len(ids))]]
        vectors = vectors + 0.05 * rng.standard_normal(vectors.shape).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        local = []
        for _ in ids:
            desc = rng.standard_normal((12, 128)).astype(np.float32)
            local.append(
                LocalFeatures(
                    rng.uniform(0, 200, (12, 2)).astype(np.float32),
                    np.ones(12, np.float32),
                    rng.uniform(0, 1, 12).astype(np.float32),
                    desc / np.linalg.norm(desc, axis=1, keepdims=True),
                )
            )
        store.write_shard(url, shard, ids, vectors, local)
