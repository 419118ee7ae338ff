"""Nightly incremental re-index: bring a versioned index up to date with the current manifest.

Layout under a root URL ``ROOT``::

    ROOT/LATEST                      the live version's name ("v000003"), moved by one small atomic write
    ROOT/versions/v000003/           a complete index dir (see pipeline.index) plus
        state.parquet                the manifest rows this version indexes: id, url, image (sha256), etag, size
        stores.json                  ordered descriptor stores (newest last, relative to ROOT): read_stores()
                                     gives the URLs for LocalReader(stores)
        report.json                  the run report that published this version
        dba.parquet                  DBA vectors of its images (with ``ReindexConfig.dba``; pipeline.index.dba)
    ROOT/descriptors/<run-name>/     descriptor store of one run's new + changed rows (+ _manifest.parquet)
    ROOT/_lock.json                  owner and lease expiry of the run in progress

A run diffs the manifest against the live version's state, extracts only new + changed rows, then builds the
next version: a copy of the live index with changed and deleted ids removed and the new shards added, or, when
the new vectors pass ``retrain_threshold`` of the live count (or nothing is live yet), a fresh build on the
compacted global descriptors. The version is written completely before LATEST moves, so readers of
:func:`resolve_latest` never see a half-built index.

Crash safety: the run's name derives from (live version, manifest, rows to extract, model), so a re-run
resumes the same extraction (committed shards are kept) and rebuilds the same version number.

Locking: ``_lock.json`` holds a lease. Object stores without conditional writes cannot make taking it atomic;
we write, read back and compare owners, which leaves a window of one round trip in which two runs started
at the same instant could both believe they hold it. Schedule one run at a time (the CronJob's
``concurrencyPolicy: Forbid``); the lock guards against overlaps, not against simultaneous starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import manifest, storage, store
from pipeline.config import get_preset
from pipeline.distributed import ClusterOptions, ExtractionJob, run_extraction
from pipeline.index import BuildConfig, add_shards, build_index, remove_ids
from pipeline.index import io as index_io
from pipeline.index.dba import build_dba, has_dba
from pipeline.storage import Options
from pipeline.store import ShardCommit, StoreSettings

log = logging.getLogger(__name__)

LATEST = "LATEST"
VERSIONS = "versions"
DESCRIPTORS = "descriptors"
LOCK = "_lock.json"
STATE = "state.parquet"
STORES = "stores.json"
REPORT = "report.json"
COMPACT = "_compact"  # the retrain path's global-only store, removed once the index is built
SUBSET_MANIFEST = "_manifest.parquet"
VERSION_FILES = (STATE, STORES, REPORT)  # ours; the rest of a version dir is the index
MAX_REPORTED_ERRORS = 1000  # error records copied into a report; counts by reason are always complete


class LockHeldError(RuntimeError):
    """Another run holds a live lease on the root."""


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

    def __post_init__(self) -> None:
        get_preset(self.preset)  # raises ValueError naming the available presets
        if self.keep < 1:
            raise ValueError(f"keep={self.keep}; must keep ≥ 1 version (the live one)")
        if self.retrain_threshold < 0:
            raise ValueError(f"retrain_threshold={self.retrain_threshold}; must be ≥ 0")
        if self.lease_seconds <= 0:
            raise ValueError(f"lease_seconds={self.lease_seconds}; must be > 0")
        if self.dba_k < 1 or not self.dba_alpha >= 0:
            raise ValueError(
                f"dba_k={self.dba_k}, dba_alpha={self.dba_alpha}; need dba_k ≥ 1 and dba_alpha ≥ 0"
            )
        if self.factory is not None and self.memory_budget is not None:
            raise ValueError("give factory or memory_budget, not both")


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


# ------------------------------------------------------------------------------------------ versions


def version_name(number: int) -> str:
    return f"v{number:06d}"


def version_number(name: str) -> int:
    if len(name) != 7 or not name.startswith("v") or not name[1:].isdigit():
        raise ValueError(f"version name {name!r}; expected 'v' and 6 digits, e.g. 'v000001'")
    return int(name[1:])


def version_url(root_url: str, name: str) -> str:
    return storage.join(root_url, VERSIONS, name)


def live_version(root_url: str, options: Options = None) -> str | None:
    """The name LATEST holds, or None before the first publish."""
    url = storage.join(root_url, LATEST)
    if not storage.exists(url, options):
        return None
    name = storage.read_text(url, options).strip()
    version_number(name)
    return name


def resolve_latest(root_url: str, options: Options = None) -> str:
    """The URL of the live, complete version (an index dir with state.parquet and stores.json)."""
    name = live_version(root_url, options)
    if name is None:
        raise FileNotFoundError(f"no published version under {storage.redact(root_url)} (no {LATEST})")
    return version_url(root_url, name)


def read_stores(version: str, options: Options = None) -> list[str]:
    """The ordered descriptor store URLs (newest last) whose local features a version's ids use."""
    root = version.rstrip("/").rsplit("/", 2)[0]  # ROOT/versions/vN → ROOT
    return [
        storage.join(root, name)
        for name in json.loads(storage.read_text(storage.join(version, STORES), options))
    ]


def _store_names(stores: Sequence[str]) -> list[str]:
    """Store URLs as paths relative to ROOT (all live under ROOT/descriptors), so a root can be moved."""
    return [f"{DESCRIPTORS}/{url.rstrip('/').rsplit('/', 1)[-1]}" for url in stores]


def _published_versions(root_url: str, options: Options) -> list[str]:
    names = [
        u.rstrip("/").rsplit("/", 1)[-1]
        for u in storage.glob(storage.join(root_url, VERSIONS, "v*"), options)
    ]
    return sorted(n for n in names if len(n) == 7 and n[1:].isdigit())


# ------------------------------------------------------------------------------------------ lock


class Lease:
    """``ROOT/_lock.json``: taken when absent or expired, renewed while the run goes on, removed at the end."""

    def __init__(self, root_url: str, seconds: float, options: Options = None) -> None:
        self.url = storage.join(root_url, LOCK)
        self.seconds = seconds
        self.options = options
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.renewed = 0.0
        self.acquired_at = time.time()

    def _read(self) -> dict[str, Any] | None:
        if not storage.exists(self.url, self.options):
            return None
        return json.loads(storage.read_text(self.url, self.options))

    def _write(self) -> None:
        now = time.time()
        record = {"owner": self.owner, "acquired_at": self.acquired_at, "expires_at": now + self.seconds}
        storage.write_text(self.url, json.dumps(record), self.options)
        self.renewed = time.monotonic()

    def acquire(self) -> None:
        held = self._read()
        if held is not None and held["expires_at"] > time.time():
            raise LockHeldError(
                f"{storage.redact(self.url)} is held by {held['owner']} until "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(held['expires_at']))}; "
                "another re-index is running (remove the file only if you know that run is dead)"
            )
        if held is not None:
            log.warning("taking over the expired lock of %s", held["owner"])
        self._write()
        self._check_ours()

    def _check_ours(self) -> None:
        held = self._read()
        if held is None or held["owner"] != self.owner:
            other = held["owner"] if held else "nobody (removed)"
            raise LockHeldError(f"lost {storage.redact(self.url)} to {other}")

    def renew_if_due(self) -> None:
        """Extend the lease once a third of it has passed (cheap to call after every chunk)."""
        if time.monotonic() - self.renewed > self.seconds / 3:
            self._check_ours()
            self._write()

    def release(self) -> None:
        held = self._read()
        if held is not None and held["owner"] == self.owner:
            storage.remove(self.url, self.options)


# ------------------------------------------------------------------------------------------ state and diff


def state_table(table: pa.Table) -> pa.Table:
    """The columns of manifest rows that decide whether an image changed; inline images as sha256 digests."""
    images = table.column("image").combine_chunks()
    digests = pa.array(
        [None if b is None else hashlib.sha256(b).digest() for b in images.to_pylist()]
        if images.null_count < len(images)
        else pa.nulls(len(images), pa.binary()),
        pa.binary(),
    )
    columns = {"id": table.column("id"), "url": table.column("url"), "image": digests}
    columns |= {c: table.column(c) for c in ("etag", "size") if c in table.column_names}
    return pa.table(columns)


def _empty_state() -> pa.Table:
    return pa.table(
        {
            "id": pa.array([], pa.string()),
            "url": pa.array([], pa.string()),
            "image": pa.array([], pa.binary()),
        }
    )


def _run_name(live: str | None, fingerprint: str, todo: pa.Table, extraction: dict[str, Any]) -> str:
    """Deterministic: the same live version, manifest and model always name the same run (so it resumes)."""
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(manifest.manifest_fingerprint(todo).encode())
    digest.update(json.dumps(extraction, sort_keys=True).encode())
    return f"{live or version_name(0)}-{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class _Plan:
    table: pa.Table  # the current manifest
    todo: pa.Table  # its rows to extract (new + changed)
    added: tuple[str, ...]
    changed: tuple[str, ...]
    deleted: tuple[str, ...]
    model_changed: bool


def _plan(table: pa.Table, live_state: pa.Table, model_changed: bool) -> _Plan:
    current = state_table(table)
    diff = manifest.diff_manifests(live_state, current)
    if model_changed:  # descriptors of another model cannot share an index: every row is extracted again
        new = set(diff.added)
        kept = tuple(i for i in current.column("id").to_pylist() if i not in new)
        return _Plan(table, table, diff.added, kept, diff.deleted, True)
    todo_ids = pa.array([*diff.added, *diff.changed], pa.string())
    todo = table.filter(pc.is_in(table.column("id"), value_set=todo_ids))
    return _Plan(table, todo, diff.added, diff.changed, diff.deleted, False)


def _retrain_decision(
    live: str | None, live_params: dict[str, Any], plan: _Plan, threshold: float
) -> tuple[bool, str]:
    """Whether to train a new index from scratch, and why (recorded in the report)."""
    if live is None:
        return True, "no live version: first build"
    if plan.model_changed:
        return True, "the extraction preset or weights changed: every image was extracted again"
    if live_params.get("on_disk"):
        return True, f"{live} has on-disk inverted lists, which cannot be updated in place"
    ntotal = int(live_params["ntotal"])
    new = len(plan.added) + len(plan.changed)
    if ntotal == 0:
        return True, f"{live} holds no vectors"
    share = new / ntotal
    if share > threshold:
        return (
            True,
            f"{new} new + changed = {share:.1%} of {ntotal} live vectors > retrain_threshold {threshold:.1%}",
        )
    return False, (
        f"{new} new + changed = {share:.1%} of {ntotal} live vectors ≤ retrain_threshold {threshold:.1%}: "
        "updated in place with the live quantizer"
    )


# ------------------------------------------------------------------------------------------ building a version


def _extract(
    plan: _Plan,
    run_store: str,
    config: ReindexConfig,
    options: Options,
    ray_address: str | None,
    lease: Lease,
) -> bool:
    """Extract the plan's rows into ``run_store`` (resuming a crashed run); False when there is nothing to do."""
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
    )
    summary = run_extraction(
        job, ClusterOptions(address=ray_address), options, lambda _: lease.renew_if_due()
    )
    log.info(
        "extracted %d rows (%d ok, %d errors) into %s", summary.rows, summary.ok, summary.errors, run_store
    )
    return True


def _copy_index(source: str, target: str, options: Options) -> None:
    """The index files of a version dir (not its state, stores or report) copied into a fresh ``target``."""
    storage.remove(target, options, recursive=True)
    for url in storage.list_files(source, options):
        name = url.rsplit("/", 1)[-1]
        if name not in VERSION_FILES:
            storage.write_bytes(storage.join(target, name), storage.read_bytes(url, options), options)


def _update_in_place(
    live_url: str, target: str, doomed: Sequence[str], run_store: str | None, options: Options
) -> None:
    """Copy of the live index → remove changed and deleted ids → add the run's shards (no retraining)."""
    _copy_index(live_url, target, options)
    if doomed:
        remove_ids(target, doomed, options)
    shards = store.global_shard_urls(run_store, options) if run_store else []
    if shards:
        add_shards(target, shards, options)


def _write_global_shard(
    store_url: str, shard: int, ids: np.ndarray, vectors: np.ndarray, options: Options
) -> None:
    """A committed global-only shard: all that build_index reads of a store."""
    table = pa.table(
        {
            "id": pa.array(list(ids), pa.string()),
            "global": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]
            ),
        }
    )
    name = store.shard_name(shard)
    storage.write_parquet(storage.join(store_url, store.GLOBAL_DIR, name + ".parquet"), table, options)
    commit = ShardCommit(shard=shard, rows=len(ids), ok=len(ids), errors=0)
    storage.write_text(
        storage.join(store_url, store.COMMITS_DIR, name + ".json"), json.dumps(asdict(commit)), options
    )


def compact_globals(
    stores: Sequence[str], wanted: set[str], out_url: str, options: Options = None
) -> list[str]:
    """Write the global descriptors of ``wanted`` ids into one global-only store, the newest store winning.

    Returns the stores that supplied at least one descriptor, in their original order (the others hold only
    superseded or deleted images).
    """
    storage.remove(out_url, options, recursive=True)
    taken: set[str] = set()
    used: list[str] = []
    shard = 0
    for store_url in reversed(stores):
        supplied = False
        for ids, vectors in store.iter_global(store_url, options):  # (n,), (n, D)
            keep = np.fromiter((i in wanted and i not in taken for i in ids), dtype=bool, count=len(ids))
            if keep.any():
                _write_global_shard(out_url, shard, ids[keep], vectors[keep], options)
                taken.update(ids[keep].tolist())
                shard += 1
                supplied = True
        if supplied:
            used.append(store_url)
    return used[::-1]


def _rebuild(
    target: str,
    stores: list[str],
    plan: _Plan,
    config: ReindexConfig,
    options: Options,
    ray_address: str | None,
) -> list[str]:
    """A freshly trained index of the current rows' descriptors under ``target``; returns the stores it uses."""
    storage.remove(target, options, recursive=True)
    compacted = plan.todo.num_rows < plan.table.num_rows  # else this run extracted every row: use its store
    if compacted:
        source = storage.join(target, COMPACT)
        stores = compact_globals(stores, set(plan.table.column("id").to_pylist()), source, options)
    else:
        source, stores = stores[-1], stores[-1:]
    build_index(
        source,
        target,
        factory=config.factory,
        memory_budget=config.memory_budget,
        options=options,
        ray_address=ray_address,
        config=config.build,
    )
    if compacted:
        storage.remove(source, options, recursive=True)
    return stores


def _indexed_ids(index_url: str, options: Options) -> set[str]:
    table = storage.read_parquet(storage.join(index_url, index_io.ID_MAP), options)
    return set(table.column("image_id").to_pylist())


def _prune(root_url: str, live_number: int, keep: int, options: Options) -> None:
    """Keep the newest ``keep`` published versions; remove older ones and stores no kept version uses.

    Versions numbered above the live one are a crashed run's partial output: the next run overwrites them.
    """
    published = [n for n in _published_versions(root_url, options) if version_number(n) <= live_number]
    kept = published[-keep:]
    for name in published[:-keep]:
        storage.remove(version_url(root_url, name), options, recursive=True)
    referenced = {
        url.rstrip("/").rsplit("/", 1)[-1]
        for name in kept
        for url in read_stores(version_url(root_url, name), options)
    }
    for url in storage.glob(storage.join(root_url, DESCRIPTORS, "*"), options):
        if url.rstrip("/").rsplit("/", 1)[-1] not in referenced:
            storage.remove(url, options, recursive=True)


# ------------------------------------------------------------------------------------------ the stage


@dataclass(frozen=True)
class _Live:
    """What a run needs to know of the live version."""

    name: str
    url: str
    state: pa.Table
    extraction: dict[str, Any]
    params: dict[str, Any]
    indexed: set[str]  # image ids in its index (failed rows are in its state but not here)


def _load_live(root_url: str, options: Options) -> _Live | None:
    name = live_version(root_url, options)
    if name is None:
        return None
    url = version_url(root_url, name)
    report = json.loads(storage.read_text(storage.join(url, REPORT), options))
    return _Live(
        name=name,
        url=url,
        state=storage.read_parquet(storage.join(url, STATE), options),
        extraction=report["extraction"],
        params=index_io.read_params(url, options),
        indexed=_indexed_ids(url, options),
    )


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


def _write_version_files(
    target: str, table: pa.Table, stores: Sequence[str], report: ReindexReport, options: Options
) -> None:
    storage.write_parquet(storage.join(target, STATE), state_table(table), options)
    storage.write_text(storage.join(target, STORES), json.dumps(_store_names(stores), indent=2), options)
    storage.write_text(storage.join(target, REPORT), json.dumps(report.to_dict(), indent=2), options)


def reindex(
    manifest_url: str,
    root_url: str,
    config: ReindexConfig,
    options: Options = None,
    ray_address: str | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ReindexReport:
    """Bring the versioned index under ``root_url`` up to date with the manifest and publish it atomically.

    ``on_stage`` is called with "extracted", "built" and "written" (the version is complete, LATEST not yet
    moved): a progress hook, and the crash-injection point of the resume tests. Raises LockHeldError while
    another run holds the lock.
    """
    lease = Lease(root_url, config.lease_seconds, options)
    lease.acquire()
    try:
        return _reindex_locked(
            manifest_url, root_url, config, options, ray_address, on_stage or (lambda _: None), lease
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
) -> ReindexReport:
    started = time.monotonic()
    table = manifest.read_manifest(manifest_url, options)
    fingerprint = manifest.manifest_fingerprint(table)
    extraction = {
        "preset": config.preset,
        "weights": storage.redact(config.weights_url) if config.weights_url else None,
    }
    live = _load_live(root_url, options)
    plan = _plan(
        table,
        live.state if live else _empty_state(),
        model_changed=live is not None and live.extraction != extraction,
    )

    def report(version: str, published: bool, **fields: Any) -> ReindexReport:
        return ReindexReport(
            version=version,
            previous=live.name if live else None,
            published=published,
            added=len(plan.added),
            changed=len(plan.changed),
            manifest_fingerprint=fingerprint,
            extraction=extraction,
            duration_s=time.monotonic() - started,
            **fields,
        )

    if live and not (plan.added or plan.changed or plan.deleted):
        reason = "the manifest matches the live version: nothing to do"
        return report(
            live.name,
            False,
            removed=0,
            retrained=False,
            reason=reason,
            run_name=None,
            ntotal=int(live.params["ntotal"]),
            **_run_errors(None, options),
        )

    run_name = _run_name(live.name if live else None, fingerprint, plan.todo, extraction)
    run_store = storage.join(root_url, DESCRIPTORS, run_name)
    extracted = _extract(plan, run_store, config, options, ray_address, lease)
    on_stage("extracted")
    lease.renew_if_due()

    name = version_name(version_number(live.name) + 1 if live else 1)
    target = version_url(root_url, name)
    doomed = sorted(live.indexed & {*plan.changed, *plan.deleted}) if live else []
    stores = [*(read_stores(live.url, options) if live else []), *([run_store] if extracted else [])]
    retrained, reason = _retrain_decision(
        live.name if live else None, live.params if live else {}, plan, config.retrain_threshold
    )
    if retrained:
        stores = _rebuild(target, stores, plan, config, options, ray_address)
    else:
        assert live is not None, "the first version is always trained"
        _update_in_place(live.url, target, doomed, run_store if extracted else None, options)
    if config.dba and not has_dba(target, options):  # retrained, or DBA newly asked for; else kept in step
        build_dba(target, stores, config.dba_k, config.dba_alpha, options)
    on_stage("built")
    lease.renew_if_due()

    result = report(
        name,
        True,
        removed=len(doomed),
        retrained=retrained,
        reason=reason,
        run_name=run_name,
        ntotal=int(index_io.read_params(target, options)["ntotal"]),
        **_run_errors(run_store if extracted else None, options),
    )
    _write_version_files(target, table, stores, result, options)
    on_stage("written")
    lease.renew_if_due()
    storage.write_text(storage.join(root_url, LATEST), name + "\n", options)  # the publish: one atomic write
    _prune(root_url, version_number(name), config.keep, options)
    return result
