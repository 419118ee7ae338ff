"""Incremental maintenance of a built index: add new descriptor shards (no retraining) and remove images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from pipeline import storage, store
from pipeline.errors import InputError
from pipeline.execution import Workers
from pipeline.index import dba, io, refine, whitening
from pipeline.index.build import add_shards_to, id_bases, shard_rows
from pipeline.storage import Options


def _load_for_update(index_url: str, options: Options) -> tuple[dict[str, Any], faiss.Index]:
    params = io.read_params(index_url, options)
    if params.get("on_disk"):
        raise InputError(
            f"{storage.redact(index_url)} has on-disk inverted lists; rebuild it to change its contents"
        )
    return params, io.read_index(storage.join(index_url, io.INDEX), options)


def _save(
    index_url: str, params: dict[str, Any], index: faiss.Index, id_map: pa.Table, options: Options
) -> None:
    """Index and id map first, params last: params.ntotal says which state is complete."""
    assert index.ntotal == id_map.num_rows, (index.ntotal, id_map.num_rows)
    io.write_index(index, storage.join(index_url, io.INDEX), options)
    io.write_id_map(index_url, id_map, options)
    io.write_params(index_url, {**params, "ntotal": int(index.ntotal)}, options)


@dataclass(frozen=True)
class IndexAddSummary:
    """What :func:`add_shards` did."""

    added: int  # vectors added
    ntotal: int  # vectors in the index after it


@dataclass(frozen=True)
class IndexRemoveSummary:
    """What :func:`remove_ids` did."""

    removed: int  # vectors removed
    ntotal: int  # vectors in the index after it


def add_shards(
    index_url: str, shard_urls: Sequence[str], options: Options = None, *, workers: Workers = Workers()
) -> IndexAddSummary:
    """Add global descriptor shard files to the index with the trained quantizer; ids continue from next_id.
    A refined index gets the new vectors' refinement codes too (written before params.json commits them);
    DBA vectors beside it are brought up to date on ``workers``.

    Raises InputError if an image id is already indexed (remove it first to replace its descriptor).
    """
    params, index = _load_for_update(index_url, options)
    counts = shard_rows(shard_urls, options)
    bases = id_bases(counts, start=params["next_id"])
    refine.remove_codes(index_url, options, from_id=params["next_id"])
    space = whitening.space(index_url, params, options)
    added = add_shards_to(index, shard_urls, bases, options, refine.code_writer(index_url, options), space)
    old = io.read_id_map_table(index_url, options)
    new_images = added.column("image_id").to_pylist()
    clashes = set(new_images) & set(old.column("image_id").to_pylist())
    if clashes or len(set(new_images)) != len(new_images):
        raise InputError(
            f"image ids already in the index or repeated in the new shards: {sorted(clashes)[:5]}"
        )
    params = {
        **params,
        "next_id": params["next_id"] + sum(counts),
        "shards": [*params["shards"], *(storage.redact(u) for u in shard_urls)],
    }
    if shard_urls and dba.has_dba(index_url, options):  # DBA vectors follow the index (saved before it)
        shards = [store.read_global_shard(u, options) for u in shard_urls]  # (ids (n,), vectors (n, D))
        added_rows = (np.concatenate([i for i, _ in shards]), space(np.concatenate([v for _, v in shards])))
        dba.update_dba(index_url, added_rows, (), options, workers=workers)
    _save(index_url, params, index, pa.concat_tables([old, added]), options)
    return IndexAddSummary(added.num_rows, int(index.ntotal))


def new_shards(index_url: str, store_url: str, options: Options = None) -> list[str]:
    """Committed global shards of ``store_url`` not yet in the index: what a nightly run passes to add_shards."""
    indexed = set(io.read_params(index_url, options)["shards"])
    return [u for u in store.global_shard_urls(store_url, options) if storage.redact(u) not in indexed]


def remove_ids(
    index_url: str, image_ids: Sequence[str], options: Options = None, *, workers: Workers = Workers()
) -> IndexRemoveSummary:
    """Remove these images from the index and its id map (DBA vectors beside it updated on ``workers``);
    unknown image ids raise InputError naming them."""
    params, index = _load_for_update(index_url, options)
    table = io.read_id_map_table(index_url, options)
    indexed = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    doomed = np.isin(indexed, np.asarray(list(image_ids), dtype=object))
    unknown = set(image_ids) - set(indexed[doomed])
    if unknown:
        raise InputError(f"image ids not in the index: {sorted(unknown)[:5]} ({len(unknown)} in all)")
    ids = table.column("id").to_numpy()[doomed].astype(np.int64)
    removed = index.remove_ids(faiss.IDSelectorBatch(ids))
    assert removed == len(ids), (removed, len(ids))
    dba.update_dba(
        index_url, None, list(image_ids), options, workers=workers
    )  # DBA vectors beside the index follow it
    _save(index_url, params, index, table.filter(pa.array(~doomed)), options)
    return IndexRemoveSummary(int(removed), int(index.ntotal))
