"""Training stage: DELG (or metric-learning fine-tuning) on a labelled manifest, data-parallel on Ray Train.

    run_training(TrainJob(manifest, out, preset, weights, TrainConfig(steps=...)), TrainCluster(workers=2))

Output under ``out``: ``weights.pt`` (the Delg state dict that ``extract --weights`` loads), ``metrics.jsonl``
(one JSON object per logged step), ``checkpoints/step-NNNNNNNNN.pt`` and ``_run.json``. Re-running the same
job resumes from the newest checkpoint; with a fixed seed the result is the same as an uninterrupted run,
because every random choice derives from (seed, step or sample position) — see ``pipeline.train_data``.

Training as the reference does it (GUIDE §1): ArcFace on the global embedding, cross-entropy of the
attention-pooled block3 features through their own classifier, reconstruction MSE × 10, the local head
behind a stop-gradient (inside the model), SGD with momentum 0.9, linear learning-rate decay, gradient-norm
clip 10, 321×321 random crops.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline import images, storage
from pipeline.config import ExtractionConfig, get_preset, trained_preset
from pipeline.manifest import local_root, manifest_fingerprint, read_manifest
from pipeline.model import Delg, load_pretrained
from pipeline.model.losses import (
    ARCFACE_MARGIN,
    ARCFACE_SCALE,
    MINING,
    ArcFace,
    MarginLoss,
    contrastive_loss,
    mine_negatives,
    pairwise_distances,
    quadruplet_loss,
    reconstruction_error,
    triplet_loss,
)
from pipeline.train_data import (
    SAMPLING,
    BatchStream,
    Decoder,
    ImageSource,
    ImageTransform,
    SampleSequence,
    TaskDecoder,
    ThreadDecoder,
    TrainingRows,
    training_rows,
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
            raise ValueError("give exactly one of steps or epochs")
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("mining", self.mining, MINING)
        _check_choice("trainable", self.trainable, TRAINABLE)
        _check_choice("batchnorm", self.batchnorm, BATCHNORM)
        _check_choice("sampling", self.sampling, SAMPLING)
        for name in ("batch_size", "image_size", "images_per_class", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        for name in ("epochs", "lr", "clip_norm", "arcface_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.margin is not None and self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin!r}")
        if self.objective != "arcface" and self.sampling != "balanced":
            log.warning("%s loss with uniform sampling: batches may hold few positives", self.objective)
        if self.objective == "quadruplet" and self.sampling == "balanced" and self.images_per_class < 3:
            raise ValueError("the quadruplet loss needs images_per_class >= 3 (an anchor and two positives)")

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
        raise ValueError(f"{name} {value!r}; allowed: {list(allowed)}")


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
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)!r}")
        if not self.decode_cpus > 0:
            raise ValueError(f"decode_cpus must be > 0, got {self.decode_cpus!r}")

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


# ---------------------------------------------------------------- the model being trained


class Trainee(nn.Module):
    """DELG plus its training-only classifiers; ``forward`` returns per-image loss terms (unreduced,
    so each worker's share of the global batch can be weighted by its image count)."""

    def __init__(self, model: Delg, num_classes: int, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        terms = config.terms()
        self.arcface = (
            ArcFace(model.global_dim, num_classes, config.global_margin, config.arcface_scale)
            if "global" in terms and config.objective == "arcface"
            else None
        )
        self.margin_loss = (
            MarginLoss(num_classes, config.global_margin, config.margin_beta, config.margin_beta_per_class)
            if "global" in terms and config.objective == "margin"
            else None
        )
        local_channels = model.backbone.spec.local_channels
        self.attention_classifier = nn.Linear(local_channels, num_classes) if "attention" in terms else None

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        views: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) images, (B,) labels, (B,) view keys (quadruplet) → {term: (B,)} for the config's
        terms."""
        out = self.model(images)
        terms = {}
        if self.arcface is not None:
            terms["global"] = self.arcface(out.global_embedding, labels)
        elif "global" in self.config.terms():
            terms["global"] = self._metric_loss(out.global_embedding, labels, generator, views)
        if self.attention_classifier is not None:
            logits = self.attention_classifier(out.attention_pooled)
            terms["attention"] = nn.functional.cross_entropy(logits, labels, reduction="none")
            terms["reconstruction"] = reconstruction_error(out.reconstruction, out.local_features)
        return terms

    def _metric_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        views: torch.Tensor | None,
    ) -> torch.Tensor:
        distances = pairwise_distances(embeddings)
        negatives = mine_negatives(distances, labels, self.config.mining, embeddings.shape[1], generator)
        margin, objective = self.config.global_margin, self.config.objective
        if self.margin_loss is not None:
            return self.margin_loss(distances, labels, negatives)
        if objective == "quadruplet":
            return quadruplet_loss(distances, labels, negatives, margin, views)
        loss = contrastive_loss if objective == "contrastive" else triplet_loss
        return loss(distances, labels, negatives, margin)

    def trainable_modules(self) -> list[nn.Module]:
        model, which = self.model, self.config.trainable
        if which == "all":
            return [self]
        if which == "local-head":
            return [model.attention, model.autoencoder, self.attention_classifier]
        if model.whitening is None:
            raise ValueError("trainable='global-head' needs a preset with a whitening layer to fine-tune")
        return [m for m in (model.whitening, self.arcface, self.margin_loss) if m is not None]

    def weighted_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) total loss per image: global + attention_weight · attention + reconstruction_weight · recon."""
        weights = {
            "global": 1.0,
            "attention": self.config.attention_weight,
            "reconstruction": self.config.reconstruction_weight,
        }
        return sum(weights[name] * value for name, value in terms.items())


def build_trainee(job: TrainJob, num_classes: int, options: storage.Options = None) -> Trainee:
    """The seeded initial model (identical in every worker), loaded from ``job.weights_url`` when given,
    with only the config's trainable parts requiring gradients."""
    torch.manual_seed(job.config.seed)
    model = Delg.from_config(job.model_config())
    if job.weights_url:
        load_pretrained(model, job.weights_url, options)
    trainee = Trainee(model, num_classes, job.config)
    trainee.requires_grad_(False)
    for module in trainee.trainable_modules():
        module.requires_grad_(True)
    return trainee


def set_train_mode(trainee: Trainee) -> None:
    """Train mode, except BatchNorm layers that must keep their statistics: all of them with
    batchnorm='frozen', else those whose parameters are frozen (a frozen backbone stays bit-identical)."""
    trainee.train()
    for module in trainee.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = not any(p.requires_grad for p in module.parameters())
            if frozen or trainee.config.batchnorm == "frozen":
                module.eval()


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The reference's linear decay: lr · (1 − step / total)."""
    return config.lr * (1.0 - step / total_steps)


def train_step(
    trainee: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    share: float,
    generator: torch.Generator,
    views: torch.Tensor | None = None,
) -> dict[str, float]:
    """One SGD step on this worker's images. ``share`` = workers / images in the global batch: data-
    parallel averaging over workers then gives the mean over the global batch's images, even when
    workers dropped different numbers of bad rows. Returns this worker's per-term sums (for logging)."""
    core = trainee.module if isinstance(trainee, nn.parallel.DistributedDataParallel) else trainee
    terms = trainee(images, labels, generator, views)
    total = core.weighted_loss(terms)
    optimizer.zero_grad(set_to_none=True)
    (total.sum() * share).backward()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    nn.utils.clip_grad_norm_(parameters, core.config.clip_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    sums = {name: value.detach().sum().item() for name, value in terms.items()}
    return {**sums, "loss": total.detach().sum().item()}


# ---------------------------------------------------------------- checkpoints (through pipeline.storage)

CHECKPOINT_FOLDER = "checkpoints"
KEEP_CHECKPOINTS = 2  # the newest is what a resume needs; one more in case it is being written


def checkpoint_url(out_url: str, step: int) -> str:
    return storage.join(out_url, CHECKPOINT_FOLDER, f"step-{step:09d}.pt")


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(out_url: str, state: dict[str, Any], options: storage.Options = None) -> None:
    """Write ``state`` (its ``step`` names the file) atomically, then drop all but the newest few."""
    storage.write_bytes(checkpoint_url(out_url, state["step"]), _torch_bytes(state), options)
    for old in checkpoint_urls(out_url, options)[:-KEEP_CHECKPOINTS]:
        storage.remove(old, options)


def checkpoint_urls(out_url: str, options: storage.Options = None) -> list[str]:
    """Checkpoints under ``out_url``, oldest first (zero-padded step numbers sort)."""
    return storage.list_files(storage.join(out_url, CHECKPOINT_FOLDER), options, suffix=".pt")


def latest_checkpoint(out_url: str, options: storage.Options = None) -> dict[str, Any] | None:
    urls = checkpoint_urls(out_url, options)
    if not urls:
        return None
    return torch.load(
        io.BytesIO(storage.read_bytes(urls[-1], options)), weights_only=True, map_location="cpu"
    )


def run_identity(job: TrainJob, manifest_digest: str, rows: TrainingRows, total_steps: int) -> dict[str, Any]:
    """What decides the trained weights: a checkpoint of another identity cannot be resumed from."""
    config = {k: v for k, v in job.config.to_dict().items() if k not in ("log_every", "checkpoint_every")}
    return {
        "manifest": manifest_digest,
        "labels": rows.digest,
        "classes": len(rows.classes),
        "preset": job.preset,
        "model": job.model_config().to_dict(),
        "config": config,
        "weights": storage.redact(job.weights_url) if job.weights_url else None,
        "total_steps": total_steps,
    }


def check_resumable(out_url: str, identity: dict[str, Any], options: storage.Options = None) -> int:
    """The step the newest checkpoint under ``out_url`` resumes at (0: none); ValueError when it belongs
    to a different run."""
    state = latest_checkpoint(out_url, options)
    if state is None:
        return 0
    differing = sorted(k for k in identity if state["identity"].get(k) != identity[k])
    if differing:
        raise ValueError(
            f"{storage.redact(out_url)} holds checkpoints of a different training run (differs in "
            f"{differing}); use a new output URL or remove {CHECKPOINT_FOLDER}/"
        )
    return int(state["step"])


# ---------------------------------------------------------------- one Ray Train worker


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the workers (no-op for one)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def mining_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Negative sampling randomness of one worker at one step (the same again after a resume)."""
    return torch.Generator().manual_seed(hash((seed, step, rank)) % 2**63)


@dataclass
class _Window:
    """Sums over the steps since the last metrics line."""

    images: float = 0.0
    failed: float = 0.0
    sums: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)


class _Worker:
    """The training loop of one worker: resume, stream batches, step, log, checkpoint."""

    def __init__(self, setup: dict[str, Any]) -> None:
        import ray
        import ray.train
        import ray.train.torch

        self.job: TrainJob = setup["job"]
        self.cluster: TrainCluster = setup["cluster"]
        self.options = setup["options"]
        self.identity = setup["identity"]
        self.progress = setup["progress"]
        self.decode: str = setup["decode"]  # TrainCluster.decode_where
        self.rows: TrainingRows = ray.get(setup["rows"])
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.total_steps = self.identity["total_steps"]
        self.trainee = build_trainee(self.job, len(self.rows.classes), self.options).to(self.device)
        parameters = [p for p in self.trainee.parameters() if p.requires_grad]
        config = self.job.config
        self.optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum)
        self.start, self.metrics = self._resume()
        set_train_mode(self.trainee)
        self.model = ray.train.torch.prepare_model(self.trainee, move_to_device=False)
        self.failures: Counter[str] = Counter()
        self.images = 0

    def _resume(self) -> tuple[int, list[dict[str, Any]]]:
        state = latest_checkpoint(self.job.out_url, self.options)
        if state is None:
            return 0, []
        self.trainee.load_state_dict(state["trainee"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), list(state["metrics"])

    def run(self) -> dict[str, Any]:
        config = self.job.config
        per_worker = config.batch_size // self.world
        stream = BatchStream(
            self._decoder(),
            SampleSequence(self.rows.labels, config.sampling, config.images_per_class, config.seed),
            config.batch_size,
            (self.rank * per_worker, (self.rank + 1) * per_worker),
            self.cluster.prefetch_steps,
        )
        window = _Window()
        batches = stream.batches(self.start, self.total_steps)
        try:
            for step, batch in enumerate(batches, start=self.start):
                self._step(step, batch, window)
                done = step + 1
                if done % config.log_every == 0 or done == self.total_steps:
                    self._log(done, window)
                    window = _Window()
                if done % config.checkpoint_every == 0 or done == self.total_steps:
                    self._checkpoint(done)
                if done == self.cluster.crash_after_step:
                    raise RuntimeError(f"injected crash after step {done} (TrainCluster.crash_after_step)")
        finally:
            batches.close()  # a crash too cancels the batches decoding ahead
            stream.close()
        return self._finish()

    def _decoder(self) -> Decoder:
        if self.decode == "tasks":
            return TaskDecoder(self._image_source(), self.cluster.decode_cpus, self.cluster.decode_chunk)
        return ThreadDecoder(self._image_source(), self.cluster.decode_threads)

    def _image_source(self) -> ImageSource:
        model = self.job.model_config()
        transform = ImageTransform(
            self.job.config.image_size, model.pixel_mean, model.pixel_std, self.job.config.augment
        )
        return ImageSource(
            self.rows,
            transform,
            self.job.config.seed,
            self.options,
            self.job.allowed_schemes,
            self.job.max_pixels,
            self.job.local_files(self.options),
        )

    def _step(self, step: int, batch: Any, window: _Window) -> None:
        failed = sum(batch.failures.values())
        self.failures.update(batch.failures)
        images, failed = _all_reduce([len(batch.labels), failed], self.device)
        share = self.world / images if images else 0.0
        sums = train_step(
            self.model,
            self.optimizer,
            batch.images.to(self.device),
            batch.labels.to(self.device),
            learning_rate(self.job.config, step, self.total_steps),
            share,
            mining_generator(self.job.config.seed, step, self.rank),
            batch.views.to(self.device),
        )
        self.images += len(batch.labels)
        window.images += images
        window.failed += failed
        window.sums.update(sums)

    def _log(self, done: int, window: _Window) -> None:
        names = ["loss", *self.job.config.terms()]
        sums = _all_reduce([window.sums[name] for name in names], self.device)
        if self.rank != 0:
            return
        seconds = time.monotonic() - window.started
        row = {name: value / max(window.images, 1) for name, value in zip(names, sums, strict=True)}
        row |= {
            "step": done,
            "lr": learning_rate(self.job.config, done - 1, self.total_steps),
            "images_per_s": window.images / max(seconds, 1e-9),
            "images": int(window.images),
            "failed_rows": int(window.failed),
        }
        self.metrics.append(row)
        self.progress.put_nowait({**row, "total_steps": self.total_steps})

    def _checkpoint(self, done: int) -> None:
        if self.rank != 0:
            return
        state = {
            "step": done,
            "trainee": self.trainee.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "metrics": self.metrics,
            "identity": self.identity,
        }
        save_checkpoint(self.job.out_url, state, self.options)
        lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in self.metrics)
        storage.write_text(storage.join(self.job.out_url, "metrics.jsonl"), lines, self.options)

    def _finish(self) -> dict[str, Any]:
        failures: Counter[str] = Counter()
        gathered = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(gathered, (self.images, dict(self.failures)))
        else:
            gathered = [(self.images, dict(self.failures))]
        for _, counts in gathered:
            failures.update(counts)
        if self.rank == 0:
            weights = {k: v.cpu() for k, v in self.trainee.model.state_dict().items()}
            storage.write_bytes(weights_url(self.job.out_url), _torch_bytes(weights), self.options)
        return {
            "steps": self.total_steps,
            "resumed_from": self.start,
            "images": sum(images for images, _ in gathered),
            "failed_rows": dict(failures),
            "final_loss": self.metrics[-1]["loss"] if self.metrics else None,
        }


def weights_url(out_url: str) -> str:
    return storage.join(out_url, "weights.pt")


def _worker_loop(setup: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point; rank 0 sends the run's summary after its last progress line."""
    worker = _Worker(setup)
    summary = worker.run()
    if worker.rank == 0:
        worker.progress.put({"summary": summary})


# ---------------------------------------------------------------- the driver


def run_training(
    job: TrainJob,
    cluster: TrainCluster | None = None,
    options: storage.Options = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainSummary:
    """Train on Ray Train (DDP) and write ``job.out_url``; resumes from the newest checkpoint there.

    ``on_progress`` gets each metrics line (plus ``total_steps``) as rank 0 logs it."""
    import ray
    from ray.util.queue import Queue

    from pipeline.ray_runtime import ensure_ray

    cluster = cluster or TrainCluster()
    storage.remember_secrets(job.out_url, options)
    table = read_manifest(job.manifest_url, options)
    rows = training_rows(table)
    total_steps = job.config.total_steps(len(rows.labels))
    identity = run_identity(job, manifest_fingerprint(table), rows, total_steps)
    resumed_from = check_resumable(job.out_url, identity, options)
    if job.weights_url and job.weights_url != "imagenet" and not storage.exists(job.weights_url, options):
        raise FileNotFoundError(f"weights file not found: {storage.redact(job.weights_url)}")
    ensure_ray(cluster.address)
    workers, gpus = worker_shape(cluster, ray.cluster_resources().get("GPU", 0.0))
    if job.config.batch_size % workers:
        raise ValueError(f"batch_size {job.config.batch_size} must split evenly over {workers} workers")
    progress = Queue(actor_options={"num_cpus": 0})
    setup = {
        "job": job,
        "cluster": cluster,
        "options": options,
        "identity": identity,
        "progress": progress,
        "rows": ray.put(rows),
        "decode": cluster.decode_where(gpus),
    }
    started = time.monotonic()
    lines: list[dict[str, Any]] = []
    try:
        _fit(
            _trainer(setup, cluster, workers, gpus), progress, lambda line: _forward(line, lines, on_progress)
        )
    finally:
        progress.shutdown()
    summary = lines[-1]["summary"]
    seconds = time.monotonic() - started
    record = {
        "identity": identity,
        "workers": workers,
        "gpus_per_worker": gpus,
        "decode": setup["decode"],
        "seconds": seconds,
        "extract_preset": trained_preset(job.preset),  # the preset the weights extract with
        **summary,
    }
    text = storage.redact_text(json.dumps(record, indent=2))  # an output: no credential in it
    storage.write_text(storage.join(job.out_url, "_run.json"), text, options)
    log.info("trained %d steps (resumed at %d) → %s", total_steps, resumed_from, storage.redact(job.out_url))
    return TrainSummary(**summary, seconds=seconds, weights_url=weights_url(job.out_url))


def _forward(
    line: dict[str, Any], lines: list[dict[str, Any]], on_progress: Callable[[dict[str, Any]], None] | None
) -> None:
    lines.append(line)
    if on_progress is not None and "summary" not in line:
        on_progress(line)


def worker_shape(cluster: TrainCluster, cluster_gpus: float) -> tuple[int, float]:
    """(workers, GPUs per worker): one worker per GPU by default, one CPU worker without GPUs."""
    gpus = cluster.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster_gpus else 0.0
    workers = cluster.workers or (max(int(cluster_gpus // gpus), 1) if gpus else 1)
    if workers < 1 or gpus < 0:
        raise ValueError(f"workers must be ≥ 1 and gpus_per_worker ≥ 0, got {workers}, {gpus}")
    return workers, gpus


def _trainer(setup: dict[str, Any], cluster: TrainCluster, workers: int, gpus: float) -> Any:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cluster.cpus_per_worker} | ({"GPU": gpus} if gpus else {})
    return TorchTrainer(
        _worker_loop,
        train_loop_config=setup,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
        # Ray's own run folder holds only its bookkeeping: checkpoints go through pipeline.storage.
        run_config=RunConfig(
            name="landmark-index-train",
            storage_path=tempfile.mkdtemp(prefix="landmark-index-train-"),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
        ),
    )


def _fit(trainer: Any, progress: Any, on_line: Callable[[dict[str, Any]], None]) -> Any:
    """``trainer.fit()`` in a thread while this one forwards the workers' progress lines."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="train-fit", daemon=True)
    thread.start()
    alive = True
    while alive:
        thread.join(timeout=0.5)
        alive = thread.is_alive()  # read before draining: lines put before the end are all forwarded
        while not progress.empty():
            on_line(progress.get_nowait())
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
