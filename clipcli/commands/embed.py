"""`clipcli embed`: image (or text) embeddings into Parquet, NPY, CSV or JSONL."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.commands import options as opt
from clipcli.store.formats import OutputFormat, format_choices
from clipcli.store.output import Layout

FORMATS = (OutputFormat.CSV, OutputFormat.JSONL, OutputFormat.PARQUET, OutputFormat.NPY)
if TYPE_CHECKING:
    from clipcli.images.decode import ImageOptions
    from clipcli.models import ModelOptions
    from clipcli.store.output import Output

    Format = OutputFormat
else:
    Format = format_choices("Format", FORMATS)  # --format's choices: these of OutputFormat


class Dtype(str, Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"


@opt.grouped(models=opt.MODEL_OPTIONS, images=opt.DECODED_IMAGE_OPTIONS)
def embed(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="INPUTS...",
            help="Image files, folders, globs, or - for paths on stdin (texts with --text).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE|DIR/",
            help="File (.parquet, .npy, .csv, .jsonl) or a directory for a Parquet "
            "dataset written part by part (incremental, resumable), also as a URI (s3://bucket/emb/). "
            "Default: CSV on stdout.",
        ),
    ] = None,
    fmt: Annotated[
        Format | None,
        opt.format_option("Default: from --output (a directory is parquet), else csv. npy needs -o FILE.npy."),
    ] = None,
    text: Annotated[
        bool, typer.Option("--text", help="Embed texts (arguments, --texts-file, or - for stdin lines).")
    ] = False,
    texts_file: Annotated[
        str | None, typer.Option(metavar="FILE", help="With --text: a file with one text per line.")
    ] = None,
    template: opt.Template = None,
    templates: opt.Templates = None,
    normalize: Annotated[bool, typer.Option(help="L2-normalise embeddings.")] = True,
    dtype: Annotated[
        Dtype | None,
        typer.Option(
            case_sensitive=False,
            help="float16 halves the size. Default: float32; float16 with --layout clip-retrieval.",
            show_default=False,
        ),
    ] = None,
    layout: Annotated[
        Layout | None,
        typer.Option(
            case_sensitive=False,
            help="Of a directory output: parquet (clipcli's dataset), or clip-retrieval (DIR/img_emb/*.npy beside "
            "DIR/metadata/*.parquet, as clip-retrieval writes it and embedding-reader and autofaiss read it; "
            "incremental too). Default: the layout the folder has; parquet for a new one.",
            show_default=False,
        ),
    ] = None,
    part_size: Annotated[
        int,
        typer.Option(min=1, metavar="ROWS", help="Rows per part file in a directory output (each written when full)."),
    ] = 4096,
    *,
    models: ModelOptions,
    images: ImageOptions,
    engine: Annotated[
        opt.Engine,
        opt.engine_option(
            "local: this process. ray: a Ray cluster (pip install 'clipcli[ray]'), into -o DIR/; "
            "the inputs must be on a filesystem every node reads."
        ),
    ] = opt.Engine.LOCAL,
    ray_address: opt.RayAddress = None,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Let this run remove rows of files that are gone even when they are more than 10% of a "
            "dataset's rows (and more than 5): without it such a run is refused, since an unmounted share "
            "or a moved folder looks the same.",
        ),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            metavar="I/N",
            help="Embed only shard I of N (by hashed path) into -o DIR/, for job arrays: N runs of 0/N..N-1/N "
            "into one directory make the dataset one run would.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Embed images (or texts) with CLIP; reruns into a Parquet output only embed what changed."""
    from clipcli.commands.console import Progress, Tally, say
    from clipcli.engines import get_engine
    from clipcli.engines.base import EmbedEvents, EmbedJob
    from clipcli.engines.inputs import check_scale_out, find_images
    from clipcli.errors import EXIT_PARTIAL, InputError
    from clipcli.store.formats import stdout_is_tty
    from clipcli.store.output import parse_dataset_output
    from clipcli.store.refusals import refuse_dataset_among_inputs, refuse_output_over_inputs
    from clipcli.store.shard import Shard

    inputs = inputs or []
    out = parse_dataset_output(output, fmt, FORMATS, tty=stdout_is_tty(), text=text, layout=layout)
    stored = dtype.value if dtype else ("float16" if out.layout is Layout.CLIP_RETRIEVAL else "float32")
    check_scale_out(engine.value, shard, text, out, output)
    refuse_output_over_inputs(out.written_files(), [*inputs, texts_file, *(templates or [])])
    if out.is_dataset:
        refuse_dataset_among_inputs(output, inputs)
    if shard is not None:  # a malformed I/N is refused before any file is touched
        out = dataclasses.replace(out, shard=Shard.parse(shard))
    if text:
        templating = (template, templates)
        return _embed_texts(inputs, texts_file, templating, out, models, stored, normalize)
    if not inputs:
        raise InputError("no inputs: pass image files, folders, globs, or - to read paths from stdin")
    tally = Tally()
    # Locked before anything is read: a second run into this output is refused at once.
    with out.lock():
        refs, missing = find_images(inputs, out, containers=images.containers)
        for m in missing:
            tally.on_skip(m)
        lm = opt.load(models)
        opt.check_decode(opt.DecodeChoice(images.decode), lm)
        job = EmbedJob(refs, out, models, images, stored, normalize, part_size, prune)
        with Progress("embedding", len(refs)) as bar:
            tally.bar = bar
            events = EmbedEvents(on_plan=lambda n: bar.update(total=n), on_skip=tally.on_skip, on_batch=tally.on_batch)
            summary = get_engine(engine.value, ray_address).embed(lm, job, events)
    say(
        f"embedded {summary.embedded}, unchanged {summary.unchanged}, removed {summary.removed}, "
        f"skipped {tally.skipped}"
    )
    if tally.skipped:
        raise typer.Exit(EXIT_PARTIAL)


def _embed_texts(
    inputs: list[str],
    texts_file: str | None,
    templating: tuple[list[str] | None, list[str] | None],
    out: Output,
    models: ModelOptions,
    dtype: str,
    normalize: bool,
) -> None:
    """``embed --text``: one row per text, through the template ensemble given (if any)."""
    from clipcli.commands.console import prompt_progress, say
    from clipcli.engines.inputs import check_text_output
    from clipcli.engines.local import collect_texts, embed_texts
    from clipcli.zeroshot.prompts import optional_templates

    check_text_output(out)
    texts = collect_texts(inputs, texts_file)
    ensemble = optional_templates(*templating)
    with out.lock():
        lm = opt.load(models)
        n_prompts = len(texts) * (len(ensemble.templates) if ensemble else 1)
        with prompt_progress("embedding texts", n_prompts) as on_progress:
            n = embed_texts(lm, texts, ensemble, out, dtype, normalize, on_progress)
    say(f"embedded {n} text{'s' * (n != 1)}")
