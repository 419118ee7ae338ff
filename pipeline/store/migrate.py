"""``migrate_store``: rewrite a store written before the local index existed in the current layout."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline import storage
from pipeline.storage import Options
from pipeline.store.layout import LOCAL_DIR, StoreSettings, _shard_url
from pipeline.store.local import _indexed_shards
from pipeline.store.read import committed_shards, require_store
from pipeline.store.write import _write_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MigrationSummary:
    shards: int  # committed shards
    migrated: int  # rewritten by this call (the others already had a local index)


def migrate_store(
    store_url: str, options: Options = None, settings: StoreSettings = StoreSettings()
) -> MigrationSummary:
    """Rewrite the local shards of a store written before local indexes existed: one row group per image and
    a local index each. Shard by shard, each rewrite atomic and its index last, so a killed migration is
    resumed by running it again, and a migrated store is left as it is."""
    require_store(store_url, options)
    indexed = _indexed_shards(store_url, options)
    shards = committed_shards(store_url, options)
    todo = [s for s in shards if s not in indexed]
    for done, shard in enumerate(todo, 1):
        table = storage.read_parquet(_shard_url(store_url, LOCAL_DIR, shard), options)
        _write_local(store_url, shard, table, settings.row_group_size, options)
        log.info("migrated local shard %d (%d/%d)", shard, done, len(todo))
    return MigrationSummary(shards=len(shards), migrated=len(todo))
