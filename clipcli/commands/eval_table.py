"""The result table of `clipcli eval` (images and texts alike): one row per model x template set, best
first, in 80 columns, with a legend of the short headers under it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from clipcli.evaluation.run import EvalResult


# Short headers keep the table inside 80 columns; the legend under it says what they stand for.
_SHORT = {"acc1": "acc@1", "acc5": "acc@5", "mean_per_class_recall": "mpcr"}
_DIRECTIONS = {"image_to_text": "i2t", "text_to_image": "t2i"}
_COMPARISON = "vs simple"


def _header(metric: str) -> str:
    """``acc1`` -> ``acc@1``, ``image_to_text_recall@5`` -> ``i2t@5``; an unknown metric keeps its name."""
    way, found, k = metric.partition("_recall@")
    if found and way in _DIRECTIONS:
        return f"{_DIRECTIONS[way]}@{k}"
    return _SHORT.get(metric, metric)


def _legend(metrics: Sequence[str], compare: bool) -> str:
    parts = []
    if any(m.startswith("acc") for m in metrics):
        parts.append("acc@k: top-k accuracy")
    if "mean_per_class_recall" in metrics:
        parts.append("mpcr: mean per-class recall")
    if any("_recall@" in m for m in metrics):
        parts.append("i2t@k, t2i@k: recall@k from images to texts and from texts to images")
    if compare:
        parts.append(f"{_COMPARISON}: acc@1 gain")  # the header says over what
    return "; ".join(parts)


def _baselines(results: Sequence[EvalResult]) -> dict[str, float]:
    """acc@1 of each model's 'simple' templates, for models that were also run with another set: the
    comparison shows only where there is something to compare."""
    sets: dict[str, set[str]] = {}
    for r in results:
        sets.setdefault(r.model, set()).add(r.templates)
    return {
        r.model: r.metrics["acc1"]
        for r in results
        if r.templates == "simple" and "acc1" in r.metrics and len(sets[r.model]) > 1
    }


def _gain(result: EvalResult, baselines: dict[str, float]) -> str:
    base = baselines.get(result.model)
    if base is None or result.templates == "simple" or "acc1" not in result.metrics:
        return ""
    gain = (result.metrics["acc1"] - base) * 100
    return "" if gain != gain else f"{gain:+.2f} pts"  # NaN: a run with no image read


def _percent(value: float | None) -> str:
    return "" if value is None or value != value else f"{value:.2%}"


def print_table(console: Console, results: Sequence[EvalResult]) -> None:
    """The side-by-side summary on ``console``: one row per model x template set, best first, in 80 columns."""
    from rich.table import Table
    from rich.text import Text

    from clipcli.commands.console import CountedTitle
    from clipcli.evaluation.run import gate_score
    from clipcli.store.formats import printable

    if not results:
        return
    metrics = list(dict.fromkeys(k for r in results for k in r.metrics))
    with_templates = any(r.n_templates for r in results)
    baselines = _baselines(results)
    # Names come from the user (paths, templates): Text keeps rich from reading "[...]" in them as markup.
    # The title wraps at the table's width, where the console would leave a long dataset path to the terminal.
    # The count stays whole on one line ("(32 images)", never "(32" / "images)"): see CountedTitle.
    unit = ("text" if results[0].dataset.startswith("texts:") else "image") + "s" * (results[0].n != 1)
    head = printable(f"zero-shot evaluation on {results[0].dataset}")
    table = Table(title=CountedTitle(head, f"({results[0].n} {unit})"))
    table.add_column("model", overflow="fold")
    if with_templates:
        table.add_column("templates", overflow="fold")
    for header in [*map(_header, metrics), *([_COMPARISON] if baselines else [])]:
        # A figure is never split across lines: names give up the width first.
        table.add_column(header, justify="right", no_wrap=True, min_width=len(header))

    def rank(r: EvalResult) -> float:
        score = gate_score(r)[1]
        return -score if score == score else float("inf")  # best first, unmeasured last

    for r in sorted(results, key=rank):
        names = [Text(printable(r.model))]
        if with_templates:
            names.append(Text(printable(f"{r.templates} ({r.n_templates})")))
        figures = [_percent(r.metrics.get(m)) for m in metrics]
        table.add_row(*names, *figures, *([_gain(r, baselines)] if baselines else []))
    console.print(table)
    console.print(_legend(metrics, bool(baselines)), markup=False, highlight=False)
