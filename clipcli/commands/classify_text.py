"""`clipcli classify-text`: zero-shot labels for texts with an NLI model (BART-MNLI and its kin)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer

from clipcli.commands import options as opt
from clipcli.store.formats import OutputFormat

if TYPE_CHECKING:
    from clipcli.commands.console import Progress
    from clipcli.text.inputs import EmptyText, TextItem
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


def classify_text(
    texts: Annotated[
        list[str] | None,
        typer.Argument(metavar="[TEXTS...]", help="Texts to classify, or - to read one per line from stdin."),
    ] = None,
    texts_file: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help="One text per line; or a .csv/.parquet file, one text per row of --column. '-' = stdin.",
        ),
    ] = None,
    column: Annotated[
        str | None, typer.Option(metavar="NAME", help="The column of a CSV/Parquet --texts-file. Default: text.")
    ] = None,
    labels: opt.Labels = None,
    labels_file: opt.LabelsFile = None,
    hypothesis: Hypothesis = "This text is about {}.",
    multi_label: Annotated[
        bool,
        typer.Option(
            "--multi-label",
            help="Score each label on its own (entailment vs contradiction), so several can be true; by default "
            "the scores of a text are a softmax over its labels and sum to 1.",
        ),
    ] = False,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, metavar="K", help="Labels to show per text.")] = 5,
    output: opt.Output = None,
    fmt: Annotated[
        opt.ResultFormat | None,
        opt.format_option("Default: from --output's extension, else a table on a terminal, else csv."),
    ] = None,
    model: NliModelOption = None,
    device: opt.Device = "auto",
    precision: opt.Precision = opt.PrecisionChoice.AUTO,
    batch_size: PairBatch = 64,
) -> None:
    """Classify texts zero-shot with an NLI model: how well each label fits, best first."""
    import itertools

    from clipcli.commands.console import Progress, say
    from clipcli.errors import EXIT_PARTIAL
    from clipcli.store.formats import choose_format, open_writer, refuse_output_over_inputs, stdout_is_tty
    from clipcli.text.inputs import open_texts
    from clipcli.text.nli import classify_texts, hypotheses, load_nli_model, prediction_columns, prediction_schema
    from clipcli.zeroshot.prompts import resolve_labels

    refuse_output_over_inputs([output], [texts_file, labels_file])
    label_list = resolve_labels(labels, labels_file)
    hypotheses(hypothesis, label_list)  # a template without {} is refused before the model loads
    out_format = choose_format(opt.output_format(fmt), output, stdout_is_tty(), opt.RESULT_FORMATS)
    source = open_texts(texts or [], texts_file, column, sys.stdin)
    tally = _EmptyRows()
    schema = prediction_schema(source.with_ids) if out_format is OutputFormat.PARQUET else None
    n = 0
    # As for `classify`, the output is locked and opened before any text is read or the model loads.
    with open_writer(out_format, output, schema=schema, columns=prediction_columns(source.with_ids)) as writer:
        items = tally.texts(source.items)
        first = next(items, None)
        if first is None:  # no model is loaded for nothing; the output is a valid empty file
            say(f"no texts in {source.name}")
        else:
            nm = load_nli_model(model, device, precision.value)
            with Progress("classifying", source.total, unit="texts") as bar:
                tally.bar = bar
                predictions = classify_texts(
                    nm,
                    itertools.chain([first], items),
                    label_list,
                    hypothesis,
                    multi_label,
                    top_k,
                    batch_size,
                    on_progress=whole_texts(bar.advance),
                )
                for prediction in predictions:
                    writer.write(_output_rows(prediction, out_format))
                    n += 1
    say(f"classified {n} text{'s' * (n != 1)}, skipped {tally.skipped}")
    if tally.skipped:
        raise typer.Exit(EXIT_PARTIAL)


class _EmptyRows:
    """Passes texts on; reports each empty CSV/Parquet cell on stderr as it is read, and counts them."""

    def __init__(self) -> None:
        self.skipped = 0
        self.bar: Progress | None = None

    def texts(self, items: Iterator[TextItem | EmptyText]) -> Iterator[TextItem]:
        from clipcli.commands.console import say

        for item in items:
            if isinstance(item, tuple):
                yield item
                continue
            self.skipped += 1
            say(f"skipped {item.where}: empty text")
            if self.bar is not None:
                self.bar.advance(1)


def whole_texts(advance: Callable[[int], None]) -> Callable[[float], None]:
    """Progress in whole texts from fractions of texts (a batch can end part-way through a text's labels)."""
    done = 0.0
    shown = 0

    def on_progress(n: float) -> None:
        nonlocal done, shown
        done += n
        if int(done + 1e-6) > shown:
            advance(int(done + 1e-6) - shown)
            shown = int(done + 1e-6)

    return on_progress


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
