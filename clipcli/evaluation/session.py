"""One ``eval`` run over images, in steps the command calls in order: the template sets compared, the
dataset read (and checked against the options that apply to it), each model's results, the outputs.

The images are embedded by whatever the caller passes (an engine: :mod:`clipcli.engines`); progress is
reported through callbacks, so that nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from clipcli.errors import InputError
from clipcli.evaluation import datasets
from clipcli.evaluation.run import EvalResult, ImageEmbeddings, classification_result, retrieval_result

if TYPE_CHECKING:
    from clipcli.models import LoadedModel
    from clipcli.store.formats import OutputFormat
    from clipcli.zeroshot.prompts import TemplateSet

PromptProgress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


def template_sets(
    template: list[str] | None, templates: list[str] | None, own: tuple[str, ...] | None = None
) -> list[TemplateSet]:
    """The sets compared: the --template ensemble (if any), then each --templates set once (when neither
    is given: the dataset's ``own`` templates, a CLIP_benchmark dataset's, else ``simple``)."""
    from clipcli.zeroshot.prompts import TemplateSet, check_template, resolve_templates

    if own and not template and not templates:
        return [TemplateSet("benchmark", tuple(check_template(t) for t in own))]
    sets = [resolve_templates(template, None)] if template else []
    names = dict.fromkeys(templates or ([] if template else ["simple"]))  # each set once
    return sets + [resolve_templates(None, name) for name in names]


def load_source(
    data: Path | None,
    dataset: datasets.Benchmark | None,
    data_root: Path,
    download: bool,
    classnames: str | None,
    classification_only: Sequence[str],
    subset: tuple[int | None, int],
) -> datasets.LabelledImages | datasets.CaptionPairs:
    """The dataset (a ``--limit``/``--seed`` subset of labelled images); ``classification_only`` names
    the options given that a retrieval manifest (path,text) refuses."""
    source = datasets.load_dataset(data, dataset, data_root, download, classnames)
    if isinstance(source, datasets.CaptionPairs):
        if classification_only:
            raise InputError(
                f"{data}: a retrieval manifest (path,text) has no classes: {', '.join(classification_only)} "
                "apply to classification"
            )
        return source
    return datasets.limit(source, *subset)


def model_results(
    lm: LoadedModel,
    name: str,
    source: datasets.LabelledImages | datasets.CaptionPairs,
    images: ImageEmbeddings,
    sets: Sequence[TemplateSet],
    cache: bool,
    progress: PromptProgress,
) -> list[EvalResult]:
    """One model's (``name``: as the user named it) results: its retrieval recall, or its accuracy with
    each template set."""
    if isinstance(source, datasets.CaptionPairs):
        return [retrieval_result(lm, source, images)]
    results = []
    for ts in sets:
        with progress(f"encoding prompts ({name})", len(source.classes) * len(ts.templates)) as bar:
            results.append(classification_result(lm, source, images, ts, cache, on_progress=bar))
    return results


def write_outputs(
    results: Sequence[EvalResult],
    report: Path | None,
    predictions: str | None,
    pred_format: OutputFormat | None,
    plots: Path | None,
    on_written: Callable[[Path], None],
) -> None:
    """The JSON report, the predictions file and the plots asked for (``on_written``: each plots page)."""
    from clipcli.evaluation.run import PREDICTION_COLUMNS, prediction_rows, write_report
    from clipcli.store.formats import open_writer

    if report:
        write_report(results, report)
    if predictions and pred_format:
        with open_writer(pred_format, predictions, columns=PREDICTION_COLUMNS) as writer:
            for r in results:
                writer.write(prediction_rows(r))
    if plots is not None:
        from clipcli.evaluation.plots import write_plots

        for r in results:
            if r.predictions is not None:
                on_written(write_plots(r, plots))
