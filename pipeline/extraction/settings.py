"""What an extraction run is: the job (everything that defines the output), the extractor pool and the
cluster options (nothing there changes the output), and the summary a run returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline import images, manifest
from pipeline.config import ExtractionConfig, RuntimeOptions
from pipeline.errors import ConfigError
from pipeline.storage import Options
from pipeline.store import StoreSettings


@dataclass(frozen=True)
class ExtractionJob:
    """What to extract and where to: everything that defines the output (recorded in ``_run.json``)."""

    manifest_url: str
    out_url: str
    config: ExtractionConfig
    weights_url: str | None = None  # full DELG or backbone-only state dict, or "imagenet"; None: random init
    store: StoreSettings = field(default_factory=StoreSettings)
    shard_size: int = 1000  # manifest rows per descriptor shard: ~5k shards for GLDv2's 5M images
    allowed_schemes: frozenset[str] = images.DEFAULT_ALLOWED_SCHEMES
    max_pixels: int = images.DEFAULT_MAX_PIXELS  # decompression-bomb guard
    image_root: str | None = None  # urls for id-only manifests (GLDv2 index/test.csv): ROOT/a/b/c/ID.jpg
    # Local files rows may read without allow_local_outside_root: those under image_root, else under the
    # manifest's folder when the manifest is local, else none (pipeline.manifest.local_root).
    allow_local_outside_root: bool = False
    origin_manifest_url: str | None = None  # the manifest the rows came from, if manifest_url is a subset
    # JPEG DCT-domain (draft) / reduce() decoding before the exact cap: faster decode, slightly different
    # pixels (see benchmarks/RESULTS.md); rows with a bbox are always decoded at full size
    decode_draft: bool = False

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"shard_size={self.shard_size}; must be ≥ 1")

    def local_files(self, options: Options = None) -> images.LocalFiles:
        """The policy on local image files that this job's rows follow."""
        origin = self.origin_manifest_url or self.manifest_url
        root = manifest.local_root(origin, options, self.image_root)
        return images.LocalFiles(root, self.allow_local_outside_root)


@dataclass(frozen=True)
class Extractors:
    """The extractor actor pool: how many, and the GPU share each asks Ray for (nothing changes the output).

    GPU actors are asked for even when no node has a GPU yet: Ray keeps the ones it cannot place pending
    (the autoscaler's demand, also requested explicitly), and each one gets work as soon as it is placed and
    loaded, so the pool grows while the run goes as GPU nodes join.
    """

    gpus_per_extractor: float = 0  # 0: CPU actors; e.g. 1 (one GPU each) or 0.5 (two actors per GPU)
    min_extractors: int = 1  # the run waits until this many actors are ready
    max_extractors: int | None = None  # the pool grows up to this many; None: min_extractors
    # Seconds to wait for min_extractors (node start-up and model load included) before failing with what
    # was asked for and what the cluster offers; 0: no limit. 30 min covers a cloud GPU node's start.
    extractor_wait_timeout: float = 1800.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gpus_per_extractor) and self.gpus_per_extractor >= 0):
            raise ConfigError(
                f"gpus_per_extractor (--gpus-per-extractor) = {self.gpus_per_extractor}; must be ≥ 0"
            )
        if self.min_extractors < 1:
            raise ConfigError(f"min_extractors (--min-extractors) = {self.min_extractors}; must be ≥ 1")
        if not (math.isfinite(self.extractor_wait_timeout) and self.extractor_wait_timeout >= 0):
            raise ConfigError(
                f"extractor_wait_timeout (--extractor-wait-timeout) = {self.extractor_wait_timeout}; "
                "must be ≥ 0 seconds (0: no limit)"
            )
        if self.max_extractors is not None and self.max_extractors < self.min_extractors:
            raise ConfigError(
                f"max_extractors (--max-extractors) = {self.max_extractors}; must be ≥ min_extractors "
                f"({self.min_extractors})"
            )

    @property
    def most(self) -> int:
        return self.max_extractors or self.min_extractors


@dataclass(frozen=True)
class ClusterOptions:
    """How the job runs on Ray: nothing here changes the output."""

    address: str | None = None  # None: start a local Ray (or use the one already initialised)
    extractors: Extractors = field(default_factory=Extractors)
    actor_cpus: float = 1.0  # CPU share of each extractor; fractional so decode tasks still run
    decode_cpus: float = 0.25  # fractional: decode is I/O-bound and must not starve (GUIDE §5)
    chunk_size: int = 16  # rows per decode task / extractor call
    max_chunks_in_flight: int = 0  # 0: 4 per extractor
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)


@dataclass(frozen=True)
class ExtractionSummary:
    rows: int
    ok: int
    errors: int
    errors_by_reason: dict[str, int]
    shards: int
    shards_resumed: int  # committed before this run started
    rows_this_run: int
    seconds: float
    extractors: int  # extractor actors that were ready by the end of the run (0: nothing left to extract)
    devices: dict[str, int]  # those actors by torch device ("cuda", or "cpu" also for a GPU fallback)

    @property
    def images_per_s(self) -> float:
        return self.rows_this_run / max(self.seconds, 1e-9)
