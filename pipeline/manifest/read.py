"""Reading a manifest source (Parquet, GLDv2 CSV, tars read in place, a folder of images) into one checked
table, normalised to the schema; relative URLs resolved against the manifest's folder."""

from __future__ import annotations

import os
import posixpath
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.manifest.checks import (
    MANIFEST_SCHEMA,
    OPTIONAL_FIELDS,
    ManifestError,
    _bbox_problems,
    _boxes_as_numpy,
    _checked,
    _column_problems,
    _error_text,
    _indices,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


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
