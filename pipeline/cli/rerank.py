"""Commands that re-rank and score results: rerank, evaluate."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Annotated, Literal

import typer
from rich.markup import escape

from pipeline import settings, storage
from pipeline.choices import PROTOCOLS
from pipeline.cli.app import app, console, stdout
from pipeline.cli.display import PROGRESS_S, metrics_table, print_explanation, print_mapping
from pipeline.cli.options import given, settings_command
from pipeline.errors import ConfigError
from pipeline.rerank.config import EXECUTION, METHODS, RerankConfig

# What a store records with its local features (chosen by its preset): unset unless given here.
RECORDED = {f"RerankConfig.{f.name}" for f in fields(RerankConfig) if f.name not in EXECUTION}


@app.command(
    cls=settings_command(
        "pipeline.rerank:RerankConfig",
        "pipeline.rerank.global_rerank:GlobalRerankConfig",
        "pipeline.rerank:RerankRun",
        # dba_k / dba_alpha shape the DBA vectors, which `dba --k --alpha` builds (rerank only reads them)
        exclude={"dba_k", "dba_alpha"},
        unset=RECORDED,
    )
)
def rerank(
    ctx: typer.Context,
    search_results: Annotated[str, typer.Argument(help="Results Parquet from `search`.")],
    query_descriptors: Annotated[str, typer.Argument(help="Descriptor store of the queries.")],
    index_descriptors: Annotated[str, typer.Argument(help="Descriptor store of the index images.")],
    out: Annotated[str, typer.Argument(help="Re-ranked results URL: a folder of committed parts.")],
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
    from pipeline.ray_runtime import every
    from pipeline.rerank import RerankRun, config_from_stores
    from pipeline.rerank import rerank as rerank_stage
    from pipeline.rerank.config import overrides_from
    from pipeline.rerank.explain import explain_query
    from pipeline.rerank.global_rerank import GlobalRerankConfig

    values, options = given(ctx), storage.options_from_env()
    config = config_from_stores(query_descriptors, index_descriptors, overrides_from(values), options)
    if explain is not None:
        if method != "verify":
            raise ConfigError(f"--explain shows verification's re-ranking; --method {method!r} is not it")
        args = (search_results, query_descriptors, index_descriptors, explain, config, options)
        print_explanation(explain_query(*args))
        return
    summary = rerank_stage(
        search_results,
        query_descriptors,
        index_descriptors,
        out,
        config,
        options=options,
        method=method,
        global_config=settings.build(GlobalRerankConfig, values),
        index_url=index,
        run=settings.build(RerankRun, values),
        on_progress=every(PROGRESS_S, lambda p: console.print(escape(p.line()))),
    )
    print_mapping(f"rerank → {storage.redact(out)}", asdict(summary))


@app.command(cls=settings_command("pipeline.evaluate:evaluate", exclude={"options"}))
def evaluate(
    ctx: typer.Context,
    results: Annotated[str, typer.Argument(help="Results Parquet from `search` or `rerank`.")],
    ground_truth: Annotated[str, typer.Argument(help="gnd_*.pkl (revisitop) or GLDv2 solution CSV.")],
    protocol: Annotated[Literal[PROTOCOLS], typer.Option(help="Evaluation protocol.")] = "revisitop",
) -> None:
    """Score results: revisitop (Easy/Medium/Hard mAP, mP@k), GLDv2 retrieval mAP@100, or recognition GAP."""
    from pipeline.evaluate import evaluate as evaluate_results

    options, chosen = storage.options_from_env(), settings.keyword_arguments(evaluate_results, given(ctx))
    metrics = evaluate_results(results, ground_truth, protocol, options, **chosen)
    stdout.print(metrics_table(metrics.figures, f"{protocol}: {storage.redact(results)} (%)"))
