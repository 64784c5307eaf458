"""`clipcli classify`: zero-shot label probabilities for images."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from clipcli.commands import options as opt
from clipcli.store.formats import OutputFormat


def classify(
    inputs: opt.Inputs,
    labels: opt.Labels = None,
    labels_file: opt.LabelsFile = None,
    template: opt.Template = None,
    templates: opt.Templates = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, metavar="K", help="Labels to show per image.")] = 5,
    output: opt.Output = None,
    fmt: Annotated[
        opt.ResultFormat | None,
        opt.format_option("Default: from --output's extension, else a table on a terminal, else csv."),
    ] = None,
    model: opt.Model = None,
    device: opt.Device = "auto",
    precision: opt.Precision = opt.PrecisionChoice.AUTO,
    batch_size: opt.BatchSize = 32,
    workers: opt.Workers = 0,
    exact: opt.Exact = False,
    max_megapixels: opt.MaxMegapixels = opt.DEFAULT_MAX_MEGAPIXELS,
) -> None:
    """Classify images zero-shot: the probability of each label, best first."""
    from clipcli.commands.console import Progress, Tally, prompt_progress, say
    from clipcli.errors import EXIT_PARTIAL
    from clipcli.images.core import discover, nothing_found
    from clipcli.store.formats import (
        choose_format,
        open_writer,
        parquet_storable,
        refuse_output_over_inputs,
        stdout_is_tty,
    )
    from clipcli.zeroshot.classify import PREDICTION_COLUMNS, Prediction, classify_images, prediction_schema
    from clipcli.zeroshot.prompts import resolve_labels, resolve_templates

    refuse_output_over_inputs([output], [*inputs, labels_file])
    label_list = resolve_labels(labels, labels_file)
    template_set = resolve_templates(template, templates)
    out_format = choose_format(opt.output_format(fmt), output, stdout_is_tty(), opt.RESULT_FORMATS)
    n_ok = 0
    tally = Tally()
    # The output is locked and opened before anything is read: a second run into it, or a folder that
    # cannot be written, is refused before any work; a failure before the first row leaves it as it was.
    schema = prediction_schema() if out_format is OutputFormat.PARQUET else None
    with open_writer(out_format, output, schema=schema, columns=PREDICTION_COLUMNS) as writer:
        refs, missing = discover(inputs, sys.stdin)
        if out_format is OutputFormat.PARQUET:
            refs, unstorable = parquet_storable(refs)
            missing += unstorable
        if not refs:
            raise nothing_found(inputs, missing)
        for m in missing:
            tally.on_skip(m)
        lm = opt.load(model, device, precision)
        n_prompts = len(label_list) * len(template_set.templates)
        with prompt_progress("encoding prompts", n_prompts) as on_prompts, Progress("classifying", len(refs)) as bar:
            tally.bar = bar
            predictions = classify_images(
                lm,
                refs,
                label_list,
                template_set,
                top_k,
                batch_size,
                workers,
                exact,
                tally.on_batch,
                on_prompts,
                max_pixels=opt.max_pixels(max_megapixels),
            )
            for item in predictions:
                if not isinstance(item, Prediction):
                    tally.on_skip(item)
                    continue
                n_ok += 1
                if out_format is OutputFormat.JSONL:
                    writer.write([item.record()])
                elif out_format is OutputFormat.TABLE:
                    writer.write([{**row, "score": f"{row['score']:.2%}"} for row in item.rows()])
                else:
                    writer.write(item.rows())
    if len(label_list) == 1 and lm.scoring == "softmax":
        say(
            "warning: with one label every image scores 1.0 (a softmax shares the score among the labels); "
            "give more labels, e.g. the alternatives to tell it from"
        )
    say(f"classified {n_ok} image{'s' * (n_ok != 1)}, skipped {tally.skipped}")
    if tally.skipped:
        raise typer.Exit(EXIT_PARTIAL)
