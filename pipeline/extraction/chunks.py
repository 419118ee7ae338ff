"""The stage logic of extraction, without Ray: a chunk of manifest rows is fetched and decoded
(:func:`decode_rows`), turned into descriptors (:class:`ChunkExtractor`), and a shard's chunks are committed
(:func:`write_chunks`). The Ray path and the in-process path run these same functions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import images, storage, store
from pipeline.config import RuntimeOptions
from pipeline.extraction.settings import ClusterOptions, ExtractionJob
from pipeline.features import PreparedImage, build_extractor, prepare_image
from pipeline.storage import Options
from pipeline.store import ErrorRecord, LocalFeatures

log = logging.getLogger(__name__)


# Reasons of rows that fail before decoding; the rest fail in decoding.
FETCH_REASONS = frozenset({"missing", "scheme_not_allowed", "local_file_refused", "fetch_failed"})


@dataclass(frozen=True)
class DecodedChunk:
    """Rows of one chunk after fetch + decode: images cropped and capped (what the extractor needs, at most
    max_side² · 3 bytes each, whatever the photo's size) for the good rows, error records for the rest."""

    ids: list[str]
    images: list[PreparedImage]
    errors: list[ErrorRecord]


@dataclass(frozen=True)
class ExtractedChunk:
    ids: list[str]
    global_vectors: np.ndarray  # (n, D) float32
    local: list[LocalFeatures]
    errors: list[ErrorRecord]


def decode_rows(rows: pa.Table, job: ExtractionJob, options: Options) -> DecodedChunk:
    """Fetch, decode, crop and cap each row; a failing row becomes an error record, never an exception."""
    ids: list[str] = []
    prepared: list[PreparedImage] = []
    errors: list[ErrorRecord] = []
    local_files = job.local_files(options)
    for row in rows.to_pylist():
        try:
            prepared.append(prepare_row(row, job, options, local_files))
        except images.ImageError as exc:
            stage = "fetch" if exc.reason in FETCH_REASONS else "decode"
            errors.append(
                ErrorRecord(row["id"], storage.redact(row["url"] or ""), stage, exc.reason, str(exc))
            )
            continue
        ids.append(row["id"])
    return DecodedChunk(ids, prepared, errors)


def prepare_row(
    row: dict[str, Any], job: ExtractionJob, options: Options, local_files: images.LocalFiles
) -> PreparedImage:
    """One manifest row's image as the extractor takes it: decoded (reduced with ``job.decode_draft``),
    cropped to its bbox, capped at the config's max_side."""
    data = images.fetch_image_bytes(
        row.get("url"), row.get("image"), options, job.allowed_schemes, local_files
    )
    bbox = tuple(row["bbox"]) if row.get("bbox") is not None else None
    max_side = job.config.max_side
    if job.decode_draft and bbox is None:
        reduced = images.decode_reduced(data, max_side, job.max_pixels)
        return prepare_image(reduced.pixels, max_side, full_size=reduced.full_size)
    pixels = images.decode_image(data, job.max_pixels)
    try:
        return prepare_image(pixels, max_side, bbox)  # type: ignore[arg-type]  # 4 floats, checked there
    except ValueError as exc:  # only the bbox can be wrong here: the pixels come from decode_image
        raise images.ImageError("bad_bbox", str(exc)) from exc


class ChunkExtractor:
    """The model, loaded once, turning decoded chunks into descriptors; an image that breaks its batch becomes
    an error record, the others still get descriptors."""

    def __init__(self, job: ExtractionJob, runtime: RuntimeOptions, options: Options, device: str) -> None:
        self.extractor = build_extractor(
            job.config, job.weights_url, options=options, device=device, runtime=runtime
        )

    def extract(self, chunk: DecodedChunk) -> ExtractedChunk:
        try:
            features = self.extractor.extract_prepared(chunk.images)
        except Exception:  # isolate the image that breaks the batch: the others still get descriptors
            return self._one_by_one(chunk)
        return _assemble(chunk, list(zip(chunk.ids, features, strict=True)), [])

    def _one_by_one(self, chunk: DecodedChunk) -> ExtractedChunk:
        good, failed = [], []
        for image_id, image in zip(chunk.ids, chunk.images, strict=True):
            try:
                good.append((image_id, self.extractor.extract_prepared([image])[0]))
            except Exception as exc:
                failed.append(
                    ErrorRecord(image_id, "", "extract", "extract_failed", f"{type(exc).__name__}: {exc}")
                )
        return _assemble(chunk, good, failed)


def _assemble(
    chunk: DecodedChunk, good: Sequence[tuple[str, Any]], failed: list[ErrorRecord]
) -> ExtractedChunk:
    dim = good[0][1].global_descriptor.shape[0] if good else 0
    vectors = np.stack([f.global_descriptor for _, f in good]) if good else np.zeros((0, dim), np.float32)
    local = [LocalFeatures(f.keypoints, f.scales, f.scores, f.descriptors) for _, f in good]
    return ExtractedChunk([i for i, _ in good], vectors.astype(np.float32), local, chunk.errors + failed)


def write_chunks(
    job: ExtractionJob, shard: int, rows: int, options: Options, *chunks: ExtractedChunk
) -> store.ShardCommit:
    """Join a shard's extracted chunks and commit the shard."""
    ids = [i for c in chunks for i in c.ids]
    dims = {c.global_vectors.shape[1] for c in chunks if len(c.ids)}
    vectors = (
        np.concatenate([c.global_vectors for c in chunks if len(c.ids)])
        if dims
        else np.zeros((0, job.config.global_dim), np.float32)
    )
    local = [f for c in chunks for f in c.local]
    errors = [e for c in chunks for e in c.errors]
    return store.write_shard(
        job.out_url, shard, ids, vectors, local, errors, rows=rows, options=options, settings=job.store
    )


def extractor_device(gpus: float) -> str:
    """The torch device of an actor given ``gpus``: CUDA when it was given a GPU share and CUDA works, else
    the CPU (a CPU actor never touches a GPU it lands beside; a GPU actor whose GPU is unusable falls back,
    with a warning)."""
    if not gpus:
        return "cpu"
    import torch

    try:
        if torch.cuda.is_available():
            torch.cuda.init()  # raises on a broken driver or device
            return "cuda"
        reason = "torch.cuda.is_available() is False"
    except Exception as exc:  # any CUDA initialisation error means: not usable here
        reason = f"{type(exc).__name__}: {exc}"
    log.warning("extractor given %g GPU, but CUDA is not usable (%s): extracting on the CPU", gpus, reason)
    return "cpu"


class ShardWork:
    """One shard from rows to commit in one worker (decode, extract, write): the execution seam's work for
    runs in this process. Returns the shard's commit."""

    def __init__(self, job: ExtractionJob, cluster: ClusterOptions, options: Options) -> None:
        self.job, self.cluster, self.options = job, cluster, options
        self.device = extractor_device(cluster.extractors.gpus_per_extractor)
        self.extractor: ChunkExtractor | None = None

    def setup(self) -> None:
        self.extractor = ChunkExtractor(self.job, self.cluster.runtime, self.options, self.device)

    def __call__(self, batch: tuple[int, pa.Table]) -> store.ShardCommit:
        assert self.extractor is not None, "setup() first"
        shard, rows = batch
        size = self.cluster.chunk_size
        chunks = [
            self.extractor.extract(decode_rows(rows.slice(start, size), self.job, self.options))
            for start in range(0, rows.num_rows, size)
        ]
        return write_chunks(self.job, shard, rows.num_rows, self.options, *chunks)
