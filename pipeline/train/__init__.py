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

The package's rooms: :mod:`~pipeline.train.settings` (job, config, cluster, summary), :mod:`~pipeline.train.step`
(the trained model and one step), :mod:`~pipeline.train.checkpoints`, :mod:`~pipeline.train.loop` (one worker's
loop, no Ray) and :mod:`~pipeline.train.ray_train` (the Ray Train driver); the data side (rows, sampling,
decoding) is :mod:`pipeline.train_data`.
"""

from __future__ import annotations

from pipeline.train.checkpoints import (
    CHECKPOINT_FOLDER,
    KEEP_CHECKPOINTS,
    check_resumable,
    checkpoint_url,
    checkpoint_urls,
    latest_checkpoint,
    run_identity,
    save_checkpoint,
    weights_url,
)
from pipeline.train.loop import ProgressSink, TrainLoop, WorkerPlace, mining_generator
from pipeline.train.ray_train import run_training, worker_shape
from pipeline.train.settings import (
    BATCHNORM,
    DECODE,
    DEFAULT_MARGINS,
    OBJECTIVES,
    TERMS,
    TRAINABLE,
    TrainCluster,
    TrainConfig,
    TrainJob,
    TrainSummary,
)
from pipeline.train.step import Trainee, build_trainee, learning_rate, set_train_mode, train_step

__all__ = [
    "BATCHNORM",
    "CHECKPOINT_FOLDER",
    "DECODE",
    "DEFAULT_MARGINS",
    "KEEP_CHECKPOINTS",
    "OBJECTIVES",
    "TERMS",
    "TRAINABLE",
    "ProgressSink",
    "TrainCluster",
    "TrainConfig",
    "TrainJob",
    "TrainLoop",
    "TrainSummary",
    "Trainee",
    "WorkerPlace",
    "build_trainee",
    "check_resumable",
    "checkpoint_url",
    "checkpoint_urls",
    "latest_checkpoint",
    "learning_rate",
    "mining_generator",
    "run_identity",
    "run_training",
    "save_checkpoint",
    "set_train_mode",
    "train_step",
    "weights_url",
    "worker_shape",
]
