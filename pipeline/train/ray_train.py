"""The Ray Train wrapper: the driver that starts data-parallel workers (DDP), each running
:class:`~pipeline.train.loop.TrainLoop`, forwards their progress and writes the run's ``_run.json``."""

from __future__ import annotations

import functools
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline import storage
from pipeline.config import trained_preset
from pipeline.errors import ConfigError, MissingInputError
from pipeline.manifest import manifest_fingerprint, read_manifest
from pipeline.ray_runtime import ensure_ray
from pipeline.train.checkpoints import check_resumable, run_identity, weights_url
from pipeline.train.loop import TrainLoop, WorkerPlace
from pipeline.train.settings import TrainCluster, TrainJob, TrainSummary
from pipeline.train_data import Decoder, ImageSource, TaskDecoder, ThreadDecoder, training_rows

log = logging.getLogger(__name__)


def _worker_loop(setup: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point: the loop at this worker's rank and device; rank 0 sends the run's
    summary after its last progress line."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    place = WorkerPlace(
        context.get_world_rank(),
        context.get_world_size(),
        ray.train.torch.get_device(),
        functools.partial(ray.train.torch.prepare_model, move_to_device=False),
    )
    cluster: TrainCluster = setup["cluster"]
    make_decoder: Callable[[ImageSource], Decoder] = (
        functools.partial(TaskDecoder, cpus=cluster.decode_cpus, chunk=cluster.decode_chunk)
        if setup["decode"] == "tasks"  # TrainCluster.decode_where
        else functools.partial(ThreadDecoder, threads=cluster.decode_threads)
    )
    rows = ray.get(setup["rows"])
    loop = TrainLoop(
        setup["job"],
        cluster,
        setup["identity"],
        rows,
        place,
        make_decoder,
        setup["progress"],
        setup["options"],
    )
    summary = loop.run()
    if place.rank == 0:
        setup["progress"].put({"summary": summary})


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

    cluster = cluster or TrainCluster()
    storage.remember_secrets(job.out_url, options)
    table = read_manifest(job.manifest_url, options)
    rows = training_rows(table)
    total_steps = job.config.total_steps(len(rows.labels))
    identity = run_identity(job, manifest_fingerprint(table), rows, total_steps)
    resumed_from = check_resumable(job.out_url, identity, options)
    if job.weights_url and job.weights_url != "imagenet" and not storage.exists(job.weights_url, options):
        raise MissingInputError(f"weights file not found: {storage.redact(job.weights_url)}")
    ensure_ray(cluster.address)
    workers, gpus = worker_shape(cluster, ray.cluster_resources().get("GPU", 0.0))
    if job.config.batch_size % workers:
        raise ConfigError(f"batch_size {job.config.batch_size} must split evenly over {workers} workers")
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
        raise ConfigError(f"workers must be ≥ 1 and gpus_per_worker ≥ 0, got {workers}, {gpus}")
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
