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
    from clipcli.zeroshot.timeline import Segment


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
    """Classify images zero-shot: the probability of each label, best first. A video gives a timeline:
    its segments (start, end in seconds) with their top label."""
    from functools import partial

    from clipcli.commands.console import Tally, prompt_progress, say
    from clipcli.errors import EXIT_PARTIAL
    from clipcli.store.formats import parquet_storable, stdout_is_tty
    from clipcli.store.output import parse_output
    from clipcli.store.refusals import refuse_output_over_inputs
    from clipcli.zeroshot.classify import ClassifyHooks, run_classify
    from clipcli.zeroshot.prompts import resolve_labels, resolve_templates

    refuse_output_over_inputs([output], [*inputs, labels_file, *(templates or [])])
    label_list = resolve_labels(labels, labels_file)
    _refuse_split_labels(labels, inputs)
    template_set = resolve_templates(template, templates)
    out_format = parse_output(output, fmt, opt.RESULT_FORMATS, tty=stdout_is_tty()).format
    tally = Tally()
    storable = parquet_storable if out_format is OutputFormat.PARQUET else None
    progress = (partial(prompt_progress, "encoding prompts"), partial(_images_bar, tally))
    hooks = ClassifyHooks(opt.load, tally.on_skip, *progress, storable, sys.stdin)
    opened = partial(_opened, out_format, output)
    result = run_classify(inputs, label_list, template_set, top_k, models, images, hooks, opened)
    if len(label_list) == 1 and result.scoring == "softmax":
        say(
            "warning: with one label every image scores 1.0 (a softmax shares the score among the labels); "
            "give more labels, e.g. the alternatives to tell it from"
        )
    n_ok = result.classified
    frames = f" ({result.frames} of them video frames)" if result.frames else ""
    say(f"classified {n_ok} image{'s' * (n_ok != 1)}{frames}, skipped {tally.skipped}")
    if tally.skipped:
        raise typer.Exit(EXIT_PARTIAL)


@contextmanager
def _images_bar(tally: Tally, total: int) -> Iterator[Callable[[int], None]]:
    """The images' bar, advanced by the tally as batches are done (read or skipped)."""
    from clipcli.commands.console import Progress

    with Progress("classifying", total) as bar:
        tally.bar = bar
        yield tally.on_batch


@contextmanager
def _opened(fmt: OutputFormat, output: str | None, timeline: bool) -> Iterator[Callable[[Prediction | Segment], None]]:
    """The output, locked and opened once the inputs are found and before any is read (a second run into
    it, or a folder that cannot be written, is refused before the model loads; a failure before the
    first row leaves it as it was): for a timeline's segments, or for predictions."""
    from functools import partial

    from clipcli.store.formats import open_writer
    from clipcli.zeroshot.classify import PREDICTION_COLUMNS, prediction_schema
    from clipcli.zeroshot.timeline import TIMELINE_COLUMNS, timeline_schema

    parquet = fmt is OutputFormat.PARQUET
    columns: tuple[str, ...]
    if timeline:
        schema, columns = (timeline_schema() if parquet else None), TIMELINE_COLUMNS
    else:
        schema, columns = (prediction_schema() if parquet else None), PREDICTION_COLUMNS
    with open_writer(fmt, output, schema=schema, columns=columns) as writer:
        yield partial(_write, writer, fmt)


def _write(writer: RowWriter, fmt: OutputFormat, item: Prediction | Segment) -> None:
    """A prediction as the format shows it: one record (JSONL), percentages (a table), or tidy rows; a
    timeline's segment as one row (times as seconds with 3 decimals in a table)."""
    from clipcli.zeroshot.timeline import Segment

    if isinstance(item, Segment):
        row = item.row()
        if fmt is OutputFormat.TABLE:
            times = {k: "" if row[k] is None else f"{row[k]:.3f}" for k in ("start", "end")}
            row = {**row, **times, "score": f"{item.score:.2%}"}
        writer.write([row])
    elif fmt is OutputFormat.JSONL:
        writer.write([item.record()])
    elif fmt is OutputFormat.TABLE:
        writer.write([{**row, "score": f"{row['score']:.2%}"} for row in item.rows()])
    else:
        writer.write(item.rows())


def _refuse_split_labels(labels: str | None, inputs: list[str]) -> None:
    """``--labels red circle,blue star`` unquoted: the shell hands ``circle,blue`` and ``star`` over as
    inputs. An input that is no file and holds a comma is taken for that, before any work."""
    import os

    from clipcli.errors import InputError

    split = [i for i in inputs if "," in i and not os.path.lexists(i)] if labels else []
    if split:
        raise InputError(
            f"{split[0]}: no such file, and it looks like a piece of --labels: labels of several words "
            "need quotes, as in --labels 'red circle,blue star'"
        )
