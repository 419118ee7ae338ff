"""What a manifest is, for resume and incremental runs: its content fingerprint, its shards, and the diff
between two manifests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigError
from pipeline.manifest.checks import _boxes_as_numpy


@dataclass(frozen=True)
class ManifestDiff:
    """Ids of ``new`` relative to ``old``: added and changed in ``new``'s order, deleted in ``old``'s."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    deleted: tuple[str, ...]


# ---------------------------------------------------------------------------------------- using a manifest


def manifest_fingerprint(table: pa.Table) -> str:
    """A stable hex digest of the rows that decide what gets extracted: ids, urls, inline images and boxes, in order.

    Independent of chunking and of string/large_string storage; landmark labels do not enter it.
    """
    digest = hashlib.sha256(b"landmark-index manifest v1")
    for name in ("id", "url", "image"):
        digest.update(_binary_column_digest(table.column(name)))
    digest.update(_bbox_digest(table.column("bbox")))
    return digest.hexdigest()


def _binary_column_digest(column: pa.ChunkedArray) -> bytes:
    """Digest of value lengths (-1 for null) and value bytes, fed chunk by chunk so chunking does not matter."""
    lengths, data = hashlib.sha256(), hashlib.sha256()
    for chunk in column.cast(pa.large_binary()).chunks:
        filled = pc.fill_null(chunk, b"")
        offsets = np.frombuffer(
            filled.buffers()[1], dtype="<i8", count=len(filled) + 1, offset=8 * filled.offset
        )
        sizes = np.diff(offsets)
        sizes[chunk.is_null().to_numpy(zero_copy_only=False)] = -1
        lengths.update(sizes.astype("<i8").tobytes())
        data.update(memoryview(filled.buffers()[2])[offsets[0] : offsets[-1]])
    return lengths.digest() + data.digest()


def _bbox_digest(bbox: pa.ChunkedArray) -> bytes:
    boxes = _boxes_as_numpy(bbox.cast(pa.list_(pa.float64()))).astype("<f4")  # NaN rows where null
    return hashlib.sha256(boxes.tobytes()).digest()


def split_shards(table: pa.Table, shard_size: int) -> list[tuple[int, pa.Table]]:
    """Contiguous shards of ``shard_size`` rows (the last may be shorter) in row order: (shard index, rows)."""
    if shard_size < 1:
        raise ConfigError(f"shard_size must be a positive number of rows, got {shard_size}")
    return [
        (i, table.slice(start, shard_size)) for i, start in enumerate(range(0, table.num_rows, shard_size))
    ]


def diff_manifests(old: pa.Table, new: pa.Table) -> ManifestDiff:
    """What an incremental run must do to move from ``old`` to ``new`` (both read by :func:`read_manifest`).

    An id is changed when its url or inline image differs, or its ``etag`` / ``size`` differs where both
    manifests have that column (a re-uploaded image keeps its url but gets a new ETag).
    """
    old_ids, new_ids = old.column("id").combine_chunks(), new.column("id").combine_chunks()
    position_in_old = pc.index_in(new_ids, value_set=old_ids)  # (N_new,), null where the id is new
    in_old = pc.is_valid(position_in_old)
    old_rows = position_in_old.drop_null().to_numpy()
    kept_in_new = np.zeros(len(old_ids), dtype=bool)
    kept_in_new[old_rows] = True
    compared = [
        c for c in ("url", "image", "etag", "size") if c in old.column_names and c in new.column_names
    ]
    common = new.select(["id", *compared]).filter(in_old)
    matching_old = old.select(compared).take(old_rows)
    differs = pa.array(np.zeros(common.num_rows, dtype=bool))
    for column in compared:
        differs = pc.or_(differs, _differs(common.column(column), matching_old.column(column)))
    return ManifestDiff(
        added=tuple(new_ids.filter(pc.invert(in_old)).to_pylist()),
        changed=tuple(common.column("id").filter(differs).to_pylist()),
        deleted=tuple(old_ids.filter(pa.array(~kept_in_new)).to_pylist()),
    )


def _differs(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.Array:
    """Element-wise inequality where null equals null and null differs from any value."""
    unequal = pc.fill_null(pc.not_equal(a, b), False)
    return pc.or_(unequal, pc.xor(pc.is_null(a), pc.is_null(b))).combine_chunks()
