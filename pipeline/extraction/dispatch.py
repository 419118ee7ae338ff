"""The Ray data path per shard (the driver never touches pixels or descriptors)::

    rows ──► decode_rows (CPU task, many in parallel: decode, crop, cap at max_side)
         ──► ExtractorActor.extract (a pool of actors, GPU or CPU)
         ──► write_chunks (CPU task) ──► OUT/{global,local,errors}/part-K + _commits/part-K.json

Backpressure: at most ``max_chunks_in_flight`` (default 4 per ready actor) chunks are between decode and
extract at any time, so object-store memory stays bounded while decode overlaps with extraction."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import metrics, store
from pipeline.execution import ActorPool
from pipeline.extraction.actors import _extractor_pool
from pipeline.extraction.chunks import decode_rows, write_chunks
from pipeline.extraction.progress import Progress
from pipeline.extraction.settings import ClusterOptions, ExtractionJob
from pipeline.storage import Options


@dataclass
class _ShardState:
    rows: int
    pending: int  # chunks not yet extracted
    results: list[Any]  # ObjectRefs of ExtractedChunk, in chunk order


def extract_on_ray(
    job: ExtractionJob,
    cluster: ClusterOptions,
    options: Options,
    todo: list[tuple[int, pa.Table]],
    progress: Progress,
    on_progress: Callable[[Progress], None] | None,
) -> None:
    """Extract the shards ``todo`` on the Ray actor pool (the data path above), counting into ``progress``."""
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
        progress.add_commit(commit)
