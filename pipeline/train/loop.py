"""The training loop of one worker: resume, stream batches, step, log, checkpoint. It knows no Ray: the
worker's rank, device, decoder and progress sink come from its caller (:mod:`pipeline.train.ray_train`)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from pipeline import storage
from pipeline.train.checkpoints import _torch_bytes, latest_checkpoint, save_checkpoint, weights_url
from pipeline.train.settings import TrainCluster, TrainJob
from pipeline.train.step import build_trainee, learning_rate, set_train_mode, train_step
from pipeline.train_data import (
    BatchStream,
    Decoder,
    ImageSource,
    ImageTransform,
    SampleSequence,
    TrainingRows,
)


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


class ProgressSink(Protocol):
    def put_nowait(self, line: dict[str, Any]) -> None: ...


_CPU = torch.device("cpu")


def _as_is(model: nn.Module) -> nn.Module:
    return model


@dataclass(frozen=True)
class WorkerPlace:
    """Where one worker runs: its rank among ``world`` workers, its device, and how its model is wrapped for
    data-parallel steps (Ray Train's ``prepare_model`` under DDP; as is for a single in-process worker)."""

    rank: int = 0
    world: int = 1
    device: torch.device = _CPU
    wrap_model: Callable[[nn.Module], nn.Module] = _as_is


class TrainLoop:
    """The training loop of one worker: resume, stream batches, step, log, checkpoint."""

    def __init__(
        self,
        job: TrainJob,
        cluster: TrainCluster,
        identity: dict[str, Any],
        rows: TrainingRows,
        place: WorkerPlace,
        make_decoder: Callable[[ImageSource], Decoder],
        progress: ProgressSink,
        options: storage.Options = None,
    ) -> None:
        """``identity``: :func:`~pipeline.train.checkpoints.run_identity` (with ``total_steps``);
        ``make_decoder``: the decoder of this worker's images (threads here, or Ray tasks)."""
        self.job, self.cluster, self.options, self.identity = job, cluster, options, identity
        self.rows, self.make_decoder, self.progress = rows, make_decoder, progress
        self.rank, self.world, self.device = place.rank, place.world, place.device
        self.total_steps = self.identity["total_steps"]
        self.trainee = build_trainee(self.job, len(self.rows.classes), self.options).to(self.device)
        parameters = [p for p in self.trainee.parameters() if p.requires_grad]
        config = self.job.config
        self.optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum)
        self.start, self.metrics = self._resume()
        set_train_mode(self.trainee)
        self.model = place.wrap_model(self.trainee)
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
            self.make_decoder(self._image_source()),
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
