"""The Ray Serve deployments behind the gateway: extraction, search and verification, one per kind of work.

Each holds the parts of pipeline.query for the versions it serves (pipeline.serve.versions), and batches the
requests that arrive together (``@serve.batch``). Requests carry their :class:`IndexVersion`, so a batch may
mix versions during a swap: it is split by version and each part answers its own requests.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from ray import serve

from pipeline import storage
from pipeline.features import ImageFeatures, PreparedImage
from pipeline.query import (
    Hit,
    IndexVersion,
    QueryModel,
    QuerySearcher,
    QueryVerifier,
    Shortlist,
)
from pipeline.serve.settings import ServeSettings
from pipeline.serve.versions import LatestWatcher, PartCache, by_model, by_name

log = logging.getLogger(__name__)

# Dynamic batching: a replica waits this long for more requests before it runs what it has.
BATCH_WAIT_S = 0.005


def _grouped(items: Sequence[Any], key: Callable[[Any], Hashable]) -> dict[Hashable, list[int]]:
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        groups[key(item)].append(position)
    return groups


class _Replica:
    """What every backend replica does: redacted logs, a cache of parts, a LATEST watcher that preloads."""

    def __init__(self, settings: ServeSettings, cache: PartCache) -> None:
        storage.install_log_redaction()
        self.settings, self.cache = settings, cache
        self.watcher = LatestWatcher(
            settings.index, settings.poll_s, self.cache.get, storage.options_from_env()
        )
        self.watcher.check()  # the replica is ready only once the live version is loaded
        self.watcher.start()

    def load(self, version: IndexVersion) -> str:
        """Load ``version`` now (the gateway calls it before it switches)."""
        self.cache.get(version)
        return version.name


class Extraction(_Replica):
    """DELG extraction; on a GPU when the replica was given one (``ServeSettings.extractor_gpus``)."""

    def __init__(self, settings: ServeSettings) -> None:
        import torch

        if not settings.extractor_gpus:
            torch.set_num_threads(settings.extractor_threads or max(1, int(settings.extractor_cpus)))
        device = "cuda" if settings.extractor_gpus and torch.cuda.is_available() else "cpu"
        options = storage.options_from_env()
        super().__init__(settings, PartCache(lambda v: QueryModel(v, options, device), by_model))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=BATCH_WAIT_S)
    async def extract(self, requests: list[tuple[IndexVersion, PreparedImage]]) -> list[ImageFeatures]:
        out: list[Any] = [None] * len(requests)
        for positions in _grouped(requests, lambda r: by_model(r[0])).values():
            model = self.cache.get(requests[positions[0]][0])
            for position, features in zip(
                positions, model.extract([requests[p][1] for p in positions]), strict=True
            ):
                out[position] = features
        return out


class Search(_Replica):
    """k-NN search on the index, loaded once per version."""

    def __init__(self, settings: ServeSettings) -> None:
        options = storage.options_from_env()
        super().__init__(settings, PartCache(lambda v: QuerySearcher(v, options), by_name))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=BATCH_WAIT_S)
    async def search(self, requests: list[tuple[IndexVersion, ImageFeatures, int]]) -> list[Shortlist]:
        import numpy as np

        out: list[Any] = [None] * len(requests)
        # by k too: a refined index's shortlist depends on k, and a batch must answer what a lone query would
        for positions in _grouped(requests, lambda r: (r[0].name, r[2])).values():
            version, _, k = requests[positions[0]]
            vectors = np.stack([requests[p][1].global_descriptor for p in positions])
            for position, shortlist in zip(
                positions, self.cache.get(version).search(vectors, k), strict=True
            ):
                out[position] = shortlist
        return out


class Verification(_Replica):
    """Geometric verification of shortlists against the version's stores."""

    def __init__(self, settings: ServeSettings) -> None:
        options = storage.options_from_env()
        super().__init__(settings, PartCache(lambda v: QueryVerifier(v, options), by_name))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=BATCH_WAIT_S)
    async def verify(
        self, requests: list[tuple[IndexVersion, ImageFeatures, Shortlist, int]]
    ) -> list[list[Hit]]:
        return [
            self.cache.get(version).verify(features, shortlist, k)
            for version, features, shortlist, k in requests
        ]
