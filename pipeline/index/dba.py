"""Database-side augmentation (DBA) vectors beside an index: ``OUT/dba.parquet``, owned by this module.

Columns: id (image id), vector (D float32, the image's global descriptor), refined (D float32, its DBA vector),
neighbours (its k most similar other indexed images, best first) and sims (their similarities). The schema
metadata ``dba`` records k and α.

The faiss index keeps the original vectors; the refined ones re-score the shortlist at re-rank time. Why not
index the DBA vectors: adding or removing one image changes the DBA vectors of its neighbours, which an IVF-PQ
index could only follow by re-encoding them (remove + add) on every update, and an index trained on
originals serves the other methods unchanged. The price: DBA re-orders the shortlist, it cannot bring in
images the original search missed.

Kept exact under incremental updates (``add`` and ``remove``, called by pipeline.index.update): a row is
recomputed when its neighbour list can change (a new image closer than its k-th neighbour, or a removed
neighbour); the result equals a rebuild from scratch (up to ties between equal similarities).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage, store
from pipeline.errors import ConfigError, InputError, MissingInputError
from pipeline.execution import Workers, executor_for
from pipeline.index import io, whitening
from pipeline.storage import Options

DBA = "dba.parquet"


@dataclass(frozen=True)
class DbaTable:
    ids: np.ndarray  # (N,) object, image ids
    vectors: np.ndarray  # (N, D) float32, global descriptors
    refined: np.ndarray  # (N, D) float32, DBA vectors
    neighbours: np.ndarray  # (N, k') int64 row positions of the nearest other rows, best first
    sims: np.ndarray  # (N, k') float32 their similarities
    k: int
    alpha: float


def dba_url(index_url: str) -> str:
    return storage.join(index_url, DBA)


class DbaWork:
    """The executor's work: row positions (n,) → their (neighbours (n, k'), sims (n, k'), refined (n, D)) against
    all ``vectors``, exact (chunked products: never all pairs at once); on the worker's GPU when it has one."""

    def __init__(self, vectors: np.ndarray, k: int, alpha: float) -> None:
        self.vectors, self.k, self.alpha = vectors, k, alpha

    def setup(self) -> None:
        import torch  # here: importing pipeline.index must not import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.x = torch.as_tensor(self.vectors, device=device)

    def __getstate__(self) -> dict[str, Any]:  # travels before setup(): the vectors once, no tensor
        return {k: self.__dict__[k] for k in ("vectors", "k", "alpha")}

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        from pipeline.rerank.global_rerank import alpha_weighted_sum, nearest_others

        positions = torch.as_tensor(rows, dtype=torch.long, device=self.x.device)
        sims, idx, taken = nearest_others(self.x, positions, self.k)
        refined = alpha_weighted_sum(self.x[positions], self.x[idx], sims, taken, self.alpha)
        return idx.cpu().numpy(), sims.cpu().numpy(), refined.cpu().numpy()


ROWS_PER_BATCH = 8192  # rows per executor batch: (8192, N) similarities are formed 1024 rows at a time


def _rows(
    vectors: np.ndarray, rows: np.ndarray, k: int, alpha: float, workers: Workers = Workers()
) -> tuple[np.ndarray, ...]:
    """(neighbours, sims, refined) of ``rows`` against all ``vectors`` (exact), batched on the executor."""
    if not len(rows):
        width = min(k, max(len(vectors) - 1, 0))
        return (
            np.zeros((0, width), np.int64),
            np.zeros((0, width), np.float32),
            np.zeros((0, vectors.shape[1])),
        )
    batches = [(b, rows[s : s + ROWS_PER_BATCH]) for b, s in enumerate(range(0, len(rows), ROWS_PER_BATCH))]
    done: dict[int, tuple[np.ndarray, ...]] = {}
    executor_for(workers).run(DbaWork(vectors, k, alpha), batches, done.__setitem__)
    return tuple(np.concatenate([done[b][i] for b in sorted(done)]) for i in range(3))


def compute_dba(
    ids: Sequence[str], vectors: np.ndarray, k: int = 10, alpha: float = 3.0, workers: Workers = Workers()
) -> DbaTable:
    """DBA of every row from scratch; ``workers`` may spread the neighbour search over Ray workers."""
    if k < 1 or not alpha >= 0:
        raise ConfigError(f"DBA k={k}, alpha={alpha}: need k >= 1 and alpha >= 0")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    neighbours, sims, refined = _rows(vectors, np.arange(len(vectors)), k, alpha, workers)
    return DbaTable(np.asarray(ids, dtype=object), vectors, refined, neighbours, sims, k, alpha)


def _refresh(
    table: DbaTable, vectors: np.ndarray, ids: np.ndarray, stale: np.ndarray, workers: Workers
) -> DbaTable:
    """The table of rows ``ids``/``vectors``: ``stale`` rows (bool) recomputed on ``workers``, the others copied
    from ``table``."""
    width = min(table.k, max(len(ids) - 1, 0))
    neighbours = np.zeros((len(ids), width), dtype=np.int64)
    sims = np.zeros((len(ids), width), dtype=np.float32)
    refined = np.zeros_like(vectors)
    keep = np.flatnonzero(~stale)
    if len(keep):  # a kept row's neighbours are all still present and its list has the same width
        old_row = {image_id: i for i, image_id in enumerate(table.ids)}
        new_row = {image_id: i for i, image_id in enumerate(ids)}
        moved = np.array([new_row.get(i, -1) for i in table.ids])  # old row → new row
        rows = np.array([old_row[i] for i in ids[keep]])
        neighbours[keep] = moved[table.neighbours[rows]]
        sims[keep] = table.sims[rows]
        refined[keep] = table.refined[rows]
    rows = np.flatnonzero(stale)
    if len(rows):
        neighbours[rows], sims[rows], refined[rows] = _rows(vectors, rows, table.k, table.alpha, workers)
    return DbaTable(ids, vectors, refined, neighbours, sims, table.k, table.alpha)


PRODUCT_ELEMENTS = 1 << 24  # similarities formed at once by _closest (64 MB of float32)


def _closest(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """(N_old,) each old row's highest similarity to a ``new`` row (−inf without new rows), in row chunks:
    never the whole (N_old, N_new) product at once."""
    step = max(1, PRODUCT_ELEMENTS // max(len(new), 1))
    chunks = [(old[s : s + step] @ new.T).max(axis=1, initial=-np.inf) for s in range(0, len(old), step)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def add_rows(
    table: DbaTable, ids: Sequence[str], vectors: np.ndarray, workers: Workers = Workers()
) -> DbaTable:
    """``table`` with new rows appended; old rows recomputed where a new row enters their top k."""
    new = np.ascontiguousarray(vectors, dtype=np.float32)
    all_vectors = np.concatenate([table.vectors, new]) if len(table.ids) else new
    all_ids = np.concatenate([table.ids, np.asarray(ids, dtype=object)])
    closest_new = _closest(table.vectors, new)  # (N_old,)
    full = table.sims.shape[1] >= min(table.k, len(all_ids) - 1)
    kth = table.sims[:, -1] if table.sims.shape[1] else np.full(len(table.ids), -np.inf)
    stale_old = (closest_new > kth) | (not full) if len(new) else np.zeros(len(table.ids), dtype=bool)
    stale = np.concatenate([stale_old, np.ones(len(new), dtype=bool)])
    return _refresh(table, all_vectors, all_ids, stale, workers)


def remove_rows(table: DbaTable, ids: Sequence[str], workers: Workers = Workers()) -> DbaTable:
    """``table`` without these rows; rows that had one of them as a neighbour recomputed."""
    doomed = np.isin(table.ids, np.asarray(list(ids), dtype=object))
    kept = ~doomed
    lost_neighbour = doomed[table.neighbours].any(axis=1)  # (N,)
    narrower = table.sims.shape[1] > min(table.k, kept.sum() - 1)  # fewer images than k + 1 left
    return _refresh(table, table.vectors[kept], table.ids[kept], (lost_neighbour | narrower)[kept], workers)


# ---------------------------------------------------------------------------------------------- storage


def _vectors_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])


def write_dba(index_url: str, table: DbaTable, options: Options = None) -> None:
    names = table.ids[table.neighbours] if table.neighbours.size else np.zeros((len(table.ids), 0), object)
    arrow = pa.table(
        {
            "id": pa.array(list(table.ids), pa.string()),
            "vector": _vectors_column(table.vectors),
            "refined": _vectors_column(table.refined),
            "neighbours": pa.array([list(row) for row in names], pa.list_(pa.string())),
            "sims": pa.array([list(row) for row in table.sims], pa.list_(pa.float32())),
        }
    )
    meta = {"dba": json.dumps({"k": table.k, "alpha": table.alpha})}
    storage.write_parquet(dba_url(index_url), arrow.replace_schema_metadata(meta), options)


def has_dba(index_url: str, options: Options = None) -> bool:
    return storage.exists(dba_url(index_url), options)


def read_dba(index_url: str, options: Options = None) -> DbaTable:
    """The DBA table beside an index; FileNotFoundError naming the command that writes it."""
    url = dba_url(index_url)
    if not storage.exists(url, options):
        raise MissingInputError(
            f"no DBA vectors at {storage.redact(url)}; write them with `landmark-index dba` (or build_dba)"
        )
    arrow = storage.read_parquet(url, options)
    meta: dict[str, Any] = json.loads(arrow.schema.metadata[b"dba"])
    ids = np.asarray(arrow.column("id").to_pylist(), dtype=object)
    dim = arrow.schema.field("vector").type.list_size

    def matrix(name: str) -> np.ndarray:
        return arrow.column(name).combine_chunks().flatten().to_numpy().reshape(len(ids), dim)

    position = {image_id: i for i, image_id in enumerate(ids)}
    names = arrow.column("neighbours").to_pylist()
    width = min((len(n) for n in names), default=0)
    neighbours = np.array([[position[n] for n in row[:width]] for row in names], dtype=np.int64)
    sims = np.array([row[:width] for row in arrow.column("sims").to_pylist()], dtype=np.float32)
    return DbaTable(
        ids,
        matrix("vector"),
        matrix("refined"),
        neighbours.reshape(len(ids), width),
        sims.reshape(len(ids), width),
        int(meta["k"]),
        float(meta["alpha"]),
    )


# ---------------------------------------------------------------------------------------------- an index's DBA


def _stored_vectors(image_ids: np.ndarray, stores: Sequence[str], options: Options) -> np.ndarray:
    """(N, D) global descriptors of ``image_ids`` from descriptor stores (the newest, last, store wins)."""
    wanted = {image_id: i for i, image_id in enumerate(image_ids)}
    out: np.ndarray | None = None
    found = np.zeros(len(image_ids), dtype=bool)
    for store_url in reversed(stores):
        for ids, vectors in store.iter_global(store_url, options):  # (n,), (n, D)
            for image_id, vector in zip(ids, vectors, strict=True):
                row = wanted.get(image_id)
                if row is not None and not found[row]:
                    out = np.zeros((len(image_ids), len(vector)), np.float32) if out is None else out
                    out[row], found[row] = vector, True
    if not found.all():
        missing = image_ids[~found][:5].tolist()
        raise InputError(
            f"{int((~found).sum())} indexed images have no global descriptor in the stores: {missing}"
        )
    return out if out is not None else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class DbaSummary:
    """What :func:`build_dba` wrote."""

    images: int  # indexed images, each with a DBA vector
    k: int
    alpha: float
    out: str  # dba.parquet's URL, redacted


def build_dba(
    index_url: str,
    stores: Sequence[str],
    k: int = 10,
    alpha: float = 3.0,
    options: Options = None,
    *,
    workers: Workers = Workers(),
) -> DbaSummary:
    """DBA vectors of every image in the index (descriptors read from ``stores``, in the index's space: whitened
    when it whitens), written beside it; the neighbour search batched on ``workers``."""
    _, image_ids = io.read_id_map(index_url, options)
    space = whitening.space(index_url, io.read_params(index_url, options), options)
    table = compute_dba(image_ids, space(_stored_vectors(image_ids, stores, options)), k, alpha, workers)
    write_dba(index_url, table, options)
    return DbaSummary(len(image_ids), k, alpha, storage.redact(dba_url(index_url)))


def update_dba(
    index_url: str,
    added: tuple[np.ndarray, np.ndarray] | None = None,  # (image ids, vectors in the index's space)
    removed: Sequence[str] = (),
    options: Options = None,
    *,
    workers: Workers = Workers(),
) -> None:
    """Keep an index's DBA vectors (if it has any) in step with added (ids, vectors) and removed ids.

    Idempotent (rows already added or removed are skipped), so the index update calls it before saving the
    index: a run that crashes in between and is repeated leaves both consistent.
    """
    if not has_dba(index_url, options):
        return
    table = read_dba(index_url, options)
    present = set(table.ids.tolist())
    gone = [i for i in removed if i in present]
    if gone:
        table = remove_rows(table, gone, workers)
    if added is not None:
        new = np.array([i not in present or i in gone for i in added[0]], dtype=bool)
        if new.any():
            rows = np.asarray(added[0], dtype=object)[new], np.asarray(added[1])[new]
            table = add_rows(table, *rows, workers)
    write_dba(index_url, table, options)
