"""The extraction stage: read the manifest, check or record the run, extract the shards not yet committed
(on Ray, or in this process), and account for every row."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import pyarrow as pa

import pipeline
from pipeline import manifest, metrics, storage, store
from pipeline.config import preset_name, rerank_settings
from pipeline.errors import InputError
from pipeline.execution import InProcessExecutor
from pipeline.extraction.chunks import ShardWork
from pipeline.extraction.dispatch import extract_on_ray
from pipeline.extraction.progress import Progress
from pipeline.extraction.settings import ClusterOptions, ExtractionJob, ExtractionSummary

# torch: loaded with the extractor's model code anyway
from pipeline.model.weights import config_for_weights
from pipeline.ray_runtime import ensure_ray
from pipeline.storage import Options

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


class NothingExtractedError(InputError):
    """Every row of a run failed: the manifest, its roots or the storage access is wrong (a user error)."""


def run_info(
    job: ExtractionJob, preset: str, fingerprint: str, rows: int, weights_sha256: str | None
) -> dict[str, Any]:
    """What the store is of: ``job``'s settings as extraction applies them, and the sha256 of its weights
    file (both from config_for_weights)."""
    return {
        "package_version": pipeline.__version__,
        "preset": preset,
        "config": job.config.to_dict(),
        "weights": storage.redact(job.weights_url) if job.weights_url else None,
        "weights_sha256": weights_sha256,
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
        raise InputError(
            f"{storage.redact(out_url)} holds descriptors of a different run (differs in: {', '.join(different)}); "
            "choose a new output location or remove the old store"
        )


def run_extraction(
    job: ExtractionJob,
    cluster: ClusterOptions = ClusterOptions(),
    options: Options = None,
    on_progress: Callable[[Progress], None] | None = None,
    in_process: bool = False,
) -> ExtractionSummary:
    """Extract descriptors for every manifest row into the store at ``job.out_url``; resume if started.

    Every manifest row ends in exactly one of: descriptors written, or an error record. ``in_process``:
    extract in this process, shard by shard, without Ray (small runs, tests); the store is the same.
    """

    started = time.monotonic()
    table = manifest.read_manifest(job.manifest_url, options, job.image_root)
    preset = preset_name(job.config)
    config, weights_sha256 = config_for_weights(job.config, job.weights_url, options)
    job = replace(job, config=config)
    info = run_info(job, preset, manifest.manifest_fingerprint(table), table.num_rows, weights_sha256)
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
    if todo and in_process:
        _extract_in_process(job, cluster, options, todo, progress, on_progress or (lambda _: None))
    elif todo:
        ensure_ray(cluster.address)
        extract_on_ray(job, cluster, options, todo, progress, on_progress)

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


def _extract_in_process(
    job: ExtractionJob,
    cluster: ClusterOptions,
    options: Options,
    todo: list[tuple[int, pa.Table]],
    progress: Progress,
    on_progress: Callable[[Progress], None],
) -> None:
    work = ShardWork(job, cluster, options)

    def committed(_: int, commit: store.ShardCommit) -> None:
        if not progress.devices:  # the model is loaded once the first shard is done
            progress.devices[work.device] += 1
        progress.done_rows += commit.rows
        metrics.count("images", commit.rows, stage="extract")
        progress.add_commit(commit)
        on_progress(progress)

    InProcessExecutor().run(work, [(shard, (shard, rows)) for shard, rows in todo], committed)


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
