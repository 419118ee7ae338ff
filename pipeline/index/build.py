"""Distributed index build: train once on a random sample → add shards in parallel Ray tasks → merge → measure.

Every heavy step is a Ray task with a memory request sized from what it holds (:func:`step_memory_bytes`): the
training sample and k-means, the adds, the merge and the recall measurement run where the scheduler finds that
memory, never in the job driver on the head pod. The driver holds only shard sizes and sample positions."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import metrics, storage, store
from pipeline.index import io, refine, whitening
from pipeline.index.params import (
    DEFAULT_REFINE,
    MERGE_MODES,
    MIN_POINTS_PER_LIST,
    REFINE_KINDS,
    IndexChoice,
    choose_index,
    parse_size,
)
from pipeline.index.quality import QualityConfig, exact_knn, quality_report
from pipeline.ray_runtime import ensure_ray
from pipeline.resources import PeakMemory, available_memory_bytes
from pipeline.storage import Options

log = logging.getLogger(__name__)

REFINE_SAMPLE = 2**16  # rows that train the SQ8 ranges when the index itself needs no training sample
STEP_MEMORY_FACTOR = 2  # k-means adds residuals as large as the sample; a RAM merge holds merged + one part
STEP_BASE_MEMORY = 512 * 2**20  # a worker's interpreter, faiss and pyarrow
T = TypeVar("T")


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0  # training and query samples are drawn from this seed
    max_points_per_centroid: int = 256  # faiss k-means subsamples above this anyway
    max_train_bytes: int = 8 * 2**30  # the float32 training sample must fit host RAM
    tasks: int = 4  # Ray add tasks; each gets every tasks-th shard
    task_cpus: float = 0.5  # fractional: whole-CPU tasks starve other Ray work on small machines
    merge: str = "auto"  # "ram": merge_from in memory; "disk": merge_ondisk (local out only); "auto": by RAM
    ram_fraction: float = 0.5  # auto merges on disk when the parts exceed this share of the free memory
    step_cpus: float | None = None  # CPUs (faiss threads) of the train and merge tasks; None: a whole node's
    train_gpus: int = 0  # GPUs of the train task: faiss k-means runs on them (0: on its CPUs)
    trained_url: str | None = None  # reuse this trained empty index instead of training (same quantizer)
    refine: str = "auto"  # shortlist re-scoring: auto (from the memory budget) or none, sq8, fp16, store
    whitening: int | None = None  # learned PCA whitening to this many dims (None: vectors as stored)
    whitening_power: float = 0.5  # each axis divided by eigenvalue^power: 0.5 full whitening, 0 PCA only
    keep_intermediate: bool = False  # keep OUT/parts/ and OUT/trained.faiss (e.g. to reuse the trained index)
    quality: QualityConfig = field(default_factory=QualityConfig)

    def __post_init__(self) -> None:
        if self.merge not in MERGE_MODES:
            raise ValueError(f"merge={self.merge!r}; allowed: {', '.join(MERGE_MODES)}")
        if (
            self.tasks < 1
            or self.task_cpus <= 0
            or (self.step_cpus is not None and self.step_cpus <= 0)
            or self.train_gpus < 0
        ):
            raise ValueError(
                f"tasks={self.tasks}, task_cpus={self.task_cpus}, step_cpus={self.step_cpus}, "
                f"train_gpus={self.train_gpus}; need tasks ≥ 1, task_cpus > 0, step_cpus > 0, train_gpus ≥ 0"
            )
        if self.refine != "auto" and self.refine not in REFINE_KINDS:
            raise ValueError(f"refine={self.refine!r}; allowed: auto, {', '.join(REFINE_KINDS)}")
        if self.whitening is not None and self.whitening < 1:
            raise ValueError(f"whitening={self.whitening}; must be ≥ 1 dims (None: no whitening)")
        if not 0 <= self.whitening_power <= 1:
            raise ValueError(f"whitening_power={self.whitening_power}; must be in [0, 1]")


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
    """Vectors (len(rows), D) float32 at global positions ``rows`` (sorted), reading one shard at a time."""
    bases = id_bases(counts)
    parts = []
    for url, base, count in zip(urls, bases, counts, strict=True):
        local = rows[(rows >= base) & (rows < base + count)] - base
        if len(local):
            parts.append(store.read_global_shard(url, options)[1][local])
    return np.concatenate(parts) if parts else np.zeros((0, shard_dim(urls[0], options)), np.float32)


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
    return index


def part_urls(out_url: str, task: int) -> tuple[str, str]:
    name = f"part-{task:05d}"
    return storage.join(out_url, io.PARTS, name + ".faiss"), storage.join(
        out_url, io.PARTS, name + ".ids.parquet"
    )


def add_shards_to(
    index: faiss.Index,
    shard_urls: Sequence[str],
    bases: Sequence[int],
    options: Options = None,
    codes: refine.CodeWriter | None = None,
    space: whitening.Space = whitening.identity,
) -> pa.Table:
    """Add each shard's vectors, mapped by ``space``, with ids base + row (and their refinement codes, given a
    writer); returns the id map of what was added."""
    tables = []
    for url, base in zip(shard_urls, bases, strict=True):
        image_ids, stored = store.read_global_shard(url, options)  # (n,), (n, D)
        vectors = space(stored)  # (n, d)
        ids = base + np.arange(len(vectors), dtype=np.int64)
        index.add_with_ids(vectors, ids)
        if codes is not None:
            codes.write(vectors, int(base))
        tables.append(io.id_map_table(ids, image_ids))
    return pa.concat_tables(tables) if tables else io.ID_MAP_SCHEMA.empty_table()


def _add_part(
    out_url: str,
    shard_urls: list[str],
    bases: list[int],
    out: tuple[str, str],
    options: Options,
    threads: int,
    whitened: bool,
) -> int:
    faiss.omp_set_num_threads(threads)
    index = io.read_index(storage.join(out_url, io.TRAINED), options)
    table = add_shards_to(
        index,
        shard_urls,
        bases,
        options,
        refine.code_writer(out_url, options),
        _space(out_url, whitened, options),
    )
    io.write_index(index, out[0], options)
    storage.write_parquet(out[1], table, options, compression="zstd")
    return int(index.ntotal)


def _space(out_url: str, whitened: bool, options: Options) -> whitening.Space:
    """The map into the space of the index being built under ``out_url`` (before its params.json exists)."""
    return whitening.load(out_url, options) if whitened else whitening.identity


def add_in_parallel(
    shard_urls: Sequence[str],
    bases: Sequence[int],
    out_url: str,
    config: BuildConfig,
    options: Options = None,
) -> list[int]:
    """Ray tasks adding to OUT's trained index; task t adds shards t, t+T, t+2T, ... (non-contiguous ids, so
    merging must not shift ids). Each task also writes its shards' refinement codes when OUT has a quantizer."""
    import ray

    tasks = min(config.tasks, len(shard_urls))
    task = ray.remote(_add_part)
    threads = max(1, int(config.task_cpus))
    refs = [
        task.options(num_cpus=config.task_cpus).remote(
            out_url,
            list(shard_urls[t::tasks]),
            [int(b) for b in bases[t::tasks]],
            part_urls(out_url, t),
            options,
            threads,
            config.whitening is not None,
        )
        for t in range(tasks)
    ]
    added = ray.get(refs)
    metrics.count("vectors_added", sum(added), stage="build-index")
    return added


def merge_in_ram(trained: faiss.Index, parts: Sequence[str], options: Options = None) -> faiss.Index:
    """merge_from with add_id=0: the parts' ids are kept as they are."""
    for url in parts:
        trained.merge_from(io.read_index(url, options), 0)
    return trained


def merge_on_disk(trained: faiss.Index, parts: Sequence[str], out_url: str) -> faiss.Index:
    """Inverted lists merged into OUT/index.ivfdata (faiss.contrib.ondisk); needs a local out_url."""
    from faiss.contrib.ondisk import merge_ondisk

    os.makedirs(out_url, exist_ok=True)
    merge_ondisk(trained, list(parts), os.path.abspath(storage.join(out_url, io.IVFDATA)), shift_ids=False)
    return trained


def check_disk_output(out_url: str) -> None:
    if not storage.is_local(out_url):
        raise ValueError(
            f"on-disk merge needs a local output, not {storage.redact(out_url)}; use merge='ram'"
        )


def choose_merge(config: BuildConfig, parts: Sequence[str], out_url: str, options: Options) -> bool:
    """True to merge on disk: asked for, or (auto) the parts would take too much of the memory this container
    may still use (its cgroup limit, not the host's RAM)."""
    if config.merge == "auto":
        on_disk = parts_bytes(parts, options) > config.ram_fraction * available_memory_bytes()
    else:
        on_disk = config.merge == "disk"
    if on_disk:
        check_disk_output(out_url)
    return on_disk


def merge_parts(out_url: str, tasks: int, config: BuildConfig, options: Options) -> tuple[faiss.Index, bool]:
    """Merge the tasks' partial indexes into OUT/index.faiss and their id maps into OUT/ids.parquet.

    Starts from the stored trained index, like the add tasks: faiss merges only indexes of identical types.
    """
    trained_url = storage.join(out_url, io.TRAINED)
    index_urls, id_urls = zip(*(part_urls(out_url, t) for t in range(tasks)), strict=True)
    on_disk = choose_merge(config, index_urls, out_url, options)
    if on_disk:
        index = merge_on_disk(io.read_index(trained_url, options), index_urls, out_url)
        faiss.write_index(index, storage.join(out_url, io.INDEX))
    else:
        index = merge_in_ram(io.read_index(trained_url, options), index_urls, options)
        io.write_index(index, storage.join(out_url, io.INDEX), options)
    id_map = pa.concat_tables(storage.read_parquet(u, options) for u in id_urls)
    io.write_id_map(out_url, id_map, options)
    return index, on_disk


def resolve_choice(
    factory: str | None, memory_budget: str | int | None, total: int, dim: int, refine_kind: str = "auto"
) -> IndexChoice:
    if factory is not None and memory_budget is not None:
        raise ValueError(
            "give factory or memory_budget, not both (the budget only steers automatic parameters)"
        )
    if factory is None:
        budget = parse_size(memory_budget) if memory_budget is not None else None
        return choose_index(total, dim, budget, refine_kind)
    try:
        nlist = nlist_of(factory, dim)
    except RuntimeError as exc:
        raise ValueError(
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


def step_memory_bytes(vectors: int, dim: int, index_bytes: int = 0) -> int:
    """Memory a build step requests from Ray: it holds ``vectors`` float32 vectors of ``dim`` and an index of
    ``index_bytes``, times :data:`STEP_MEMORY_FACTOR` for faiss's working copies, plus a worker's own footprint."""
    return STEP_MEMORY_FACTOR * (vectors * dim * 4 + index_bytes) + STEP_BASE_MEMORY


def parts_bytes(parts: Sequence[str], options: Options = None) -> int:
    return sum(storage.info(p, options)["size"] for p in parts)


def run_step(step: Callable[..., T], memory: int, cpus: float | None, gpus: int, *args: Any) -> T:
    """``step(*args)`` as a Ray task that requests ``memory`` bytes (the scheduler places it on a node that has
    them) and ``cpus`` faiss threads (None: every CPU of the largest node, as a single-process build would use
    every core: k-means and the merge are the build's serial steps); returns its (small) result."""
    import ray

    cpus = cpus or largest_node("CPU") or 1
    task = ray.remote(_threaded).options(num_cpus=cpus, num_gpus=gpus, memory=memory_request(memory))
    return ray.get(task.remote(step, max(1, int(cpus)), *args))


def largest_node(resource: str) -> float:
    """The most of ``resource`` one live node of the Ray cluster has (0 when none has any)."""
    import ray

    return max((n["Resources"].get(resource, 0) for n in ray.nodes() if n["Alive"]), default=0)


def memory_request(estimate: int) -> int:
    """``estimate``, but never more than the largest live node offers: a request no node can meet would wait
    forever (on a local Ray, or a cluster whose nodes are all that size); there the step runs as it always did."""
    largest = largest_node("memory")
    if largest and estimate > largest:
        log.warning(
            "a build step needs ~%d B, more than any node's %d B: requesting %d B", estimate, largest, largest
        )
        return int(largest)
    return estimate


def _threaded(step: Callable[..., T], threads: int, *args: Any) -> T:
    faiss.omp_set_num_threads(threads)  # Ray sets OMP_NUM_THREADS from num_cpus; be explicit as the adds are
    return step(*args)


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
            raise ValueError(
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
            raise ValueError(
                f"the trained index's whitening gives {fitted.dim} dims, whitening={config.whitening} asked"
            )
    else:
        fitted = whitening.fit(sample, config.whitening, config.whitening_power)
    whitening.write(out_url, fitted, options)
    return fitted(sample)


def recall_queries(
    shard_urls: Sequence[str],
    counts: Sequence[int],
    query_rows: np.ndarray,
    config: BuildConfig,
    options: Options,
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The recall report's queries (q, D) as stored, the ids to leave out (None for a query store) and what
    they are: a seeded sample of ``config.quality.query_store``, else the index's own rows ``query_rows``
    (their ids: a fresh build numbers rows 0..N-1 in shard order)."""
    url = config.quality.query_store
    if url is None:
        where = f"leave-one-out: {len(query_rows)} stored vectors drawn at random, own id excluded"
        return sample_rows(shard_urls, counts, query_rows, options), query_rows, where
    urls, query_counts, _ = committed_global_shards(url, options)
    total = sum(query_counts)
    rows = np.sort(
        np.random.default_rng(config.seed).choice(total, min(total, config.quality.queries), False)
    )
    return sample_rows(urls, query_counts, rows, options), None, f"query store {storage.redact(url)}"


def quality_step(
    index: faiss.Index,
    choice: IndexChoice,
    shard_urls: Sequence[str],
    counts: Sequence[int],
    query_rows: np.ndarray,
    out_url: str,
    options: Options,
    config: BuildConfig,
) -> dict[str, Any]:
    """quality.json: recall of the index alone and refined, per nprobe (× k_factor), and the chosen setting."""
    space = _space(out_url, config.whitening is not None, options)
    stored, exclude, query_set = recall_queries(shard_urls, counts, query_rows, config, options)
    queries = space(stored)
    total = sum(counts)
    depth = max(1, min(config.quality.target_k, total - (exclude is not None)))
    _, exact_ids = exact_knn(queries, shard_urls, id_bases(counts), depth, options, space, exclude)
    state = {"refine": choice.refine, "next_id": total, "dim": queries.shape[1]}
    refined = refine.attach(index, out_url, state, options) if choice.refine != "none" else None
    quality = quality_report(
        index, queries, exact_ids, choice.nlist, config.quality, refined, exclude, query_set
    )
    io.write_json(storage.join(out_url, io.QUALITY), quality, options)
    return quality


def merge_and_measure(
    out_url: str,
    tasks: int,
    choice: IndexChoice,
    shard_urls: Sequence[str],
    counts: Sequence[int],
    query_rows: np.ndarray,
    config: BuildConfig,
    options: Options,
) -> tuple[int, bool, dict[str, Any], dict[str, float]]:
    """Merge, then measure recall, in one step: both need the merged index in memory.

    Returns (vectors in the index, merged on disk, quality.json's content, {merge_s, quality_s})."""
    start = time.perf_counter()
    index, on_disk = merge_parts(out_url, tasks, config, options)
    merged = time.perf_counter()
    quality = quality_step(index, choice, shard_urls, counts, query_rows, out_url, options, config)
    timings = {"merge_s": merged - start, "quality_s": time.perf_counter() - merged}
    return int(index.ntotal), on_disk, quality, timings


def _train_task(
    choice: IndexChoice,
    shard_urls: Sequence[str],
    counts: Sequence[int],
    out_url: str,
    config: BuildConfig,
    options: Options,
) -> tuple[int, np.ndarray]:
    """:func:`train_step` on Ray, requesting the memory of its sample and the index's centroids."""
    dim = shard_dim(shard_urls[0], options)
    memory = step_memory_bytes(sample_sizes(choice, sum(counts), dim, config)[1], dim, choice.nlist * dim * 4)
    args = (choice, shard_urls, counts, out_url, config, options)
    return run_step(train_step, memory, config.step_cpus, config.train_gpus, *args)


def _merge_task(
    tasks: int,
    choice: IndexChoice,
    shard_urls: Sequence[str],
    counts: Sequence[int],
    query_rows: np.ndarray,
    out_url: str,
    config: BuildConfig,
    options: Options,
) -> tuple[int, bool, dict[str, Any], dict[str, float]]:
    """:func:`merge_and_measure` on Ray, requesting the memory of the merged parts, the recall queries and
    one shard (exact search reads the shards one at a time)."""
    parts = [part_urls(out_url, t)[0] for t in range(tasks)]
    dim = shard_dim(shard_urls[0], options)
    memory = step_memory_bytes(config.quality.queries + max(counts), dim, parts_bytes(parts, options))
    args = (out_url, tasks, choice, shard_urls, counts, query_rows, config, options)
    return run_step(merge_and_measure, memory, config.step_cpus, 0, *args)


def committed_global_shards(descriptors_url: str, options: Options) -> tuple[list[str], list[int], int]:
    """A store's committed global shards: their URLs, row counts and the dimension; ValueError when empty."""
    shard_urls = store.global_shard_urls(descriptors_url, options)
    if not shard_urls:
        raise ValueError(f"no committed global shards under {storage.redact(descriptors_url)}")
    counts = shard_rows(shard_urls, options)
    if sum(counts) == 0:
        raise ValueError(f"{storage.redact(descriptors_url)} has committed shards but no descriptors")
    return shard_urls, counts, shard_dim(shard_urls[0], options)


def checked_inputs(
    descriptors_url: str, out_url: str, config: BuildConfig, options: Options
) -> tuple[list[str], list[int], int]:
    """:func:`committed_global_shards` of the index store, once the output and the recall query store are
    checked: before the expensive steps."""
    if config.merge == "disk":
        check_disk_output(out_url)
    shard_urls, counts, dim = committed_global_shards(descriptors_url, options)
    if config.quality.query_store:
        query_dim = committed_global_shards(config.quality.query_store, options)[2]
        if query_dim != dim:
            raise ValueError(
                f"recall query store {storage.redact(config.quality.query_store)} has {query_dim}-d "
                f"descriptors, the index store {dim}-d"
            )
    return shard_urls, counts, dim


BUILD_STEPS = ("train", "add", "merge and recall")


def _step_reporter(on_step: Callable[[str, int, int], None]) -> Callable[[str], float]:
    """Tells ``on_step`` and the build_step gauge of each step as it starts (its index in BUILD_STEPS);
    returns the time it started (``time.perf_counter()``)."""

    def step(name: str) -> float:
        done = BUILD_STEPS.index(name) if name in BUILD_STEPS else len(BUILD_STEPS)
        metrics.gauge("build_step", done)
        on_step(name, done, len(BUILD_STEPS))
        return time.perf_counter()

    return step


def _build_steps(
    choice: IndexChoice,
    shard_urls: list[str],
    counts: list[int],
    out_url: str,
    config: BuildConfig,
    options: Options,
    step: Callable[[str], float],
) -> tuple[int, int, bool, dict[str, Any], dict[str, float], int]:
    """Train, add, merge + recall: (training points, indexed vectors, on disk, quality, timings, peak bytes
    summed over this machine's build processes: driver + a local Ray's, not a remote cluster's)."""
    timings: dict[str, float] = {}
    with PeakMemory() as memory:
        start = step("train")
        n_train, query_rows = _train_task(choice, shard_urls, counts, out_url, config, options)
        timings["train_s"] = time.perf_counter() - start
        start = step("add")
        added = add_in_parallel(shard_urls, id_bases(counts), out_url, config, options)
        assert sum(added) == sum(counts), (added, counts)
        timings["add_s"] = time.perf_counter() - start
        step("merge and recall")
        ntotal, on_disk, quality, step_timings = _merge_task(
            len(added), choice, shard_urls, counts, query_rows, out_url, config, options
        )
    return n_train, ntotal, on_disk, quality, timings | step_timings, memory.peak


def build_index(
    descriptors_url: str,
    out_url: str,
    *,
    factory: str | None = None,
    memory_budget: str | int | None = None,
    options: Options = None,
    ray_address: str | None = None,
    config: BuildConfig = BuildConfig(),
    on_step: Callable[[str, int, int], None] = lambda step, done, total: None,
) -> dict[str, Any]:
    """Build the index of a descriptor store's committed global descriptors under ``out_url``.

    Returns the summary written to ``OUT/params.json`` (choice, nprobe, k_factor, timings, peak memory).
    ``on_step(step, done, total)`` hears each of BUILD_STEPS start, then "done".
    """
    shard_urls, counts, dim = checked_inputs(descriptors_url, out_url, config, options)
    total = sum(counts)
    choice = resolve_choice(factory, memory_budget, total, config.whitening or dim, config.refine)
    log.info("index %s, refine %s: %s", choice.factory, choice.refine, choice.reason)
    ensure_ray(ray_address)
    step = _step_reporter(on_step)
    n_train, ntotal, on_disk, quality, timings, peak = _build_steps(
        choice, shard_urls, counts, out_url, config, options, step
    )
    if not config.keep_intermediate:
        io.remove_intermediate(out_url, options)

    summary = {
        **asdict(choice),
        "dim": config.whitening or dim,
        "input_dim": dim,
        "whitening": config.whitening,
        "metric": "inner_product",
        "ntotal": ntotal,
        "next_id": total,
        "train_points": n_train,
        "trained_from": config.trained_url,
        "shards": [storage.redact(u) for u in shard_urls],
        "on_disk": on_disk,
        "nprobe": quality["nprobe"],
        "k_factor": quality["k_factor"],
        "nprobe_reason": quality["nprobe_reason"],
        "timings": timings,
        "peak_memory_bytes": peak,
    }
    io.write_json(storage.join(out_url, io.PARAMS), summary, options)
    step("done")
    return {**summary, "index_bytes": io.index_bytes(out_url, options)}
