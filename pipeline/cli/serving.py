"""Commands that answer photos on a built index: query (one-off), serve (the Ray Serve service)."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from pipeline import settings, storage
from pipeline.boundary import EXIT_USER_ERROR
from pipeline.cli.app import app, console, stdout
from pipeline.cli.options import Address, given, settings_command


@app.command()
def query(
    photos: Annotated[list[str], typer.Argument(help="Photos: local files or URLs (http(s), s3, gs, ...).")],
    index: Annotated[
        str,
        typer.Option(
            "--index", help="Versioned root (its LATEST is read), a `run` folder, or an index folder."
        ),
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
            title = escape(f"{found['photo']} ({found['index_version']})")  # names are text, not markup
            table = Table("rank", "id", "score", "inliers", title=title)
            for rank, hit in enumerate(found["results"], 1):
                inliers = "" if hit["inliers"] is None else str(hit["inliers"])
                table.add_row(str(rank), escape(hit["id"]), f"{hit['score']:.4f}", inliers)
            stdout.print(table)
    if any("error" in found for found in answers):
        raise SystemExit(EXIT_USER_ERROR)


@app.command(cls=settings_command("pipeline.serve.settings:ServeSettings"))
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address the HTTP server listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    address: Address = None,
) -> None:
    """The query service on Ray Serve: POST /v1/search with a photo, GET / for the search page.

    Extraction, search and verification run as separate autoscaled deployments; a new LATEST is loaded in
    the background and served once every deployment has it. Stops on Ctrl-C.
    """
    import ray
    from ray import serve as ray_serve

    from pipeline.serve.app import build_app
    from pipeline.serve.settings import ServeSettings

    config = settings.build(ServeSettings, given(ctx))
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    ray_serve.start(http_options={"host": host, "port": port})
    ray_serve.run(build_app(config), name="landmark-index", route_prefix="/")
    console.print(f"serving {storage.redact(config.index)} on http://{host}:{port}/ (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray_serve.shutdown()
