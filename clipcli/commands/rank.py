"""`clipcli rank`: score images (or saved embeddings, or texts) against a text or image query."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from clipcli.commands import options as opt
from clipcli.io import OutputFormat

FORMATS = (OutputFormat.TABLE, OutputFormat.TSV, OutputFormat.CSV, OutputFormat.JSONL, OutputFormat.PARQUET)


def rank(
    arguments: Annotated[
        list[str] | None,
        typer.Argument(
            help="QUERY text then SOURCES (images, folders, globs, - for stdin, or embeddings written by "
            "embed); with --image, only SOURCES.",
            metavar="[QUERY] SOURCES...",
            show_default=False,
        ),
    ] = None,
    image: Annotated[str | None, typer.Option("--image", "-i", help="Query by this image instead of a text.")] = None,
    texts_file: Annotated[
        str | None, typer.Option(help="Rank the texts in this file (one per line) for the --image query.")
    ] = None,
    template: opt.Template = None,
    templates: opt.Templates = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many results to keep.")] = 10,
    threshold: Annotated[float | None, typer.Option(help="Drop results with a cosine score below this.")] = None,
    output: opt.Output = None,
    fmt: Annotated[
        OutputFormat | None,
        typer.Option(
            "--format",
            "-f",
            case_sensitive=False,
            show_default=False,
            help="table, tsv (score<TAB>path), csv, jsonl or parquet (default: table on a terminal, "
            "tsv in a pipe, else from --output).",
        ),
    ] = None,
    model: opt.Model = None,
    device: opt.Device = "auto",
    precision: opt.Precision = "auto",
    batch_size: opt.BatchSize = 32,
    workers: opt.Workers = 0,
    exact: opt.Exact = False,
    max_megapixels: opt.MaxMegapixels = opt.DEFAULT_MAX_MEGAPIXELS,
    cache: Annotated[
        bool,
        typer.Option(
            help="Keep a memory-mapped copy of saved Parquet embeddings in the cache, so later searches "
            "skip Parquet decoding (rebuilt when a part file changes)."
        ),
    ] = True,
) -> None:
    """Rank sources by similarity to a query, best first (cosine similarity of normalised embeddings)."""
    from clipcli.console import prompt_progress, say, skipped
    from clipcli.encode import encode_texts, iter_image_embeddings
    from clipcli.errors import EXIT_PARTIAL, InputError
    from clipcli.images import Skipped, discover
    from clipcli.io import NOT_UTF8, choose_format, is_utf8, open_writer, stdout_is_tty
    from clipcli.prompts import read_lines, resolve_templates, zero_shot_classifier
    from clipcli.rank import rank_sources, rank_texts

    args = list(arguments or [])
    out_format = choose_format(fmt, output, stdout_is_tty(), FORMATS, piped=OutputFormat.TSV)
    if image is None and not args:
        raise InputError("no query: pass a text QUERY, or --image FILE")
    query_text = None if image else args.pop(0)
    if texts_file and not image:
        raise InputError("--texts-file ranks texts for an image: pass --image FILE")
    if not args and not texts_file:
        raise InputError("no sources to rank: pass images, folders, or embeddings written by `clipcli embed`")

    key = "text" if texts_file else "path"
    schema = None
    if out_format is OutputFormat.PARQUET:
        import pyarrow as pa

        schema = pa.schema([("score", pa.float64()), (key, pa.string())])
    # Opened first: an output another run is writing, or one that cannot be written, is refused at once.
    with open_writer(out_format, output, schema=schema, columns=("score", key)) as writer:
        lm = opt.load(model, device, precision)
        if image:
            refs, missing = discover([image])
            limit = opt.max_pixels(max_megapixels)
            batch = next(iter_image_embeddings(lm, refs, 1, 0, exact, max_pixels=limit), None) if refs else None
            if batch is None or not batch.names:
                reason = (missing or (batch.skipped if batch else []))[0].reason
                raise InputError(f"{image}: cannot use as the query ({reason})")
            query = batch.embeddings[0].numpy()
        elif template or templates:
            query = zero_shot_classifier(lm, [query_text], resolve_templates(template, templates))[0].numpy()  # type: ignore[list-item]
        else:
            query = encode_texts(lm, [query_text])[0].numpy()  # type: ignore[list-item]

        n_skipped = 0

        def on_skip(s: object) -> None:
            nonlocal n_skipped
            n_skipped += 1
            skipped(s.path, s.reason)  # type: ignore[attr-defined]

        if texts_file:
            texts = read_lines(texts_file, "texts")
            with prompt_progress("encoding texts", len(texts)) as on_progress:
                embeddings = encode_texts(lm, texts, on_progress=on_progress).numpy()
            hits = rank_texts(query, texts, embeddings, top_k, threshold)
        else:
            limit = opt.max_pixels(max_megapixels)
            hits = rank_sources(
                lm, query, args, top_k, threshold, batch_size, workers, exact, on_skip, sys.stdin, cache, limit
            )
        if out_format is OutputFormat.PARQUET:
            for h in hits:
                if not is_utf8(h.name):
                    on_skip(Skipped(h.name, NOT_UTF8))
            hits = [h for h in hits if is_utf8(h.name)]
        writer.write([{"score": round(h.score, 6), key: h.name} for h in hits])
    say(f"ranked {len(hits)} result{'s' * (len(hits) != 1)}" + (f", skipped {n_skipped}" if n_skipped else ""))
    if n_skipped:
        raise typer.Exit(EXIT_PARTIAL)
