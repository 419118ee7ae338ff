"""Refinement: the IVF-PQ shortlist (k × k_factor candidates) re-scored with more exact vectors.

PQ codes cap recall (tens of dimensions per code byte cannot order near-duplicates), so the final top-k is
re-ranked by inner products with scalar-quantizer codes of the original vectors:

    sq8    1 byte per dimension, in RAM (faiss IndexRefine over an IndexScalarQuantizer)
    fp16   2 bytes per dimension, in RAM: the store's own float16 values, so the scores are exact
    store  the same float16 codes left on disk and memory-mapped (a local copy: RAM holds only the PQ index)

The codes are addressed by faiss id: ``OUT/refine-<first id>.codes`` holds the codes of ids ``[first, first + n)``
(one file per added descriptor shard, beside the index so that copying a version's files copies them; ids are
never reused). Removing an image removes
it from the IVF lists only, so its code stays behind unreachable: a removed id can never come back, and added
shards append new files. ``OUT/refine.faiss`` is the trained, empty scalar quantizer (sq8 learns per-dimension
ranges on the training sample).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from pipeline import storage
from pipeline.errors import InputError
from pipeline.index import io
from pipeline.storage import Options

QUANTIZER = "refine.faiss"
CODES_PREFIX, CODES_SUFFIX = "refine-", ".codes"
_SQ_TYPE = {
    "sq8": faiss.ScalarQuantizer.QT_8bit,
    "fp16": faiss.ScalarQuantizer.QT_fp16,
    "store": faiss.ScalarQuantizer.QT_fp16,
}
QUERY_CHUNK_BYTES = 256 * 2**20  # store tier: float32 candidates gathered per chunk of queries


def train_quantizer(kind: str, sample: np.ndarray, dim: int) -> faiss.IndexScalarQuantizer:
    """The empty scalar quantizer of ``kind`` (sq8 learns its ranges on ``sample`` (n, dim))."""
    quantizer = faiss.IndexScalarQuantizer(dim, _SQ_TYPE[kind], faiss.METRIC_INNER_PRODUCT)
    if not quantizer.is_trained:
        quantizer.train(sample)
    return quantizer


def codes_url(index_url: str, first_id: int) -> str:
    return storage.join(index_url, f"{CODES_PREFIX}{first_id:012d}{CODES_SUFFIX}")


def _first_id(url: str) -> int:
    return int(url.rsplit("/", 1)[1][len(CODES_PREFIX) : -len(CODES_SUFFIX)])


def remove_codes(index_url: str, options: Options = None, from_id: int = 0) -> None:
    """Drop the codes files of ids ≥ ``from_id``: a rebuild must not inherit another index's codes, an add
    not the leftovers of an interrupted one."""
    for url in storage.list_files(index_url, options, suffix=CODES_SUFFIX):
        if _first_id(url) >= from_id:
            storage.remove(url, options)


@dataclass(frozen=True)
class CodeWriter:
    """Encodes added vectors and writes them beside the index, addressed by their first faiss id."""

    quantizer: faiss.Index
    index_url: str
    options: Options = None

    def write(self, vectors: np.ndarray, first_id: int) -> None:
        """``vectors`` (n, D) float32 get ids first_id … first_id + n − 1."""
        storage.write_bytes(
            codes_url(self.index_url, first_id), self.quantizer.sa_encode(vectors).tobytes(), self.options
        )


def code_writer(index_url: str, options: Options = None) -> CodeWriter | None:
    """The writer of an index with refinement, None for one without (no stored quantizer)."""
    url = storage.join(index_url, QUANTIZER)
    if not storage.exists(url, options):
        return None
    return CodeWriter(io.read_index(url, options), index_url, options)


def _code_files(index_url: str, code_size: int, next_id: int, options: Options) -> list[tuple[int, str]]:
    """(first id, url) of the codes files, checked to cover ids [0, next_id) without gap or overlap.

    Files from next_id on are an interrupted add's (params.json, written last, does not count them yet).
    """
    urls = storage.list_files(index_url, options, suffix=CODES_SUFFIX)
    files = sorted((_first_id(u), u) for u in urls)
    files = [(first, url) for first, url in files if first < next_id]
    expected = 0
    for first, url in files:
        size = storage.info(url, options)["size"]
        if first != expected or size % code_size:
            raise InputError(
                f"refinement codes under {storage.redact(index_url)} do not cover ids contiguously at "
                f"{storage.redact(url)} (expected first id {expected}, size {size} B)"
            )
        expected += size // code_size
    if expected != next_id:
        raise InputError(f"refinement codes cover ids [0, {expected}), the index has ids up to {next_id}")
    return files


def _in_ram(base: faiss.Index, quantizer: faiss.Index, files: Sequence[tuple[int, str]], options: Options):
    codes = np.concatenate(
        [np.frombuffer(storage.read_bytes(u, options), np.uint8) for _, u in files] or [np.zeros(0, np.uint8)]
    )
    faiss.copy_array_to_vector(codes, quantizer.codes)
    quantizer.ntotal = len(codes) // quantizer.code_size
    refined = faiss.IndexRefine(base, quantizer)
    refined.referenced_objects = [base, quantizer]  # the Python objects must outlive the C++ wrapper
    return refined


def _local_copies(index_url: str, files: Sequence[tuple[int, str]], options: Options) -> list[str]:
    """Local paths of the codes files: the files themselves for a local index, else a downloaded copy."""
    if storage.is_local(index_url):
        return [u for _, u in files]
    folder = tempfile.mkdtemp(prefix="refine-codes-")
    paths = []
    for _, url in files:
        paths.append(os.path.join(folder, url.rsplit("/", 1)[1]))
        storage.download(url, paths[-1], options)
    return paths


class StoreRefined:
    """A base index whose shortlist is re-scored with memory-mapped float16 vectors (the store tier).

    Searches like a faiss index (``search(x, k) → (scores, ids)``, ``k_factor``, ``base_index``).
    """

    def __init__(self, base: faiss.Index, firsts: np.ndarray, paths: Sequence[str], dim: int) -> None:
        self.base_index, self.d, self.k_factor = base, dim, 1.0
        self.ntotal = base.ntotal
        self.firsts = firsts  # (F,) first id of each file, ascending
        self.chunks = [np.memmap(p, np.float16, "r").reshape(-1, dim) for p in paths]

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(m, D) float32 vectors of ``ids`` (m,) ≥ 0, read file by file in id order."""
        out = np.empty((len(ids), self.d), np.float32)
        which = np.searchsorted(self.firsts, ids, side="right") - 1
        for f in np.unique(which):
            picked = np.flatnonzero(which == f)
            picked = picked[np.argsort(ids[picked])]  # ascending offsets: sequential disk reads
            out[picked] = self.chunks[f][ids[picked] - self.firsts[f]]
        return out

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        shortlist = max(k, int(k * self.k_factor))
        _, candidates = self.base_index.search(x, shortlist)  # (q, K)
        scores = np.full((len(x), k), -np.inf, np.float32)
        ids = np.full((len(x), k), -1, np.int64)
        step = max(1, QUERY_CHUNK_BYTES // (shortlist * self.d * 4))
        for start in range(0, len(x), step):
            block = candidates[start : start + step]  # (b, K)
            valid = block >= 0
            exact = np.full(block.shape, -np.inf, np.float32)
            gathered = self.vectors(block[valid]).reshape(-1, self.d)
            exact[valid] = np.einsum(
                "md,md->m", gathered, np.repeat(x[start : start + step], valid.sum(1), 0)
            )
            order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            scores[start : start + step, : order.shape[1]] = np.take_along_axis(exact, order, 1)
            ids[start : start + step, : order.shape[1]] = np.where(
                np.take_along_axis(valid, order, 1), np.take_along_axis(block, order, 1), -1
            )
        return scores, ids


def attach(base: faiss.Index, index_url: str, params: dict[str, Any], options: Options = None) -> Any:
    """The searchable index: ``base`` alone, or refined by the kind stored in ``params["refine"]``."""
    kind = params.get("refine", "none")
    if kind == "none":
        return base
    quantizer = io.read_index(storage.join(index_url, QUANTIZER), options)
    files = _code_files(index_url, quantizer.code_size, params["next_id"], options)
    if kind == "store":
        firsts = np.array([first for first, _ in files], np.int64)
        return StoreRefined(base, firsts, _local_copies(index_url, files, options), params["dim"])
    return _in_ram(base, quantizer, files, options)


def configure(index: Any, nprobe: int | None, k_factor: float | None) -> None:
    """nprobe on the IVF part and the shortlist factor on a refined index (ignored by an unrefined one)."""
    io.set_search_params(getattr(index, "base_index", index), nprobe)
    if k_factor is not None and hasattr(index, "k_factor"):
        index.k_factor = float(k_factor)


def code_size(index: Any) -> int:
    """Bytes of one refinement code of a refined index (IndexRefine or StoreRefined)."""
    if hasattr(index, "refine_index"):
        return int(faiss.downcast_index(index.refine_index).code_size)
    return 2 * index.d
