"""Reading and writing the index artefacts (faiss indexes, id map, JSON) through pipeline.storage."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.errors import InputError, MissingInputError
from pipeline.storage import Options

TRAINED = "trained.faiss"
PARTS = "parts"
INDEX = "index.faiss"
IVFDATA = "index.ivfdata"
ID_MAP = "ids.parquet"
PARAMS = "params.json"
QUALITY = "quality.json"

ID_MAP_SCHEMA = pa.schema([("id", pa.int64()), ("image_id", pa.string())])


class IndexFormatError(InputError):
    """A file of an index directory that is not what build-index writes (corrupt, truncated, wrong schema)."""


def _faiss_reason(exc: RuntimeError) -> str:
    """faiss's own message without its C++ function signature and source location."""
    message = str(exc).strip()
    found = re.search(r"\.(?:cpp|h):\d+: (.*)", message, re.DOTALL)
    return " ".join((found.group(1) if found else message).split())


def _read_faiss(url: str, read: Callable[[], faiss.Index]) -> faiss.Index:
    try:
        return read()
    except RuntimeError as exc:  # faiss raises RuntimeError for every unreadable input
        raise IndexFormatError(
            f"{storage.redact(url)} is not a readable faiss index: {_faiss_reason(exc)}"
        ) from None


def _missing(index_url: str, name: str) -> MissingInputError:
    return MissingInputError(
        f"no index at {storage.redact(index_url)}: {name} is missing (build-index writes it)"
    )


def index_to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def index_from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def write_index(index: faiss.Index, url: str, options: Options = None) -> None:
    storage.write_bytes(url, index_to_bytes(index), options)


def read_index(url: str, options: Options = None) -> faiss.Index:
    """The faiss index at ``url``; IndexFormatError naming the file when faiss cannot read it."""
    data = storage.read_bytes(url, options)
    return _read_faiss(url, lambda: index_from_bytes(data))


def load_index(index_url: str, options: Options = None) -> faiss.Index:
    """The final index under ``index_url``; an on-disk one is opened from its local file (its lists stay on disk).

    Plain ``read_index`` without IO_FLAG_MMAP: mmap-reading a merged on-disk index segfaulted here (GUIDE §2).
    """
    url = storage.join(index_url, INDEX)
    if not storage.exists(url, options):
        raise _missing(index_url, INDEX)
    if read_params(index_url, options).get("on_disk"):
        return _read_faiss(url, lambda: faiss.read_index(url))
    return read_index(url, options)


def id_map_table(ids: np.ndarray, image_ids: np.ndarray) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "image_id": pa.array(list(image_ids), pa.string())})


def write_id_map(index_url: str, table: pa.Table, options: Options = None) -> None:
    storage.write_parquet(storage.join(index_url, ID_MAP), table, options, compression="zstd")


def read_id_map_table(index_url: str, options: Options = None) -> pa.Table:
    """The id map as stored: columns id (int64, faiss id) and image_id (string), in no particular order.

    FileNotFoundError when it is missing, IndexFormatError naming the file when it is not that table."""
    url = storage.join(index_url, ID_MAP)
    try:
        table = storage.read_parquet(url, options)
    except FileNotFoundError:
        raise _missing(index_url, ID_MAP) from None
    except pa.ArrowException as exc:
        raise IndexFormatError(f"{storage.redact(url)} is not a readable Parquet file: {exc}") from None
    if not table.schema.equals(ID_MAP_SCHEMA, check_metadata=False):
        found = ", ".join(f"{f.name}: {f.type}" for f in table.schema)
        raise IndexFormatError(
            f"{storage.redact(url)}: columns ({found}); expected (id: int64, image_id: string)"
        )
    return table


def read_id_map(index_url: str, options: Options = None) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids (n,) and image ids (n,) object array, sorted by int64 id."""
    table = read_id_map_table(index_url, options)
    ids = table.column("id").to_numpy()
    image_ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    order = np.argsort(ids, kind="stable")
    return ids[order], image_ids[order]


def _write_json(url: str, value: dict[str, Any], options: Options = None) -> None:
    storage.write_text(url, storage.redact_text(json.dumps(value, indent=2, sort_keys=True)), options)


def write_params(index_url: str, params: dict[str, Any], options: Options = None) -> None:
    """The one writer of params.json: the build writes it last, an update rewrites it last (its ``ntotal``
    says which state of the index is complete)."""
    _write_json(storage.join(index_url, PARAMS), params, options)


def write_quality(index_url: str, quality: dict[str, Any], options: Options = None) -> None:
    """The one writer of quality.json (the build's recall report, pipeline.index.quality)."""
    _write_json(storage.join(index_url, QUALITY), quality, options)


def read_params(index_url: str, options: Options = None) -> dict[str, Any]:
    """The index's build parameters; FileNotFoundError for a folder without an index, IndexFormatError for
    a params.json that is not a JSON object with the index dimension."""
    url = storage.join(index_url, PARAMS)
    try:
        params = json.loads(storage.read_text(url, options))
    except FileNotFoundError:
        raise _missing(index_url, PARAMS) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{storage.redact(url)} is not JSON ({exc})") from None
    if not isinstance(params, dict) or not isinstance(params.get("dim"), int):
        raise IndexFormatError(f"{storage.redact(url)} must be a JSON object with an integer 'dim'")
    return params


def index_bytes(index_url: str, options: Options = None) -> int:
    """Bytes of the files directly under ``index_url`` except the intermediate trained index: what a copy of
    the index for search holds (index, id map, refinement codes, JSON, whitening, DBA vectors)."""
    files = storage.list_files(index_url, options)
    return sum(storage.info(url, options)["size"] for url in files if not url.endswith("/" + TRAINED))


def remove_intermediate(index_url: str, options: Options = None) -> None:
    """Remove what only the build needed: the add tasks' parts and the trained empty index."""
    storage.remove(storage.join(index_url, PARTS), options, recursive=True)
    storage.remove(storage.join(index_url, TRAINED), options)


def read_quality(index_url: str, options: Options = None) -> dict[str, Any] | None:
    """The recall report the build measured against exact search (quality.json); None when there is none."""
    url = storage.join(index_url, QUALITY)
    return json.loads(storage.read_text(url, options)) if storage.exists(url, options) else None


def packed_in_blocks(index: faiss.Index) -> bool:
    """True for a fast-scan IVF index (``PQ…x4fs``): its inverted lists pack 32 codes per block, which on-disk
    lists, GPU copies and per-entry list copies do not handle."""
    try:
        return isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFFastScan)
    except RuntimeError:  # not an IVF index
        return False


def set_search_params(index: faiss.Index, nprobe: int | None) -> None:
    """Set nprobe (and a wide enough HNSW coarse-quantizer beam); a no-op for exact indexes."""
    if nprobe is None:
        return
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index: exact search has no nprobe
        return
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(quantizer.hnsw.efSearch, 2 * nprobe)
