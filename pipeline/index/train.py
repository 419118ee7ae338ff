"""Train once on a random sample: the store's shard sizes, the sample drawn from them (never the first N
rows), the whitening fit, and the trained empty index (and refinement quantizer) every add task starts from."""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import pyarrow.parquet as pq

from pipeline import storage, store
from pipeline.errors import ConfigError, InputError
from pipeline.index import io, refine, whitening
from pipeline.index.build_config import BuildConfig
from pipeline.index.params import (
    DEFAULT_REFINE,
    MIN_POINTS_PER_LIST,
    IndexChoice,
    choose_index,
    parse_size,
)
from pipeline.storage import Options

REFINE_SAMPLE = 2**16  # rows that train the SQ8 ranges when the index itself needs no training sample


def shard_rows(urls: Sequence[str], options: Options = None) -> list[int]:
    """Rows of each global shard file, from its Parquet footer (no data read)."""
    counts = []
    for url in urls:
        with storage.open_input(url, options) as f:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
    return counts


def shard_dim(url: str, options: Options = None) -> int:
    with storage.open_input(url, options) as f:
        return pq.ParquetFile(f).schema_arrow.field("global").type.list_size


def id_bases(counts: Sequence[int], start: int = 0) -> np.ndarray:
    """Global int64 id of each shard's first row: ids are ``start`` + position in shard order."""
    return start + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def sample_rows(
    urls: Sequence[str], counts: Sequence[int], rows: np.ndarray, options: Options = None
) -> np.ndarray:
    """Vectors (len(rows), D) float32 at global positions ``rows`` (sorted), reading one shard at a time into
    one preallocated array: collecting per-shard parts and concatenating them held the sample twice (16 GB at
    a 1M × 2048 sample)."""
    sample = np.empty((len(rows), shard_dim(urls[0], options)), np.float32)
    filled = 0
    for url, base, count in zip(urls, id_bases(counts), counts, strict=True):
        local = rows[(rows >= base) & (rows < base + count)] - base
        if len(local):
            sample[filled : filled + len(local)] = store.read_global_shard(url, options)[1][local]
            filled += len(local)
    assert filled == len(rows), "rows outside the shards"
    return sample


def draw_samples(total: int, train: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random global positions for training and for held-out queries, each sorted.

    Disjoint when ``train + queries ≤ total``; otherwise the queries reuse training rows. Only the drawn
    positions are held (no permutation of all N).
    """
    picked = np.random.default_rng(seed).choice(total, min(total, train + queries), replace=False)
    return np.sort(picked[:train]), np.sort(picked[len(picked) - queries :])


def leave_one_out_queries(total: int, config: BuildConfig) -> int:
    """Stored vectors drawn as recall queries: none when a query store gives them."""
    return 0 if config.quality.query_store else min(config.quality.queries, total)


def train_size(factory: str, total: int, dim: int, config: BuildConfig) -> int:
    """≥ 39 points per centroid, up to 256 where the budget allows; all rows when fewer; 0 when nothing to train.

    Centroids are the IVF lists, or the 256 codewords of each PQ sub-quantizer when those are more.
    """
    if faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT).is_trained:
        return 0
    centroids = max(nlist_of(factory, dim), 256)
    affordable = config.max_train_bytes // (4 * dim)
    wanted = min(config.max_points_per_centroid * centroids, affordable)
    return int(min(total, max(wanted, MIN_POINTS_PER_LIST * centroids)))


def nlist_of(factory: str, dim: int) -> int:
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    try:
        return faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return 0


def train(factory: str, sample: np.ndarray, dim: int) -> faiss.Index:
    """The trained, empty index; k-means runs on all GPUs when faiss sees any."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if index.is_trained:
        return index
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None and faiss.get_num_gpus() > 0:
        flat = (
            faiss.IndexFlatIP(ivf.d)
            if ivf.metric_type == faiss.METRIC_INNER_PRODUCT
            else faiss.IndexFlatL2(ivf.d)
        )
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
    index.train(sample)
    if ivf is not None:
        ivf.clustering_index = None
    drop_pca_basis(index)
    return index


def drop_pca_basis(index: faiss.Index) -> None:
    """Free a trained PCA's full d_in × d_in eigenvector matrix: search applies only its d_out × d_in projection,
    and the full one (16.8 MB at 2048-d, 84 B per vector of a 200k index) would be stored in every copy."""
    if isinstance(index, faiss.IndexPreTransform):
        for step in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(step))
            if isinstance(transform, faiss.PCAMatrix):
                transform.PCAMat.clear()


def resolve_choice(
    factory: str | None, memory_budget: str | int | None, total: int, dim: int, refine_kind: str = "auto"
) -> IndexChoice:
    if factory is not None and memory_budget is not None:
        raise ConfigError(
            "give factory or memory_budget, not both (the budget only steers automatic parameters)"
        )
    if factory is None:
        budget = parse_size(memory_budget) if memory_budget is not None else None
        return choose_index(total, dim, budget, refine_kind)
    try:
        nlist = nlist_of(factory, dim)
    except RuntimeError as exc:
        raise ConfigError(
            f"factory {factory!r} is not a faiss index_factory string for d={dim}: {exc}"
        ) from exc
    kind = (DEFAULT_REFINE if nlist else "none") if refine_kind == "auto" else refine_kind
    return IndexChoice(factory, "factory given by the user", nlist, 0, 0, kind)


def sample_sizes(choice: IndexChoice, total: int, dim: int, config: BuildConfig) -> tuple[int, int]:
    """(points that train the index, rows of the training sample): one sample trains the index, the whitening
    and the refinement; whitening and SQ8 ranges still need one when the index does not (reused or untrained)."""
    n_train = 0 if config.trained_url else train_size(choice.factory, total, dim, config)
    side = config.whitening is not None or choice.refine == "sq8"
    return n_train, max(n_train, min(total, REFINE_SAMPLE) if side else 0)


def train_step(
    choice: IndexChoice,
    shard_urls: Sequence[str],
    counts: Sequence[int],
    out_url: str,
    config: BuildConfig,
    options: Options,
) -> tuple[int, np.ndarray]:
    """Write OUT/trained.faiss (and OUT/refine.faiss for a refined index, OUT/whitening.npz for a whitened one)
    from one random sample.

    Returns the training points used by the index and the leave-one-out query rows (none with a query store).
    """
    total, dim = sum(counts), config.whitening or shard_dim(shard_urls[0], options)
    n_train, n_sample = sample_sizes(choice, total, dim, config)
    rows, query_rows = draw_samples(total, n_sample, leave_one_out_queries(total, config), config.seed)
    sample = whitening_step(sample_rows(shard_urls, counts, rows, options), out_url, config, options)
    if config.trained_url:
        trained = io.read_index(config.trained_url, options)
        if trained.d != dim:
            raise InputError(
                f"trained index {storage.redact(config.trained_url)} has d={trained.d}, the index needs {dim}"
            )
    else:
        trained = train(choice.factory, sample, dim)  # the whole sample: a larger whitening one too
    io.write_index(trained, storage.join(out_url, io.TRAINED), options)
    refine.remove_codes(out_url, options)
    if choice.refine != "none":
        quantizer = refine.train_quantizer(choice.refine, sample, dim)
        io.write_index(quantizer, storage.join(out_url, refine.QUANTIZER), options)
    return (len(sample) if n_train else 0), query_rows


def whitening_step(sample: np.ndarray, out_url: str, config: BuildConfig, options: Options) -> np.ndarray:
    """Fit the whitening on ``sample`` (n, D) into OUT (a reused trained index brings its own, from beside
    it); returns the sample in the index's space (n, d)."""
    whitening.remove(out_url, options)
    if config.whitening is None:
        return sample
    if config.trained_url:
        fitted = whitening.load(config.trained_url.rsplit("/", 1)[0], options)
        if fitted.dim != config.whitening:
            raise InputError(
                f"the trained index's whitening gives {fitted.dim} dims, whitening={config.whitening} asked"
            )
    else:
        fitted = whitening.fit(sample, config.whitening, config.whitening_power)
    whitening.write(out_url, fitted, options)
    return fitted(sample)


def committed_global_shards(descriptors_url: str, options: Options) -> tuple[list[str], list[int], int]:
    """A store's committed global shards: their URLs, row counts and the dimension; ValueError when empty."""
    shard_urls = store.global_shard_urls(descriptors_url, options)
    if not shard_urls:
        raise InputError(f"no committed global shards under {storage.redact(descriptors_url)}")
    counts = shard_rows(shard_urls, options)
    if sum(counts) == 0:
        raise InputError(f"{storage.redact(descriptors_url)} has committed shards but no descriptors")
    return shard_urls, counts, shard_dim(shard_urls[0], options)
