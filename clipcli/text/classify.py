"""``classify-text`` as one call: the texts of a :class:`~clipcli.text.inputs.TextSource` classified with
an NLI model (:mod:`clipcli.text.nli`), each prediction handed to the caller's writer as it is made.

The model loads only when there is a text to classify. Empty CSV/Parquet cells are told to the caller
and counted on the progress bar, never classified.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from clipcli.models import ModelOptions
from clipcli.text.inputs import EmptyText, TextItem, TextSource
from clipcli.text.nli import TextPrediction, classify_texts


@dataclass(frozen=True)
class TextTask:
    """What to ask of each text: its ``labels`` put into ``hypothesis``; scored on their own
    (``multi_label``) or as a softmax over them; the ``top_k`` best; ``batch_size`` pairs a pass."""

    labels: Sequence[str]
    hypothesis: str
    multi_label: bool = False
    top_k: int = 5
    batch_size: int = 64


@dataclass(frozen=True)
class TextHooks:
    """``on_empty`` hears of each empty cell; ``progress(total)`` gives a callback counting whole texts
    done (None: the total is not known before reading)."""

    on_empty: Callable[[EmptyText], None]
    progress: Callable[[int | None], AbstractContextManager[Callable[[int], None]]]


def run_classify_text(
    source: TextSource,
    task: TextTask,
    models: ModelOptions,
    hooks: TextHooks,
    write: Callable[[TextPrediction], None],
) -> int | None:
    """Classify the source's texts; how many were classified, or None when it holds no text at all."""
    from clipcli.models.nli import load_nli_model

    advance: list[Callable[[int], None]] = []  # the bar's, once it is shown

    def texts(items: Iterator[TextItem | EmptyText]) -> Iterator[TextItem]:
        for item in items:
            if isinstance(item, tuple):
                yield item
                continue
            hooks.on_empty(item)
            for a in advance:
                a(1)

    items = texts(source.items)
    first = next(items, None)
    if first is None:  # no model is loaded for nothing
        return None
    nm = load_nli_model(models.spec, models.device, models.precision)
    n = 0
    with hooks.progress(source.total) as on_texts:
        advance.append(on_texts)
        predictions = classify_texts(
            nm,
            itertools.chain([first], items),
            task.labels,
            task.hypothesis,
            task.multi_label,
            task.top_k,
            task.batch_size,
            on_progress=whole_texts(on_texts),
        )
        for prediction in predictions:
            write(prediction)
            n += 1
    return n


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
