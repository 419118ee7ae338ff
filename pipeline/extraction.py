"""Distributed extraction on Ray: manifest shards → decode tasks (CPU) → extractor actors → shard writers.

Why Ray Core rather than Ray Data: the unit of output is a descriptor shard that must commit atomically and
account for every manifest row (ok or error record), and resume is derived from commit markers. With Core
tasks and actors that unit is explicit: each shard's chunks flow decode → extract → one writer task, and
the driver only moves small references and counts. Ray Data's streaming output has no notion of
"this shard is complete", and its operator resource reservations starve on small (2-CPU) nodes.

Data path per shard (the driver never touches pixels or descriptors)::

    rows ──► decode_rows (CPU task, many in parallel: decode, crop, cap at max_side)
         ──► Extractor.extract_prepared (a pool of actors, GPU or CPU)
         ──► write_shard_task (CPU task) ──► OUT/{global,local,errors}/part-K + _commits/part-K.json

The actor pool follows the cluster (:class:`Extractors`): its actors are asked for up front, placed or not
(the autoscaler's demand), the run starts once ``min_extractors`` are ready and gives work to each further
one as soon as its node has joined and its model is loaded.

Backpressure: at most ``max_chunks_in_flight`` (default 4 per ready actor) chunks are between decode and
extract at any time, so object-store memory stays bounded while decode overlaps with extraction. Faults:
decode and writer tasks are retried by Ray; actors restart and their pending calls are retried
(``max_restarts``, ``max_task_retries``); a killed driver resumes from the commit markers on the next run.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

import pipeline
from pipeline import images, manifest, metrics, storage, store
from pipeline.config import ExtractionConfig, RuntimeOptions
from pipeline.execution import ActorPool
from pipeline.features import PreparedImage, prepare_image
from pipeline.ray_runtime import ensure_ray
from pipeline.storage import Options
from pipeline.store import ErrorRecord, LocalFeatures, StoreSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionJob:
    """What to extract and where to: everything that defines the output (recorded in ``_run.json``)."""

    manifest_url: str
    out_url: str
    config: ExtractionConfig
    weights_url: str | None = None  # full DELG or backbone-only state dict, or "imagenet"; None: random init
    store: StoreSettings = field(default_factory=StoreSettings)
    shard_size: int = 1000  # manifest rows per descriptor shard: ~5k shards for GLDv2's 5M images
    allowed_schemes: frozenset[str] = images.DEFAULT_ALLOWED_SCHEMES
    max_pixels: int = images.DEFAULT_MAX_PIXELS  # decompression-bomb guard
    image_root: str | None = None  # urls for id-only manifests (GLDv2 index/test.csv): ROOT/a/b/c/ID.jpg
    # Local files rows may read without allow_local_outside_root: those under image_root, else under the
    # manifest's folder when the manifest is local, else none (pipeline.manifest.local_root).
    allow_local_outside_root: bool = False
    origin_manifest_url: str | None = None  # the manifest the rows came from, if manifest_url is a subset
    # JPEG DCT-domain (draft) / reduce() decoding before the exact cap: faster decode, slightly different
    # pixels (see benchmarks/RESULTS.md); rows with a bbox are always decoded at full size
    decode_draft: bool = False

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size={self.shard_size}; must be ≥ 1")

    def local_files(self, options: Options = None) -> images.LocalFiles:
        """The policy on local image files that this job's rows follow."""
        origin = self.origin_manifest_url or self.manifest_url
        root = manifest.local_root(origin, options, self.image_root)
        return images.LocalFiles(root, self.allow_local_outside_root)


@dataclass(frozen=True)
class Extractors:
    """The extractor actor pool: how many, and the GPU share each asks Ray for (nothing changes the output).

    GPU actors are asked for even when no node has a GPU yet: Ray keeps the ones it cannot place pending
    (the autoscaler's demand, also requested explicitly), and each one gets work as soon as it is placed and
    loaded, so the pool grows while the run goes as GPU nodes join.
    """

    gpus_per_extractor: float = 0  # 0: CPU actors; e.g. 1 (one GPU each) or 0.5 (two actors per GPU)
    min_extractors: int = 1  # the run waits until this many actors are ready
    max_extractors: int | None = None  # the pool grows up to this many; None: min_extractors
    # Seconds to wait for min_extractors (node start-up and model load included) before failing with what
    # was asked for and what the cluster offers; 0: no limit. 30 min covers a cloud GPU node's start.
    extractor_wait_timeout: float = 1800.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gpus_per_extractor) and self.gpus_per_extractor >= 0):
            raise ValueError(
                f"gpus_per_extractor (--gpus-per-extractor) = {self.gpus_per_extractor}; must be ≥ 0"
            )
        if self.min_extractors < 1:
            raise ValueError(f"min_extractors (--min-extractors) = {self.min_extractors}; must be ≥ 1")
        if not (math.isfinite(self.extractor_wait_timeout) and self.extractor_wait_timeout >= 0):
            raise ValueError(
                f"extractor_wait_timeout (--extractor-wait-timeout) = {self.extractor_wait_timeout}; "
                "must be ≥ 0 seconds (0: no limit)"
            )
        if self.max_extractors is not None and self.max_extractors < self.min_extractors:
            raise ValueError(
                f"max_extractors (--max-extractors) = {self.max_extractors}; must be ≥ min_extractors "
                f"({self.min_extractors})"
            )

    @property
    def most(self) -> int:
        return self.max_extractors or self.min_extractors


@dataclass(frozen=True)
class ClusterOptions:
    """How the job runs on Ray: nothing here changes the output."""

    address: str | None = None  # None: start a local Ray (or use the one already initialised)
    extractors: Extractors = field(default_factory=Extractors)
    actor_cpus: float = 1.0  # CPU share of each extractor; fractional so decode tasks still run
    decode_cpus: float = 0.25  # fractional: decode is I/O-bound and must not starve (GUIDE §5)
    chunk_size: int = 16  # rows per decode task / extractor call
    max_chunks_in_flight: int = 0  # 0: 4 per extractor
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)


@dataclass
class Progress:
    """Counts as the run goes (sent to the ``on_progress`` callback after every chunk)."""

    total_rows: int
    skipped_rows: int  # rows of shards already committed by an earlier run
    done_rows: int = 0
    ok: int = 0
    errors: int = 0
    shards_committed: int = 0
    devices: Counter[str] = field(default_factory=Counter)  # ready extractor actors by torch device
    started: float = field(default_factory=time.monotonic)

    @property
    def images_per_s(self) -> float:
        return self.done_rows / max(time.monotonic() - self.started, 1e-9)

    @property
    def extractors(self) -> int:
        return sum(self.devices.values())

    def describe(self) -> str:
        """One progress line, e.g. for `ray job logs`."""
        done = self.skipped_rows + self.done_rows
        devices = ", ".join(f"{d}: {n}" for d, n in sorted(self.devices.items()))
        return (
            f"extraction: {done}/{self.total_rows} rows ({done / max(self.total_rows, 1):.1%}), "
            f"{self.images_per_s:.2f} images/s, {self.errors} errors, {self.extractors} extractors"
            + (f" ({devices})" if devices else "")
        )


@dataclass(frozen=True)
class ExtractionSummary:
    rows: int
    ok: int
    errors: int
    errors_by_reason: dict[str, int]
    shards: int
    shards_resumed: int  # committed before this run started
    rows_this_run: int
    seconds: float
    extractors: int  # extractor actors that were ready by the end of the run (0: nothing left to extract)
    devices: dict[str, int]  # those actors by torch device ("cuda", or "cpu" also for a GPU fallback)

    @property
    def images_per_s(self) -> float:
        return self.rows_this_run / max(self.seconds, 1e-9)


# Reasons of rows that fail before decoding; the rest fail in decoding.
FETCH_REASONS = frozenset({"missing", "scheme_not_allowed", "local_file_refused", "fetch_failed"})

# What fixes a run in which every row failed, by the reason most rows failed for.
FIXES = {
    "local_file_refused": "the rows are local files outside the manifest's folder: pass --image-root with "
    "the folder they are under, or --allow-local-files",
    "missing": "no image where the rows point: check the urls (or --image-root of an id-only manifest)",
    "scheme_not_allowed": "the rows' url scheme is not allowed: use local paths, s3://, gs:// or http(s)://",
    "fetch_failed": "storage refused every read: check the credentials (AWS_* or "
    "LANDMARK_INDEX_STORAGE_OPTIONS), the endpoint and the bucket",
    "extract_failed": "the model failed on every image: check --weights against --preset",
}
DECODE_FIX = "the rows are not images this pipeline decodes: check that the manifest lists photos"


class NothingExtractedError(ValueError):
    """Every row of a run failed: the manifest, its roots or the storage access is wrong (a user error)."""


@dataclass(frozen=True)
class DecodedChunk:
    """Rows of one chunk after fetch + decode: images cropped and capped (what the extractor needs, at most
    max_side² · 3 bytes each, whatever the photo's size) for the good rows, error records for the rest."""

    ids: list[str]
    images: list[PreparedImage]
    errors: list[ErrorRecord]


@dataclass(frozen=True)
class ExtractedChunk:
    ids: list[str]
    global_vectors: np.ndarray  # (n, D) float32
    local: list[LocalFeatures]
    errors: list[ErrorRecord]


def decode_rows(rows: pa.Table, job: ExtractionJob, options: Options) -> DecodedChunk:
    """Fetch, decode, crop and cap each row; a failing row becomes an error record, never an exception."""
    ids: list[str] = []
    prepared: list[PreparedImage] = []
    errors: list[ErrorRecord] = []
    local_files = job.local_files(options)
    for row in rows.to_pylist():
        try:
            prepared.append(prepare_row(row, job, options, local_files))
        except images.ImageError as exc:
            stage = "fetch" if exc.reason in FETCH_REASONS else "decode"
            errors.append(
                ErrorRecord(row["id"], storage.redact(row["url"] or ""), stage, exc.reason, str(exc))
            )
            continue
        ids.append(row["id"])
    return DecodedChunk(ids, prepared, errors)


def prepare_row(
    row: dict[str, Any], job: ExtractionJob, options: Options, local_files: images.LocalFiles
) -> PreparedImage:
    """One manifest row's image as the extractor takes it: decoded (reduced with ``job.decode_draft``),
    cropped to its bbox, capped at the config's max_side."""
    data = images.fetch_image_bytes(
        row.get("url"), row.get("image"), options, job.allowed_schemes, local_files
    )
    bbox = tuple(row["bbox"]) if row.get("bbox") is not None else None
    max_side = job.config.max_side
    if job.decode_draft and bbox is None:
        reduced = images.decode_reduced(data, max_side, job.max_pixels)
        return prepare_image(reduced.pixels, max_side, full_size=reduced.full_size)
    pixels = images.decode_image(data, job.max_pixels)
    try:
        return prepare_image(pixels, max_side, bbox)  # type: ignore[arg-type]  # 4 floats, checked there
    except ValueError as exc:  # only the bbox can be wrong here: the pixels come from decode_image
        raise images.ImageError("bad_bbox", str(exc)) from exc


class ExtractorActor:
    """A thin Ray actor: loads the model once, then turns decoded chunks into descriptors."""

    def __init__(self, job: ExtractionJob, cluster: ClusterOptions, options: Options) -> None:
        import torch

        from pipeline.features import build_extractor

        gpus = cluster.extractors.gpus_per_extractor
        torch.set_num_threads(_threads_on_this_node(cluster))
        self.extractor = build_extractor(
            job.config,
            job.weights_url,
            options=options,
            device=extractor_device(gpus),
            runtime=cluster.runtime,
        )

    def ready(self) -> str:
        """The torch device this actor extracts on; answered once the model is loaded."""
        return self.extractor.device.type

    def extract(self, chunk: DecodedChunk) -> ExtractedChunk:
        try:
            features = self.extractor.extract_prepared(chunk.images)
        except Exception:  # isolate the image that breaks the batch: the others still get descriptors
            return self._one_by_one(chunk)
        return _assemble(chunk, list(zip(chunk.ids, features, strict=True)), [])

    def _one_by_one(self, chunk: DecodedChunk) -> ExtractedChunk:
        good, failed = [], []
        for image_id, image in zip(chunk.ids, chunk.images, strict=True):
            try:
                good.append((image_id, self.extractor.extract_prepared([image])[0]))
            except Exception as exc:
                failed.append(
                    ErrorRecord(image_id, "", "extract", "extract_failed", f"{type(exc).__name__}: {exc}")
                )
        return _assemble(chunk, good, failed)


def _assemble(
    chunk: DecodedChunk, good: Sequence[tuple[str, Any]], failed: list[ErrorRecord]
) -> ExtractedChunk:
    dim = good[0][1].global_descriptor.shape[0] if good else 0
    vectors = np.stack([f.global_descriptor for _, f in good]) if good else np.zeros((0, dim), np.float32)
    local = [LocalFeatures(f.keypoints, f.scales, f.scores, f.descriptors) for _, f in good]
    return ExtractedChunk([i for i, _ in good], vectors.astype(np.float32), local, chunk.errors + failed)


def write_chunks(
    job: ExtractionJob, shard: int, rows: int, options: Options, *chunks: ExtractedChunk
) -> store.ShardCommit:
    """Join a shard's extracted chunks and commit the shard."""
    ids = [i for c in chunks for i in c.ids]
    dims = {c.global_vectors.shape[1] for c in chunks if len(c.ids)}
    vectors = (
        np.concatenate([c.global_vectors for c in chunks if len(c.ids)])
        if dims
        else np.zeros((0, job.config.global_dim), np.float32)
    )
    local = [f for c in chunks for f in c.local]
    errors = [e for c in chunks for e in c.errors]
    return store.write_shard(
        job.out_url, shard, ids, vectors, local, errors, rows=rows, options=options, settings=job.store
    )


# ---------------------------------------------------------------- run metadata and resume


def run_info(job: ExtractionJob, fingerprint: str, rows: int, options: Options) -> dict[str, Any]:
    from pipeline.config import PRESETS, rerank_settings
    from pipeline.model.weights import weights_checksum

    preset = next((name for name, config in PRESETS.items() if config == job.config), "custom")
    return {
        "package_version": pipeline.__version__,
        "preset": preset,
        "config": job.config.to_dict(),
        "weights": storage.redact(job.weights_url) if job.weights_url else None,
        "weights_sha256": (
            weights_checksum(job.weights_url, options) if job.weights_url not in (None, "imagenet") else None
        ),
        "manifest": storage.redact(job.manifest_url),
        "manifest_fingerprint": fingerprint,
        "manifest_rows": rows,
        "shard_size": job.shard_size,
        "decode_draft": job.decode_draft,
        "store": asdict(job.store),
        "rerank": rerank_settings(job.config.local_head),  # re-ranking defaults for these features
    }


def _check_resumable(existing: dict[str, Any], wanted: dict[str, Any], out_url: str) -> None:
    """A store may only be resumed by the run that started it: same manifest, model and encoding."""
    keys = (
        "manifest_fingerprint",
        "config",
        "weights_sha256",
        "backbone_weights_sha256",
        "shard_size",
        "decode_draft",
        "store",
    )
    older = {"decode_draft": False}  # keys added since stores were first written: their value back then
    different = [k for k in keys if existing.get(k, older.get(k)) != wanted.get(k)]
    if different:
        raise ValueError(
            f"{storage.redact(out_url)} holds descriptors of a different run (differs in: {', '.join(different)}); "
            "choose a new output location or remove the old store"
        )


# ---------------------------------------------------------------- the stage


def run_extraction(
    job: ExtractionJob,
    cluster: ClusterOptions = ClusterOptions(),
    options: Options = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> ExtractionSummary:
    """Extract descriptors for every manifest row into the store at ``job.out_url``; resume if started.

    Every manifest row ends in exactly one of: descriptors written, or an error record.
    """

    started = time.monotonic()
    table = manifest.read_manifest(job.manifest_url, options, job.image_root)
    info = run_info(job, manifest.manifest_fingerprint(table), table.num_rows, options)
    existing = store.read_run_info(job.out_url, options)
    if existing is None:
        store.write_run_info(job.out_url, info, options)
    else:
        _check_resumable(existing, info, job.out_url)

    shards = manifest.split_shards(table, job.shard_size)
    done = set(store.committed_shards(job.out_url, options))
    todo = [(index, rows) for index, rows in shards if index not in done]
    progress = Progress(
        total_rows=table.num_rows, skipped_rows=sum(rows.num_rows for i, rows in shards if i in done)
    )
    if on_progress is not None:
        on_progress(progress)  # the manifest is valid: a progress display may start
    if todo:
        ensure_ray(cluster.address)
        _extract_shards(job, cluster, options, todo, progress, on_progress)

    stats = store.store_stats(job.out_url, options)
    if stats["rows"] != table.num_rows:
        raise RuntimeError(f"store accounts for {stats['rows']} of {table.num_rows} manifest rows")
    if stats["rows"] and not stats["ok"]:
        raise NothingExtractedError(nothing_extracted_message(job, stats, options))
    return ExtractionSummary(
        rows=stats["rows"],
        ok=stats["ok"],
        errors=stats["errors"],
        errors_by_reason=stats["errors_by_reason"],
        shards=stats["shards"],
        shards_resumed=len(done),
        rows_this_run=progress.done_rows,
        seconds=time.monotonic() - started,
        extractors=progress.extractors,
        devices=dict(progress.devices),
    )


def nothing_extracted_message(job: ExtractionJob, stats: dict[str, Any], options: Options) -> str:
    """Why every row failed (counts by reason, one example), what fixes it, and what to do with the store."""
    reasons = stats["errors_by_reason"]
    commonest = max(reasons, key=reasons.__getitem__)
    records = store.read_errors(job.out_url, options).to_pylist()
    example = next(r for r in records if r["reason"] == commonest)
    counts = ", ".join(f"{reason}: {n}" for reason, n in reasons.items())
    return (
        f"none of the {stats['rows']} rows of {storage.redact(job.manifest_url)} gave descriptors ({counts}; "
        f"e.g. {example['id']}: {example['message']}). Fix: {FIXES.get(commonest, DECODE_FIX)}; then remove "
        f"{storage.redact(job.out_url)} (it holds these error records, and a re-run would keep them) "
        "and run again"
    )


# OpenMP threads that spin-wait between parallel regions burn the cores the decode tasks (and anything else
# on the node) need; with 2 torch threads on 2 busy cores that made CPU extraction 5–8× slower. Passive
# threads sleep instead. Read when torch loads, so it is set in the actor's environment, not in __init__.
ACTOR_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
GPU_HOST_THREADS = 4  # a GPU actor's CPU work (resize, top-K, copies) is small: a few threads suffice


def extractor_threads(node_cpus: int, extractors: int, gpus: int) -> int:
    """Torch CPU threads of one extractor actor: a CPU actor gets its share of the node's cores (the
    decode tasks' small share fits in the gaps), a GPU actor a few for host-side work."""
    share = max(1, node_cpus // extractors)
    return min(share, GPU_HOST_THREADS) if gpus else share


def extractor_device(gpus: float) -> str:
    """The torch device of an actor given ``gpus``: CUDA when it was given a GPU share and CUDA works, else
    the CPU (a CPU actor never touches a GPU it lands beside; a GPU actor whose GPU is unusable falls back,
    with a warning)."""
    if not gpus:
        return "cpu"
    import torch

    try:
        if torch.cuda.is_available():
            torch.cuda.init()  # raises on a broken driver or device
            return "cuda"
        reason = "torch.cuda.is_available() is False"
    except Exception as exc:  # any CUDA initialisation error means: not usable here
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("extractor given %g GPU, but CUDA is not usable (%s): extracting on the CPU", gpus, reason)
    return "cpu"


def _threads_on_this_node(cluster: ClusterOptions) -> int:
    """extractor_threads for the node this actor runs on: CPU actors may all share one node; GPU actors
    share a node with as many others as its GPUs hold."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    resources = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id)
    gpus = cluster.extractors.gpus_per_extractor
    sharing = int(resources.get("GPU", 0) // gpus) if gpus else cluster.extractors.most
    return extractor_threads(int(resources.get("CPU", 1)), max(sharing, 1), int(gpus > 0))


def _extractor_pool(
    job: ExtractionJob, cluster: ClusterOptions, options: Options, devices: Counter[str]
) -> ActorPool:
    """All ``max_extractors`` actors at once; Ray keeps those it cannot place pending (GPU actors on a
    cluster whose GPU nodes are still to come)."""
    import ray

    gpus = cluster.extractors.gpus_per_extractor
    actor_class = ray.remote(
        max_restarts=-1,
        max_task_retries=3,
        runtime_env={"env_vars": ACTOR_ENV},
        num_cpus=cluster.actor_cpus,
        num_gpus=gpus,
    )(ExtractorActor)
    actors = [actor_class.remote(job, cluster, options) for _ in range(cluster.extractors.most)]
    min_ready = cluster.extractors.min_extractors
    return ActorPool(
        actors,
        min_ready,
        gpus,
        cluster.actor_cpus,
        "extractor",
        devices,
        wait_timeout=cluster.extractors.extractor_wait_timeout,
        flags=("--min-extractors", "--extractor-wait-timeout", "--gpus-per-extractor"),
    )


@dataclass
class _ShardState:
    rows: int
    pending: int  # chunks not yet extracted
    results: list[Any]  # ObjectRefs of ExtractedChunk, in chunk order


def _extract_shards(
    job: ExtractionJob,
    cluster: ClusterOptions,
    options: Options,
    todo: list[tuple[int, pa.Table]],
    progress: Progress,
    on_progress: Callable[[Progress], None] | None,
) -> None:
    pool = _extractor_pool(job, cluster, options, progress.devices)
    pool.ask_autoscaler(True)
    try:
        pool.wait_for_minimum()
        _Dispatch(job, cluster, options, todo).run(pool, progress, on_progress or (lambda _: None))
    finally:
        pool.ask_autoscaler(False)


class _Dispatch:
    """Chunks of the shards to do → ready extractors (least busy first) → one writer task per shard."""

    def __init__(
        self, job: ExtractionJob, cluster: ClusterOptions, options: Options, todo: list[tuple[int, pa.Table]]
    ) -> None:
        import ray

        self.job, self.cluster, self.options = job, cluster, options
        self.decode = ray.remote(num_cpus=cluster.decode_cpus, max_retries=3)(decode_rows)
        self.writer = ray.remote(num_cpus=cluster.decode_cpus, max_retries=3)(write_chunks)
        size = cluster.chunk_size
        self.chunks: deque[tuple[int, pa.Table]] = deque(
            (shard, rows.slice(start, size))
            for shard, rows in todo
            for start in range(0, rows.num_rows, size)
        )
        self.states = {
            shard: _ShardState(rows.num_rows, -(-rows.num_rows // size), []) for shard, rows in todo
        }
        self.in_flight: dict[Any, tuple[int, int, int]] = {}  # extract ref → (shard, rows, actor index)
        self.load: Counter[int] = Counter()  # chunks in flight per ready actor
        self.writes: list[Any] = []

    def run(self, pool: ActorPool, progress: Progress, on_progress: Callable[[Progress], None]) -> None:
        import ray

        while self.chunks or self.in_flight:
            pool.poll()
            self._submit(pool)
            # Only completion matters here: the features go from the extractor's node to the writer task,
            # never through the driver (the default fetch_local=True would pull every result onto the
            # driver's node). A pending actor's ready() answer wakes the loop too: a joining node gets work.
            done, _ = ray.wait([*self.in_flight, *pool.pending], num_returns=1, fetch_local=False)
            for ref in done:
                if ref in self.in_flight:
                    self._extracted(ref, progress)
            _collect_writes(self.writes, progress, block=False)
            self._gauge_queues()
            on_progress(progress)
        _collect_writes(self.writes, progress, block=True)
        self._gauge_queues()
        on_progress(progress)

    def _gauge_queues(self) -> None:
        """Chunks waiting for an extractor, chunks being decoded or extracted, shards being written."""
        depths = {"waiting": len(self.chunks), "extracting": len(self.in_flight), "writing": len(self.writes)}
        for queue, depth in depths.items():
            metrics.gauge("queue_depth", depth, stage="extract", queue=queue)

    def _submit(self, pool: ActorPool) -> None:
        """Keep at most ``max_chunks_in_flight`` (default 4 per ready extractor) chunks in flight."""
        limit = self.cluster.max_chunks_in_flight or 4 * len(pool.ready)
        while self.chunks and len(self.in_flight) < limit:
            shard, rows = self.chunks.popleft()
            actor = min(range(len(pool.ready)), key=self.load.__getitem__)  # the least busy extractor
            ref = pool.ready[actor].extract.remote(self.decode.remote(rows, self.job, self.options))
            self.in_flight[ref] = (shard, rows.num_rows, actor)
            self.load[actor] += 1
            self.states[shard].results.append(ref)

    def _extracted(self, ref: Any, progress: Progress) -> None:
        shard, count, actor = self.in_flight.pop(ref)
        self.load[actor] -= 1
        state = self.states[shard]
        state.pending -= 1
        progress.done_rows += count
        metrics.count("images", count, stage="extract")
        if state.pending == 0:
            self.writes.append(self.writer.remote(self.job, shard, state.rows, self.options, *state.results))


def _collect_writes(writes: list[Any], progress: Progress, block: bool) -> None:
    """Account committed shards; re-raise a writer's failure (after Ray's retries)."""
    import ray

    if not writes:
        return
    ready, _ = ray.wait(writes, num_returns=len(writes), timeout=None if block else 0)
    for ref in ready:
        commit: store.ShardCommit = ray.get(ref)
        writes.remove(ref)
        progress.ok += commit.ok
        progress.errors += commit.errors
        progress.shards_committed += 1
        for reason, n in commit.reasons.items():
            metrics.count("image_errors", n, stage="extract", reason=reason)
