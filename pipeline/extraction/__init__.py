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

The package's rooms: :mod:`~pipeline.extraction.settings` (job, pool, cluster, summary),
:mod:`~pipeline.extraction.chunks` (the stage logic, no Ray: decode, extract, commit a shard),
:mod:`~pipeline.extraction.progress`, :mod:`~pipeline.extraction.actors` (the Ray actor pool),
:mod:`~pipeline.extraction.dispatch` (the Ray data path) and :mod:`~pipeline.extraction.stage`
(:func:`run_extraction`; ``in_process=True`` runs the same chunk logic through
:class:`pipeline.execution.InProcessExecutor`, without Ray).
"""

from __future__ import annotations

from pipeline.extraction.actors import ACTOR_ENV, GPU_HOST_THREADS, ExtractorActor, extractor_threads
from pipeline.extraction.chunks import (
    FETCH_REASONS,
    ChunkExtractor,
    DecodedChunk,
    ExtractedChunk,
    ShardWork,
    decode_rows,
    extractor_device,
    prepare_row,
    write_chunks,
)
from pipeline.extraction.dispatch import extract_on_ray
from pipeline.extraction.progress import Progress
from pipeline.extraction.settings import ClusterOptions, ExtractionJob, ExtractionSummary, Extractors
from pipeline.extraction.stage import (
    DECODE_FIX,
    FIXES,
    NothingExtractedError,
    nothing_extracted_message,
    run_extraction,
    run_info,
)

__all__ = [
    "ACTOR_ENV",
    "DECODE_FIX",
    "FETCH_REASONS",
    "FIXES",
    "GPU_HOST_THREADS",
    "ChunkExtractor",
    "ClusterOptions",
    "DecodedChunk",
    "ExtractedChunk",
    "ExtractionJob",
    "ExtractionSummary",
    "ExtractorActor",
    "Extractors",
    "NothingExtractedError",
    "Progress",
    "ShardWork",
    "decode_rows",
    "extract_on_ray",
    "extractor_device",
    "extractor_threads",
    "nothing_extracted_message",
    "prepare_row",
    "run_extraction",
    "run_info",
    "write_chunks",
]
