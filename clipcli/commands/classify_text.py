"""`clipcli classify-text`: zero-shot labels for texts with an NLI model (BART-MNLI and its kin)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from clipcli.commands import options as opt
from clipcli.store.formats import OutputFormat

if TYPE_CHECKING:
    from clipcli.store.formats import RowWriter
    from clipcli.text.inputs import EmptyText
    from clipcli.text.nli import TextPrediction


TABLE_TEXT_CHARS = 60  # a table shows the start of each text; files hold all of it

NliModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        metavar="hf:ORG/REPO|DIR",
        help="A Hugging Face sequence-classification model fine-tuned on NLI: hf:ORG/REPO (through the Hugging "
        "Face cache; HF_HOME and HF_HUB_OFFLINE apply) or a folder written by save_pretrained. "
        "Default: hf:facebook/bart-large-mnli.",
        show_default=False,
    ),
]
Hypothesis = Annotated[
    str,
    typer.Option(
        "--hypothesis",
        metavar="TEMPLATE",
        help="The hypothesis each label is put into, with {} for the label.",
    ),
]
PairBatch = Annotated[
    int,
    typer.Option(
        "--batch-size",
        "-b",
        min=1,
        metavar="N",
        help="(text, label) pairs per forward pass, at most: batches of long pairs are smaller.",
    ),
]


Texts = Annotated[
    list[str] | None,
    typer.Argument(metavar="[TEXTS...]", help="Texts to classify, or - to read one per line from stdin."),
]
TextsFile = Annotated[
    str | None,
    typer.Option(
        metavar="FILE",
        help="One text per line; or a .csv/.parquet file, one text per row of --column. '-' = stdin.",
    ),
]
Column = Annotated[
    str | None, typer.Option(metavar="NAME", help="The column of a CSV/Parquet --texts-file. Default: text.")
]
MultiLabel = Annotated[
    bool,
    typer.Option(
        "--multi-label",
        help="Score each label on its own (entailment vs contradiction), so several can be true; by default "
        "the scores of a text are a softmax over its labels and sum to 1.",
    ),
]
TopK = Annotated[int, typer.Option("--top-k", "-k", min=1, metavar="K", help="Labels to show per text.")]


def classify_text(
    texts: Texts = None,
    texts_file: TextsFile = None,
    column: Column = None,
    labels: opt.Labels = None,
    labels_file: opt.LabelsFile = None,
    hypothesis: Hypothesis = "This text is about {}.",
    multi_label: MultiLabel = False,
    top_k: TopK = 5,
    output: opt.Output = None,
    fmt: opt.ResultFormatOption = None,
    model: NliModelOption = None,
    device: opt.Device = "auto",
    precision: opt.Precision = opt.PrecisionChoice.AUTO,
    batch_size: PairBatch = 64,
) -> None:
    """Classify texts zero-shot with an NLI model: how well each label fits, best first."""
    from functools import partial

    from clipcli.commands.console import say
    from clipcli.errors import EXIT_PARTIAL
    from clipcli.store.formats import open_writer, stdout_is_tty
    from clipcli.store.output import parse_output
    from clipcli.store.refusals import refuse_output_over_inputs
    from clipcli.text.classify import TextHooks, TextTask, run_classify_text
    from clipcli.text.inputs import open_texts
    from clipcli.text.nli import hypotheses, prediction_columns, prediction_schema
    from clipcli.zeroshot.prompts import resolve_labels

    refuse_output_over_inputs([output], [texts_file, labels_file])
    label_list = resolve_labels(labels, labels_file)
    hypotheses(hypothesis, label_list)  # a template without {} is refused before the model loads
    out_format = parse_output(output, fmt, opt.RESULT_FORMATS, tty=stdout_is_tty()).format
    source = open_texts(texts or [], texts_file, column, sys.stdin)
    empty = _EmptyRows()
    task = TextTask(label_list, hypothesis, multi_label, top_k, batch_size)
    schema = prediction_schema(source.with_ids) if out_format is OutputFormat.PARQUET else None
    # As for `classify`, the output is locked and opened before any text is read or the model loads.
    with open_writer(out_format, output, schema=schema, columns=prediction_columns(source.with_ids)) as writer:
        write = partial(_write, writer, out_format)
        models = opt.model_options(model, device, precision)
        n = run_classify_text(source, task, models, TextHooks(empty.on_empty, _texts_bar), write)
        if n is None:  # no model is loaded for nothing; the output is a valid empty file
            say(f"no texts in {source.name}")
    n = n or 0
    say(f"classified {n} text{'s' * (n != 1)}, skipped {empty.skipped}")
    if empty.skipped:
        raise typer.Exit(EXIT_PARTIAL)


class _EmptyRows:
    """Reports each empty CSV/Parquet cell on stderr as it is read, and counts them."""

    def __init__(self) -> None:
        self.skipped = 0

    def on_empty(self, item: EmptyText) -> None:
        from clipcli.commands.console import say

        self.skipped += 1
        say(f"skipped {item.where}: empty text")


@contextmanager
def _texts_bar(total: int | None) -> Iterator[Callable[[int], None]]:
    from clipcli.commands.console import Progress

    with Progress("classifying", total, unit="texts") as bar:
        yield bar.advance


def _write(writer: RowWriter, fmt: OutputFormat, prediction: TextPrediction) -> None:
    writer.write(_output_rows(prediction, fmt))


def _output_rows(prediction: TextPrediction, fmt: OutputFormat) -> list[dict[str, Any]]:
    if fmt is OutputFormat.JSONL:
        return [prediction.record()]
    rows = prediction.rows()
    if fmt is OutputFormat.TABLE:
        return [{**row, "text": _short(row["text"]), "score": f"{row['score']:.2%}"} for row in rows]
    return rows


def _short(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= TABLE_TEXT_CHARS else flat[: TABLE_TEXT_CHARS - 1] + "…"
