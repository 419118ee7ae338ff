"""Building the next version's index beside the live one: a copy updated in place (ids removed, the run's
shards added), or a fresh build on the current rows' global descriptors, compacted into one store."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline import storage, store, versions
from pipeline.execution import Workers
from pipeline.index import BuildConfig, add_shards, build_index, remove_ids
from pipeline.reindex.plan import Plan
from pipeline.storage import Options

COMPACT = "_compact"  # the retrain path's global-only store, removed once the index is built


def _copy_index(source: str, target: str, options: Options) -> None:
    """The index files of a version dir (not its state, stores or report) copied into a fresh ``target``."""
    storage.remove(target, options, recursive=True)
    for url in storage.list_files(source, options):
        name = url.rsplit("/", 1)[-1]
        if name not in versions.VERSION_FILES:
            storage.copy(url, storage.join(target, name), options)


def update_in_place(
    live_url: str,
    target: str,
    doomed: Sequence[str],
    run_store: str | None,
    options: Options,
    workers: Workers,
) -> None:
    """Copy of the live index → remove changed and deleted ids → add the run's shards (no retraining); its DBA
    vectors, if any, follow on ``workers``."""
    _copy_index(live_url, target, options)
    if doomed:
        remove_ids(target, doomed, options, workers=workers)
    shards = store.global_shard_urls(run_store, options) if run_store else []
    if shards:
        add_shards(target, shards, options, workers=workers)


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
                store.write_global_only_shard(out_url, shard, ids[keep], vectors[keep], options)
                taken.update(ids[keep].tolist())
                shard += 1
                supplied = True
        if supplied:
            used.append(store_url)
    return used[::-1]


def rebuild(
    target: str,
    stores: list[str],
    plan: Plan,
    options: Options,
    ray_address: str | None,
    *,
    factory: str | None,
    memory_budget: str | None,
    config: BuildConfig,
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
        factory=factory,
        memory_budget=memory_budget,
        options=options,
        ray_address=ray_address,
        config=config,
    )
    if compacted:
        storage.remove(source, options, recursive=True)
    return stores
