"""The store's format in one place: folder and file names, schemas, the commit marker and its checks, the
run metadata, and the decoding of stored descriptors."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.choices import GLOBAL_DTYPES, LOCAL_DTYPES
from pipeline.errors import ConfigError, InputError
from pipeline.storage import Options

GLOBAL_DIR = "global"
LOCAL_DIR = "local"
LOCAL_INDEX_DIR = "local_index"
ERRORS_DIR = "errors"
COMMITS_DIR = "_commits"
RUN_INFO = "_run.json"

INT8_SCALE = 127.0


@dataclass(frozen=True)
class StoreSettings:
    """How descriptors are encoded on storage."""

    global_dtype: str = "float16"  # halves the store; cosine error ~1e-4, far below retrieval noise
    local_dtype: str = "float16"  # "int8" quarters float32 again (≈ 0.13 MB/image at 1000 × 128)
    row_group_size: int = 1  # local rows per row group: 1 prices a read at one image's bytes

    def __post_init__(self) -> None:
        if self.global_dtype not in GLOBAL_DTYPES:
            raise ConfigError(f"global_dtype={self.global_dtype!r}; allowed: {', '.join(GLOBAL_DTYPES)}")
        if self.local_dtype not in LOCAL_DTYPES:
            raise ConfigError(f"local_dtype={self.local_dtype!r}; allowed: {', '.join(LOCAL_DTYPES)}")
        if self.row_group_size < 1:
            raise ConfigError(f"row_group_size={self.row_group_size}; must be ≥ 1")


@dataclass(frozen=True)
class LocalFeatures:
    """The local features of one image."""

    keypoints: np.ndarray  # (N, 2) float32, (x, y) in original-image pixels
    scales: np.ndarray  # (N,) float32, the extraction scale each feature came from
    scores: np.ndarray  # (N,) float32, attention
    descriptors: np.ndarray  # (N, 128) float32, L2-normalised

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class ErrorRecord:
    """A manifest row that produced no descriptors, and why."""

    id: str
    url: str
    stage: str  # fetch | decode | extract
    reason: str  # a short code, e.g. "truncated", "missing"
    message: str  # readable detail


@dataclass(frozen=True)
class ShardCommit:
    """The commit marker of one shard: what the shard accounts for."""

    shard: int  # the NNNNN of part-NNNNN.json; optional in the file, which must agree with its name
    rows: int  # manifest rows the shard covers = ok + errors
    ok: int  # rows with descriptors (in global/ and local/)
    errors: int  # rows in errors/
    reasons: dict[str, int] = field(default_factory=dict)  # error reason → count; optional


class StoreFormatError(InputError):
    """A store file that does not follow the documented format (README, "Descriptor store format")."""


COMMIT_KEYS = ("rows", "ok", "errors")  # required in a commit marker
COMMIT_OPTIONAL = ("shard", "reasons")


ERROR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
    ]
)


def shard_name(shard: int) -> str:
    if shard < 0:
        raise ValueError(f"shard={shard}; must be ≥ 0")
    return f"part-{shard:05d}"


def _shard_url(store_url: str, folder: str, shard: int, suffix: str = ".parquet") -> str:
    return storage.join(store_url, folder, shard_name(shard) + suffix)


def _count(marker: Mapping[str, Any], key: str, where: str) -> int:
    value = marker[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreFormatError(f"{where}: {key!r} is {value!r}; must be an integer ≥ 0")
    return value


def parse_commit(url: str, text: str) -> ShardCommit:
    """A commit marker, validated; the shard number is taken from the file name ``part-NNNNN.json``."""
    where = f"commit marker {storage.redact(url)}"
    name = url.rsplit("/", 1)[-1]
    if not re.fullmatch(r"part-\d{5,}\.json", name):
        raise StoreFormatError(f"{where}: file name must be part-NNNNN.json (NNNNN = shard number)")
    shard = int(name[len("part-") : -len(".json")])
    try:
        marker = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreFormatError(f"{where}: not JSON ({exc})") from None
    if not isinstance(marker, dict):
        raise StoreFormatError(f"{where}: must be a JSON object, not {type(marker).__name__}")
    missing = [k for k in COMMIT_KEYS if k not in marker]
    unknown = sorted(set(marker) - set(COMMIT_KEYS) - set(COMMIT_OPTIONAL))
    if missing or unknown:
        raise StoreFormatError(
            f"{where}: missing keys {missing}, unknown keys {unknown}; required {list(COMMIT_KEYS)}, "
            f"optional {list(COMMIT_OPTIONAL)}"
        )
    rows, ok, errors = (_count(marker, k, where) for k in COMMIT_KEYS)
    if rows != ok + errors:
        raise StoreFormatError(f"{where}: rows {rows} != ok {ok} + errors {errors}")
    if "shard" in marker and marker["shard"] != shard:
        raise StoreFormatError(f"{where}: says shard {marker['shard']!r} but is named for shard {shard}")
    reasons = marker.get("reasons", {})
    if not isinstance(reasons, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in reasons.items()
    ):
        raise StoreFormatError(f"{where}: 'reasons' must map reason strings to counts ≥ 0, got {reasons!r}")
    return ShardCommit(shard=shard, rows=rows, ok=ok, errors=errors, reasons=dict(reasons))


def _fixed_size_to_numpy(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed_size_list column as an (n, width) array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(array), width)


def _decode_local(table: pa.Table) -> dict[str, LocalFeatures]:
    desc_type = table.schema.field("descriptors").type.value_type
    dim = desc_type.list_size
    out: dict[str, LocalFeatures] = {}
    for row in range(table.num_rows):
        descriptors = _fixed_size_to_numpy(table.column("descriptors")[row].values, dim)
        if desc_type.value_type == pa.int8():
            descriptors = descriptors.astype(np.float32) / INT8_SCALE
            norms = np.linalg.norm(descriptors, axis=1, keepdims=True)
            descriptors = descriptors / np.maximum(norms, 1e-12)
        out[table.column("id")[row].as_py()] = LocalFeatures(
            keypoints=_fixed_size_to_numpy(table.column("keypoints")[row].values, 2).astype(np.float32),
            scales=table.column("scales")[row].values.to_numpy(zero_copy_only=False).astype(np.float32),
            scores=table.column("scores")[row].values.to_numpy(zero_copy_only=False).astype(np.float32),
            descriptors=descriptors.astype(np.float32),
        )
    return out


LOCAL_INDEX_SCHEMA = pa.schema(
    [("id", pa.string()), ("row_group", pa.int32()), ("offset", pa.int64()), ("size", pa.int64())]
)


def _row_group_range(row_group: pq.RowGroupMetaData) -> tuple[int, int]:
    """[start, end) of a row group's column chunks in its file."""
    chunks = [row_group.column(j) for j in range(row_group.num_columns)]
    starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks]
    ends = [start + c.total_compressed_size for start, c in zip(starts, chunks, strict=True)]
    return min(starts), max(ends)


def write_run_info(store_url: str, info: Mapping[str, Any], options: Options = None) -> None:
    text = storage.redact_text(json.dumps(info, indent=2, sort_keys=True))  # an output: no credential in it
    storage.write_text(storage.join(store_url, RUN_INFO), text, options)


def read_run_info(store_url: str, options: Options = None) -> dict[str, Any] | None:
    """The store's run metadata, or None for a store not yet started."""
    url = storage.join(store_url, RUN_INFO)
    return json.loads(storage.read_text(url, options)) if storage.exists(url, options) else None
