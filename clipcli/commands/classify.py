"""`clipcli classify`: zero-shot label probabilities for images."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.commands import options as opt
from clipcli.store.formats import OutputFormat

if TYPE_CHECKING:
    from clipcli.commands.console import Tally
    from clipcli.images.decode import ImageOptions
    from clipcli.models import ModelOptions
    from clipcli.store.formats import RowWriter
    from clipcli.zeroshot.classify import Prediction


@opt.grouped(models=opt.MODEL_OPTIONS, images=opt.IMAGE_OPTIONS)
def classify(
    inputs: opt.Inputs,
    labels: opt.Labels = None,
    labels_file: opt.LabelsFile = None,
    template: opt.Template = None,
    templates: opt.Templates = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, metavar="K", help="Labels to show per image.")] = 5,
    output: opt.Output = None,
    fmt: opt.ResultFormatOption = None,
    *,
    models: ModelOptions,
    images: ImageOptions,
) -> None:
    """Classify images zero-shot: the probability of each label, best first."""
    from functools import partial

    from clipcli.commands.console import Tally, prompt_progress, say
    from clipcli.errors import EXIT_PARTIAL
    from clipcli.store.formats import open_writer, parquet_storable, stdout_is_tty
    from clipcli.store.output import parse_output, refuse_output_over_inputs
    from clipcli.zeroshot.classify import PREDICTION_COLUMNS, ClassifyHooks, prediction_schema, run_classify
    from clipcli.zeroshot.prompts import resolve_labels, resolve_templates

    refuse_output_over_inputs([output], [*inputs, labels_file, *(templates or [])])
    label_list = resolve_labels(labels, labels_file)
    template_set = resolve_templates(template, templates)
    out_format = parse_output(output, fmt, opt.RESULT_FORMATS, tty=stdout_is_tty()).format
    tally = Tally()
    storable = parquet_storable if out_format is OutputFormat.PARQUET else None
    progress = (partial(prompt_progress, "encoding prompts"), partial(_images_bar, tally))
    hooks = ClassifyHooks(opt.load, tally.on_skip, *progress, storable, sys.stdin)
    # The output is locked and opened before anything is read: a second run into it, or a folder that
    # cannot be written, is refused before any work; a failure before the first row leaves it as it was.
    schema = prediction_schema() if out_format is OutputFormat.PARQUET else None
    with open_writer(out_format, output, schema=schema, columns=PREDICTION_COLUMNS) as writer:
        write = partial(_write, writer, out_format)
        result = run_classify(inputs, label_list, template_set, top_k, models, images, hooks, write)
    if len(label_list) == 1 and result.scoring == "softmax":
        say(
            "warning: with one label every image scores 1.0 (a softmax shares the score among the labels); "
            "give more labels, e.g. the alternatives to tell it from"
        )
    n_ok = result.classified
    say(f"classified {n_ok} image{'s' * (n_ok != 1)}, skipped {tally.skipped}")
    if tally.skipped:
        raise typer.Exit(EXIT_PARTIAL)


@contextmanager
def _images_bar(tally: Tally, total: int) -> Iterator[Callable[[int], None]]:
    """The images' bar, advanced by the tally as batches are done (read or skipped)."""
    from clipcli.commands.console import Progress

    with Progress("classifying", total) as bar:
        tally.bar = bar
        yield tally.on_batch


def _write(writer: RowWriter, fmt: OutputFormat, item: Prediction) -> None:
    """A prediction as the format shows it: one record (JSONL), percentages (a table), or tidy rows."""
    if fmt is OutputFormat.JSONL:
        writer.write([item.record()])
    elif fmt is OutputFormat.TABLE:
        writer.write([{**row, "score": f"{row['score']:.2%}"} for row in item.rows()])
    else:
        writer.write(item.rows())
