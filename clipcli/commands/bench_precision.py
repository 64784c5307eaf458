"""`clipcli bench-precision`: whether a cheaper precision (int8) gives fp32's embeddings and answers."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from clipcli.commands import options as opt


def bench_precision(
    inputs: opt.Inputs,
    labels: Annotated[
        str | None,
        typer.Option("--labels", "-l", metavar="A,B,...", help="Comma-separated labels: also compare top-1 labels."),
    ] = None,
    labels_file: opt.LabelsFile = None,
    template: opt.Template = None,
    templates: opt.Templates = None,
    model: opt.Model = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="Where both precisions run.")] = "cpu",
    precision: Annotated[
        opt.PrecisionChoice, typer.Option(case_sensitive=False, help="The precision to check against fp32.")
    ] = opt.PrecisionChoice.INT8,
    batch_size: opt.BatchSize = 32,
    min_cosine: Annotated[
        float,
        typer.Option(min=-1.0, max=1.0, metavar="C", help="Exit 1 if any image's cosine to fp32 is below C."),
    ] = 0.0,
) -> None:
    """Embed the images at fp32 and at --precision (int8) with one model: per-image cosine, speed, top-1.

    Prints one row per precision (images per second, the lowest and median cosine to fp32, and, with
    labels, the share of images whose top-1 label is unchanged), then each image whose label changed.
    """
    from clipcli.commands.console import say, skipped
    from clipcli.errors import EXIT_PARTIAL
    from clipcli.models.precision import cpu_class
    from clipcli.zeroshot.precision_check import check_precision
    from clipcli.zeroshot.prompts import resolve_labels, resolve_templates

    label_list = resolve_labels(labels, labels_file) if (labels or labels_file) else None
    template_set = resolve_templates(template, templates)
    models = opt.model_options(model, device, precision)
    result = check_precision(inputs, models, label_list, template_set, batch_size, sys.stdin)
    for item in [*result.missing, *result.skipped]:
        skipped(item.path, item.reason)
    print("\n".join(result.table()))
    for name, before, after in result.changed:
        print(f"# top-1 changed: {name}: {before} -> {after}")
    say(f"CPU: {cpu_class()}; model {result.candidate.precision} vs fp32 on {len(result.reference.names)} images")
    below = result.below(min_cosine)
    for name, c in below:
        say(f"below --min-cosine {min_cosine}: {name} (cosine {c:.5f})")
    if below or result.missing or result.skipped:
        raise typer.Exit(EXIT_PARTIAL)
