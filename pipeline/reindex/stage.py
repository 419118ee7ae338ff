"""The re-index stage: its settings, its report, and one run under the lock: plan, extract, build, write the
version whole, publish."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline import manifest, storage, store, versions
from pipeline.config import get_preset
from pipeline.errors import ConfigError
from pipeline.execution import Workers
from pipeline.extraction import ClusterOptions, ExtractionJob, Extractors, Progress, run_extraction
from pipeline.index import BuildConfig
from pipeline.index import io as index_io
from pipeline.index.dba import build_dba, has_dba
from pipeline.lease import Lease
from pipeline.reindex.build import rebuild, update_in_place
from pipeline.reindex.plan import Live, Plan, load_live, plan_changes, resumable_run_name, retrain_decision
from pipeline.storage import Options
from pipeline.store import StoreSettings

log = logging.getLogger(__name__)

SUBSET_MANIFEST = "_manifest.parquet"
MAX_REPORTED_ERRORS = 1000  # error records copied into a report; counts by reason are always complete


@dataclass(frozen=True)
class ReindexConfig:
    """What a nightly run extracts and how it maintains the index."""

    preset: str  # extraction preset (pipeline.config.PRESETS)
    weights_url: str | None = None  # model state dict; None: random init (tests only)
    shard_size: int = 1000  # manifest rows per descriptor shard
    keep: int = 3  # published versions kept (the live one included)
    retrain_threshold: float = 0.2  # retrain when (new + changed) / live vectors exceeds this
    lease_seconds: float = 6 * 3600.0  # lock lease, renewed as the run progresses
    factory: str | None = None  # faiss factory for a retrain; None: chosen from N (and memory_budget)
    memory_budget: str | None = None  # e.g. "48GiB": steers the automatic factory choice
    dba: bool = False  # keep DBA vectors beside every version (global re-ranking methods "dba", "dba+qe")
    dba_k: int = 10  # DBA neighbours (a fresh DBA file only; an updated one keeps its own k and α)
    dba_alpha: float = 3.0  # DBA weight exponent
    store: StoreSettings = field(default_factory=StoreSettings)
    build: BuildConfig = field(default_factory=BuildConfig)
    image_root: str | None = None  # urls for id-only manifests (GLDv2 index.csv): ROOT/a/b/c/ID.jpg
    allow_local_outside_root: bool = False  # rows may read any local file (ExtractionJob's opt-in)
    extractors: Extractors = field(default_factory=Extractors)  # the extractor actor pool (not the output)
    # the DBA neighbour search's workers, as `run` and `landmark-index dba` take them (not the output)
    workers: Workers = field(default_factory=Workers)

    def __post_init__(self) -> None:
        get_preset(self.preset)  # raises ValueError naming the available presets
        if self.keep < 1:
            raise ConfigError(f"keep={self.keep}; must keep ≥ 1 version (the live one)")
        if self.retrain_threshold < 0:
            raise ConfigError(f"retrain_threshold={self.retrain_threshold}; must be ≥ 0")
        if self.lease_seconds <= 0:
            raise ConfigError(f"lease_seconds={self.lease_seconds}; must be > 0")
        if self.dba_k < 1 or not self.dba_alpha >= 0:
            raise ConfigError(
                f"dba_k={self.dba_k}, dba_alpha={self.dba_alpha}; need dba_k ≥ 1 and dba_alpha ≥ 0"
            )
        if self.factory is not None and self.memory_budget is not None:
            raise ConfigError("give factory or memory_budget, not both")


@dataclass(frozen=True)
class ReindexReport:
    """What one run did (also written to the new version's report.json)."""

    version: str  # the live version after the run
    previous: str | None  # the live version before it
    published: bool  # False: nothing changed, no new version
    added: int
    changed: int
    removed: int  # changed + deleted ids taken out of the live index (a failed row was never in it)
    errors: int  # extraction error records of this run
    errors_by_reason: dict[str, int]
    error_records: list[dict[str, str]]  # the first MAX_REPORTED_ERRORS records
    retrained: bool
    reason: str  # why the index was retrained or updated in place
    run_name: str | None
    manifest_fingerprint: str
    extraction: dict[str, Any]  # preset and weights: a change forces full re-extraction
    ntotal: int  # vectors in the live index after the run
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _extract(run: _Run, run_store: str) -> bool:
    """Extract the plan's rows into ``run_store`` (resuming a crashed run); False when there is nothing to do."""
    plan, config, options = run.plan, run.config, run.options
    if plan.todo.num_rows == 0:
        return False
    subset_url = storage.join(run_store, SUBSET_MANIFEST)
    storage.write_parquet(subset_url, plan.todo, options)
    job = ExtractionJob(
        manifest_url=subset_url,
        out_url=run_store,
        config=get_preset(config.preset),
        weights_url=config.weights_url,
        store=config.store,
        shard_size=config.shard_size,
        image_root=config.image_root,  # the subset's urls are resolved: here it only decides local access
        origin_manifest_url=run.manifest_url,
        allow_local_outside_root=config.allow_local_outside_root,
    )
    summary = run_extraction(
        job, ClusterOptions(address=run.ray_address, extractors=config.extractors), options, run.progressed
    )
    log.info(
        "extracted %d rows (%d ok, %d errors) into %s", summary.rows, summary.ok, summary.errors, run_store
    )
    return True


def _run_errors(run_store: str | None, options: Options) -> dict[str, Any]:
    """The report's error fields: counts by reason over the run's store and its first error records."""
    if run_store is None:
        return {"errors": 0, "errors_by_reason": {}, "error_records": []}
    stats = store.store_stats(run_store, options)
    records = store.read_errors(run_store, options).slice(0, MAX_REPORTED_ERRORS).to_pylist()
    return {
        "errors": stats["errors"],
        "errors_by_reason": stats["errors_by_reason"],
        "error_records": records,
    }


def reindex(
    manifest_url: str,
    root_url: str,
    config: ReindexConfig,
    options: Options = None,
    ray_address: str | None = None,
    on_stage: Callable[[str], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> ReindexReport:
    """Bring the versioned index under ``root_url`` up to date with the manifest and publish it atomically.

    ``on_stage`` is called with "extracted", "built" and "written" (the version is complete, LATEST not yet
    moved): a progress hook, and the crash-injection point of the resume tests. ``on_progress`` gets the
    extraction's progress as it goes. Raises LockHeldError while another run holds the lock.
    """
    lease = Lease(root_url, config.lease_seconds, options)
    lease.acquire()
    try:
        return _reindex_locked(
            manifest_url,
            root_url,
            config,
            options,
            ray_address,
            on_stage or (lambda _: None),
            lease,
            on_progress,
        )
    finally:
        lease.release()


def _reindex_locked(
    manifest_url: str,
    root_url: str,
    config: ReindexConfig,
    options: Options,
    ray_address: str | None,
    on_stage: Callable[[str], None],
    lease: Lease,
    on_progress: Callable[[Progress], None] | None,
) -> ReindexReport:
    started = time.monotonic()
    table = manifest.read_manifest(manifest_url, options, config.image_root)
    extraction = {
        "preset": config.preset,
        "weights": storage.redact(config.weights_url) if config.weights_url else None,
    }
    live = load_live(root_url, options)
    plan = plan_changes(
        table,
        live.state if live else versions.empty_state(),
        model_changed=live is not None and live.extraction != extraction,
    )
    fingerprint = manifest.manifest_fingerprint(table)
    run = _Run(
        manifest_url,
        root_url,
        config,
        options,
        ray_address,
        on_stage,
        lease,
        live,
        plan,
        extraction,
        fingerprint,
        started,
        on_progress,
    )
    if live and not (plan.added or plan.changed or plan.deleted):
        return run.report(
            live.name,
            False,
            removed=0,
            retrained=False,
            reason="the manifest matches the live version: nothing to do",
            run_name=None,
            ntotal=int(live.params["ntotal"]),
            **_run_errors(None, options),
        )
    return _build_and_publish(run)


@dataclass
class _Run:
    """One re-index run's inputs, decided before anything is written."""

    manifest_url: str
    root_url: str
    config: ReindexConfig
    options: Options
    ray_address: str | None
    on_stage: Callable[[str], None]
    lease: Lease
    live: Live | None
    plan: Plan
    extraction: dict[str, Any]
    fingerprint: str  # of the manifest
    started: float  # time.monotonic() when the run began
    on_progress: Callable[[Progress], None] | None = None  # the extraction's progress

    def progressed(self, progress: Progress) -> None:
        self.lease.renew_if_due()
        if self.on_progress is not None:
            self.on_progress(progress)

    def report(self, version: str, published: bool, **fields: Any) -> ReindexReport:
        return ReindexReport(
            version=version,
            previous=self.live.name if self.live else None,
            published=published,
            added=len(self.plan.added),
            changed=len(self.plan.changed),
            manifest_fingerprint=self.fingerprint,
            extraction=self.extraction,
            duration_s=time.monotonic() - self.started,
            **fields,
        )

    def reached(self, stage: str) -> None:
        self.on_stage(stage)
        self.lease.renew_if_due()


def _build_and_publish(run: _Run) -> ReindexReport:
    """Extract the plan's rows, build the next version beside the live one, write it whole, then publish it."""
    live, plan, options = run.live, run.plan, run.options
    run_name = resumable_run_name(live.name if live else None, run.fingerprint, plan.todo, run.extraction)
    run_store = storage.join(run.root_url, versions.DESCRIPTORS, run_name)
    extracted = _extract(run, run_store)
    run.reached("extracted")

    name = versions.version_name(versions.version_number(live.name) + 1 if live else 1)
    target = versions.version_url(run.root_url, name)
    doomed = sorted(live.indexed & {*plan.changed, *plan.deleted}) if live else []
    stores = [*(versions.read_stores(live.url, options) if live else []), *([run_store] if extracted else [])]
    workers = replace(run.config.workers, address=run.ray_address)  # the run's Ray, as extraction's
    retrained, reason = retrain_decision(
        live.name if live else None, live.params if live else {}, plan, run.config.retrain_threshold
    )
    if retrained:
        stores = rebuild(
            target,
            stores,
            plan,
            options,
            run.ray_address,
            factory=run.config.factory,
            memory_budget=run.config.memory_budget,
            config=run.config.build,
        )
    else:
        assert live is not None, "the first version is always trained"
        update_in_place(live.url, target, doomed, run_store if extracted else None, options, workers)
    if run.config.dba and not has_dba(
        target, options
    ):  # retrained, or DBA newly asked for; else kept in step
        build_dba(target, stores, run.config.dba_k, run.config.dba_alpha, options, workers=workers)
    run.reached("built")

    result = run.report(
        name,
        True,
        removed=len(doomed),
        retrained=retrained,
        reason=reason,
        run_name=run_name,
        ntotal=int(index_io.read_params(target, options)["ntotal"]),
        **_run_errors(run_store if extracted else None, options),
    )
    versions.write_version_files(target, plan.table, stores, result.to_dict(), options)
    run.reached("written")
    versions.publish(run.root_url, name, options)
    versions.prune(run.root_url, versions.version_number(name), run.config.keep, options)
    return result
