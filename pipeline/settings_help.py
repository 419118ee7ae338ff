"""The one help text (and, where the values are a fixed set, the choices) of every library setting: what the
CLI's ``--help``, the jobs' ``--help`` and docs/configuration.md show.

A text is found under ``Owner.key`` first (where one key means different things to different classes, e.g.
``batch_size``), then under the key. Keys are the settings' spellings (pipeline.settings.SPELLINGS). A field
declared with ``metadata={"help": ...}`` carries its own text (the run config's own keys do). This module
imports nothing heavy: the CLI reads it to build ``--help``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.choices import GLOBAL_DTYPES, LOCAL_DTYPES
from pipeline.config import AUTOCAST_DTYPES
from pipeline.index.params import MERGE_MODES
from pipeline.rerank.config import MODELS, RESIDUAL_SPACES, SCORE_MODES

if TYPE_CHECKING:  # pipeline.settings reads the texts: the type only, no import cycle
    from pipeline.settings import Setting

_EXTRACTOR_GPUS = (
    "GPUs each extractor actor asks for (0: CPU actors). Asked for even before a GPU node exists: the "
    "autoscaler adds them and the pool grows as they join; an actor whose GPU is unusable uses its CPU."
)
_WORKER_GPUS = "GPUs each Ray worker asks for (0: CPU workers); asked for before a GPU node exists."

HELP: dict[str, str] = {
    # shared by several stages
    "address": "Ray cluster address; default: start a local Ray.",
    "preset": "Extraction preset (see `landmark-index presets`).",
    "weights": "Model weights URL (local path, s3://, https://): a full DELG state dict, a backbone-only one "
    "(e.g. ImageNet MobileNetV2 features), or 'imagenet' (torchvision download).",
    "image_root": "Image root of an id-only manifest (GLDv2 index/test.csv): ROOT/a/b/c/ID.jpg.",
    "allow_local_files": "Let manifest rows read any local file: outside the manifest's folder (or "
    "--image-root), and from a remote manifest. Without it such rows get a local_file_refused error record.",
    # extraction: ExtractionJob, StoreSettings, ClusterOptions, Extractors, RuntimeOptions
    "shard_size": "Manifest rows per descriptor shard.",
    "local_dtype": "Local descriptor encoding.",
    "global_dtype": "Global descriptor encoding.",
    "row_group_size": "Images per Parquet row group of a local shard (1: reads priced per image).",
    "decode_draft": "Decode JPEGs at reduced scale before capping: faster, slightly different features.",
    "gpus_per_extractor": _EXTRACTOR_GPUS,
    "min_extractors": "Extractor actors the run waits for before it starts.",
    "max_extractors": "Extractor actors the pool grows to as nodes join (default: --min-extractors).",
    "extractor_wait_timeout": "Seconds to wait for --min-extractors to be ready (GPU nodes starting "
    "included); then fail naming what the cluster offers. 0: no limit.",
    "chunk_size": "Images per decode task and extractor call.",
    "max_chunks_in_flight": "Chunks between decode and extract (0: 4 per extractor).",
    "actor_cpus": "CPU share of a CPU-only extractor actor.",
    "ClusterOptions.decode_cpus": "CPU share of a decode task.",
    "RuntimeOptions.batch_size": "Images per forward pass (same capped shape).",
    "max_batch_pixels": "Cap on pixels per forward pass (0: none); large images then go fewer at a time.",
    "autocast": "CUDA mixed precision.",
    "channels_last": "NHWC memory format (faster convs on GPUs).",
    "compile": "torch.compile the forward pass.",
    # training: TrainJob, TrainConfig, TrainCluster
    "steps": "Optimiser steps (or --epochs).",
    "epochs": "Passes over the manifest (or --steps).",
    "TrainConfig.batch_size": "Global batch, split over the workers.",
    "lr": "Initial learning rate (linear decay to 0).",
    "momentum": "SGD momentum.",
    "clip_norm": "Global gradient-norm clip.",
    "image_size": "Square training crop side.",
    "augment": "Reference random crops (off: whole image).",
    "objective": "Global loss: arcface, contrastive, triplet, margin, quadruplet.",
    "arcface_scale": "ArcFace scale (the reference's √2048).",
    "margin": "Loss margin (default per objective).",
    "margin_beta": "Margin loss: initial boundary β (learned).",
    "margin_beta_per_class": "Margin loss: one β per class.",
    "mining": "Negatives: hard, distance-weighted.",
    "attention_weight": "Weight of the attention loss.",
    "reconstruction_weight": "Weight of the reconstruction loss.",
    "trainable": "all, local-head, global-head.",
    "batchnorm": "batch (per-worker statistics) or frozen.",
    "sampling": "uniform or balanced (per class).",
    "images_per_class": "Adjacent images per class (balanced).",
    "TrainConfig.seed": "Seed of every random choice.",
    "log_every": "Steps per metrics line.",
    "checkpoint_every": "Steps per checkpoint.",
    "workers": "Workers (default: one per GPU, else 1).",
    "TrainCluster.gpus_per_worker": "Default: 1 with GPUs, else 0.",
    "TrainCluster.cpus_per_worker": "CPUs reserved per worker.",
    "decode": "threads (in each worker), tasks (Ray tasks), auto: tasks with GPUs.",
    "decode_threads": "Decode threads per worker (threads).",
    "TrainCluster.decode_cpus": "CPUs per decode task (tasks).",
    "decode_chunk": "Images per decode task (tasks).",
    "prefetch_steps": "Batches decoded ahead of the step trained.",
    "max_failures": "Worker-group restarts, each from the newest checkpoint.",
    # index: build_index, BuildConfig, QualityConfig
    "build_index.factory": "faiss index_factory string, e.g. 'OPQ64_256,IVF65536_HNSW32,PQ64'.",
    "build_index.memory_budget": "Index size budget, e.g. 8GB; parameters are chosen to fit it.",
    "target_recall": "100-recall@100 the stored nprobe must reach.",
    "target_k": "The k of that recall.",
    "target_r1": "1-recall@1 the stored nprobe must reach too.",
    "recall_sample": "Queries of the recall report (a sample).",
    "recall_queries": "Descriptor store of held-out queries for the recall report [default: leave-one-out "
    "stored vectors].",
    "max_nprobe": "Largest nprobe the recall report tries.",
    "k_factors": "Refined shortlist sizes tried, in multiples of k.",
    "tasks": "Parallel Ray add tasks.",
    "task_cpus": "CPUs per add task.",
    "step_cpus": "CPUs (faiss threads) of the train and merge tasks [default: a whole node's].",
    "train_gpus": "GPUs of the train task (faiss k-means on them).",
    "merge": "Merge inverted lists in RAM, on disk (larger than RAM), or auto by size.",
    "ram_fraction": "auto merges on disk when the parts exceed this share of RAM.",
    "refine": "Shortlist re-scoring: auto (from the budget), none, sq8, fp16 (RAM), store (disk).",
    "trained_url": "Reuse this trained empty index instead of training.",
    "BuildConfig.seed": "Seed of the training and query samples.",
    "max_points_per_centroid": "k-means sample per centroid.",
    "max_train_bytes": "Bound on the float32 training sample.",
    "whitening": "Learned PCA whitening to this many dims, fitted on the index sample (default: off).",
    "whitening_power": "Whitening: axes divided by eigenvalue^power (0.5 full, 0 PCA only).",
    "keep_intermediate": "Keep OUT/parts/ and OUT/trained.faiss after a successful build.",
    # search: SearchConfig, Workers
    "k": "Results per query.",
    "nprobe": "IVF cells visited (default: the one stored by the quality report).",
    "k_factor": "Refined shortlist size in multiples of k (default: stored one).",
    "SearchConfig.batch_size": "Queries per search call and per committed part (a killed run redoes one).",
    "shards": "Index id ranges, each held by its own workers (an index too big for one worker); results are "
    "merged exactly.",
    "Workers.gpus_per_worker": _WORKER_GPUS,
    "Workers.cpus_per_worker": "CPUs each Ray worker asks for.",
    "min_workers": "Workers the run waits for; above 1 (or --address, --gpus-per-worker): on Ray.",
    "max_workers": "Workers the pool grows to as nodes join (default: --min-workers).",
    # re-ranking: RerankConfig (unset: the stores' settings), GlobalRerankConfig, RerankRun
    "top": "Shortlist entries verified per query.",
    "model": "Geometric model.",
    "residual_in": "Inlier threshold in query (reference) or candidate pixels.",
    "threshold": "RANSAC inlier threshold in pixels.",
    "trials": "RANSAC hypotheses per pair.",
    "RerankConfig.seed": "RANSAC sampling seed.",
    "refit": "Least-squares refit on the best consensus set.",
    "max_distance": "Descriptor L2 distance bound.",
    "ratio": "Lowe ratio test; 0 = off.",
    "mutual": "Keep only mutual nearest neighbours.",
    "score": "inliers: (inliers, global) order; saturate: min(i,k)/k + global; shortlist: global + a boost "
    "for inlier counts standing out of the shortlist's; gate: candidates with inliers significant against "
    "the query's null move up, in global order.",
    "min_inliers": "Fewer inliers = unverified (kept below verified ones).",
    "saturate_at": "k of the saturate score.",
    "z_from": "shortlist score: boost starts this many spreads up.",
    "z_span": "shortlist score: full boost this many further.",
    "boost": "shortlist score: the full boost.",
    "null_size": "gate score: null images per query (a fixed database sample).",
    "false_alarms": "gate score: expected false promotions per query.",
    "device": "cpu, cuda, ... (default: CUDA when available).",
    "max_elements": "Bound on the elements of one tensor chunk.",
    "queries_per_batch": "Queries whose features are read together.",
    "keep_matches": "Inlier pairs stored for this many top hits per query (the report's).",
    "qe_k": "α-QE: top entries averaged into the query.",
    "qe_alpha": "α-QE: weight = similarity^α.",
    "dba_k": "DBA neighbours (a fresh DBA file).",
    "dba_alpha": "DBA weight exponent.",
    "sg_m": "SuperGlobal: shortlist entries refined.",
    "sg_k": "SuperGlobal: neighbours per descriptor.",
    "sg_beta": "SuperGlobal: neighbour weight β.",
    "cache_dir": "Node-local folder caching the index images' local features.",
    "queries_per_part": "Queries per committed part of OUT (a killed run redoes at most one).",
    # evaluation: evaluate's keyword arguments
    "evaluate.landmarks": "id → landmark_id of index images (gldv2-recognition).",
    "evaluate.out": "Write the figures as JSON (fractions).",
    # aggregation: AggregateConfig
    "AggregateConfig.method": "Aggregation: vlad.",
    "clusters": "Visual words of a new codebook (K × 128 dims).",
    "power": "Signed power normalisation before L2 (1: none).",
    "sample_images": "Images whose local features train a new codebook.",
    "AggregateConfig.seed": "Seed of the codebook's sample and k-means.",
    # nightly re-index: ReindexConfig
    "keep": "Published versions kept, the live one included.",
    "retrain_threshold": "Retrain from scratch when (new + changed) / live vectors exceeds this.",
    "ReindexConfig.factory": "faiss index_factory string for a retrain.",
    "ReindexConfig.memory_budget": "Index size budget for a retrain, e.g. 16GB.",
    "lease_seconds": "Lock lease, renewed as the run goes on.",
    "dba": "Keep DBA vectors beside every version (re-rank --method dba...).",
    # report: ReportSettings
    "title": "Page title.",
    "thumb_px": "Longest side of a ranking thumbnail.",
    "match_px": "Height of each image in a match panel.",
    "max_queries": "Queries shown in the report.",
    "max_hits": "Hits shown per ranking.",
    "max_match_pairs": "Top re-ranked pairs drawn with their inliers.",
    "max_match_lines": "Inlier lines drawn per pair (more are unreadable).",
    "jpeg_quality": "JPEG quality of the embedded images.",
    "map_points": "Descriptors sampled for the embedding map (exact t-SNE); 0: no map.",
    # query service: ServeSettings
    "index": "Versioned root (LATEST is followed as it moves), a `run` folder, or an index folder.",
    "poll_s": "Seconds between checks for a new LATEST.",
    "max_upload_bytes": "Largest request body (413 above).",
    "max_pixels": "Largest image in pixels (413 above).",
    "max_k": "Most results a request may ask for.",
    "allow_urls": "Let a JSON request name an http(s)/s3/gs image URL the server fetches.",
    "ServeSettings.allow_local_files": "Let a JSON request name a file on the server.",
    "max_in_flight": "Requests per gateway replica; beyond: 503.",
    "retry_after_s": "Retry-After of a 503, in seconds.",
    "extractor_cpus": "CPUs per extraction replica.",
    "extractor_threads": "Torch threads of a CPU extraction replica (default: its CPUs).",
    "extractor_gpus": "GPUs per extraction replica (default: 1 when the cluster has GPUs).",
    "backend_cpus": "CPUs per search and per verification replica.",
    "ServeSettings.max_extractors": "Autoscaling ceiling of extraction replicas.",
    "max_searchers": "Autoscaling ceiling of search replicas.",
    "max_verifiers": "Autoscaling ceiling of verification replicas.",
    "max_gateways": "Autoscaling ceiling of gateway replicas.",
}

# Settings whose values are a fixed set: the CLI offers them as choices, the docs list them.
CHOICES: dict[str, tuple[str, ...]] = {
    "local_dtype": LOCAL_DTYPES,
    "global_dtype": GLOBAL_DTYPES,
    "autocast": AUTOCAST_DTYPES,
    "merge": MERGE_MODES,
    "model": MODELS,
    "residual_in": RESIDUAL_SPACES,
    "score": SCORE_MODES,
}


def help_entry(setting: Setting) -> str:
    """The HELP entry that describes ``setting``: ``Owner.key`` where the owner has its own text, else the key."""
    qualified = f"{setting.owner.__name__}.{setting.key}"
    return qualified if qualified in HELP else setting.key


def help_text(setting: Setting) -> str:
    """``setting``'s help: its field's ``metadata["help"]``, else its HELP entry; KeyError when it has none
    (tests/test_structure.py checks that every setting a front end offers has one)."""
    own = setting.metadata.get("help")
    return own if own is not None else HELP[help_entry(setting)]


def choices(setting: Setting) -> tuple[str, ...] | None:
    return CHOICES.get(setting.key)
