"""The query service's settings (one place: the CLI, `serve run` arguments and the Kubernetes config read them)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import images
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class ServeSettings:
    """What ``landmark-index serve`` runs. Replica counts autoscale between min and max on the requests each
    replica has in flight (``target_ongoing_requests``: a few in flight per replica keeps batches full)."""

    index: str  # versioned root (LATEST is followed), a `run` folder, or one index folder
    poll_s: float = 10.0  # how often replicas look for a new LATEST
    max_upload_bytes: int = 20 * 2**20  # a request body above this is refused (413)
    max_pixels: int = images.DEFAULT_MAX_PIXELS  # decompression-bomb guard on uploads (413)
    max_k: int = 100  # results a request may ask for
    allow_urls: bool = False  # a JSON body may name an image URL (http(s), s3, gs) the service then fetches
    allow_local_files: bool = False  # ... or a path on the server's disk (never for an open service)
    max_in_flight: int = 64  # requests a gateway replica works on; beyond: 503 with Retry-After
    retry_after_s: int = 1  # what a 503 tells the client to wait
    extractor_cpus: float = 1.0  # CPUs per extraction replica
    extractor_threads: int | None = None  # torch threads of a CPU extraction replica; None: extractor_cpus
    extractor_gpus: float | None = None  # GPUs per extraction replica; None: 1 when the cluster has GPUs
    backend_cpus: float = 0.5  # CPUs per search and per verification replica
    max_extractors: int = 4  # autoscaling ceilings
    max_searchers: int = 2
    max_verifiers: int = 4
    max_gateways: int = 2

    def __post_init__(self) -> None:
        if self.poll_s <= 0 or self.max_upload_bytes < 1 or self.max_pixels < 1:
            raise ConfigError(
                f"poll_s={self.poll_s}, max_upload_bytes={self.max_upload_bytes}, max_pixels={self.max_pixels}: "
                "all must be > 0"
            )
        if not 1 <= self.max_k <= 1000:
            raise ConfigError(f"max_k={self.max_k}; must be between 1 and 1000")
        if self.max_in_flight < 1 or self.retry_after_s < 0:
            raise ConfigError(f"max_in_flight={self.max_in_flight} must be ≥ 1, retry_after_s ≥ 0")
        if min(self.max_extractors, self.max_searchers, self.max_verifiers, self.max_gateways) < 1:
            raise ConfigError("every max_* replica count must be ≥ 1")
