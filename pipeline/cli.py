"""The `landmark-index` command line: thin shells that parse arguments and call the library stages.

Storage credentials never go on the command line: they come from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...) or from LANDMARK_INDEX_STORAGE_OPTIONS (JSON fsspec options).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pipeline import storage

app = typer.Typer(
    help="Distributed batch indexing for landmark image retrieval: DELG extraction on Ray, FAISS IVF-PQ "
    "indexing, geometric re-ranking, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)

Preset = Annotated[str, typer.Option("--preset", help="Extraction preset (see `landmark-index presets`).")]
Weights = Annotated[
    str | None, typer.Option("--weights", help="Model state dict URL (local path, s3://, https://).")
]
Address = Annotated[
    str | None, typer.Option("--address", help="Ray cluster address; default: start a local Ray.")
]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code=2)


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
    Console().print(table)


@app.command()
def extract(
    manifest: Annotated[
        str, typer.Argument(help="Parquet/CSV manifest (file, folder, glob) or a folder of images.")
    ],
    out: Annotated[str, typer.Argument(help="Descriptor store URL (local folder or s3://bucket/prefix).")],
    preset: Preset = "cpu-small",
    weights: Weights = None,
    address: Address = None,
    shard_size: Annotated[int, typer.Option(help="Manifest rows per descriptor shard.")] = 1000,
    local_dtype: Annotated[
        str, typer.Option(help="Local descriptor encoding: float16, int8, float32.")
    ] = "float16",
    global_dtype: Annotated[
        str, typer.Option(help="Global descriptor encoding: float16, float32.")
    ] = "float16",
    num_extractors: Annotated[
        int | None, typer.Option(help="Extractor actors (default: one per GPU, else one).")
    ] = None,
    chunk_size: Annotated[int, typer.Option(help="Images per decode task and extractor call.")] = 16,
) -> None:
    """Extract DELG descriptors for every manifest row into a sharded descriptor store (resumable).

    Re-running the same command resumes: committed shards are kept, the rest is extracted.
    """
    from pipeline.config import get_preset
    from pipeline.distributed import ClusterOptions, ExtractionJob, run_extraction
    from pipeline.store import StoreSettings

    try:
        job = ExtractionJob(
            manifest_url=manifest,
            out_url=out,
            config=get_preset(preset),
            weights_url=weights,
            store=StoreSettings(global_dtype=global_dtype, local_dtype=local_dtype),
            shard_size=shard_size,
        )
        cluster = ClusterOptions(address=address, num_extractors=num_extractors, chunk_size=chunk_size)
        options = storage.options_from_env()
    except ValueError as exc:
        raise _fail(exc) from None
    with _progress_bar() as bar:
        task = bar.add_task("extract", total=None, errors=0, rate=0.0)

        def show(p):
            bar.update(
                task,
                total=p.total_rows,
                completed=p.skipped_rows + p.done_rows,
                errors=p.errors,
                rate=p.images_per_s,
            )

        try:
            summary = run_extraction(job, cluster, options, on_progress=show)
        except ValueError as exc:
            raise _fail(exc) from None
    _print_summary(summary, out)


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} img/s"),
        TextColumn("errors {task.fields[errors]}"),
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
    table.add_row(
        "throughput",
        f"{summary.images_per_s:.2f} images/s ({summary.rows_this_run} in {summary.seconds:.1f} s)",
    )
    Console().print(table)


@app.command()
def stats(store_url: Annotated[str, typer.Argument(help="Descriptor store URL.")]) -> None:
    """Counts of a descriptor store: shards, rows, ok, errors by reason."""
    from pipeline.store import store_stats

    result = store_stats(store_url, storage.options_from_env())
    table = Table(show_header=False)
    for key, value in result.items():
        table.add_row(key, str(value))
    Console().print(table)


if __name__ == "__main__":
    app()
