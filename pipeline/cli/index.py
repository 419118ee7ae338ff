"""Commands that build, change and search an index: build-index, index-add, index-remove, search, dba,
aggregate."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
from rich.markup import escape

from pipeline import settings, storage
from pipeline.cli.app import app, console
from pipeline.cli.display import PROGRESS_S, print_mapping
from pipeline.cli.options import Address, given, settings_command

WORKERS = "pipeline.execution:Workers"  # the Ray workers of a distributed search / neighbour search


@app.command(
    "build-index",
    cls=settings_command(
        "pipeline.index:build_index",
        "pipeline.index:BuildConfig",
        # options: from the environment; ray_address: --address; config: the BuildConfig options; k_factors
        # is a list (run config [index] k_factors, jobs' --k-factors 1,2,4); in_process: small builds and tests
        exclude={"options", "ray_address", "config", "k_factors", "in_process"},
    ),
)
def build_index_command(
    ctx: typer.Context,
    descriptors: Annotated[str, typer.Argument(help="Descriptor store of the images to index.")],
    out: Annotated[str, typer.Argument(help="Index output URL (folder or s3:// prefix).")],
    address: Address = None,
) -> None:
    """Train an IVF-PQ index on a random sample, add shards in parallel on Ray, merge, and report recall.

    Without --factory, the parameters (nlist, PQ size, quantizer) are chosen from N, the dimension and
    --memory-budget, and printed with the reason. The recall report is written to OUT/quality.json.
    """
    from pipeline.index import BuildConfig, build_index

    values = given(ctx)
    summary = build_index(
        descriptors,
        out,
        **settings.keyword_arguments(build_index, values),
        options=storage.options_from_env(),
        ray_address=address,
        config=settings.build(BuildConfig, values),
    )
    print_mapping(f"index → {storage.redact(out)}", summary.to_dict())


@app.command("index-add")
def index_add(
    index: Annotated[str, typer.Argument(help="Index URL (from build-index).")],
    descriptors: Annotated[str, typer.Argument(help="Descriptor store whose new committed shards to add.")],
) -> None:
    """Add a store's committed shards that the index does not hold yet, without retraining."""
    from pipeline.index import add_shards, new_shards

    options = storage.options_from_env()
    summary = add_shards(index, new_shards(index, descriptors, options), options)
    print_mapping(f"index-add → {storage.redact(index)}", asdict(summary))


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
    print_mapping(f"index-remove → {storage.redact(index)}", asdict(summary))


@app.command(cls=settings_command("pipeline.index:SearchConfig", WORKERS))
def search(
    ctx: typer.Context,
    index: Annotated[str, typer.Argument(help="Index URL (from build-index).")],
    queries: Annotated[str, typer.Argument(help="Descriptor store of the query images.")],
    out: Annotated[
        str, typer.Argument(help="Results URL (query_id, rank, id, score): a folder of committed parts.")
    ],
) -> None:
    """Batched k-NN search of every query descriptor; GPU when there is one; on Ray workers if asked."""
    from pipeline.execution import Workers
    from pipeline.index import SearchConfig
    from pipeline.index import search as search_index
    from pipeline.ray_runtime import every

    values = given(ctx)
    config, workers = settings.build(SearchConfig, values), settings.build(Workers, values)
    progress = every(PROGRESS_S, lambda p: console.print(escape(p.line())))
    summary = search_index(
        index, queries, out, config, storage.options_from_env(), workers=workers, on_progress=progress
    )
    print_mapping(f"search → {storage.redact(out)}", asdict(summary))


@app.command(cls=settings_command(WORKERS))
def dba(
    ctx: typer.Context,
    index: Annotated[str, typer.Argument(help="Index URL (from build-index); dba.parquet is written there.")],
    descriptors: Annotated[
        list[str], typer.Argument(help="Descriptor store(s) holding the indexed images (newest last).")
    ],
    k: Annotated[int, typer.Option(help="Neighbours averaged into each index vector.")] = 10,
    alpha: Annotated[float, typer.Option(help="Weight = similarity^α.")] = 3.0,
) -> None:
    """Database-side augmentation: refined vectors of every indexed image, kept beside the index (index-add,
    index-remove and reindex keep them up to date). The neighbour search runs on Ray workers if asked."""
    from pipeline.execution import Workers
    from pipeline.index.dba import build_dba

    workers = settings.build(Workers, given(ctx))
    summary = build_dba(index, descriptors, k, alpha, storage.options_from_env(), workers=workers)
    print_mapping(f"dba → {storage.redact(index)}", asdict(summary))


@app.command(cls=settings_command("pipeline.aggregate:AggregateConfig"))
def aggregate(
    ctx: typer.Context,
    store_url: Annotated[str, typer.Argument(metavar="STORE", help="Descriptor store with local features.")],
    out: Annotated[str, typer.Argument(help="Output store: one aggregated global vector per image.")],
    codebook: Annotated[
        str | None,
        typer.Option(
            help="An aggregated store (or its codebook.npy) whose codebook to use: the index's, for queries."
        ),
    ] = None,
) -> None:
    """Local features → one VLAD vector per image, in a new store that build-index, search and the global
    re-rankings take like any store. Aggregate the index store first (it trains the codebook), then the
    queries with --codebook INDEX_OUT. PCA whitening: build-index --whitening D."""
    from pipeline.aggregate import AggregateConfig, aggregate_store, read_codebook, train_codebook

    options = storage.options_from_env()
    config = settings.build(AggregateConfig, given(ctx))
    words = read_codebook(codebook, options) if codebook else train_codebook(store_url, config, options)
    summary = aggregate_store(store_url, out, words, config, options)
    print_mapping(f"aggregate → {storage.redact(out)}", asdict(summary))
