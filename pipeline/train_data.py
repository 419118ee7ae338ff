"""Training input: which manifest rows each step trains on, and their decoded, augmented pixels.

Every random choice derives from (seed, position in the sample sequence), so a step's images and crops
are the same whoever computes them: a run resumed at step s, or a batch split over any number of workers.
Rows that cannot be fetched or decoded are counted and dropped from their batch, never fatal. Decoding runs
in the training worker's threads or in Ray tasks anywhere in the cluster (``ThreadDecoder``, ``TaskDecoder``).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, deque
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline import images, storage
from pipeline.errors import ConfigError
from pipeline.manifest import ManifestError

SAMPLING = ("uniform", "balanced")
CROP_AREA = (0.1, 1.0)  # the reference's area range 0.08–1 with min_object_covered 0.1 of the whole image
CROP_ASPECT = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 100  # then the whole image, as the reference's sample_distorted_bounding_box


@dataclass(frozen=True)
class TrainingRows:
    """What the workers need of a labelled manifest: where each image is and its class index."""

    urls: list[str]
    inline: list[bytes | None]
    labels: np.ndarray  # (N,) int64 class index into ``classes``
    classes: tuple[str, ...]  # landmark ids, sorted
    views: np.ndarray | None = None  # (N,) float64 view keys from the manifest's ``view`` column (NaN: none)

    @property
    def digest(self) -> str:
        """Identity of the label assignment (the manifest fingerprint leaves labels out)."""
        digest = hashlib.sha256("\n".join(self.classes).encode())
        digest.update(self.labels.tobytes())
        if self.views is not None:
            digest.update(self.views.tobytes())
        return digest.hexdigest()

    def view(self, row: int) -> float:
        return float("nan") if self.views is None else float(self.views[row])


def training_rows(table: pa.Table) -> TrainingRows:
    """The manifest's rows with their labels; ManifestError when a row has no ``landmark_id``."""
    labels = table.column("landmark_id").to_pylist()
    unlabelled = [i for i, label in enumerate(labels) if label is None]
    if unlabelled:
        raise ManifestError(
            f"training needs a landmark_id on every row; {len(unlabelled)} rows have none "
            f"(rows {unlabelled[:5]})"
        )
    classes = tuple(sorted(set(labels)))
    index = {label: i for i, label in enumerate(classes)}
    return TrainingRows(
        urls=table.column("url").to_pylist(),
        inline=table.column("image").to_pylist(),
        labels=np.array([index[label] for label in labels], dtype=np.int64),
        classes=classes,
        views=table.column("view").to_numpy(zero_copy_only=False).astype(np.float64)
        if "view" in table.column_names
        else None,
    )


class SampleSequence:
    """An endless sequence of row indices, epoch by epoch: position p → the row trained on at p.

    ``uniform``: each epoch is a permutation of the rows. ``balanced``: each epoch draws N/K classes
    uniformly (GLDv2's long tail: rare landmarks as often as famous ones) and K images of each, adjacent,
    so batches hold positives for metric learning (with replacement when a class has fewer than K).
    """

    def __init__(self, labels: np.ndarray, sampling: str, images_per_class: int, seed: int) -> None:
        if sampling not in SAMPLING:
            raise ConfigError(f"sampling {sampling!r}; allowed: {list(SAMPLING)}")
        self.labels = labels
        self.sampling = sampling
        self.k = images_per_class if sampling == "balanced" else 1
        self.seed = seed
        self.epoch_length = math.ceil(len(labels) / self.k) * self.k
        self._members = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
        self._epoch = lru_cache(maxsize=2)(self._epoch_order)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Row indices at positions [start, stop)."""
        positions = np.arange(start, stop)
        return np.array([self._epoch(p // self.epoch_length)[p % self.epoch_length] for p in positions])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.sampling == "uniform":
            return rng.permutation(len(self.labels))
        groups = rng.integers(len(self._members), size=self.epoch_length // self.k)
        return np.concatenate(
            [rng.choice(m, self.k, replace=len(m) < self.k) for m in (self._members[g] for g in groups)]
        )


@dataclass(frozen=True)
class ImageTransform:
    """Decoded uint8 image → normalised (3, S, S) float tensor, with the reference's random crop or not."""

    size: int  # square side (the reference trains at 321)
    mean: tuple[float, float, float]  # per RGB channel, 0..255 units
    std: tuple[float, float, float]
    augment: bool

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.augment:
            top, left, height, width = random_crop_box(image.shape[1], image.shape[2], rng)
            image = image[:, top : top + height, left : left + width]
        # Antialiased bilinear: an area-like average when shrinking (the reference resizes with 'area').
        pixels = image[None].float()
        resized = F.interpolate(pixels, (self.size, self.size), mode="bilinear", antialias=True)[0]
        mean = torch.tensor(self.mean).view(3, 1, 1)
        return (resized - mean) / torch.tensor(self.std).view(3, 1, 1)


def random_crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an ImageNet-style crop: area a fraction in CROP_AREA of the image, aspect
    ratio log-uniform in CROP_ASPECT; the whole image when no draw fits."""
    for _ in range(CROP_ATTEMPTS):
        area = rng.uniform(*CROP_AREA) * height * width
        aspect = math.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < h <= height and 0 < w <= width:
            return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
    return 0, 0, height, width


@dataclass
class Batch:
    images: torch.Tensor  # (b, 3, S, S), b ≤ the rows asked for
    labels: torch.Tensor  # (b,) int64
    views: torch.Tensor  # (b,) float64 view keys, NaN where the manifest gives none
    failures: Counter[str] = field(default_factory=Counter)  # ImageError reason → rows dropped


def concatenate(parts: list[Batch]) -> Batch:
    """The parts' images, labels and views in order, their failures summed."""
    return Batch(
        torch.cat([part.images for part in parts]),
        torch.cat([part.labels for part in parts]),
        torch.cat([part.views for part in parts]),
        sum((part.failures for part in parts), Counter()),
    )


@dataclass(frozen=True)
class ImageSource:
    """Fetch, decode and transform sequence positions (the project's safe decoding)."""

    rows: TrainingRows
    transform: ImageTransform
    seed: int
    options: storage.Options = None
    allowed_schemes: Collection[str] = images.DEFAULT_ALLOWED_SCHEMES
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    local_files: images.LocalFiles = images.ANY_LOCAL_FILE  # the job's policy (TrainJob.local_files)

    def load(self, position: int, row: int) -> torch.Tensor | images.ImageError:
        try:
            data = images.fetch_image_bytes(
                self.rows.urls[row],
                self.rows.inline[row],
                self.options,
                self.allowed_schemes,
                self.local_files,
            )
            image = images.decode_image(data, self.max_pixels)
        except images.ImageError as error:
            return error
        return self.transform(image, np.random.default_rng([self.seed, position]))

    def batch(self, positions: Sequence[int], rows: Sequence[int]) -> Batch:
        """The images at ``positions`` (``rows`` their rows), the failed ones counted and left out."""
        kept, labels, views, failures = [], [], [], Counter()
        for position, row in zip(positions, rows, strict=True):
            result = self.load(position, row)
            if isinstance(result, images.ImageError):
                failures[result.reason] += 1
            else:
                kept.append(result)
                labels.append(int(self.rows.labels[row]))
                views.append(self.rows.view(row))
        size = self.transform.size
        stacked = torch.stack(kept) if kept else torch.empty(0, 3, size, size)
        as_tensors = torch.tensor(labels, dtype=torch.int64), torch.tensor(views, dtype=torch.float64)
        return Batch(stacked, *as_tensors, failures)

    def take(self, rows: Sequence[int]) -> ImageSource:
        """This source over ``rows`` only, in order: what a decode task is sent of a big manifest (class
        names left out, the batch needs label indices only)."""
        taken = TrainingRows(
            [self.rows.urls[r] for r in rows],
            [self.rows.inline[r] for r in rows],
            self.rows.labels[list(rows)],
            (),
            None if self.rows.views is None else self.rows.views[list(rows)],
        )
        return replace(self, rows=taken)


def decode_chunk(source: ImageSource, positions: list[int]) -> Batch:
    """A decode task's work: ``source`` is ``ImageSource.take`` of the positions' rows."""
    return source.batch(positions, range(len(positions)))


class ThreadDecoder:
    """Decodes in the training worker's own process, one pool thread per position: its own CPUs do it."""

    def __init__(self, source: ImageSource, threads: int) -> None:
        self.source = source
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="train-decode")

    def submit(self, positions: list[int], rows: list[int]) -> list[Future]:
        return [self.pool.submit(self.source.batch, [p], [r]) for p, r in zip(positions, rows, strict=True)]

    def gather(self, handles: list[Future]) -> list[Batch]:
        return [handle.result() for handle in handles]

    def cancel(self, handles: list[Future]) -> None:
        for handle in handles:
            handle.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class TaskDecoder:
    """Decodes in Ray tasks of ``chunk`` positions each, ``cpus`` CPUs each, wherever the cluster has CPUs
    free (Ray's default placement: this node first), so the training worker's process only steps. A task
    gets its rows' URLs and inline bytes only, not the manifest; a task lost with its node is retried."""

    def __init__(self, source: ImageSource, cpus: float, chunk: int) -> None:
        import ray

        self.source = source
        self.chunk = chunk
        self.task = ray.remote(num_cpus=cpus, max_retries=3)(decode_chunk)

    def submit(self, positions: list[int], rows: list[int]) -> list[Any]:
        starts = range(0, len(positions), self.chunk)
        return [
            self.task.remote(self.source.take(rows[i : i + self.chunk]), positions[i : i + self.chunk])
            for i in starts
        ]

    def gather(self, handles: list[Any]) -> list[Batch]:
        import ray

        return ray.get(handles)

    def cancel(self, handles: list[Any]) -> None:
        import ray

        for handle in handles:
            ray.cancel(handle)

    def close(self) -> None:
        """Nothing held: the tasks' results go with their references."""


Decoder = ThreadDecoder | TaskDecoder


class BatchStream:
    """The batches of steps [first, last), each one the slice [lo, hi) of its global batch, submitted to
    ``decoder`` ``prefetch`` steps ahead so the training loop rarely waits on I/O or decoding. A batch is
    the same whichever decoder makes it: each position's randomness is its own (``ImageSource.load``)."""

    def __init__(
        self,
        decoder: Decoder,
        sequence: SampleSequence,
        global_batch: int,
        part: tuple[int, int],
        prefetch: int,
    ) -> None:
        self.decoder = decoder
        self.sequence = sequence
        self.global_batch = global_batch
        self.part = part
        self.prefetch = prefetch

    def batches(self, first: int, last: int) -> Iterator[Batch]:
        pending: deque[list[Any]] = deque()
        try:
            for step in range(first, last):
                while len(pending) <= self.prefetch and step + len(pending) < last:
                    pending.append(self._submit(step + len(pending)))
                yield concatenate(self.decoder.gather(pending.popleft()))
        finally:
            for handles in pending:
                self.decoder.cancel(handles)

    def close(self) -> None:
        self.decoder.close()

    def _submit(self, step: int) -> list[Any]:
        start = step * self.global_batch
        lo, hi = start + self.part[0], start + self.part[1]
        rows = [int(row) for row in self.sequence.rows(lo, hi)]
        return self.decoder.submit(list(range(lo, hi)), rows)
