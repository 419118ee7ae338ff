"""Reading and writing the index artefacts (faiss indexes, id map, JSON) through pipeline.storage."""

from __future__ import annotations

import json
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.storage import Options

TRAINED = "trained.faiss"
PARTS = "parts"
INDEX = "index.faiss"
IVFDATA = "index.ivfdata"
ID_MAP = "ids.parquet"
PARAMS = "params.json"
QUALITY = "quality.json"

ID_MAP_SCHEMA = pa.schema([("id", pa.int64()), ("image_id", pa.string())])


def index_to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def index_from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def write_index(index: faiss.Index, url: str, options: Options = None) -> None:
    storage.write_bytes(url, index_to_bytes(index), options)


def read_index(url: str, options: Options = None) -> faiss.Index:
    return index_from_bytes(storage.read_bytes(url, options))


def load_index(index_url: str, options: Options = None) -> faiss.Index:
    """The final index under ``index_url``; an on-disk one is opened from its local file (its lists stay on disk).

    Plain ``read_index`` without IO_FLAG_MMAP: mmap-reading a merged on-disk index segfaulted here (GUIDE §2).
    """
    if read_params(index_url, options).get("on_disk"):
        return faiss.read_index(storage.join(index_url, INDEX))
    return read_index(storage.join(index_url, INDEX), options)


def id_map_table(ids: np.ndarray, image_ids: np.ndarray) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "image_id": pa.array(list(image_ids), pa.string())})


def write_id_map(index_url: str, table: pa.Table, options: Options = None) -> None:
    storage.write_parquet(storage.join(index_url, ID_MAP), table, options, compression="zstd")


def read_id_map_table(index_url: str, options: Options = None) -> pa.Table:
    """The id map as stored: columns id (int64, faiss id) and image_id (string), in no particular order."""
    return storage.read_parquet(storage.join(index_url, ID_MAP), options)


def read_id_map(index_url: str, options: Options = None) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids (n,) and image ids (n,) object array, sorted by int64 id."""
    table = read_id_map_table(index_url, options)
    ids = table.column("id").to_numpy()
    image_ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    order = np.argsort(ids, kind="stable")
    return ids[order], image_ids[order]


def write_json(url: str, value: dict[str, Any], options: Options = None) -> None:
    storage.write_text(url, json.dumps(value, indent=2, sort_keys=True), options)


def read_params(index_url: str, options: Options = None) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(index_url, PARAMS), options))


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
