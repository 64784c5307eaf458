"""`clipcli eval`: zero-shot accuracy of models x template sets, for scripts and people."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clipcli.commands import options as opt


def evaluate(
    data: Annotated[
        Path | None,
        typer.Argument(
            help="An image folder (leaf folder = class) or a CSV/Parquet manifest (path + label, or "
            "path + text for retrieval).",
            show_default=False,
        ),
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="cifar10 or cifar100 (test split, via torchvision).")] = None,
    data_root: Annotated[Path, typer.Option(help="Where CIFAR files are (or are downloaded to).")] = Path("data"),
    download: Annotated[bool, typer.Option(help="Download CIFAR if missing (needs a network).")] = False,
    classnames: Annotated[
        str | None, typer.Option(help="Names for prompts: 'folder<TAB>name' lines, or one name per class in order.")
    ] = None,
    models: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Model to evaluate (repeatable). Default: $CLIPCLI_MODEL or ViT-B/32.",
            show_default=False,
        ),
    ] = None,
    template: opt.Template = None,
    templates: Annotated[
        list[str] | None,
        typer.Option(
            help="Template set to compare (repeatable): simple, cifar, imagenet or a file.", show_default=False
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate a random subset of N images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for --limit.")] = 0,
    cache: Annotated[
        bool, typer.Option(help="Reuse cached class text embeddings (keyed by model, templates, class names).")
    ] = True,
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here (schema in the README).")] = None,
    predictions: Annotated[
        str | None, typer.Option(help="Write per-image predictions here (.csv or .parquet).")
    ] = None,
    plots: Annotated[
        Path | None, typer.Option(help="Write a confusion-matrix PNG and an HTML page of mistakes here.")
    ] = None,
    min_acc1: Annotated[
        float | None, typer.Option(help="Exit 1 when any top-1 accuracy is below this (0-1), for CI gates.")
    ] = None,
    device: opt.Device = "auto",
    precision: opt.Precision = "auto",
    batch_size: opt.BatchSize = 32,
    workers: opt.Workers = 0,
    exact: opt.Exact = False,
    max_megapixels: opt.MaxMegapixels = opt.DEFAULT_MAX_MEGAPIXELS,
) -> None:
    """Evaluate zero-shot classification (or caption retrieval) and compare models and prompt sets."""
    from clipcli import datasets
    from clipcli.console import Progress, err, prompt_progress, say, skipped
    from clipcli.errors import EXIT_PARTIAL, InputError, OutputError
    from clipcli.evaluate import (
        classification_result,
        embed_dataset,
        prediction_rows,
        retrieval_result,
        write_report,
    )
    from clipcli.io import OutputFormat, choose_format, open_writer
    from clipcli.models import default_model
    from clipcli.prompts import resolve_templates

    if (data is None) == (dataset is None):
        raise InputError("give a folder or manifest, or --dataset cifar10|cifar100 (one of them)")
    if plots is not None:
        from clipcli.plots import require_matplotlib

        require_matplotlib()
    pred_format = (
        choose_format(None, predictions, False, (OutputFormat.CSV, OutputFormat.PARQUET)) if predictions else None
    )
    if report is not None and report.is_dir():
        # Found now, not after the whole evaluation has run (write_report would refuse it too).
        raise OutputError(f"{report}: cannot write (is a directory)")
    template_sets = [resolve_templates(template, None)] if template else []
    template_sets += [resolve_templates(None, name) for name in (templates or ([] if template else ["simple"]))]

    if dataset is not None:
        if dataset not in ("cifar10", "cifar100"):
            raise InputError(f"unknown dataset {dataset!r}: use cifar10 or cifar100")
        source: datasets.LabelledImages | datasets.CaptionPairs = datasets.cifar(dataset, data_root, download)
    elif data is not None and data.is_dir():
        source = datasets.image_folder(data, classnames)
    elif data is not None and data.is_file():
        source = datasets.manifest(data, classnames)
    else:
        raise InputError(f"{data}: no such folder or manifest")
    if isinstance(source, datasets.LabelledImages):
        for folder in source.empty_folders:
            say(f"note: {folder}: no images, class left out")
        source = datasets.limit(source, limit, seed)

    results = []
    n_skipped = 0
    for name in models or [default_model()]:
        lm = opt.load(name, device, precision)
        total = len(source.refs) if source.refs is not None else len(source.arrays)
        with Progress(f"embedding ({name})", total) as bar:
            limit_px = opt.max_pixels(max_megapixels)
            images = embed_dataset(lm, source, batch_size, workers, exact, bar.advance, limit_px)
        for s in images.skipped:
            skipped(s.path, s.reason)
        n_skipped = max(n_skipped, len(images.skipped))
        if isinstance(source, datasets.CaptionPairs):
            results.append(retrieval_result(lm, source, images))
        else:
            for ts in template_sets:
                with prompt_progress(f"encoding prompts ({name})", len(source.classes) * len(ts.templates)) as bar:
                    results.append(classification_result(lm, source, images, ts, cache, on_progress=bar))

    _print_table(err, results)
    if report:
        write_report(results, report)
    if predictions and pred_format:
        with open_writer(pred_format, predictions) as writer:
            for r in results:
                writer.write(prediction_rows(r))
    if plots is not None:
        from clipcli.plots import write_plots

        for r in results:
            if r.predictions is not None:
                say(f"wrote {write_plots(r, plots)}")
    below = [r for r in results if min_acc1 is not None and r.metrics.get("acc1", 1.0) < min_acc1]
    for r in below:
        say(f"acc1 {r.metrics['acc1']:.4f} of {r.model} / {r.templates} is below --min-acc1 {min_acc1}")
    if below or n_skipped:
        raise typer.Exit(EXIT_PARTIAL)


def _print_table(console: object, results: list) -> None:
    from rich.table import Table

    if not results:
        return
    metric_names = list(dict.fromkeys(k for r in results for k in r.metrics))
    baseline = {r.model: r.metrics.get("acc1") for r in results if r.templates == "simple"}
    table = Table(title=f"zero-shot evaluation on {results[0].dataset} ({results[0].n} images)")
    for column in ("model", "templates", *metric_names, "vs simple"):
        table.add_column(column, justify="left" if column in ("model", "templates") else "right", overflow="fold")
    ordered = sorted(results, key=lambda r: -(r.metrics.get("acc1") or r.metrics.get("image_to_text_recall@1") or 0))
    for r in ordered:
        base = baseline.get(r.model)
        gain = f"{(r.metrics['acc1'] - base) * 100:+.2f} pts" if base is not None and "acc1" in r.metrics else ""
        cells = [f"{r.metrics[m]:.2%}" if m in r.metrics and r.metrics[m] == r.metrics[m] else "" for m in metric_names]
        table.add_row(r.model, f"{r.templates} ({r.n_templates})", *cells, gain)
    console.print(table)  # type: ignore[attr-defined]
