"""Commands that run the whole pipeline or keep an index current: run, report, demo, reindex, latest."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from pipeline import settings, settings_help, storage
from pipeline.cli.app import app, console, stdout
from pipeline.cli.display import StageBars, print_mapping
from pipeline.cli.options import Address, Preset, given, settings_command
from pipeline.cli.stores import DEFAULT_PRESET


@app.command()
def run(
    config: Annotated[
        str, typer.Argument(help="Run config (.toml or .yaml); keys in docs/configuration.md.")
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
    stdout.print(f"report: {summary.report} ({summary.queries_shown} queries shown)")


@app.command()
def demo(
    out: Annotated[str, typer.Argument(help="Folder for the demo data and outputs.")] = "out/demo",
    views: Annotated[int, typer.Option(help="Index views per demo photo.")] = 4,
    preset: Annotated[
        str | None, typer.Option(help="Preset (default: delg-mobilenetv2-imagenet with ../shared weights).")
    ] = None,
    weights: Annotated[str | None, typer.Option("--weights", help=settings_help.HELP["weights"])] = None,
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

    with StageBars() as bars:
        results = run_pipeline(config, storage.options_from_env(), say=say, show=bars.show)
    table = Table("stage", "seconds", "reused")
    for name, result in results.items():
        table.add_row(name, f"{result.seconds:.1f}", "yes" if result.reused else "")
    stdout.print(table)
    if "evaluate" in results:
        print_mapping("metrics", results["evaluate"].summary)
    if "report" in results:
        stdout.print(f"report: {storage.join(config.out, 'report.html')}")


# build: the index settings of a retrain keep BuildConfig's defaults on the nightly path (the run config,
# build-index and jobs/nightly_reindex.py offer them); row_group_size: the store default
@app.command(
    cls=settings_command("pipeline.reindex:ReindexConfig", exclude={"preset", "build", "row_group_size"})
)
def reindex(
    ctx: typer.Context,
    manifest: Annotated[
        str, typer.Argument(help="The current manifest (new, changed and deleted rows are found).")
    ],
    root: Annotated[
        str, typer.Argument(help="Root of the versioned index (LATEST, versions/, descriptors/).")
    ],
    preset: Preset = DEFAULT_PRESET,
    address: Address = None,
) -> None:
    """Incremental re-index: extract only new and changed images, update the live index without retraining
    (or retrain past the threshold), publish a new version atomically (LATEST), keep the last N versions.

    Idempotent and resumable; a lock with a lease in the same storage keeps two runs apart (exit code 3).
    """
    from pipeline.lease import LockHeldError
    from pipeline.reindex import ReindexConfig
    from pipeline.reindex import reindex as run_reindex

    config = settings.build(ReindexConfig, given(ctx), preset=preset)
    try:
        report = run_reindex(manifest, root, config, storage.options_from_env(), ray_address=address)
    except LockHeldError as exc:
        console.print(f"[bold red]refused:[/] {exc}")
        raise SystemExit(3) from None
    summary = report.to_dict()
    summary.pop("error_records", None)  # counts are in the table; records are in the version's report.json
    print_mapping(f"reindex → {storage.redact(root)}", summary)


@app.command()
def latest(root: Annotated[str, typer.Argument(help="Root of a versioned index (from reindex).")]) -> None:
    """Print the URL of the live index version (what searches should use)."""
    from pipeline.versions import resolve_latest

    stdout.print(resolve_latest(root, storage.options_from_env()))
