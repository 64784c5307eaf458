"""`clipcli eval`: zero-shot accuracy of models x template sets, for scripts and people."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.commands import options as opt
from clipcli.evaluation.datasets import Benchmark, LabelledImages

if TYPE_CHECKING:
    from clipcli.engines.base import Engine
    from clipcli.evaluation.datasets import CaptionPairs
    from clipcli.evaluation.run import ImageEmbeddings
    from clipcli.models import LoadedModel, ModelOptions


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
        opt.repeatable(
            "--model",
            "-m",
            metavar="NAME|FILE",
            help="Model to evaluate (repeatable). Default: $CLIPCLI_MODEL or ViT-B/32.",
        ),
    ] = None,
    template: opt.Template = None,
    templates: Annotated[
        list[str] | None,
        opt.repeatable(metavar="SET", help="Template set to compare (repeatable): simple, cifar, imagenet or a file."),
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
            "package; the documentation (Inputs and outputs) shows an example.",
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
    from clipcli.commands.console import err, say
    from clipcli.commands.eval_table import print_table
    from clipcli.commands.eval_text import evaluate_texts
    from clipcli.engines import get_engine
    from clipcli.errors import EXIT_PARTIAL, OutputError
    from clipcli.evaluation import session
    from clipcli.evaluation.run import gate_failures
    from clipcli.evaluation.text import is_text_manifest as text_manifest
    from clipcli.models import ModelOptions, default_model
    from clipcli.store import ownership
    from clipcli.store.output import lock_files, prediction_format
    from clipcli.store.refusals import refuse_one_file_twice, refuse_output_over_inputs

    refuse_output_over_inputs([report, predictions, plots], [data, classnames, *(models or []), *(templates or [])])
    refuse_one_file_twice({"--report": report, "--predictions": predictions})
    if plots is not None:
        from clipcli.evaluation.plots import require_matplotlib

        require_matplotlib()
    pred_format = prediction_format(predictions)
    if report is not None and report.is_dir():
        raise OutputError(f"{report}: cannot write (is a directory)")
    ownership.refuse_unless_own(report, ownership.report_is_own, "JSON report")
    if predictions is not None and pred_format is not None:  # found now, not after the whole evaluation
        own = partial(ownership.rows_are_own, Path(predictions), pred_format.value, first=("model",))
        ownership.refuse_unless_own(Path(predictions), own, f"{pred_format.value} predictions")
    if data is not None and dataset is None and text_manifest(data):  # text,label: NLI models (eval_text.py)
        outputs, run = (report, predictions, min_acc1), (device, precision.value, batch_size)
        image_only = {"--plots": plots, "--classnames": classnames}
        return evaluate_texts(data, models, (template, templates), (limit, seed), outputs, run, image_only)
    refused = [f for f, v in (("--predictions", predictions), ("--plots", plots)) if v]
    refused += ["--template(s)"] if (template or templates) else []
    source = session.load_source(data, dataset, data_root, download, classnames, refused, (limit, seed))
    sets = session.template_sets(template, templates, source.templates if isinstance(source, LabelledImages) else None)
    for folder in source.empty_folders if isinstance(source, LabelledImages) else []:
        say(f"note: {folder}: no images, class left out")
    runner = get_engine(engine.value, ray_address)
    # Every output is locked (and so found writable) now, not after the whole evaluation has run.
    with lock_files(report, predictions, folders=[plots]):
        results, n_skipped = [], 0
        for name in models or [default_model()]:
            lm = opt.load(name, device, precision)
            options = ModelOptions(name, device, opt.precision_value(precision))
            images, skipped = _embed(runner, lm, name, options, source, batch_size, workers, exact, max_megapixels)
            n_skipped = max(n_skipped, skipped)
            results += session.model_results(lm, name, source, images, sets, cache, _prompt_progress)
        print_table(err, results)
        session.write_outputs(results, report, predictions, pred_format, plots, lambda page: say(f"wrote {page}"))
    failed = gate_failures(results, min_acc1)
    for line in failed:
        say(line)
    if failed or n_skipped:
        raise typer.Exit(EXIT_PARTIAL)


def _embed(
    engine: Engine,
    lm: LoadedModel,
    name: str,
    model: ModelOptions,
    source: LabelledImages | CaptionPairs,
    batch_size: int,
    workers: int,
    exact: bool,
    max_megapixels: float,
) -> tuple[ImageEmbeddings, int]:
    """The dataset's images embedded by ``engine``, with a progress bar; and how many were skipped
    (each reported: per model, since each embeds the images again)."""
    from clipcli.commands.console import Progress, Tally
    from clipcli.engines.base import DatasetJob

    tally = Tally()
    with Progress(f"embedding ({name})", len(source)) as tally.bar:
        images = opt.image_options(batch_size, workers, exact, max_megapixels)
        embedded = engine.embed_dataset(lm, DatasetJob(source, model, images), tally.on_batch)
    for s in embedded.skipped:
        tally.on_skip(s)
    return embedded, tally.skipped


def _prompt_progress(label: str, total: int) -> AbstractContextManager[Callable[[int], None]]:
    from clipcli.commands.console import prompt_progress

    return prompt_progress(label, total)
