"""The extractor actor pool on Ray: thin actors around :class:`~pipeline.extraction.chunks.ChunkExtractor`,
their torch threads per node and their environment."""

from __future__ import annotations

from collections import Counter

from pipeline.execution import ActorPool
from pipeline.extraction.chunks import ChunkExtractor, extractor_device
from pipeline.extraction.settings import ClusterOptions, ExtractionJob
from pipeline.storage import Options

# OpenMP threads that spin-wait between parallel regions burn the cores the decode tasks (and anything else
# on the node) need; with 2 torch threads on 2 busy cores that made CPU extraction 5–8× slower. Passive
# threads sleep instead. Read when torch loads, so it is set in the actor's environment, not in __init__.
ACTOR_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
GPU_HOST_THREADS = 4  # a GPU actor's CPU work (resize, top-K, copies) is small: a few threads suffice


def extractor_threads(node_cpus: int, extractors: int, gpus: int) -> int:
    """Torch CPU threads of one extractor actor: a CPU actor gets its share of the node's cores (the
    decode tasks' small share fits in the gaps), a GPU actor a few for host-side work."""
    share = max(1, node_cpus // extractors)
    return min(share, GPU_HOST_THREADS) if gpus else share


class ExtractorActor(ChunkExtractor):
    """A thin Ray actor around :class:`ChunkExtractor`: its torch threads fit the node it landed on."""

    def __init__(self, job: ExtractionJob, cluster: ClusterOptions, options: Options) -> None:
        import torch

        torch.set_num_threads(_threads_on_this_node(cluster))
        gpus = cluster.extractors.gpus_per_extractor
        super().__init__(job, cluster.runtime, options, extractor_device(gpus))

    def ready(self) -> str:
        """The torch device this actor extracts on; answered once the model is loaded."""
        return self.extractor.device.type


def _threads_on_this_node(cluster: ClusterOptions) -> int:
    """extractor_threads for the node this actor runs on: CPU actors may all share one node; GPU actors
    share a node with as many others as its GPUs hold."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    resources = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id)
    gpus = cluster.extractors.gpus_per_extractor
    sharing = int(resources.get("GPU", 0) // gpus) if gpus else cluster.extractors.most
    return extractor_threads(int(resources.get("CPU", 1)), max(sharing, 1), int(gpus > 0))


def _extractor_pool(
    job: ExtractionJob, cluster: ClusterOptions, options: Options, devices: Counter[str]
) -> ActorPool:
    """All ``max_extractors`` actors at once; Ray keeps those it cannot place pending (GPU actors on a
    cluster whose GPU nodes are still to come)."""
    import ray

    gpus = cluster.extractors.gpus_per_extractor
    actor_class = ray.remote(
        max_restarts=-1,
        max_task_retries=3,
        runtime_env={"env_vars": ACTOR_ENV},
        num_cpus=cluster.actor_cpus,
        num_gpus=gpus,
    )(ExtractorActor)
    actors = [actor_class.remote(job, cluster, options) for _ in range(cluster.extractors.most)]
    min_ready = cluster.extractors.min_extractors
    return ActorPool(
        actors,
        min_ready,
        gpus,
        cluster.actor_cpus,
        "extractor",
        devices,
        wait_timeout=cluster.extractors.extractor_wait_timeout,
        flags=("--min-extractors", "--extractor-wait-timeout", "--gpus-per-extractor"),
    )
