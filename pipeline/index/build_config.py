"""How an index is built: every setting of :func:`~pipeline.index.build.build_index` in one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import ConfigError
from pipeline.index.params import (
    MERGE_MODES,
    REFINE_KINDS,
)
from pipeline.index.quality import QualityConfig


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0  # training and query samples are drawn from this seed
    max_points_per_centroid: int = 256  # faiss k-means subsamples above this anyway
    max_train_bytes: int = 8 * 2**30  # the float32 training sample must fit host RAM
    tasks: int = 4  # Ray add tasks; each gets every tasks-th shard
    task_cpus: float = 0.5  # fractional: whole-CPU tasks starve other Ray work on small machines
    merge: str = "auto"  # "ram": merge_from in memory; "disk": merge_ondisk (local out only); "auto": by RAM
    ram_fraction: float = 0.5  # auto merges on disk when the parts exceed this share of the free memory
    step_cpus: float | None = None  # CPUs (faiss threads) of the train and merge tasks; None: a whole node's
    train_gpus: int = 0  # GPUs of the train task: faiss k-means runs on them (0: on its CPUs)
    trained_url: str | None = None  # reuse this trained empty index instead of training (same quantizer)
    refine: str = "auto"  # shortlist re-scoring: auto (from the memory budget) or none, sq8, fp16, store
    whitening: int | None = None  # learned PCA whitening to this many dims (None: vectors as stored)
    whitening_power: float = 0.5  # each axis divided by eigenvalue^power: 0.5 full whitening, 0 PCA only
    keep_intermediate: bool = False  # keep OUT/parts/ and OUT/trained.faiss (e.g. to reuse the trained index)
    quality: QualityConfig = field(default_factory=QualityConfig)

    def __post_init__(self) -> None:
        if self.merge not in MERGE_MODES:
            raise ConfigError(f"merge={self.merge!r}; allowed: {', '.join(MERGE_MODES)}")
        if (
            self.tasks < 1
            or self.task_cpus <= 0
            or (self.step_cpus is not None and self.step_cpus <= 0)
            or self.train_gpus < 0
        ):
            raise ConfigError(
                f"tasks={self.tasks}, task_cpus={self.task_cpus}, step_cpus={self.step_cpus}, "
                f"train_gpus={self.train_gpus}; need tasks ≥ 1, task_cpus > 0, step_cpus > 0, train_gpus ≥ 0"
            )
        if self.refine != "auto" and self.refine not in REFINE_KINDS:
            raise ConfigError(f"refine={self.refine!r}; allowed: auto, {', '.join(REFINE_KINDS)}")
        if self.whitening is not None and self.whitening < 1:
            raise ConfigError(f"whitening={self.whitening}; must be ≥ 1 dims (None: no whitening)")
        if not 0 <= self.whitening_power <= 1:
            raise ConfigError(f"whitening_power={self.whitening_power}; must be in [0, 1]")
