"""Manifests: which images to index, read from Parquet, GLDv2 CSV or a folder of images, validated up front.

A manifest source is one of
- a Parquet file, a folder of ``.parquet`` files, or a glob over Parquet/CSV files (any fsspec URL; files are
  read in sorted order);
- a GLDv2 CSV file: ``train.csv`` (id,url,landmark_id), ``index.csv`` / ``test.csv`` (id[,url]);
- uncompressed tar files (a ``.tar``, a glob such as ``images_*.tar``, or a folder of them, e.g. GLDv2's
  ``images_000.tar`` ...), read in place: each image member becomes a row whose url addresses its bytes inside
  the tar (:func:`pipeline.storage.tar_member_url`); ids as for a folder, except that GLDv2's layout
  ``a/b/c/ID.jpg`` (a, b, c = ID's first characters) gives ``ID`` itself, so GLDv2's ground truth matches;
- a folder of images (searched recursively): ids are the relative paths without extension.

Columns: ``id`` (string, required), ``url`` (http(s)://, s3://, gs://, file://, an absolute local path, or a path
relative to the manifest file's folder), ``landmark_id`` (int or string), ``image`` (inline bytes; the url may then
be empty), ``bbox`` (4 numbers x0, y0, x1, y1 in original pixels, or null), and the content fingerprints ``etag``
(string) and ``size`` (int) that :func:`diff_manifests` compares, and ``view`` (a number ordering the views of one
landmark — a view index, a capture time — that the quadruplet training loss uses). Other columns are dropped.

Every problem is collected and reported in one :class:`ManifestError` before any work starts. URL schemes are
not checked here: a disallowed scheme fails its own row at fetch time (``pipeline.images``), so one bad row
does not stop a large run.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import ConfigError

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False),  # resolved; "" only where an inline image is given
        pa.field("landmark_id", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("bbox", pa.list_(pa.float32(), 4)),
    ]
)
# Content fingerprints kept after the fixed columns when the source has them (compared by diff_manifests).
FINGERPRINT_FIELDS = (pa.field("etag", pa.string()), pa.field("size", pa.int64()))
# Optional columns kept after the fixed ones when the source has them.
OPTIONAL_FIELDS = (*FINGERPRINT_FIELDS, pa.field("view", pa.float64()))

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
MAX_EXAMPLES = 5  # offending rows / ids quoted per problem


class ManifestError(ValueError):
    """A manifest that cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class ManifestDiff:
    """Ids of ``new`` relative to ``old``: added and changed in ``new``'s order, deleted in ``old``'s."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    deleted: tuple[str, ...]


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(source: str, options: storage.Options = None, image_root: str | None = None) -> pa.Table:
    """The validated manifest at ``source`` as a table with :data:`MANIFEST_SCHEMA` (+ etag/size if present).

    ``image_root`` derives urls for sources without a ``url`` column (GLDv2 index/test CSVs) with the GLDv2
    layout ``{root}/{id[0]}/{id[1]}/{id[2]}/{id}.jpg``. Rows keep the source's order (files in sorted order).
    Raises :class:`ManifestError` listing every problem.
    """
    if storage.isdir(source, options):
        files = storage.list_files(source, options, suffix=".parquet") or storage.list_files(
            source, options, suffix=".tar"
        )
        if not files:
            table = _image_folder_table(source, options)
            return _checked(source, [], table, np.arange(table.num_rows))
    else:
        files = _matching_files(source, options)
    root = _absolute(image_root) if image_root else None
    problems: list[str] = []
    parts: list[pa.Table] = []
    rows: list[np.ndarray] = []  # manifest row numbers of the parts' rows, for messages
    first_row = 0
    for url in files:
        name = storage.redact(url)
        try:
            raw = _read_table(url, options)
        except (pa.ArrowException, OSError, ValueError) as exc:
            problems.append(f"{name}: unreadable: {type(exc).__name__}: {exc}")
            continue
        file_problems = _column_problems(raw, name, derive_urls=root is not None)
        if not file_problems and "bbox" in raw.column_names:
            file_problems = _bbox_problems(raw.column("bbox"), first_row)
        if file_problems:
            problems += file_problems
        else:
            parts.append(_normalise(raw, _parent(_absolute(url)), root))
            rows.append(np.arange(first_row, first_row + raw.num_rows))
        first_row += raw.num_rows
    if not parts:
        raise ManifestError(_error_text(source, problems or ["no rows"]))
    return _checked(source, problems, _concat(parts), np.concatenate(rows))


def local_root(source: str, options: storage.Options = None, image_root: str | None = None) -> str | None:
    """The local folder whose files the rows of manifest ``source`` may read without an opt-in: ``image_root``
    when given, else the manifest's own folder (a folder manifest: itself); None when that is not local."""
    if image_root:
        return storage.local_path(image_root)
    if not storage.is_local(source):
        return None
    source = _absolute(source)
    literal = re.split(r"[*?\[]", source, maxsplit=1)[0]  # a glob's folder ends before its first wildcard
    is_folder = literal.endswith("/") or (literal == source and storage.isdir(source, options))
    return storage.local_path((literal if is_folder else _parent(literal)).rstrip("/") or "/")


def _checked(source: str, problems: list[str], table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table`` when neither ``problems`` nor its rows have any, else one ManifestError listing them all."""
    problems = problems + _row_problems(table, rows)
    if problems:
        raise ManifestError(_error_text(source, problems))
    return table


def _matching_files(source: str, options: storage.Options) -> list[str]:
    """The files a glob matches, or ``source`` itself when it is a file."""
    if any(c in source for c in "*?["):
        files = storage.glob(source, options)
    else:
        files = [source] if storage.exists(source, options) else []
    if not files:
        raise ManifestError(f"manifest {storage.redact(source)!r}: no such file, folder or matching files")
    return files


def _read_table(url: str, options: storage.Options) -> pa.Table:
    if url.lower().endswith(".tar"):
        return _tar_table(url, options)
    with storage.open_input(url, options) as f:
        if url.lower().endswith(".csv"):
            # Ids and labels stay strings: GLDv2 ids like "00e1..." or "1e57..." must not become numbers.
            types = {c: pa.string() for c in ("id", "url", "landmark_id")}
            return pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types=types))
        return pq.read_table(f)


def _tar_table(url: str, options: storage.Options) -> pa.Table:
    """Rows id, url (into the tar), size for the image members of one tar; hidden members skipped."""
    tar_url = _absolute(url)
    ids, urls, sizes = [], [], []
    for name, offset, size in storage.list_tar_members(url, options):
        stem, suffix = posixpath.splitext(posixpath.normpath(name).lstrip("/"))
        if suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in stem.split("/")):
            ids.append(_member_id(stem))
            urls.append(storage.tar_member_url(tar_url, offset, size))
            sizes.append(size)
    return pa.table({"id": pa.array(ids, pa.string()), "url": urls, "size": pa.array(sizes, pa.int64())})


def _member_id(stem: str) -> str:
    """GLDv2 keeps image ID at a/b/c/ID.jpg with a, b, c its first three characters: the id is then ID;
    any other member is named by its path without extension (as files in a folder are)."""
    *folders, name = stem.split("/")
    return name if len(folders) >= 3 and folders[-3:] == list(name[:3]) else stem


def _image_folder_table(root: str, options: storage.Options) -> pa.Table:
    """A manifest of every image file under ``root`` (recursive; hidden files and folders skipped)."""
    prefix = _bare(_absolute(root)).rstrip("/") + "/"
    ids, urls = [], []
    for url in storage.glob(storage.join(root, "**"), options):
        relative = _bare(url)[len(prefix) :]
        stem, suffix = posixpath.splitext(relative)
        hidden = any(part.startswith(".") for part in relative.split("/"))
        if suffix.lower() in IMAGE_SUFFIXES and not hidden:
            ids.append(stem)
            urls.append(url)
    if not ids:
        raise ManifestError(f"manifest {storage.redact(root)!r}: folder holds no images {IMAGE_SUFFIXES}")
    labels_images_boxes = [pa.nulls(len(ids), f.type) for f in list(MANIFEST_SCHEMA)[2:]]
    columns = [pa.array(ids, pa.string()), pa.array(urls, pa.string()), *labels_images_boxes]
    return pa.table(columns, schema=MANIFEST_SCHEMA)


# ------------------------------------------------------------------------------------------- validation


def _column_problems(raw: pa.Table, name: str, derive_urls: bool) -> list[str]:
    """Missing columns and wrong column types of one manifest file."""
    problems = []
    required = ["id"] if derive_urls or "image" in raw.column_names else ["id", "url"]
    for column in required:
        if column not in raw.column_names:
            hint = " (or pass image_root to derive urls from ids)" if column == "url" else ""
            problems.append(f"{name}: missing column {column!r}{hint}; columns are {raw.column_names}")
    for column, (allowed, is_ok) in _COLUMN_TYPES.items():
        if column in raw.column_names and not is_ok(raw.schema.field(column).type):
            problems.append(
                f"{name}: column {column!r} has type {raw.schema.field(column).type}, expected {allowed}"
            )
    return problems


def _is_bbox_type(t: pa.DataType) -> bool:
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return pa.types.is_null(t) or (is_list and (_is_number(t.value_type) or pa.types.is_null(t.value_type)))


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


_COLUMN_TYPES = {
    "id": ("string", _is_text),
    "url": ("string", lambda t: _is_text(t) or pa.types.is_null(t)),
    "landmark_id": ("int or string", lambda t: _is_text(t) or pa.types.is_integer(t) or pa.types.is_null(t)),
    "image": (
        "binary",
        lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t),
    ),
    "bbox": ("list of 4 numbers", _is_bbox_type),
    "etag": ("string", lambda t: _is_text(t) or pa.types.is_null(t)),
    "size": ("int", lambda t: pa.types.is_integer(t) or pa.types.is_null(t)),
    "view": ("number", lambda t: _is_number(t) or pa.types.is_null(t)),
}


def _bbox_problems(bbox: pa.ChunkedArray, first_row: int) -> list[str]:
    """Boxes that are not 4 finite numbers with 0 <= x0 < x1 and 0 <= y0 < y1 (null boxes are fine)."""
    if pa.types.is_null(bbox.type):
        return []
    lengths = pc.list_value_length(bbox).to_numpy(zero_copy_only=False)  # NaN where the box is null
    bad_shape = np.flatnonzero(~np.isnan(lengths) & (lengths != 4))
    if len(bad_shape):
        return [f"bbox must hold 4 numbers [x0, y0, x1, y1]: {_rows(bad_shape + first_row)}"]
    boxes = _boxes_as_numpy(bbox.cast(pa.list_(pa.float64())))  # (N, 4), NaN rows where null
    present = ~pc.is_null(bbox).to_numpy(zero_copy_only=False)
    x0, y0, x1, y1 = boxes.T
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(boxes).all(axis=1) & (x0 >= 0) & (y0 >= 0) & (x1 > x0) & (y1 > y0)
    bad_values = np.flatnonzero(present & ~valid)
    if len(bad_values):
        return [
            f"bbox values must be finite with 0 <= x0 < x1 and 0 <= y0 < y1: {_rows(bad_values + first_row)}"
        ]
    return []


def _boxes_as_numpy(bbox: pa.ChunkedArray) -> np.ndarray:
    """(N, 4) float64 boxes from a list column whose non-null entries hold 4 values; NaN rows where null."""
    boxes = np.full((len(bbox), 4), np.nan)
    present = ~pc.is_null(bbox).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(bbox).to_numpy(zero_copy_only=False)  # null entries inside a box become NaN
    boxes[present] = values.reshape(-1, 4)
    return boxes


def _row_problems(table: pa.Table, rows: np.ndarray) -> list[str]:
    """Empty ids, rows with nothing to fetch, duplicate ids; ``rows`` numbers the table's rows for messages."""
    problems = [] if table.num_rows else ["no rows"]
    ids, urls = table.column("id"), table.column("url")
    no_id = pc.or_kleene(pc.is_null(ids), pc.equal(pc.utf8_length(ids), 0))
    if pc.any(no_id).as_py():
        problems.append(f"empty or null id: {_rows(rows[_indices(no_id)])}")
    no_url = pc.and_(pc.equal(pc.utf8_length(urls), 0), pc.is_null(table.column("image")))
    if pc.any(no_url).as_py():
        problems.append(f"empty url and no inline image: {_rows(rows[_indices(no_url)])}")
    return problems + _duplicate_ids(ids, rows)


def _duplicate_ids(ids: pa.ChunkedArray, rows: np.ndarray) -> list[str]:
    counts = pa.table({"id": ids}).group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.greater(counts.column("id_count"), 1)).column("id").drop_null()
    if len(repeated) == 0:
        return []
    examples = [
        f"{value!r} at rows {rows[_indices(pc.equal(ids, value))].tolist()}"
        for value in repeated[:MAX_EXAMPLES].to_pylist()
    ]
    more = f" and {len(repeated) - MAX_EXAMPLES} more" if len(repeated) > MAX_EXAMPLES else ""
    return [f"{len(repeated)} duplicate ids: {'; '.join(examples)}{more}"]


def _indices(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))


def _rows(rows: np.ndarray) -> str:
    shown = ", ".join(str(r) for r in rows[:MAX_EXAMPLES])
    more = f" and {len(rows) - MAX_EXAMPLES} more" if len(rows) > MAX_EXAMPLES else ""
    return f"{len(rows)} row(s) ({shown}{more})"


def _error_text(source: str, problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"manifest {storage.redact(source)!r} has {len(problems)} problem(s):\n{lines}"


# -------------------------------------------------------------------------------------------- normalising


def _normalise(raw: pa.Table, base: str, image_root: str | None) -> pa.Table:
    """One checked manifest file cast to the fixed schema, with urls resolved against ``base``."""
    n = raw.num_rows
    ids = raw.column("id").cast(pa.string())
    if "url" in raw.column_names:
        urls = _resolve_urls(raw.column("url").cast(pa.string()), base)
    elif image_root is not None:
        urls = pa.array([_gldv2_url(image_root, i) for i in ids.to_pylist()], pa.string())
    else:  # inline images only
        urls = pa.array([""] * n, pa.string())
    columns = {
        "id": ids,
        "url": urls,
        "landmark_id": _column_or_nulls(raw, "landmark_id", pa.string()),
        "image": _column_or_nulls(raw, "image", pa.binary()),
        "bbox": _fixed_boxes(raw.column("bbox"))
        if "bbox" in raw.column_names
        else pa.nulls(n, pa.list_(pa.float32(), 4)),
    }
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    for field in OPTIONAL_FIELDS:
        if field.name in raw.column_names:
            table = table.append_column(field, raw.column(field.name).cast(field.type))
    return table


def _column_or_nulls(raw: pa.Table, name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
    return raw.column(name).cast(type_) if name in raw.column_names else pa.nulls(raw.num_rows, type_)


def _fixed_boxes(bbox: pa.ChunkedArray) -> pa.Array:
    """fixed_size_list<float32, 4> boxes from any checked numeric list column."""
    boxes = _boxes_as_numpy(bbox.cast(pa.list_(pa.float64()))).astype(np.float32)  # (N, 4)
    mask = pc.is_null(bbox).to_numpy(zero_copy_only=False)
    return pa.FixedSizeListArray.from_arrays(pa.array(np.nan_to_num(boxes).ravel()), 4, mask=pa.array(mask))


def _resolve_urls(urls: pa.ChunkedArray, base: str) -> pa.Array:
    """Relative paths joined onto ``base``; absolute urls and paths kept; null becomes ""."""
    urls = pc.fill_null(urls, "").combine_chunks()
    absolute = pc.or_(pc.starts_with(urls, "/"), pc.match_substring(urls, "://"))
    relative_rows = _indices(pc.and_(pc.invert(absolute), pc.not_equal(urls, "")))
    if len(relative_rows) == 0:
        return urls
    values = urls.to_numpy(zero_copy_only=False)  # object array of str
    scheme, sep, path = base.rpartition("://")
    values[relative_rows] = [
        f"{scheme}{sep}{posixpath.normpath(posixpath.join(path, u))}" for u in values[relative_rows]
    ]
    return pa.array(values, pa.string())


def _gldv2_url(root: str, image_id: str | None) -> str:
    if not image_id or len(image_id) < 3:
        return ""  # reported as "empty url" by validation
    return storage.join(root, image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")


def _concat(parts: list[pa.Table]) -> pa.Table:
    """Concatenate normalised parts; an optional column present in any part is kept (null elsewhere)."""
    present = [f for f in OPTIONAL_FIELDS if any(f.name in p.column_names for p in parts)]
    schema = pa.schema([*MANIFEST_SCHEMA, *present])
    filled = [
        pa.table(
            {
                f.name: p.column(f.name) if f.name in p.column_names else pa.nulls(p.num_rows, f.type)
                for f in schema
            },
            schema=schema,
        )
        for p in parts
    ]
    return pa.concat_tables(filled)


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _parent(url: str) -> str:
    scheme, sep, path = url.rpartition("://")
    return f"{scheme}{sep}{posixpath.dirname(path)}"


def _bare(url: str) -> str:
    """The path of a URL without scheme or leading slashes, to compare forms like memory://a and memory:///a."""
    return url.rpartition("://")[2].lstrip("/")


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
