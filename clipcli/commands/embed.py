"""`clipcli embed`: image (or text) embeddings into Parquet, NPY, CSV or JSONL."""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager, nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from clipcli.commands import options as opt
from clipcli.store.formats import OutputFormat


class Format(str, Enum):
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"
    NPY = "npy"


class Dtype(str, Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"


FORMATS = tuple(OutputFormat(f.value) for f in Format)


def _is_dataset_dir(output: str | None) -> bool:
    """A directory of Parquet parts: named with a trailing slash or without an extension, or an
    existing folder named ``*.parquet`` (as Spark writes them); an existing ``x.csv`` folder is not."""
    from clipcli.atomic import is_stream
    from clipcli.store.remote import is_remote, is_remote_dataset

    if is_remote(output):
        return is_remote_dataset(output or "")
    if not output or output == "-" or is_stream(Path(output)):
        return False
    suffix = Path(output).suffix.lower()
    return output.endswith(("/", os.sep)) or not suffix or (suffix in (".parquet", ".pq") and Path(output).is_dir())


def _written_files(output: str | None, fmt: OutputFormat) -> list[str]:
    """The files (or the folder) a run writes: the output, and an NPY output's sidecar."""
    if not output or output == "-":
        return []
    if fmt is OutputFormat.NPY:
        from clipcli.store.dataset import npy_sidecar

        return [output, str(npy_sidecar(Path(output)))]
    return [output]


def _output_lock(output: str | None, is_dir: bool, shard: str | None = None) -> AbstractContextManager[object]:
    """The output's lock, held from before anything is read; none for stdout, a FIFO or a pipe. A shard
    run takes its shard's locks instead, which let the other shards write the same directory."""
    from clipcli.atomic import OutputLock, is_stream
    from clipcli.store.remote import is_remote

    if not output or output == "-" or is_remote(output) or is_stream(Path(output)):
        return nullcontext()  # an object store has no locks (see clipcli.store.remote)
    if shard is not None:
        from clipcli.store.shard import Shard, ShardLocks

        return ShardLocks(Path(output), Shard.parse(shard))
    return OutputLock(Path(output), is_dir)


def _check_scale_out(engine: opt.Engine, shard: str | None, text: bool, into_dir: bool, output: str | None) -> None:
    """--engine ray and --shard write parts into a dataset directory, from several processes."""
    wanted = [f for f, on in (("--engine ray", engine is opt.Engine.RAY), (f"--shard {shard}", shard)) if on]
    if not wanted:
        return
    from clipcli.errors import InputError

    if text:
        raise InputError(f"{' and '.join(wanted)}: texts are embedded in this process; drop the option")
    if not into_dir:
        verb = "need" if len(wanted) > 1 else "needs"
        raise InputError(
            f"{' and '.join(wanted)} {verb} a Parquet dataset directory as output: -o DIR/ (not {output or 'stdout'})"
        )


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
    dtype: Annotated[Dtype, typer.Option(case_sensitive=False, help="float16 halves the size.")] = Dtype.FLOAT32,
    part_size: Annotated[
        int,
        typer.Option(min=1, metavar="ROWS", help="Rows per part file in a directory output (each written when full)."),
    ] = 4096,
    model: opt.Model = None,
    device: opt.Device = "auto",
    precision: opt.Precision = opt.PrecisionChoice.AUTO,
    batch_size: opt.BatchSize = 32,
    workers: opt.Workers = 0,
    exact: opt.Exact = False,
    max_megapixels: opt.MaxMegapixels = opt.DEFAULT_MAX_MEGAPIXELS,
    decode: opt.Decode = opt.DecodeChoice.AUTO,
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
    from clipcli.commands.console import Progress, Tally, prompt_progress, say
    from clipcli.engines.local import embed_images, embed_text_list
    from clipcli.errors import EXIT_PARTIAL, InputError
    from clipcli.images.core import discover, nothing_found
    from clipcli.store.formats import choose_format, has_format_suffix, refuse_output_over_inputs, stdout_is_tty
    from clipcli.store.remote import check_remote_output, local_output
    from clipcli.zeroshot.prompts import read_lines, resolve_templates

    element = dtype.value
    inputs = inputs or []
    output = local_output(output)
    into_dir = _is_dataset_dir(output) and fmt in (None, Format.PARQUET)
    check_remote_output(output, into_dir, text)
    if into_dir:
        out_format = OutputFormat.PARQUET
    elif output and not text and fmt is None and not has_format_suffix(output) and Path(output).is_dir():
        raise InputError(
            f"{output}: is a directory; to write a Parquet dataset into it, end the name with a slash "
            f"(-o {output.rstrip('/' + os.sep)}/), or name a file (.parquet, .npy, .csv or .jsonl)"
        )
    else:
        out_format = choose_format(opt.output_format(fmt), output, stdout_is_tty(), FORMATS)
    _check_scale_out(engine, shard, text, into_dir, output)
    written = _written_files(output, out_format)
    refuse_output_over_inputs(written, [*inputs, texts_file])
    if shard is not None:
        from clipcli.store.shard import Shard

        Shard.parse(shard)  # a malformed I/N is refused before any file is touched

    if text:
        if into_dir and output and (output.endswith(("/", os.sep)) or Path(output).is_dir()):
            raise InputError(
                f"{output}: --text writes one file (.parquet, .npy, .csv or .jsonl), not a dataset directory"
            )
        texts = [t for arg in inputs for t in (sys.stdin.read().splitlines() if arg == "-" else [arg])]
        texts = [t.strip() for t in texts if t.strip()]
        if texts_file:
            texts += read_lines(texts_file, "texts")
        if not texts:
            raise InputError("no texts: pass them as arguments, with --texts-file, or on stdin with -")
        ensemble = resolve_templates(template, templates) if (template or templates) else None
        with _output_lock(output, into_dir):
            lm = opt.load(model, device, precision)
            n_prompts = len(texts) * (len(ensemble.templates) if ensemble else 1)
            with prompt_progress("embedding texts", n_prompts) as on_progress:
                n = embed_text_list(lm, texts, ensemble, out_format, output, element, normalize, on_progress)
        say(f"embedded {n} text{'s' * (n != 1)}")
        return

    if not inputs:
        raise InputError("no inputs: pass image files, folders, globs, or - to read paths from stdin")
    tally = Tally()
    # Locked before anything is read: a second run into this output is refused at once.
    with _output_lock(output, into_dir, shard):
        refs, missing = discover(inputs, sys.stdin)
        if not refs:
            raise nothing_found(inputs, missing)
        if not into_dir:  # an image found in a folder given as input (a folder output holds none)
            refuse_output_over_inputs(written, (r.file for r in refs))
        for m in missing:
            tally.on_skip(m)
        part_of = None
        if shard is not None:
            from clipcli.store.shard import Shard

            part_of = Shard.parse(shard)
            refs = part_of.select(refs)
        lm = opt.load(model, device, precision)
        opt.check_decode(decode, lm)
        with Progress("embedding", len(refs)) as bar:
            tally.bar = bar
            if engine is opt.Engine.RAY:
                from clipcli.engines.ray import embed_on_ray, model_spec

                choice = precision.value if isinstance(precision, opt.PrecisionChoice) else str(precision)
                summary = embed_on_ray(
                    lm,
                    model_spec(model, device, choice, lm),
                    refs,
                    str(output),
                    address=ray_address,
                    shard=part_of,
                    dtype=element,
                    normalize=normalize,
                    batch_size=batch_size,
                    exact=exact,
                    part_size=part_size,
                    max_pixels=opt.max_pixels(max_megapixels),
                    on_skip=tally.on_skip,
                    on_plan=lambda n: bar.update(total=n),
                    on_batch=tally.on_batch,
                    prune=prune,
                )
            else:
                summary = embed_images(
                    lm,
                    refs,
                    out_format,
                    output,
                    dtype=element,
                    normalize=normalize,
                    batch_size=batch_size,
                    workers=workers,
                    exact=exact,
                    part_size=part_size,
                    max_pixels=opt.max_pixels(max_megapixels),
                    on_skip=tally.on_skip,
                    on_plan=lambda n: bar.update(total=n),
                    on_batch=tally.on_batch,
                    shard=part_of,
                    decode=decode.value,
                    prune=prune,
                )
    say(
        f"embedded {summary.embedded}, unchanged {summary.unchanged}, removed {summary.removed}, "
        f"skipped {tally.skipped}"
    )
    if tally.skipped:
        raise typer.Exit(EXIT_PARTIAL)
