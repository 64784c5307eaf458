"""`clipcli eval`: zero-shot accuracy of models x template sets, for scripts and people."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.commands import options as opt
from clipcli.evaluation.datasets import Benchmark

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from clipcli.evaluation.datasets import CaptionPairs, LabelledImages
    from clipcli.evaluation.run import EvalResult, ImageEmbeddings
    from clipcli.models import LoadedModel


def evaluate(
    data: Annotated[
        Path | None,
        typer.Argument(
            metavar="[DATA]",
            help="An image folder (leaf folder = class) or a CSV/Parquet manifest (path + label, or "
            "path + text for retrieval).",
            show_default=False,
        ),
    ] = None,
    dataset: Annotated[
        Benchmark | None, typer.Option(help="A benchmark's test split, via torchvision.", show_default=False)
    ] = None,
    data_root: Annotated[
        Path, typer.Option(metavar="DIR", help="Where CIFAR files are (or are downloaded to).")
    ] = Path("data"),
    download: Annotated[bool, typer.Option(help="Download CIFAR if missing (needs a network).")] = False,
    classnames: Annotated[
        str | None,
        typer.Option(
            metavar="FILE", help="Names for prompts: 'folder<TAB>name' lines, or one name per class in order."
        ),
    ] = None,
    models: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            metavar="NAME|FILE",
            help="Model to evaluate (repeatable). Default: $CLIPCLI_MODEL or ViT-B/32.",
            show_default=False,
        ),
    ] = None,
    template: opt.Template = None,
    templates: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SET",
            help="Template set to compare (repeatable): simple, cifar, imagenet or a file.",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, metavar="N", help="Evaluate a random subset of N images.")] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed for --limit.")] = 0,
    cache: Annotated[
        bool, typer.Option(help="Reuse cached class text embeddings (keyed by model, templates, class names).")
    ] = True,
    report: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Write the JSON report here. Its JSON Schema is clipcli/report.schema.json, installed with the "
            "package; the README shows an example.",
        ),
    ] = None,
    predictions: Annotated[
        str | None, typer.Option(metavar="FILE", help="Write per-image predictions here (.csv or .parquet).")
    ] = None,
    plots: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Write a confusion-matrix PNG and an HTML page of mistakes here.")
    ] = None,
    min_acc1: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            metavar="X",
            help="Exit 1 when any top-1 accuracy is below this fraction (0-1), for CI gates. For a retrieval "
            "manifest, the gate is recall@1: the smaller of image->text and text->image.",
        ),
    ] = None,
    device: opt.Device = "auto",
    precision: opt.Precision = opt.PrecisionChoice.AUTO,
    batch_size: opt.BatchSize = 32,
    workers: opt.Workers = 0,
    exact: opt.Exact = False,
    max_megapixels: opt.MaxMegapixels = opt.DEFAULT_MAX_MEGAPIXELS,
    engine: Annotated[
        opt.Engine,
        opt.engine_option(
            "ray: embed the images on a Ray cluster (pip install 'clipcli[ray]'); texts and scores stay here."
        ),
    ] = opt.Engine.LOCAL,
    ray_address: opt.RayAddress = None,
) -> None:
    """Evaluate zero-shot classification (or caption retrieval) and compare models and prompt sets."""
    from clipcli.commands.console import Progress, Tally, err, prompt_progress, say
    from clipcli.commands.eval_text import evaluate_texts
    from clipcli.errors import EXIT_PARTIAL, InputError, OutputError
    from clipcli.evaluation import datasets
    from clipcli.evaluation.run import (
        PREDICTION_COLUMNS,
        classification_result,
        embed_dataset,
        prediction_rows,
        retrieval_result,
        write_report,
    )
    from clipcli.evaluation.text import is_text_manifest as text_manifest
    from clipcli.models import default_model
    from clipcli.store.formats import OutputFormat, choose_format, open_writer, refuse_output_over_inputs
    from clipcli.zeroshot.prompts import resolve_templates

    refuse_output_over_inputs([report, predictions, plots], [data, classnames, *(models or []), *(templates or [])])
    if plots is not None:
        from clipcli.evaluation.plots import require_matplotlib

        require_matplotlib()
    pred_format = (
        choose_format(None, predictions, False, (OutputFormat.CSV, OutputFormat.PARQUET), format_flag=None)
        if predictions
        else None
    )
    if report is not None and report.is_dir():
        raise OutputError(f"{report}: cannot write (is a directory)")
    if data is not None and dataset is None and text_manifest(data):  # text,label: NLI models (eval_text.py)
        outputs, run = (report, predictions, min_acc1), (device, precision.value, batch_size)
        image_only = {"--plots": plots, "--classnames": classnames}
        return evaluate_texts(data, models, (template, templates), (limit, seed), outputs, run, image_only)
    template_sets = [resolve_templates(template, None)] if template else []
    names = dict.fromkeys(templates or ([] if template else ["simple"]))  # each set once
    template_sets += [resolve_templates(None, name) for name in names]

    source = datasets.load_dataset(data, dataset, data_root, download, classnames)
    if isinstance(source, datasets.CaptionPairs):
        classification_only = [f for f, v in (("--predictions", predictions), ("--plots", plots)) if v]
        classification_only += ["--template(s)"] if (template or templates) else []
        if classification_only:
            raise InputError(
                f"{data}: a retrieval manifest (path,text) has no classes: {', '.join(classification_only)} "
                "apply to classification"
            )
    if isinstance(source, datasets.LabelledImages):
        for folder in source.empty_folders:
            say(f"note: {folder}: no images, class left out")
        source = datasets.limit(source, limit, seed)

    # Every output is locked (and so found writable) now, not after the whole evaluation has run.
    with _locked_outputs(report, predictions, plots):
        results: list[EvalResult] = []
        n_skipped = 0
        for name in models or [default_model()]:
            lm = opt.load(name, device, precision)
            tally = Tally()  # per model: each embeds the images again, and reports what it skipped
            with Progress(f"embedding ({name})", len(source)) as tally.bar:
                limit_px = opt.max_pixels(max_megapixels)
                if engine is opt.Engine.RAY:
                    images = _embed_on_ray(
                        lm, name, device, precision, source, ray_address, batch_size, exact, tally.on_batch, limit_px
                    )
                else:
                    images = embed_dataset(lm, source, batch_size, workers, exact, tally.on_batch, limit_px)
            for s in images.skipped:
                tally.on_skip(s)
            n_skipped = max(n_skipped, tally.skipped)
            if isinstance(source, datasets.CaptionPairs):
                results.append(retrieval_result(lm, source, images))
            else:
                for ts in template_sets:
                    with prompt_progress(f"encoding prompts ({name})", len(source.classes) * len(ts.templates)) as bar:
                        results.append(classification_result(lm, source, images, ts, cache, on_progress=bar))

        _print_table(err, results)
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
                    say(f"wrote {write_plots(r, plots)}")
    failed = _gate(results, min_acc1)
    for line in failed:
        say(line)
    if failed or n_skipped:
        raise typer.Exit(EXIT_PARTIAL)


def _embed_on_ray(
    lm: LoadedModel,
    model: str,
    device: str,
    precision: opt.PrecisionChoice | str,
    source: LabelledImages | CaptionPairs,
    address: str | None,
    batch_size: int,
    exact: bool,
    on_batch: Callable[[int], None],
    max_pixels: int | None,
) -> ImageEmbeddings:
    """The dataset's images embedded on a Ray cluster, as :func:`clipcli.evaluation.run.embed_dataset` returns them."""
    from clipcli.engines.ray import embed_dataset_on_ray, model_spec
    from clipcli.errors import InputError

    if source.refs is None:
        raise InputError("--engine ray embeds image files; a torchvision benchmark lives in this process's memory")
    choice = precision.value if isinstance(precision, opt.PrecisionChoice) else str(precision)
    spec = model_spec(model, device, choice, lm)
    return embed_dataset_on_ray(
        lm,
        spec,
        source.refs,
        address=address,
        batch_size=batch_size,
        exact=exact,
        on_batch=on_batch,
        max_pixels=max_pixels,
    )


def _locked_outputs(report: Path | None, predictions: str | None, plots: Path | None) -> ExitStack:
    from clipcli.atomic import OutputLock

    held = ExitStack()
    try:
        for file in (report, predictions):
            if file:
                held.enter_context(OutputLock(Path(file), is_dir=False))
        if plots is not None:
            held.enter_context(OutputLock(plots, is_dir=True))
    except BaseException:
        held.close()
        raise
    return held


def _gate(results: Sequence[EvalResult], min_acc1: float | None) -> list[str]:
    """One line for each result below ``--min-acc1`` (a result with nothing measured is below it)."""
    from clipcli.evaluation.run import gate_score

    if min_acc1 is None:
        return []
    lines = []
    for r in results:
        name, value = gate_score(r)
        if not value >= min_acc1:
            lines.append(f"{name} {value:.4f} of {_run_name(r)} is below --min-acc1 {min_acc1}")
    return lines


def _run_name(result: EvalResult) -> str:
    """The model, and the template set where there is one (retrieval has none)."""
    return f"{result.model} / {result.templates}" if result.n_templates else result.model


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


def _print_table(console: Console, results: Sequence[EvalResult]) -> None:
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
    unit = "texts" if results[0].dataset.startswith("texts:") else "images"
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
