"""The manifest's schema and its checks: every problem of a table collected into one :class:`ManifestError`
(columns, types, boxes, duplicate ids)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.errors import InputError

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
MAX_EXAMPLES = 5  # offending rows / ids quoted per problem


class ManifestError(InputError):
    """A manifest that cannot be used; the message lists every problem found."""


def _checked(source: str, problems: list[str], table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table`` when neither ``problems`` nor its rows have any, else one ManifestError listing them all."""
    problems = problems + _row_problems(table, rows)
    if problems:
        raise ManifestError(_error_text(source, problems))
    return table


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
