"""The `landmark-index` command line: thin shells that parse arguments and call the library stages.

Storage credentials never go on the command line: they come from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...) or from LANDMARK_INDEX_STORAGE_OPTIONS (JSON fsspec options).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pipeline import settings, storage
from pipeline.boundary import EXIT_USER_ERROR, error_line, user_error
from pipeline.choices import GLOBAL_DTYPES, LOCAL_DTYPES, PROTOCOLS
from pipeline.config import AUTOCAST_DTYPES, PRESETS
from pipeline.index.params import MERGE_MODES
from pipeline.rerank.config import METHODS, MODELS, RESIDUAL_SPACES, SCORE_MODES

app = typer.Typer(
    help="Distributed batch indexing for landmark image retrieval: DELG extraction on Ray, FAISS IVF-PQ "
    "indexing, geometric re-ranking, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)
PROGRESS_S = 10.0  # how often a long stage prints its progress line
# Tables go to stdout; when it is a pipe or file, rich would wrap at 80 columns and split names.
stdout = Console() if sys.stdout.isatty() else Console(width=200)


# A str, not a Literal: PRESETS is a registry that can grow at run time (the library checks the name);
# the shell still completes the names registered when it asks.
Preset = Annotated[
    str,
    typer.Option(
        "--preset",
        autocompletion=lambda: list(PRESETS),
        help="Extraction preset (see `landmark-index presets`).",
    ),
]
Weights = Annotated[
    str | None,
    typer.Option(
        "--weights",
        help="Model weights URL (local path, s3://, https://): a full DELG state dict, a backbone-only one "
        "(e.g. ImageNet MobileNetV2 features), or 'imagenet' (torchvision download).",
    ),
]
Address = Annotated[
    str | None, typer.Option("--address", help="Ray cluster address; default: start a local Ray.")
]
GpusPerExtractor = Annotated[
    float,
    typer.Option(
        help="GPUs each extractor actor asks for (0: CPU actors). Asked for even before a GPU node exists: "
        "the autoscaler adds them and the pool grows as they join; an actor whose GPU is unusable uses its CPU."
    ),
]
GpusPerWorker = Annotated[
    float,
    typer.Option(help="GPUs each Ray worker asks for (0: CPU workers); asked for before a GPU node exists."),
]
CpusPerWorker = Annotated[float, typer.Option(help="CPUs each Ray worker asks for.")]
MinWorkers = Annotated[
    int, typer.Option(help="Workers the run waits for; above 1 (or --address, --gpus-per-worker): on Ray.")
]
MaxWorkers = Annotated[
    int | None, typer.Option(help="Workers the pool grows to as nodes join (default: --min-workers).")
]
MinExtractors = Annotated[int, typer.Option(help="Extractor actors the run waits for before it starts.")]
MaxExtractors = Annotated[
    int | None,
    typer.Option(help="Extractor actors the pool grows to as nodes join (default: --min-extractors)."),
]
ExtractorWaitTimeout = Annotated[
    float,
    typer.Option(
        help="Seconds to wait for --min-extractors to be ready (GPU nodes starting included); then fail "
        "naming what the cluster offers. 0: no limit."
    ),
]
ImageRoot = Annotated[
    str | None,
    typer.Option(
        "--image-root", help="Image root of an id-only manifest (GLDv2 index/test.csv): ROOT/a/b/c/ID.jpg."
    ),
]
AllowLocalFiles = Annotated[
    bool,
    typer.Option(
        "--allow-local-files",
        help="Let manifest rows read any local file: outside the manifest's folder (or --image-root), "
        "and from a remote manifest. Without it such rows get a local_file_refused error record.",
    ),
]


def _print_version(requested: bool) -> None:
    if requested:
        stdout.print(f"landmark-index {importlib.metadata.version('landmark-index')}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    storage.install_log_redaction()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def main() -> None:
    """Console-script entry point: the CLI with one error boundary for every command (pipeline.boundary):
    a user error or environment fault, also one raised in a Ray task, is one line and exit code 2."""
    try:
        app()
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        console.print(f"[bold red]error:[/] {escape(error_line(error))}", soft_wrap=True)
        raise SystemExit(EXIT_USER_ERROR) from None


@app.command()
def presets() -> None:
    """List the extraction presets and what they extract."""
    from pipeline.config import PRESETS

    table = Table("preset", "backbone", "max side", "scales", "global scales", "threshold", "top-k")
    for name, c in PRESETS.items():
        table.add_row(
            name,
            c.backbone,
            str(c.max_side),
            " ".join(f"{s:g}" for s in c.scales),
            " ".join(f"{s:g}" for s in c.global_scales),
            f"{c.attention_threshold:g}",
            str(c.max_local_features),
        )
    stdout.print(table)


@app.command()
def extract(
    manifest: Annotated[
        str, typer.Argument(help="Parquet/CSV manifest (file, folder, glob) or a folder of images.")
    ],
    out: Annotated[str, typer.Argument(help="Descriptor store URL (local folder or s3://bucket/prefix).")],
    preset: Preset = "delg-r50-gldv2",
    weights: Weights = None,
    address: Address = None,
    image_root: ImageRoot = None,
    allow_local_files: AllowLocalFiles = False,
    shard_size: Annotated[int, typer.Option(help="Manifest rows per descriptor shard.")] = 1000,
    local_dtype: Annotated[
        Literal[LOCAL_DTYPES], typer.Option(help="Local descriptor encoding.")
    ] = "float16",
    global_dtype: Annotated[
        Literal[GLOBAL_DTYPES], typer.Option(help="Global descriptor encoding.")
    ] = "float16",
    row_group_size: Annotated[
        int, typer.Option(help="Images per Parquet row group of a local shard (1: reads priced per image).")
    ] = 1,
    gpus_per_extractor: GpusPerExtractor = 0,
    min_extractors: MinExtractors = 1,
    max_extractors: MaxExtractors = None,
    extractor_wait_timeout: ExtractorWaitTimeout = 1800.0,
    chunk_size: Annotated[int, typer.Option(help="Images per decode task and extractor call.")] = 16,
    max_chunks_in_flight: Annotated[
        int, typer.Option(help="Chunks between decode and extract (0: 4 per extractor).")
    ] = 0,
    actor_cpus: Annotated[float, typer.Option(help="CPU share of a CPU-only extractor actor.")] = 1.0,
    decode_cpus: Annotated[float, typer.Option(help="CPU share of a decode task.")] = 0.25,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (same capped shape).")] = 8,
    max_batch_pixels: Annotated[
        int,
        typer.Option(help="Cap on pixels per forward pass (0: none); large images then go fewer at a time."),
    ] = 0,
    autocast: Annotated[Literal[AUTOCAST_DTYPES], typer.Option(help="CUDA mixed precision.")] = "none",
    channels_last: Annotated[bool, typer.Option(help="NHWC memory format (faster convs on GPUs).")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the forward pass.")] = False,
    decode_draft: Annotated[
        bool,
        typer.Option(
            help="Decode JPEGs at reduced scale before capping: faster, slightly different features."
        ),
    ] = False,
) -> None:
    """Extract DELG descriptors for every manifest row into a sharded descriptor store (resumable).

    Re-running the same command resumes: committed shards are kept, the rest is extracted.
    """
    given = dict(locals())  # every option under its setting key (pipeline.settings)
    from pipeline.config import get_preset
    from pipeline.extraction import ClusterOptions, ExtractionJob

    job = settings.build(ExtractionJob, given, manifest_url=manifest, out_url=out, config=get_preset(preset))
    cluster = settings.build(ClusterOptions, given)
    summary = _extract_with_progress(job, cluster)
    _print_summary(summary, out)


def _extract_with_progress(job, cluster):
    """run_extraction behind the console's progress bar; its summary."""
    from pipeline.extraction import run_extraction
    from pipeline.run import extraction_progress

    with _StageBars() as bars:
        return run_extraction(
            job,
            cluster,
            storage.options_from_env(),
            on_progress=lambda p: bars.show(extraction_progress("extract", p)),
        )


class _StageBars:
    """One live bar per stage (``pipeline.run.StageProgress``), shown from a stage's first progress on: a
    stage validates its input before it reports progress, so an input error prints with no bar above it."""

    def __init__(self) -> None:
        self.bar = _progress_bar("{task.fields[detail]}")
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> _StageBars:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.tasks:  # rich ends a stopped display with a newline, even one never started
            self.bar.stop()

    def show(self, progress) -> None:
        task = self.tasks.get(progress.stage)
        if task is None:
            self.bar.start()
            task = self.tasks[progress.stage] = self.bar.add_task(progress.stage, total=None, detail="")
        if progress.finished:  # a stage that counted nothing ends as one unit done
            total = self.bar.tasks[task].total or 1
            self.bar.update(task, total=total, completed=total)
        else:
            self.bar.update(task, total=progress.total, completed=progress.done, detail=progress.detail)


def _progress_bar(fields: str) -> Progress:
    """The console's progress bar: description, bar, done/total, the stage's ``fields``, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(fields),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def _print_summary(summary, out: str) -> None:
    table = Table(title=f"extraction → {storage.redact(out)}", show_header=False)
    table.add_row("rows", str(summary.rows))
    table.add_row("ok", str(summary.ok))
    table.add_row("errors", str(summary.errors))
    for reason, count in summary.errors_by_reason.items():
        table.add_row(f"  {reason}", str(count))
    table.add_row("shards", f"{summary.shards} ({summary.shards_resumed} from an earlier run)")
    devices = ", ".join(f"{device}: {n}" for device, n in sorted(summary.devices.items()))
    table.add_row("extractors", f"{summary.extractors}" + (f" ({devices})" if devices else ""))
    table.add_row(
        "throughput",
        f"{summary.images_per_s:.2f} images/s ({summary.rows_this_run} in {summary.seconds:.1f} s)",
    )
    stdout.print(table)


@app.command()
def train(
    manifest: Annotated[str, typer.Argument(help="Labelled manifest (landmark_id on every row).")],
    out: Annotated[str, typer.Argument(help="Output URL: weights.pt, metrics.jsonl, checkpoints/.")],
    preset: Preset = "delg-r50-gldv2",
    weights: Weights = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (or --epochs).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the manifest (or --steps).")] = None,
    batch_size: Annotated[int, typer.Option(help="Global batch, split over the workers.")] = 32,
    lr: Annotated[float, typer.Option(help="Initial learning rate (linear decay to 0).")] = 0.01,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    clip_norm: Annotated[float, typer.Option(help="Global gradient-norm clip.")] = 10.0,
    image_size: Annotated[int, typer.Option(help="Square training crop side.")] = 321,
    augment: Annotated[bool, typer.Option(help="Reference random crops (off: whole image).")] = True,
    objective: Annotated[
        str, typer.Option(help="Global loss: arcface, contrastive, triplet, margin, quadruplet.")
    ] = "arcface",
    margin: Annotated[float | None, typer.Option(help="Loss margin (default per objective).")] = None,
    margin_beta: Annotated[float, typer.Option(help="Margin loss: initial boundary β (learned).")] = 1.2,
    margin_beta_per_class: Annotated[bool, typer.Option(help="Margin loss: one β per class.")] = False,
    mining: Annotated[str, typer.Option(help="Negatives: hard, distance-weighted.")] = "hard",
    attention_weight: Annotated[float, typer.Option(help="Weight of the attention loss.")] = 1.0,
    reconstruction_weight: Annotated[float, typer.Option(help="Weight of the reconstruction loss.")] = 10.0,
    trainable: Annotated[str, typer.Option(help="all, local-head, global-head.")] = "all",
    batchnorm: Annotated[str, typer.Option(help="batch (per-worker statistics) or frozen.")] = "batch",
    sampling: Annotated[str, typer.Option(help="uniform or balanced (per class).")] = "uniform",
    images_per_class: Annotated[int, typer.Option(help="Adjacent images per class (balanced).")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    log_every: Annotated[int, typer.Option(help="Steps per metrics line.")] = 10,
    checkpoint_every: Annotated[int, typer.Option(help="Steps per checkpoint.")] = 500,
    workers: Annotated[int | None, typer.Option(help="Workers (default: one per GPU, else 1).")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option(help="Default: 1 with GPUs, else 0.")] = None,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs reserved per worker.")] = 1.0,
    decode: Annotated[
        str, typer.Option(help="threads (in each worker), tasks (Ray tasks), auto: tasks with GPUs.")
    ] = "auto",
    decode_threads: Annotated[int, typer.Option(help="Decode threads per worker (threads).")] = 4,
    decode_cpus: Annotated[float, typer.Option(help="CPUs per decode task (tasks).")] = 1.0,
    decode_chunk: Annotated[int, typer.Option(help="Images per decode task (tasks).")] = 8,
    prefetch_steps: Annotated[int, typer.Option(help="Batches decoded ahead of the step trained.")] = 2,
    max_failures: Annotated[
        int, typer.Option(help="Worker-group restarts, each from the newest checkpoint.")
    ] = 0,
    allow_local_files: AllowLocalFiles = False,
    address: Address = None,
) -> None:
    """Train DELG (or fine-tune with a metric-learning loss) on Ray Train; re-running resumes."""
    given = dict(locals())  # every option under its setting key (pipeline.settings)
    from pipeline.config import trained_preset
    from pipeline.train import TrainCluster, TrainJob

    job = settings.build(TrainJob, given, manifest_url=manifest, out_url=out)
    summary = _train_with_progress(job, settings.build(TrainCluster, given))
    table = Table(title=f"training → {storage.redact(out)}", show_header=False)
    table.add_row("steps", f"{summary.steps} (resumed at {summary.resumed_from})")
    table.add_row("final loss", "-" if summary.final_loss is None else f"{summary.final_loss:.4f}")
    table.add_row("failed rows", str(sum(summary.failed_rows.values())))
    table.add_row(
        "throughput", f"{summary.images_per_s:.2f} images/s ({summary.images} in {summary.seconds:.1f} s)"
    )
    table.add_row("weights", storage.redact(summary.weights_url))
    table.add_row("extract with", f"--preset {trained_preset(preset)}")
    stdout.print(table)


def _train_with_progress(job, cluster):
    """run_training behind the console's progress bar (loss and throughput); its summary."""
    from pipeline.train import run_training

    bar = _progress_bar("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} img/s")
    with bar:
        task = bar.add_task("train", total=None, loss=float("nan"), rate=0.0)

        def show(line):
            bar.update(
                task,
                total=line["total_steps"],
                completed=line["step"],
                loss=line["loss"],
                rate=line["images_per_s"],
            )

        return run_training(job, cluster, storage.options_from_env(), on_progress=show)


@app.command("build-index")
def build_index_command(
    descriptors: Annotated[str, typer.Argument(help="Descriptor store of the images to index.")],
    out: Annotated[str, typer.Argument(help="Index output URL (folder or s3:// prefix).")],
    factory: Annotated[
        str | None, typer.Option(help="faiss index_factory string, e.g. 'OPQ64_256,IVF65536_HNSW32,PQ64'.")
    ] = None,
    memory_budget: Annotated[
        str | None, typer.Option(help="Index size budget, e.g. 8GB; parameters are chosen to fit it.")
    ] = None,
    target_recall: Annotated[float, typer.Option(help="100-recall@100 the stored nprobe must reach.")] = 0.98,
    target_k: Annotated[int, typer.Option(help="The k of that recall.")] = 100,
    target_r1: Annotated[float, typer.Option(help="1-recall@1 the stored nprobe must reach too.")] = 0.99,
    recall_sample: Annotated[int, typer.Option(help="Queries of the recall report (a sample).")] = 1000,
    recall_queries: Annotated[
        str | None,
        typer.Option(
            help="Descriptor store of held-out queries for the recall report [default: leave-one-out stored vectors]."
        ),
    ] = None,
    max_nprobe: Annotated[int, typer.Option(help="Largest nprobe the recall report tries.")] = 1024,
    tasks: Annotated[int, typer.Option(help="Parallel Ray add tasks.")] = 4,
    task_cpus: Annotated[float, typer.Option(help="CPUs per add task.")] = 0.5,
    step_cpus: Annotated[
        float | None,
        typer.Option(help="CPUs (faiss threads) of the train and merge tasks [default: a whole node's]."),
    ] = None,
    train_gpus: Annotated[int, typer.Option(help="GPUs of the train task (faiss k-means on them).")] = 0,
    merge: Annotated[
        Literal[MERGE_MODES],
        typer.Option(
            help="Merge inverted lists in RAM, on disk (larger than RAM), or auto by size.",
        ),
    ] = "auto",
    ram_fraction: Annotated[
        float, typer.Option(help="auto merges on disk when the parts exceed this share of RAM.")
    ] = 0.5,
    refine: Annotated[
        str,
        typer.Option(
            help="Shortlist re-scoring: auto (from the budget), none, sq8, fp16 (RAM), store (disk)."
        ),
    ] = "auto",
    trained_url: Annotated[
        str | None, typer.Option(help="Reuse this trained empty index instead of training.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the training and query samples.")] = 0,
    max_points_per_centroid: Annotated[int, typer.Option(help="k-means sample per centroid.")] = 256,
    max_train_bytes: Annotated[int, typer.Option(help="Bound on the float32 training sample.")] = 8 * 2**30,
    whitening: Annotated[
        int | None,
        typer.Option(
            help="Learned PCA whitening to this many dims, fitted on the index sample (default: off)."
        ),
    ] = None,
    whitening_power: Annotated[
        float, typer.Option(help="Whitening: axes divided by eigenvalue^power (0.5 full, 0 PCA only).")
    ] = 0.5,
    keep_intermediate: Annotated[
        bool, typer.Option(help="Keep OUT/parts/ and OUT/trained.faiss after a successful build.")
    ] = False,
    address: Address = None,
) -> None:
    """Train an IVF-PQ index on a random sample, add shards in parallel on Ray, merge, and report recall.

    Without --factory, the parameters (nlist, PQ size, quantizer) are chosen from N, the dimension and
    --memory-budget, and printed with the reason. The recall report is written to OUT/quality.json.
    """
    given = dict(locals())  # every option under its setting key (pipeline.settings)
    from pipeline.index import BuildConfig, build_index

    summary = build_index(
        descriptors,
        out,
        **settings.keyword_arguments(build_index, given),
        options=storage.options_from_env(),
        ray_address=address,
        config=settings.build(BuildConfig, given),
    )
    _print_mapping(f"index → {storage.redact(out)}", summary)


@app.command("index-add")
def index_add(
    index: Annotated[str, typer.Argument(help="Index URL (from build-index).")],
    descriptors: Annotated[str, typer.Argument(help="Descriptor store whose new committed shards to add.")],
) -> None:
    """Add a store's committed shards that the index does not hold yet, without retraining."""
    from pipeline.index import add_shards, new_shards

    options = storage.options_from_env()
    summary = add_shards(index, new_shards(index, descriptors, options), options)
    _print_mapping(f"index-add → {storage.redact(index)}", summary)


@app.command("index-remove")
def index_remove(
    index: Annotated[str, typer.Argument(help="Index URL (from build-index).")],
    ids_file: Annotated[str, typer.Argument(help="Text file of image ids to remove, one per line.")],
) -> None:
    """Remove images from the index and its id map (e.g. deleted or changed images)."""
    from pipeline.index import remove_ids

    options = storage.options_from_env()
    ids = [line.strip() for line in storage.read_text(ids_file, options).splitlines() if line.strip()]
    summary = remove_ids(index, ids, options)
    _print_mapping(f"index-remove → {storage.redact(index)}", summary)


@app.command()
def search(
    index: Annotated[str, typer.Argument(help="Index URL (from build-index).")],
    queries: Annotated[str, typer.Argument(help="Descriptor store of the query images.")],
    out: Annotated[
        str, typer.Argument(help="Results URL (query_id, rank, id, score): a folder of committed parts.")
    ],
    k: Annotated[int, typer.Option("--k", help="Results per query.")] = 100,
    nprobe: Annotated[
        int | None, typer.Option(help="IVF cells visited (default: the one stored by the quality report).")
    ] = None,
    k_factor: Annotated[
        float | None, typer.Option(help="Refined shortlist size in multiples of k (default: stored one).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Queries per search call and per committed part (a killed run redoes one).")
    ] = 4096,
    shards: Annotated[
        int, typer.Option(help="Index id ranges, each held by its own workers (an index too big for one).")
    ] = 1,
    address: Address = None,
    gpus_per_worker: GpusPerWorker = 0,
    cpus_per_worker: CpusPerWorker = 1.0,
    min_workers: MinWorkers = 1,
    max_workers: MaxWorkers = None,
) -> None:
    """Batched k-NN search of every query descriptor; GPU when there is one; on Ray workers if asked."""
    given = dict(locals())  # every option under its setting key (pipeline.settings)
    from pipeline.execution import Workers
    from pipeline.index import SearchConfig
    from pipeline.index import search as search_index

    config = settings.build(SearchConfig, given)
    workers = settings.build(Workers, given)
    from pipeline.ray_runtime import every

    progress = every(PROGRESS_S, lambda p: console.print(escape(p.line())))
    summary = search_index(
        index, queries, out, config, storage.options_from_env(), workers=workers, on_progress=progress
    )
    _print_mapping(f"search → {storage.redact(out)}", summary)


@app.command()
def rerank(
    search_results: Annotated[str, typer.Argument(help="Results Parquet from `search`.")],
    query_descriptors: Annotated[str, typer.Argument(help="Descriptor store of the queries.")],
    index_descriptors: Annotated[str, typer.Argument(help="Descriptor store of the index images.")],
    out: Annotated[str, typer.Argument(help="Re-ranked results URL: a folder of committed parts.")],
    top: Annotated[int, typer.Option(help="Shortlist entries verified per query.")] = 100,
    model: Annotated[Literal[MODELS] | None, typer.Option(help="Geometric model.")] = None,
    residual_in: Annotated[
        Literal[RESIDUAL_SPACES] | None,
        typer.Option(help="Inlier threshold in query (reference) or candidate pixels."),
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="RANSAC inlier threshold in pixels.")] = None,
    trials: Annotated[int | None, typer.Option(help="RANSAC hypotheses per pair.")] = None,
    seed: Annotated[int | None, typer.Option(help="RANSAC sampling seed.")] = None,
    refit: Annotated[bool | None, typer.Option(help="Least-squares refit on the best consensus set.")] = None,
    max_distance: Annotated[float | None, typer.Option(help="Descriptor L2 distance bound.")] = None,
    ratio: Annotated[float | None, typer.Option(help="Lowe ratio test; 0 = off.")] = None,
    mutual: Annotated[bool | None, typer.Option(help="Keep only mutual nearest neighbours.")] = None,
    score: Annotated[
        Literal[SCORE_MODES] | None,
        typer.Option(
            help="inliers: (inliers, global) order; saturate: min(i,k)/k + global; "
            "shortlist: global + a boost for inlier counts standing out of the shortlist's; "
            "gate: candidates with inliers significant against the query's null move up, in global order."
        ),
    ] = None,
    min_inliers: Annotated[
        int | None, typer.Option(help="Fewer inliers = unverified (kept below verified ones).")
    ] = None,
    saturate_at: Annotated[int | None, typer.Option(help="k of the saturate score.")] = None,
    z_from: Annotated[
        float | None, typer.Option(help="shortlist score: boost starts this many spreads up.")
    ] = None,
    z_span: Annotated[
        float | None, typer.Option(help="shortlist score: full boost this many further.")
    ] = None,
    boost: Annotated[float | None, typer.Option(help="shortlist score: the full boost.")] = None,
    null_size: Annotated[
        int | None, typer.Option(help="gate score: null images per query (a fixed database sample).")
    ] = None,
    false_alarms: Annotated[
        float | None, typer.Option(help="gate score: expected false promotions per query.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: CUDA when available).")] = None,
    max_elements: Annotated[int, typer.Option(help="Bound on the elements of one tensor chunk.")] = 1 << 22,
    queries_per_batch: Annotated[int, typer.Option(help="Queries whose features are read together.")] = 16,
    keep_matches: Annotated[
        int, typer.Option(help="Inlier pairs stored for this many top hits per query (the report's).")
    ] = 3,
    method: Annotated[
        Literal[METHODS],
        typer.Option(
            help="verify (local features) | qe | dba | dba+qe | superglobal (global features), or one of "
            "the four + '+verify' (refine, then verify the refined shortlist).",
        ),
    ] = "verify",
    index: Annotated[
        str | None, typer.Option("--index", help="Index URL whose dba.parquet DBA methods read.")
    ] = None,
    qe_k: Annotated[int, typer.Option(help="α-QE: top entries averaged into the query.")] = 10,
    qe_alpha: Annotated[float, typer.Option(help="α-QE: weight = similarity^α.")] = 3.0,
    sg_m: Annotated[int, typer.Option(help="SuperGlobal: shortlist entries refined.")] = 400,
    sg_k: Annotated[int, typer.Option(help="SuperGlobal: neighbours per descriptor.")] = 9,
    sg_beta: Annotated[float, typer.Option(help="SuperGlobal: neighbour weight β.")] = 0.15,
    address: Address = None,
    gpus_per_worker: GpusPerWorker = 0,
    cpus_per_worker: CpusPerWorker = 1.0,
    min_workers: MinWorkers = 1,
    max_workers: MaxWorkers = None,
    cache_dir: Annotated[
        str | None, typer.Option(help="Node-local folder caching the index images' local features.")
    ] = None,
    queries_per_part: Annotated[
        int, typer.Option(help="Queries per committed part of OUT (a killed run redoes at most one).")
    ] = 256,
    explain: Annotated[
        str | None,
        typer.Option(
            help="Print why this query's candidates moved (global score, inliers, null level, positions) "
            "instead of re-ranking every query; nothing is written."
        ),
    ] = None,
) -> None:
    """Re-rank each shortlist: local-feature matching + batched RANSAC, global refinements, or both.

    Matching, verification and scoring default to the settings recorded in the descriptor stores (chosen
    by their preset); options given here override them.
    """
    given = dict(locals())  # every option under its setting key (pipeline.settings)
    from pipeline.ray_runtime import every
    from pipeline.rerank import RerankRun, config_from_stores
    from pipeline.rerank import rerank as rerank_stage
    from pipeline.rerank.config import overrides_from
    from pipeline.rerank.explain import explain_query
    from pipeline.rerank.global_rerank import GlobalRerankConfig

    options = storage.options_from_env()
    config = config_from_stores(query_descriptors, index_descriptors, overrides_from(given), options)
    if explain is not None:
        if method != "verify":
            raise ValueError(f"--explain shows verification's re-ranking; --method {method!r} is not it")
        args = (search_results, query_descriptors, index_descriptors, explain, config, options)
        _print_explanation(explain_query(*args))
        return
    summary = rerank_stage(
        search_results,
        query_descriptors,
        index_descriptors,
        out,
        config,
        options=options,
        method=method,
        global_config=settings.build(GlobalRerankConfig, given),
        index_url=index,
        run=settings.build(RerankRun, given),
        on_progress=every(PROGRESS_S, lambda p: console.print(escape(p.line()))),
    )
    _print_mapping(f"rerank → {storage.redact(out)}", asdict(summary))


@app.command()
def dba(
    index: Annotated[str, typer.Argument(help="Index URL (from build-index); dba.parquet is written there.")],
    descriptors: Annotated[
        list[str], typer.Argument(help="Descriptor store(s) holding the indexed images (newest last).")
    ],
    k: Annotated[int, typer.Option(help="Neighbours averaged into each index vector.")] = 10,
    alpha: Annotated[float, typer.Option(help="Weight = similarity^α.")] = 3.0,
    address: Address = None,
    gpus_per_worker: GpusPerWorker = 0,
    cpus_per_worker: CpusPerWorker = 1.0,
    min_workers: MinWorkers = 1,
    max_workers: MaxWorkers = None,
) -> None:
    """Database-side augmentation: refined vectors of every indexed image, kept beside the index (index-add,
    index-remove and reindex keep them up to date). The neighbour search runs on Ray workers if asked."""
    given = dict(locals())  # every option under its setting key (pipeline.settings)
    from pipeline.execution import Workers
    from pipeline.index.dba import build_dba

    workers = settings.build(Workers, given)
    summary = build_dba(index, descriptors, k, alpha, storage.options_from_env(), workers=workers)
    _print_mapping(f"dba → {storage.redact(index)}", summary)


@app.command()
def aggregate(
    store_url: Annotated[str, typer.Argument(metavar="STORE", help="Descriptor store with local features.")],
    out: Annotated[str, typer.Argument(help="Output store: one aggregated global vector per image.")],
    codebook: Annotated[
        str | None,
        typer.Option(
            help="An aggregated store (or its codebook.npy) whose codebook to use: the index's, for queries."
        ),
    ] = None,
    method: Annotated[str, typer.Option(help="Aggregation: vlad.")] = "vlad",
    clusters: Annotated[int, typer.Option(help="Visual words of a new codebook (K × 128 dims).")] = 64,
    power: Annotated[float, typer.Option(help="Signed power normalisation before L2 (1: none).")] = 0.5,
    sample_images: Annotated[
        int, typer.Option(help="Images whose local features train a new codebook.")
    ] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the codebook's sample and k-means.")] = 0,
) -> None:
    """Local features → one VLAD vector per image, in a new store that build-index, search and the global
    re-rankings take like any store. Aggregate the index store first (it trains the codebook), then the
    queries with --codebook INDEX_OUT. PCA whitening: build-index --whitening D."""
    from pipeline.aggregate import AggregateConfig, aggregate_store, read_codebook, train_codebook

    given, options = dict(locals()), storage.options_from_env()
    config = settings.build(AggregateConfig, given)
    words = read_codebook(codebook, options) if codebook else train_codebook(store_url, config, options)
    summary = aggregate_store(store_url, out, words, config, options)
    _print_mapping(f"aggregate → {storage.redact(out)}", asdict(summary))


@app.command()
def evaluate(
    results: Annotated[str, typer.Argument(help="Results Parquet from `search` or `rerank`.")],
    ground_truth: Annotated[str, typer.Argument(help="gnd_*.pkl (revisitop) or GLDv2 solution CSV.")],
    protocol: Annotated[Literal[PROTOCOLS], typer.Option(help="Evaluation protocol.")] = "revisitop",
    out: Annotated[str | None, typer.Option("--out", help="Write the figures as JSON (fractions).")] = None,
    landmarks: Annotated[
        str | None, typer.Option(help="id → landmark_id of index images (gldv2-recognition).")
    ] = None,
) -> None:
    """Score results: revisitop (Easy/Medium/Hard mAP, mP@k), GLDv2 retrieval mAP@100, or recognition GAP."""
    from pipeline.evaluate import evaluate as evaluate_results

    options = storage.options_from_env()
    metrics = evaluate_results(results, ground_truth, protocol, options, landmarks_url=landmarks, out_url=out)
    stdout.print(_metrics_table(metrics, f"{protocol}: {storage.redact(results)} (%)"))


def _metrics_table(metrics, title: str) -> Table:
    """One row per setting / subset, one column per figure (fractions shown as percentages)."""
    columns = list(dict.fromkeys(name for row in metrics.values() for name in row))
    table = Table(title=title)
    table.add_column("")
    for name in columns:
        table.add_column(name, justify="right")
    for row_name, row in metrics.items():
        table.add_row(row_name, *(_percent(name, row.get(name)) for name in columns))
    return table


def _percent(name: str, value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if name == "queries" else f"{100 * value:.2f}"


@app.command()
def run(
    config: Annotated[
        str, typer.Argument(help="Run config (.toml or .yaml); keys in pipeline/runconfig.py.")
    ],
) -> None:
    """The whole pipeline: extract → index → search → re-rank → evaluate → report. Resumable.

    Each stage reuses its output when complete; re-running a finished run does nothing.
    """
    from pipeline.runconfig import load_run_config

    parsed = load_run_config(config, storage.options_from_env())
    _run_and_show(parsed)


@app.command()
def report(
    config: Annotated[str, typer.Argument(help="Run config of a finished run (.toml or .yaml).")],
    out: Annotated[
        str | None, typer.Option("--out", help="Where to write the HTML (default: the run's report.html).")
    ] = None,
) -> None:
    """Render the HTML report of a run from its outputs alone: results, metrics, timings (nothing is recomputed)."""
    from pipeline.report import report_run
    from pipeline.runconfig import load_run_config

    options = storage.options_from_env()
    summary = report_run(load_run_config(config, options), options, out)
    stdout.print(f"report: {summary['report']} ({summary['queries_shown']} queries shown)")


@app.command()
def demo(
    out: Annotated[str, typer.Argument(help="Folder for the demo data and outputs.")] = "out/demo",
    views: Annotated[int, typer.Option(help="Index views per demo photo.")] = 4,
    preset: Annotated[
        str | None, typer.Option(help="Preset (default: delg-mobilenetv2-imagenet with ../shared weights).")
    ] = None,
    weights: Weights = None,
) -> None:
    """Run the pipeline on the embedded demo: photos bundled with scikit-image under synthetic viewpoint
    changes (no network). Local Ray, local files, CPU when there is no GPU."""
    from pipeline.demo import write_demo

    config = write_demo(out, views, preset, weights)
    console.print(f"demo data and config in {out}")
    _run_and_show(config)


def _run_and_show(config) -> None:
    from pipeline.run import run_pipeline

    def say(message: str) -> None:
        console.print(f"[dim]{message}[/]")

    with _StageBars() as bars:
        results = run_pipeline(config, storage.options_from_env(), say=say, show=bars.show)
    table = Table("stage", "seconds", "reused")
    for name, result in results.items():
        table.add_row(name, f"{result.seconds:.1f}", "yes" if result.reused else "")
    stdout.print(table)
    if "evaluate" in results:
        _print_mapping("metrics", results["evaluate"].summary)
    if "report" in results:
        stdout.print(f"report: {storage.join(config.out, 'report.html')}")


def _print_explanation(explanation) -> None:
    """One query's candidates in global order: scores, inliers against the null level, positions."""
    level = explanation.level
    gated = not math.isnan(level)
    shown = "—" if not gated else ("∞ (too few null images)" if math.isinf(level) else f"{level:.1f}")
    null = sorted(explanation.null_inliers.tolist())
    title = f"rerank --explain {explanation.query_id}: score {explanation.score}, null level {shown}" + (
        f" (null: {len(null)} images, median {statistics.median(null):g} inliers)" if null else ""
    )
    columns = ("global rank", "id", "global score", "inliers", "null level", "vs level", "final rank")
    table = Table(*columns, title=title)
    for c in explanation.candidates:
        verdict = "—" if c.inliers < 0 or not gated else ("above" if c.inliers > level else "below")
        inliers = "not verified" if c.inliers < 0 else str(c.inliers)
        table.add_row(str(c.global_rank), c.id, f"{c.global_score:.4f}", inliers, shown, verdict, str(c.rank))
    stdout.print(table)
    if not explanation.query_has_features:
        console.print("the query has no local features in its store: nothing was verified")


def _print_mapping(title: str, values) -> None:
    table = Table(title=title, show_header=False)
    for key, value in values.items():
        table.add_row(
            str(key), json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
        )
    stdout.print(table)


@app.command("convert-weights")
def convert_weights_command(
    src: Annotated[
        str,
        typer.Argument(
            help="Released DELG SavedModel (TF1 or TF2), its variables/, or a TF checkpoint prefix."
        ),
    ],
    out: Annotated[str, typer.Argument(help="Where to write the PyTorch state dict (.pt; any storage URL).")],
    preset: Annotated[
        str | None,
        typer.Option(
            help="Preset the weights are for [default: the one of the file's layout, e.g. delg-r50-gldv2]."
        ),
    ] = None,
    verify: Annotated[
        str | None,
        typer.Option(
            "--verify",
            help="Image: extract it with the SavedModel's own graph and the converted weights, compare.",
        ),
    ] = None,
    detect: Annotated[
        bool,
        typer.Option(
            "--detect",
            help="With --verify: try the head variants (attention input, autoencoder activation), keep the one "
            "that reproduces the SavedModel.",
        ),
    ] = False,
    min_matched: Annotated[
        float, typer.Option(help="--verify: share of reference keypoints the conversion must reproduce.")
    ] = 0.99,
) -> None:
    """Convert released DELG weights (TF1 or TF2 SavedModel, or checkpoint) into a state dict for a preset.

    1. Download and unpack a released model (r50delg_gldv2clean_20200914.tar.gz or
    r101delg_gldv2clean_20200914.tar.gz, linked from the tensorflow/models research/delf README).

    2. landmark-index convert-weights SAVED_MODEL delg-r50.pt --verify photo.jpg: the preset follows the
    file's layout (tf-slim resnet_v1_50 → delg-r50-gldv2, resnet_v1_101 → delg-r101-gldv2). --verify runs
    the SavedModel's own graph and the converted extractor on the image and exits 1 when their features
    differ beyond tolerance; --detect tries the head variants and reports the one that matches.

    3. landmark-index extract MANIFEST OUT --preset delg-r50-gldv2 --weights delg-r50.pt

    Needs TensorFlow: pip install 'landmark-index\\[convert]'.
    """
    from pipeline.config import get_preset
    from pipeline.convert import convert_weights, detect_variant, variant_label, verify_conversion

    if detect and verify is None:
        raise ValueError("--detect needs --verify IMAGE: the variants are judged on that image")
    options = storage.options_from_env()
    conversion = convert_weights(src, out, get_preset(preset) if preset else None, options)
    summary = {k: v for k, v in asdict(conversion).items() if k != "config"}
    _print_mapping(f"{src} → {conversion.out}", summary | {"ignored": len(conversion.ignored)})
    if verify is None:
        return
    config = conversion.config
    if detect:
        found, comparisons = detect_variant(src, out, verify, config, options)
        for label, comparison in comparisons.items():
            _print_mapping(f"SavedModel vs converted ({label}) on {verify}", asdict(comparison))
        if found is None:
            console.print("[bold red]no variant reproduces the SavedModel[/]")
            raise SystemExit(1)
        stdout.print(f"detected: {variant_label(found)}" + ("" if found == config else " (not the preset's)"))
        return
    comparison = verify_conversion(src, out, verify, config, options)
    _print_mapping(f"SavedModel vs converted on {verify}", asdict(comparison))
    if not comparison.passes(min_matched=min_matched):
        console.print(
            "[bold red]verification failed:[/] the converted model's features differ beyond tolerance"
        )
        raise SystemExit(1)


@app.command()
def reindex(
    manifest: Annotated[
        str, typer.Argument(help="The current manifest (new, changed and deleted rows are found).")
    ],
    root: Annotated[
        str, typer.Argument(help="Root of the versioned index (LATEST, versions/, descriptors/).")
    ],
    preset: Preset = "delg-r50-gldv2",
    weights: Weights = None,
    keep: Annotated[int, typer.Option(help="Published versions kept, the live one included.")] = 3,
    retrain_threshold: Annotated[
        float, typer.Option(help="Retrain from scratch when (new + changed) / live vectors exceeds this.")
    ] = 0.2,
    factory: Annotated[str | None, typer.Option(help="faiss index_factory string for a retrain.")] = None,
    memory_budget: Annotated[
        str | None, typer.Option(help="Index size budget for a retrain, e.g. 16GB.")
    ] = None,
    shard_size: Annotated[int, typer.Option(help="Manifest rows per descriptor shard.")] = 1000,
    local_dtype: Annotated[
        Literal[LOCAL_DTYPES], typer.Option(help="Local descriptor encoding.")
    ] = "float16",
    global_dtype: Annotated[
        Literal[GLOBAL_DTYPES], typer.Option(help="Global descriptor encoding.")
    ] = "float16",
    lease_seconds: Annotated[float, typer.Option(help="Lock lease, renewed as the run goes on.")] = 6
    * 3600.0,
    dba: Annotated[
        bool, typer.Option(help="Keep DBA vectors beside every version (re-rank --method dba...).")
    ] = False,
    dba_k: Annotated[int, typer.Option(help="DBA neighbours (a fresh DBA file).")] = 10,
    dba_alpha: Annotated[float, typer.Option(help="DBA weight exponent.")] = 3.0,
    address: Address = None,
    image_root: ImageRoot = None,
    allow_local_files: AllowLocalFiles = False,
    gpus_per_extractor: GpusPerExtractor = 0,
    min_extractors: MinExtractors = 1,
    max_extractors: MaxExtractors = None,
    extractor_wait_timeout: ExtractorWaitTimeout = 1800.0,
    gpus_per_worker: GpusPerWorker = 0,
    cpus_per_worker: CpusPerWorker = 1.0,
    min_workers: MinWorkers = 1,
    max_workers: MaxWorkers = None,
) -> None:
    """Incremental re-index: extract only new and changed images, update the live index without retraining
    (or retrain past the threshold), publish a new version atomically (LATEST), keep the last N versions.

    Idempotent and resumable; a lock with a lease in the same storage keeps two runs apart (exit code 3).
    """
    given = dict(locals())  # every option under its setting key (pipeline.settings)
    from pipeline.lease import LockHeldError
    from pipeline.reindex import ReindexConfig
    from pipeline.reindex import reindex as run_reindex

    config = settings.build(ReindexConfig, given)
    try:
        report = run_reindex(manifest, root, config, storage.options_from_env(), ray_address=address)
    except LockHeldError as exc:
        console.print(f"[bold red]refused:[/] {exc}")
        raise SystemExit(3) from None
    summary = report.to_dict()
    summary.pop("error_records", None)  # counts are in the table; records are in the version's report.json
    _print_mapping(f"reindex → {storage.redact(root)}", summary)


@app.command()
def query(
    photos: Annotated[list[str], typer.Argument(help="Photos: local files or URLs (http(s), s3, gs, ...).")],
    index: Annotated[
        str, typer.Option("--index", help="Versioned root (its LATEST is read) or an index folder.")
    ],
    k: Annotated[int, typer.Option("--k", help="Results per photo.")] = 10,
    rerank: Annotated[bool, typer.Option(help="Verify the shortlist geometrically.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per photo.")] = False,
    stores: Annotated[
        list[str] | None,
        typer.Option("--stores", help="Index descriptor stores (default: the version's, or a run's)."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Load the recorded weights from here (their checksum must match)."),
    ] = None,
) -> None:
    """Where is this photo? Extract, search and re-rank one or more photos on a built index, with the preset,
    weights and settings recorded with it."""
    from pipeline.query import query_photos

    answers = query_photos(photos, index, k, rerank, storage.options_from_env(), stores, weights)
    for found in answers:
        if as_json:
            print(json.dumps(found))
        elif "error" in found:
            console.print(f"[bold red]{escape(found['photo'])}:[/] {escape(found['message'])}")
        else:
            table = Table(
                "rank", "id", "score", "inliers", title=f"{found['photo']} ({found['index_version']})"
            )
            for rank, hit in enumerate(found["results"], 1):
                inliers = "" if hit["inliers"] is None else str(hit["inliers"])
                table.add_row(str(rank), hit["id"], f"{hit['score']:.4f}", inliers)
            stdout.print(table)
    if any("error" in found for found in answers):
        raise SystemExit(EXIT_USER_ERROR)


@app.command()
def serve(
    index: Annotated[
        str,
        typer.Option("--index", help="Versioned root (LATEST is followed as it moves) or an index folder."),
    ],
    host: Annotated[str, typer.Option(help="Address the HTTP server listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    address: Address = None,
    poll_s: Annotated[float, typer.Option(help="Seconds between checks for a new LATEST.")] = 10.0,
    max_upload_bytes: Annotated[int, typer.Option(help="Largest request body (413 above).")] = 20 * 2**20,
    max_pixels: Annotated[int, typer.Option(help="Largest image in pixels (413 above).")] = 64 * 2**20,
    max_k: Annotated[int, typer.Option(help="Most results a request may ask for.")] = 100,
    allow_urls: Annotated[
        bool, typer.Option(help="Let a JSON request name an http(s)/s3/gs image URL the server fetches.")
    ] = False,
    allow_local_files: Annotated[
        bool, typer.Option("--allow-local-files", help="Let a JSON request name a file on the server.")
    ] = False,
    max_in_flight: Annotated[int, typer.Option(help="Requests per gateway replica; beyond: 503.")] = 64,
    retry_after_s: Annotated[int, typer.Option(help="Retry-After of a 503, in seconds.")] = 1,
    extractor_cpus: Annotated[float, typer.Option(help="CPUs per extraction replica.")] = 1.0,
    extractor_threads: Annotated[
        int | None, typer.Option(help="Torch threads of a CPU extraction replica (default: its CPUs).")
    ] = None,
    extractor_gpus: Annotated[
        float | None, typer.Option(help="GPUs per extraction replica (default: 1 when the cluster has GPUs).")
    ] = None,
    backend_cpus: Annotated[float, typer.Option(help="CPUs per search and per verification replica.")] = 0.5,
    max_extractors: Annotated[int, typer.Option(help="Autoscaling ceiling of extraction replicas.")] = 4,
    max_searchers: Annotated[int, typer.Option(help="Autoscaling ceiling of search replicas.")] = 2,
    max_verifiers: Annotated[int, typer.Option(help="Autoscaling ceiling of verification replicas.")] = 4,
    max_gateways: Annotated[int, typer.Option(help="Autoscaling ceiling of gateway replicas.")] = 2,
) -> None:
    """The query service on Ray Serve: POST /v1/search with a photo, GET / for the search page.

    Extraction, search and verification run as separate autoscaled deployments; a new LATEST is loaded in
    the background and served once every deployment has it. Stops on Ctrl-C.
    """
    given = dict(locals())  # every option under its setting key (pipeline.settings)
    import ray
    from ray import serve as ray_serve

    from pipeline.serve.app import build_app
    from pipeline.serve.settings import ServeSettings

    config = settings.build(ServeSettings, given)
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    ray_serve.start(http_options={"host": host, "port": port})
    ray_serve.run(build_app(config), name="landmark-index", route_prefix="/")
    console.print(f"serving {storage.redact(index)} on http://{host}:{port}/ (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray_serve.shutdown()


@app.command()
def latest(root: Annotated[str, typer.Argument(help="Root of a versioned index (from reindex).")]) -> None:
    """Print the URL of the live index version (what searches should use)."""
    from pipeline.versions import resolve_latest

    stdout.print(resolve_latest(root, storage.options_from_env()))


@app.command()
def stats(
    store_url: Annotated[str, typer.Argument(help="Descriptor store URL.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as one JSON object.")] = False,
) -> None:
    """Counts of a descriptor store: shards, rows, ok, errors by reason."""
    from pipeline.store import store_stats

    counts = store_stats(store_url, storage.options_from_env())
    if as_json:
        print(json.dumps(counts, sort_keys=True))
    else:
        _print_mapping(f"store {storage.redact(store_url)}", counts)


@app.command("migrate-store")
def migrate_store_command(
    store_url: Annotated[str, typer.Argument(help="Descriptor store URL written before local indexes.")],
) -> None:
    """Rewrite a store's local shards in the per-image layout, with their local indexes (resumable: run again
    after a kill; a migrated store is left as it is)."""
    from pipeline.store import migrate_store

    summary = migrate_store(store_url, storage.options_from_env())
    stdout.print(
        f"{storage.redact(store_url)}: {summary.migrated} of {summary.shards} local shards migrated "
        f"({summary.shards - summary.migrated} already per-image)"
    )


if __name__ == "__main__":
    main()
