"""Commands that write or inspect descriptor stores and weights: presets, extract, train, convert-weights,
stats, migrate-store."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from pipeline import settings, storage
from pipeline.cli.app import app, console, stdout
from pipeline.cli.display import StageBars, print_mapping, progress_bar
from pipeline.cli.options import Preset, given, settings_command
from pipeline.errors import ConfigError

DEFAULT_PRESET = "delg-r50-gldv2"


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


@app.command(
    cls=settings_command(
        "pipeline.extraction:ExtractionJob",
        "pipeline.extraction:ClusterOptions",
        exclude={"manifest_url", "out_url", "config", *settings.GUARDS},
    )
)
def extract(
    ctx: typer.Context,
    manifest: Annotated[
        str, typer.Argument(help="Parquet/CSV manifest (file, folder, glob) or a folder of images.")
    ],
    out: Annotated[str, typer.Argument(help="Descriptor store URL (local folder or s3://bucket/prefix).")],
    preset: Preset = DEFAULT_PRESET,
) -> None:
    """Extract DELG descriptors for every manifest row into a sharded descriptor store (resumable).

    Re-running the same command resumes: committed shards are kept, the rest is extracted.
    """
    from pipeline.config import get_preset
    from pipeline.extraction import ClusterOptions, ExtractionJob, run_extraction
    from pipeline.run import extraction_progress

    values = given(ctx)
    job = settings.build(ExtractionJob, values, manifest_url=manifest, out_url=out, config=get_preset(preset))
    cluster = settings.build(ClusterOptions, values)
    with StageBars() as bars:
        show = lambda p: bars.show(extraction_progress("extract", p))  # noqa: E731
        summary = run_extraction(job, cluster, storage.options_from_env(), on_progress=show)
    _print_extraction(summary, out)


def _print_extraction(summary, out: str) -> None:
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


@app.command(
    cls=settings_command(
        "pipeline.train:TrainJob",
        "pipeline.train:TrainCluster",
        # arcface_scale is the reference's fixed √2048 (jobs/train.py offers it); crash_after_step is the
        # resume tests' fault injection
        exclude={"manifest_url", "out_url", "preset", "arcface_scale", "crash_after_step", *settings.GUARDS},
    )
)
def train(
    ctx: typer.Context,
    manifest: Annotated[str, typer.Argument(help="Labelled manifest (landmark_id on every row).")],
    out: Annotated[str, typer.Argument(help="Output URL: weights.pt, metrics.jsonl, checkpoints/.")],
    preset: Preset = DEFAULT_PRESET,
) -> None:
    """Train DELG (or fine-tune with a metric-learning loss) on Ray Train; re-running resumes."""
    from pipeline.config import trained_preset
    from pipeline.train import TrainCluster, TrainJob

    values = given(ctx)
    job = settings.build(TrainJob, values, manifest_url=manifest, out_url=out, preset=preset)
    summary = _train_with_progress(job, settings.build(TrainCluster, values))
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

    bar = progress_bar("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} img/s")
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
    differ beyond tolerance; --detect tries the head variants and reports the one that matches. The head
    variant (the preset's, or the one detected) is recorded beside the weights (delg-r50.pt.model.json).

    3. landmark-index extract MANIFEST OUT --preset delg-r50-gldv2 --weights delg-r50.pt: extraction
    applies the recorded head variant and the file's learned GeM exponent, and records both in _run.json.

    Needs TensorFlow: pip install 'landmark-index\\[convert]'.
    """
    from pipeline.config import get_preset
    from pipeline.convert import convert_weights
    from pipeline.model.weights import model_settings_url

    if detect and verify is None:
        raise ConfigError("--detect needs --verify IMAGE: the variants are judged on that image")
    options = storage.options_from_env()
    conversion = convert_weights(src, out, get_preset(preset) if preset else None, options)
    summary = {k: v for k, v in asdict(conversion).items() if k != "config"}
    recorded = {"ignored": len(conversion.ignored), "model settings": model_settings_url(conversion.out)}
    print_mapping(f"{src} → {conversion.out}", summary | recorded)
    if verify is None:
        return
    if detect:
        _detect_or_exit(src, out, conversion, verify, options)
    else:
        _verify_or_exit(src, out, conversion, verify, min_matched, options)


def _detect_or_exit(src: str, out: str, conversion, image: str, options: storage.Options) -> None:
    """--detect: every head variant against the SavedModel on ``image``; print the one that reproduces it
    (recorded beside the weights) and how to extract with it, or exit 1."""
    from pipeline.config import preset_name
    from pipeline.convert import detect_variant, variant_label
    from pipeline.model.weights import model_settings_url

    config = conversion.config
    found, comparisons = detect_variant(src, out, image, config, options)
    for label, comparison in comparisons.items():
        print_mapping(f"SavedModel vs converted ({label}) on {image}", asdict(comparison))
    if found is None:
        console.print("[bold red]no variant reproduces the SavedModel[/]")
        raise SystemExit(1)
    stdout.print(f"detected: {variant_label(found)}" + ("" if found == config else " (not the preset's)"))
    stdout.print(
        f"recorded in {model_settings_url(conversion.out)}; extraction with these weights applies it:\n"
        f"  landmark-index extract MANIFEST OUT --preset {preset_name(config)} --weights {conversion.out}\n"
        f"  (run config: [extract] preset = {preset_name(config)!r}, weights = {conversion.out!r})"
    )


def _verify_or_exit(
    src: str, out: str, conversion, image: str, min_matched: float, options: storage.Options
) -> None:
    """--verify: the SavedModel and the converted weights on ``image``; exit 1 beyond tolerance."""
    from pipeline.convert import verify_conversion

    comparison = verify_conversion(src, out, image, conversion.config, options)
    print_mapping(f"SavedModel vs converted on {image}", asdict(comparison))
    if not comparison.passes(min_matched=min_matched):
        console.print(
            "[bold red]verification failed:[/] the converted model's features differ beyond tolerance"
        )
        raise SystemExit(1)


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
        print_mapping(f"store {storage.redact(store_url)}", counts)


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
