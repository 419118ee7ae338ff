"""Checkpoints, the run identity a resume must match, and the trained weights' URL."""

from __future__ import annotations

import io
from typing import Any

import torch

from pipeline import storage
from pipeline.errors import InputError
from pipeline.train.settings import TrainJob
from pipeline.train_data import (
    TrainingRows,
)

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
        raise InputError(
            f"{storage.redact(out_url)} holds checkpoints of a different training run (differs in "
            f"{differing}); use a new output URL or remove {CHECKPOINT_FOLDER}/"
        )
    return int(state["step"])


def weights_url(out_url: str) -> str:
    return storage.join(out_url, "weights.pt")
