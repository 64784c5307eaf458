"""`clipcli bench-precision`: whether a cheaper precision (int8, bf16) gives fp32's embeddings and answers,
for images (a CLIP model) or, with ``--texts-file``, for texts (an NLI model, as `classify-text` runs it)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.commands import options as opt

if TYPE_CHECKING:
    from clipcli.models import ModelOptions

MinAgreement = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=1.0,
        metavar="A",
        help="Exit 1 if the share of images (or texts) whose top label is unchanged is below A, naming each "
        "one that changed. Needs labels.",
    ),
]


def bench_precision(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(metavar="[INPUTS...]", help="Image files, folders, globs, or - to read paths from stdin."),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option("--labels", "-l", metavar="A,B,...", help="Comma-separated labels: also compare top-1 labels."),
    ] = None,
    labels_file: opt.LabelsFile = None,
    template: opt.Template = None,
    templates: opt.Templates = None,
    texts_file: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help="Compare on texts instead of images: one per line, or a .csv/.parquet column (--column); "
            "-m then names an NLI model, as for classify-text.",
        ),
    ] = None,
    column: Annotated[
        str | None, typer.Option(metavar="NAME", help="The column of a CSV/Parquet --texts-file.")
    ] = None,
    hypothesis: Annotated[
        str, typer.Option(metavar="TEMPLATE", help="With --texts-file: the hypothesis, with {} for the label.")
    ] = "This text is about {}.",
    multi_label: Annotated[
        bool, typer.Option("--multi-label", help="With --texts-file: score labels on their own.")
    ] = False,
    model: opt.Model = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="Where both precisions run.")] = "cpu",
    precision: Annotated[
        opt.PrecisionChoice, typer.Option(case_sensitive=False, help="The precision to check against fp32.")
    ] = opt.PrecisionChoice.INT8,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            min=1,
            metavar="N",
            help="Images per forward pass (default 32); with --texts-file, (text, label) pairs (default 64, as "
            "classify-text: int8 scales each batch's activations, so its answers depend on the batching).",
            show_default=False,
        ),
    ] = None,
    min_cosine: Annotated[
        float,
        typer.Option(min=-1.0, max=1.0, metavar="C", help="Exit 1 if any image's cosine to fp32 is below C."),
    ] = 0.0,
    min_agreement: MinAgreement = 0.0,
) -> None:
    """Run images (or texts) at fp32 and at --precision (int8) with one model: speed and agreement.

    Images: one row per precision (images per second, the lowest and median cosine to fp32, and, with
    labels, the share of images whose top-1 label is unchanged), then each image whose label changed.
    Texts (--texts-file, an NLI model): texts per second, the share of texts whose top label is
    unchanged, the largest change of any label's probability, and where the time went.
    """
    from clipcli.commands.console import say, skipped
    from clipcli.errors import EXIT_PARTIAL, InputError
    from clipcli.models.precision import cpu_class
    from clipcli.zeroshot.precision_check import check_precision
    from clipcli.zeroshot.prompts import resolve_labels, resolve_templates

    label_list = resolve_labels(labels, labels_file) if (labels or labels_file) else None
    models = opt.model_options(model, device, precision)
    if texts_file is not None:
        if inputs or not label_list:
            raise InputError("--texts-file compares texts: give --labels (or --labels-file) and no image inputs")
        task = (label_list, hypothesis, multi_label)
        return _bench_texts(texts_file, column, task, models, batch_size or 64, min_agreement)
    if not inputs:
        raise InputError("no inputs: give images (files, folders, globs, or -), or --texts-file FILE for texts")
    template_set = resolve_templates(template, templates)
    result = check_precision(inputs, models, label_list, template_set, batch_size or 32, sys.stdin)
    for item in [*result.missing, *result.skipped]:
        skipped(item.path, item.reason)
    print("\n".join(result.table()))
    for name, before, after in result.changed:
        print(f"# top-1 changed: {name}: {before} -> {after}")
    say(f"CPU: {cpu_class()}; model {result.candidate.precision} vs fp32 on {len(result.reference.names)} images")
    below = result.below(min_cosine)
    for name, c in below:
        say(f"below --min-cosine {min_cosine}: {name} (cosine {c:.5f})")
    agreement = result.top1_agreement
    disagree = agreement is not None and agreement < min_agreement
    if disagree:
        names = ", ".join(name for name, _, _ in result.changed)
        say(f"below --min-agreement {min_agreement}: top-1 kept for {agreement:.4f} of the images; changed: {names}")
    if below or disagree or result.missing or result.skipped:
        raise typer.Exit(EXIT_PARTIAL)


def _bench_texts(
    texts_file: str,
    column: str | None,
    task: tuple[list[str], str, bool],
    models: ModelOptions,
    batch_size: int,
    min_agreement: float,
) -> None:
    """The text half of the command: one core call, then its table and gate."""
    from clipcli.commands.console import say
    from clipcli.errors import EXIT_PARTIAL
    from clipcli.models.precision import cpu_class
    from clipcli.text.inputs import open_texts
    from clipcli.text.nli import hypotheses
    from clipcli.text.precision import check_text_precision

    hypotheses(task[1], task[0])  # a template without {} is refused before a model loads
    result = check_text_precision(open_texts([], texts_file, column, sys.stdin), task, models, batch_size)
    for item in result.skipped:
        say(f"skipped {item.where}: empty text")
    print("\n".join(result.table()))
    for change in result.changed:
        print(f"# top label changed: {change.name}: {change.before} -> {change.after}")
    say(f"CPU: {cpu_class()}; NLI model {result.candidate.precision} vs fp32 on {len(result.texts)} texts")
    if result.agreement < min_agreement:
        names = ", ".join(c.name for c in result.changed)
        kept = f"top label kept for {result.agreement:.4f} of the texts"
        say(f"below --min-agreement {min_agreement}: {kept}; changed: {names}")
    if result.agreement < min_agreement or result.skipped:
        raise typer.Exit(EXIT_PARTIAL)
