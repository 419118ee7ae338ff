"""Aggregation stage: a store's local features → one global vector per image (VLAD), in a new store.

    codebook = train_codebook(index_store, AggregateConfig(clusters=64))
    aggregate_store(index_store, index_vlad_store, codebook)   # then build-index / search as any store
    aggregate_store(query_store, query_vlad_store, codebook)   # the queries with the SAME codebook

VLAD (Jégou et al. 2010): each local descriptor is assigned to its nearest visual word of a k-means
codebook; the image's vector stacks, per word, the sum of its descriptors' residuals to that word (K × 128
values). It is then power-normalised (signed |v|^power, Jégou et al. 2012 / Perronnin et al. 2010: bursty
words stop dominating) and L2-normalised, so inner products are cosines as for DELG's global descriptor. PCA
whitening, when wanted, is the index's own (``build-index --whitening D``): it is learned on the index's
training sample and applied to everything the index sees, queries included.

The codebook is trained with faiss k-means on the local descriptors of a seeded random sample of images
of the (index) store, and written beside the aggregated store as ``codebook.npy`` (float32, (K, 128)); the
output store's ``_run.json`` records the source store, the settings and the codebook's origin. Output
shards mirror the input's committed shards, each committed as in any store, so a re-run resumes. Images
without local features get a zero vector (similarity 0 to everything) and are counted.

ASMK (Tolias et al. 2013) is not offered as an index: it keeps, per image, one binarised residual per
visual word present (a set of vectors, not one), scored by a selective kernel over an inverted file keyed by
word — a structure beside the IVF-PQ index of one vector per image that this pipeline builds, searches,
merges and refines. Its kernel is a re-ranking of a shortlist's local features:
:func:`asmk_similarity` (benchmarks/bench_aggregate.py measures it against VLAD and GeM).
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from pipeline import storage, store
from pipeline.errors import ConfigError, InputError, MissingInputError
from pipeline.storage import Options

log = logging.getLogger(__name__)

CODEBOOK = "codebook.npy"
METHODS = ("vlad",)


@dataclass(frozen=True)
class AggregateConfig:
    """How local features become one vector per image."""

    method: str = "vlad"  # the aggregation: vlad
    clusters: int = 64  # visual words K: a K × 128-d vector (64 → 8192-d, as in the VLAD literature)
    power: float = 0.5  # signed |v|^power before L2 (0.5: the usual signed square root; 1: none)
    sample_images: int = 2000  # images whose local features train the codebook
    seed: int = 0  # the codebook's image sample and k-means initialisation

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r}; allowed: {list(METHODS)}")
        if self.clusters < 1 or self.sample_images < 1:
            raise ConfigError(f"clusters={self.clusters}, sample_images={self.sample_images}; must be ≥ 1")
        if not 0 < self.power <= 1:
            raise ConfigError(f"power={self.power}; must be in (0, 1]")


@dataclass(frozen=True)
class AggregateSummary:
    shards: int  # shards aggregated in this run (already committed ones are skipped)
    images: int
    images_without_local_features: int
    dim: int


def vlad(descriptors: np.ndarray, codebook: np.ndarray, power: float = 0.5) -> np.ndarray:
    """(N, D) descriptors, (K, D) codebook → (K · D,) float32 VLAD, power- and L2-normalised (zeros if N = 0)."""
    clusters, dim = codebook.shape
    out = np.zeros((clusters, dim), dtype=np.float64)
    if len(descriptors):
        x = np.asarray(descriptors, dtype=np.float64)
        nearest = _nearest_words(x, codebook)  # (N,)
        np.add.at(out, nearest, x - codebook[nearest])
    out = np.sign(out) * np.abs(out) ** power
    norm = np.linalg.norm(out)
    return (out / norm if norm > 0 else out).reshape(-1).astype(np.float32)


def _nearest_words(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """(N, D), (K, D) → (N,) index of each row's nearest word (squared Euclidean distance)."""
    squared = (x**2).sum(1)[:, None] - 2 * x @ codebook.T + (codebook.astype(np.float64) ** 2).sum(1)[None]
    return squared.argmin(axis=1)


def train_codebook(
    store_url: str, config: AggregateConfig = AggregateConfig(), options: Options = None
) -> np.ndarray:
    """(K, 128) float32 k-means codebook of the local descriptors of ``config.sample_images`` images drawn at
    random (seeded) from ``store_url``; at most 256 descriptors per word are used, as faiss would subsample."""
    ids = np.concatenate([ids for ids, _ in store.iter_global(store_url, options)] or [np.array([], object)])
    rng = np.random.default_rng(config.seed)
    sample = rng.choice(ids, size=min(config.sample_images, len(ids)), replace=False) if len(ids) else ids
    reader = store.LocalReader(store_url, options)
    features = reader.read([i for i in sample if i in reader])
    descriptors = [f.descriptors for f in features.values() if len(f)]
    points = np.concatenate(descriptors).astype(np.float32) if descriptors else np.zeros((0, 0), np.float32)
    if len(points) < config.clusters:
        raise InputError(
            f"{storage.redact(store_url)}: {len(points)} local descriptors in the sample of {len(sample)} images; "
            f"the codebook needs at least clusters={config.clusters}"
        )
    cap = 256 * config.clusters
    if len(points) > cap:
        points = points[rng.choice(len(points), cap, replace=False)]
    kmeans = faiss.Kmeans(
        points.shape[1], config.clusters, niter=20, seed=config.seed, max_points_per_centroid=256
    )
    kmeans.train(np.ascontiguousarray(points))
    return kmeans.centroids.astype(np.float32)


def write_codebook(out_url: str, codebook: np.ndarray, options: Options = None) -> None:
    buffer = io.BytesIO()
    np.save(buffer, codebook.astype(np.float32), allow_pickle=False)
    storage.write_bytes(storage.join(out_url, CODEBOOK), buffer.getvalue(), options)


def read_codebook(url: str, options: Options = None) -> np.ndarray:
    """The codebook of an aggregated store (``url`` the store, or the ``codebook.npy`` itself)."""
    path = url if url.endswith(".npy") else storage.join(url, CODEBOOK)
    if not storage.exists(path, options):
        raise MissingInputError(
            f"no VLAD codebook at {storage.redact(path)}: aggregate the index store first"
        )
    codebook = np.load(io.BytesIO(storage.read_bytes(path, options)), allow_pickle=False)
    if codebook.ndim != 2 or codebook.dtype != np.float32:
        raise store.StoreFormatError(f"{storage.redact(path)}: not a (K, D) float32 codebook")
    return codebook


def aggregate_store(
    store_url: str,
    out_url: str,
    codebook: np.ndarray,
    config: AggregateConfig = AggregateConfig(),
    options: Options = None,
) -> AggregateSummary:
    """One VLAD per image of ``store_url``'s committed shards into the store ``out_url`` (global vectors
    only, shard numbers kept; committed shards of ``out_url`` are skipped), with the codebook beside it."""
    store.require_store(store_url, options)
    write_codebook(out_url, codebook, options)
    store.write_run_info(out_url, _run_info(store_url, codebook, config), options)
    done = set(store.committed_shards(out_url, options))
    reader = store.LocalReader(store_url, options)
    shards = store.committed_shards(store_url, options)
    summary = AggregateSummary(0, 0, 0, codebook.size)
    for shard, url in zip(shards, store.global_shard_urls(store_url, options), strict=True):
        if shard not in done:
            ids, _ = store.read_global_shard(url, options)
            vectors, empty = _aggregate(list(ids), reader, codebook, config)
            store.write_global_only_shard(out_url, shard, list(ids), vectors, options)
            summary = AggregateSummary(
                summary.shards + 1,
                summary.images + len(ids),
                summary.images_without_local_features + empty,
                codebook.size,
            )
            log.info("aggregated shard %d: %d images", shard, len(ids))
    return summary


def _aggregate(
    ids: list[str], reader: store.LocalReader, codebook: np.ndarray, config: AggregateConfig
) -> tuple[np.ndarray, int]:
    """(n, K · D) VLADs of ``ids`` and how many of them had no local features."""
    features = reader.read([i for i in ids if i in reader])
    none = np.zeros((0, codebook.shape[1]), np.float32)
    local = [features[i].descriptors if i in features else none for i in ids]
    vectors = (
        np.stack([vlad(d, codebook, config.power) for d in local]) if ids else np.zeros((0, codebook.size))
    )
    return vectors.astype(np.float32), sum(1 for d in local if not len(d))


def _run_info(store_url: str, codebook: np.ndarray, config: AggregateConfig) -> dict:
    return {
        "aggregate": asdict(config) | {"clusters": int(codebook.shape[0])},
        "source_store": storage.redact(store_url),
        "codebook": CODEBOOK,
    }


def asmk_similarity(
    query: np.ndarray, candidate: np.ndarray, codebook: np.ndarray, alpha: float = 3.0, threshold: float = 0.0
) -> float:
    """ASMK's selective match kernel (Tolias, Avrithis, Jégou 2013) between two images' (N, D) local
    descriptors over ``codebook``: per shared visual word c, the L2-normalised residual sums V_q(c), V_x(c)
    are compared by σ(u) = sign(u)·|u|^alpha where u = ⟨V_q(c), V_x(c)⟩ > threshold (else 0), summed over
    words, and normalised by both images' self-similarity (so an image scores 1 against itself)."""
    vq, vx = _word_residuals(query, codebook), _word_residuals(candidate, codebook)
    if not vq or not vx:
        return 0.0

    def kernel(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> float:
        u = np.array([float(a[c] @ b[c]) for c in a.keys() & b.keys()])
        return float((np.sign(u) * np.abs(u) ** alpha * (u > threshold)).sum()) if len(u) else 0.0

    return kernel(vq, vx) / np.sqrt(kernel(vq, vq) * kernel(vx, vx))


def _word_residuals(descriptors: np.ndarray, codebook: np.ndarray) -> dict[int, np.ndarray]:
    """Visual word → the L2-normalised sum of the residuals of the descriptors assigned to it."""
    if not len(descriptors):
        return {}
    x = np.asarray(descriptors, dtype=np.float64)
    nearest = _nearest_words(x, codebook)
    out = {}
    for word in np.unique(nearest):
        residual = (x[nearest == word] - codebook[word]).sum(0)
        norm = np.linalg.norm(residual)
        if norm > 0:
            out[int(word)] = residual / norm
    return out
