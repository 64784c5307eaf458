"""The quality guard of a cheaper precision for texts: how far an NLI model's answers move from fp32's.

The same texts are scored with the same model and labels at fp32 and at the precision under test, one
after the other; for each text, whether its top label stays the same, and how far any label's
probability moved. ``clipcli bench-precision --texts-file`` prints it (the images' counterpart is
:mod:`clipcli.zeroshot.precision_check`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clipcli.errors import InputError
from clipcli.models import ModelOptions
from clipcli.text.inputs import EmptyText, TextSource
from clipcli.text.nli import DEFAULT_BATCH_SIZE, StageSeconds, iter_scores

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class TextScoring:
    """What one precision made of the texts."""

    precision: str
    scores: np.ndarray  # texts x labels
    seconds: float  # scoring, after the model is loaded
    stages: StageSeconds

    @property
    def texts_per_second(self) -> float:
        return len(self.scores) / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class TextChange:
    """A text whose top label is not fp32's. ``id`` is its line or row number (None for an argument)."""

    id: int | None
    text: str
    before: str
    after: str

    @property
    def name(self) -> str:
        short = " ".join(self.text.split())
        short = short if len(short) <= 40 else short[:39] + "…"
        return f"{short!r}" if self.id is None else f"{self.id} ({short!r})"


@dataclass(frozen=True)
class TextComparison:
    ids: list[int | None]
    texts: list[str]
    labels: list[str]
    reference: TextScoring
    candidate: TextScoring
    skipped: list[EmptyText] = field(default_factory=list)

    @property
    def changed(self) -> list[TextChange]:
        """Each text whose top label differs from fp32's, in input order."""
        before, after = self.reference.scores.argmax(axis=1), self.candidate.scores.argmax(axis=1)
        rows = zip(self.ids, self.texts, before.tolist(), after.tolist(), strict=True)
        return [TextChange(i, t, self.labels[a], self.labels[b]) for i, t, a, b in rows if a != b]

    @property
    def agreement(self) -> float:
        """The share of texts whose top label is unchanged."""
        return 1 - len(self.changed) / max(len(self.texts), 1)

    @property
    def max_change(self) -> float:
        """The largest absolute change of any label's probability, over all texts."""
        import numpy as np

        return float(np.abs(self.reference.scores - self.candidate.scores).max(initial=0.0))

    def table(self) -> list[str]:
        """Tab-separated lines, a header then one per precision: texts per second, the share of texts
        with an unchanged top label, the largest change of a probability, and where the time went."""
        lines = ["precision\ttexts\ttexts_per_s\ttop1_agreement\tmax_abs_change\ttokenize\tmodel\tscores"]
        for run, same, moved in ((self.reference, 1.0, 0.0), (self.candidate, self.agreement, self.max_change)):
            shares = "\t".join(f"{v:.1%}" for v in run.stages.shares().values())
            lines.append(
                f"{run.precision}\t{len(run.scores)}\t{run.texts_per_second:.2f}\t{same:.4f}\t{moved:.4f}\t{shares}"
            )
        return lines


def score_at(
    models: ModelOptions,
    precision: str,
    texts: Sequence[str],
    task: tuple[Sequence[str], str, bool],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> TextScoring:
    """``texts`` scored at ``precision`` for ``task`` = (labels, hypothesis, multi-label)."""
    import numpy as np

    from clipcli.models.nli import load_nli_model

    labels, hypothesis, multi_label = task
    nm = load_nli_model(models.spec, models.device, precision)
    stages = StageSeconds()
    start = time.perf_counter()
    rows = list(iter_scores(nm, texts, labels, hypothesis, multi_label, batch_size, seconds=stages))
    seconds = time.perf_counter() - start
    return TextScoring(nm.precision, np.stack(rows), seconds, stages)


def check_text_precision(
    source: TextSource,
    task: tuple[Sequence[str], str, bool],
    models: ModelOptions,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> TextComparison:
    """``bench-precision --texts-file``: the source's texts scored at fp32, then at ``models.precision``,
    for ``task`` = (labels, hypothesis, multi-label). Empty CSV/Parquet cells come back as skipped."""
    ids: list[int | None] = []
    texts: list[str] = []
    skipped: list[EmptyText] = []
    for item in source.items:
        if isinstance(item, EmptyText):
            skipped.append(item)
        else:
            ids.append(item[0])
            texts.append(item[1])
    if not texts:
        raise InputError(f"no texts in {source.name}: nothing to compare")
    reference = score_at(models, "fp32", texts, task, batch_size)
    candidate = score_at(models, models.precision, texts, task, batch_size)
    return TextComparison(ids, texts, list(task[0]), reference, candidate, skipped)
