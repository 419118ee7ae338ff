"""What a training run is: the job (inputs, output, preset), the optimisation settings, the cluster shape
and the summary a run returns."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from pipeline import images, storage
from pipeline.config import ExtractionConfig, get_preset, trained_preset
from pipeline.errors import ConfigError
from pipeline.manifest import local_root
from pipeline.model.losses import (
    ARCFACE_MARGIN,
    ARCFACE_SCALE,
    MINING,
)
from pipeline.train_data import (
    SAMPLING,
)

log = logging.getLogger(__name__)

OBJECTIVES = ("arcface", "contrastive", "triplet", "margin", "quadruplet")
TRAINABLE = ("all", "local-head", "global-head")
BATCHNORM = ("batch", "frozen")
DECODE = ("auto", "threads", "tasks")
# margin: Wu et al.'s α; quadruplet: δ₂ (δ₁ = δ₂ / 2), as the triplet's
DEFAULT_MARGINS = {
    "arcface": ARCFACE_MARGIN,
    "contrastive": 0.7,
    "triplet": 0.1,
    "margin": 0.2,
    "quadruplet": 0.1,
}
TERMS = ("global", "attention", "reconstruction")


@dataclass(frozen=True)
class TrainConfig:
    """What training computes (recorded in ``_run.json``; a resumed run must use the same)."""

    steps: int | None = None  # optimiser steps; exactly one of steps / epochs
    epochs: float | None = None  # passes over the manifest's rows (steps = ⌈epochs · rows / batch⌉)
    batch_size: int = 32  # global batch, split evenly over the workers (reference: 32 flag, 256 on 8 GPUs)
    lr: float = 0.01  # initial learning rate, decayed linearly to 0 at the last step (reference)
    momentum: float = 0.9
    clip_norm: float = 10.0  # global gradient-norm clip (reference)
    image_size: int = 321  # square training crops (reference)
    augment: bool = True  # reference ImageNet-style random crop; off: the whole image, resized
    objective: str = (
        "arcface"  # global descriptor loss: arcface | contrastive | triplet | margin | quadruplet
    )
    margin: float | None = (
        None  # None: 0.1 arcface (reference), 0.7 contrastive, 0.1 triplet, 0.2 margin (α),
    )
    # 0.1 quadruplet (δ₂)
    margin_beta: float = 1.2  # the margin loss's initial boundary β₀ (Wu et al.), then learned
    margin_beta_per_class: bool = False  # one learned β per class instead of one for all
    arcface_scale: float = ARCFACE_SCALE  # √2048, fixed (reference)
    mining: str = "hard"  # negatives for contrastive/triplet: hard | distance-weighted (within a worker)
    attention_weight: float = 1.0  # reference
    reconstruction_weight: float = 10.0  # reference
    trainable: str = "all"  # all | local-head (frozen backbone) | global-head (whitening only)
    batchnorm: str = "batch"  # batch: per-worker batch statistics (reference) | frozen: running statistics
    sampling: str = "uniform"  # uniform | balanced (classes drawn uniformly, images_per_class each)
    images_per_class: int = 2  # with balanced sampling
    seed: int = 0
    log_every: int = 10  # steps per metrics.jsonl line
    checkpoint_every: int = 500  # steps per checkpoint (and always at the end)

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("give exactly one of steps or epochs")
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("mining", self.mining, MINING)
        _check_choice("trainable", self.trainable, TRAINABLE)
        _check_choice("batchnorm", self.batchnorm, BATCHNORM)
        _check_choice("sampling", self.sampling, SAMPLING)
        for name in ("batch_size", "image_size", "images_per_class", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(f"steps must be a positive int, got {self.steps!r}")
        for name in ("epochs", "lr", "clip_norm", "arcface_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")
        if self.margin is not None and self.margin < 0:
            raise ConfigError(f"margin must be >= 0, got {self.margin!r}")
        if self.objective != "arcface" and self.sampling != "balanced":
            log.warning("%s loss with uniform sampling: batches may hold few positives", self.objective)
        if self.objective == "quadruplet" and self.sampling == "balanced" and self.images_per_class < 3:
            raise ConfigError("the quadruplet loss needs images_per_class >= 3 (an anchor and two positives)")

    @property
    def global_margin(self) -> float:
        return DEFAULT_MARGINS[self.objective] if self.margin is None else self.margin

    def total_steps(self, rows: int) -> int:
        return self.steps or math.ceil(self.epochs * rows / self.batch_size)

    def terms(self) -> tuple[str, ...]:
        """The loss terms this config trains."""
        return {"all": TERMS, "local-head": TERMS[1:], "global-head": TERMS[:1]}[self.trainable]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} {value!r}; allowed: {list(allowed)}")


@dataclass(frozen=True)
class TrainJob:
    """Everything that defines the output."""

    manifest_url: str  # a labelled manifest (landmark_id on every row)
    out_url: str
    preset: str  # extraction preset: architecture and pixel normalisation of the trained model
    config: TrainConfig
    weights_url: str | None = None  # start from: full DELG, backbone-only, or "imagenet"; None: random
    allowed_schemes: frozenset[str] = images.DEFAULT_ALLOWED_SCHEMES
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    # Rows read local files under the manifest's folder (a local manifest) only, unless this opts in (as
    # extraction's ExtractionJob.allow_local_outside_root)
    allow_local_outside_root: bool = False

    def local_files(self, options: storage.Options = None) -> images.LocalFiles:
        """The policy on local image files that this job's rows follow."""
        return images.LocalFiles(local_root(self.manifest_url, options), self.allow_local_outside_root)

    def model_config(self) -> ExtractionConfig:
        """The preset with a learned local head: a backbone-only preset trains one from scratch."""
        return get_preset(trained_preset(self.preset))


@dataclass(frozen=True)
class TrainCluster:
    """How training runs; nothing here changes the result beyond float rounding (worker count included)."""

    address: str | None = None  # None: start a local Ray (or use the one already initialised)
    workers: int | None = None  # None: one per GPU in the cluster, else one CPU worker
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    # Where fetch + decode + augment run: "tasks" (Ray tasks anywhere in the cluster), "threads" (in each
    # training worker's process), "auto": tasks when the workers have GPUs, so a GPU worker's process only
    # steps; threads on CPU workers, where the decoding competes with the step for the same cores either
    # way and tasks only add their start-up and the batches' trip through the object store (on a 2-core
    # machine: the same steady images/s, a slower start; benchmarks/bench_train.py --decode).
    decode: str = "auto"
    decode_threads: int = 4  # "threads": per worker
    decode_cpus: float = 1.0  # "tasks": CPUs each task asks for (decode + resize is CPU-bound)
    decode_chunk: int = 8  # "tasks": positions per task
    prefetch_steps: int = 2  # batches decoded ahead of the step being trained
    max_failures: int = 0  # worker-group restarts (each resumes from the newest checkpoint)
    crash_after_step: int | None = None  # fault injection for resume tests: fail once this step is done

    def __post_init__(self) -> None:
        _check_choice("decode", self.decode, DECODE)
        for name in ("decode_threads", "decode_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)!r}")
        if not self.decode_cpus > 0:
            raise ConfigError(f"decode_cpus must be > 0, got {self.decode_cpus!r}")

    def decode_where(self, gpus_per_worker: float) -> str:
        """Where the workers decode (threads or tasks): ``decode``, "auto" resolved for their GPUs."""
        if self.decode != "auto":
            return self.decode
        return "tasks" if gpus_per_worker else "threads"


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    resumed_from: int  # step of the checkpoint the run started from (0: fresh)
    images: int  # images trained on in this run
    failed_rows: dict[str, int]  # reason → rows dropped in this run
    final_loss: float | None
    seconds: float
    weights_url: str

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)
