"""`clipcli rank`: score images (or saved embeddings, or texts) against a text or image query."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.commands import options as opt
from clipcli.store.formats import OutputFormat

if TYPE_CHECKING:
    from collections.abc import Iterable

    from clipcli.models import LoadedModel
    from clipcli.search.rank import IndexChoice, SourceScan
    from clipcli.zeroshot.prompts import TemplateSet


class Format(str, Enum):
    TABLE = "table"
    TSV = "tsv"
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"


FORMATS = tuple(OutputFormat(f.value) for f in Format)


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
    image: Annotated[
        str | None, typer.Option("--image", "-i", metavar="FILE", help="Query by this image instead of a text.")
    ] = None,
    texts_file: Annotated[
        str | None,
        typer.Option(metavar="FILE", help="Rank the texts in this file (one per line) for the --image query."),
    ] = None,
    queries_file: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help="Many text queries, one per line, answered in one pass over the sources; "
            "the output gains a query column.",
        ),
    ] = None,
    image_queries: Annotated[
        str | None,
        typer.Option(metavar="FILE", help="As --queries-file, with one query image path per line."),
    ] = None,
    index: Annotated[
        str | None,
        typer.Option(
            metavar="INDEX",
            help="Search saved embeddings through this index (built by `clipcli index`). Default: the "
            "index beside them (emb/ -> emb.index, emb.npy -> emb.npy.index) when there is one.",
        ),
    ] = None,
    no_index: Annotated[
        bool, typer.Option("--no-index", help="Scan every saved embedding exactly, even where an index exists.")
    ] = False,
    template: opt.Template = None,
    templates: opt.Templates = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, metavar="K", help="How many results to keep.")] = 10,
    threshold: Annotated[
        float | None, typer.Option(metavar="SCORE", help="Drop results with a cosine score below this.")
    ] = None,
    output: opt.Output = None,
    null: Annotated[
        bool,
        typer.Option(
            "--null",
            "-0",
            help="Print only the paths, best first, each ended by a NUL byte, for `xargs -0` (names may hold "
            "newlines; a line-separated output refuses such a name).",
        ),
    ] = False,
    fmt: Annotated[
        Format | None,
        opt.format_option(
            "tsv is score<TAB>path lines; the others have path (or text) and score columns. Default: a "
            "table on a terminal, tsv in a pipe, else from --output's extension."
        ),
    ] = None,
    model: opt.Model = None,
    device: opt.Device = "auto",
    precision: opt.Precision = opt.PrecisionChoice.AUTO,
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
    from clipcli.commands.console import Tally, prompt_progress, say
    from clipcli.errors import EXIT_PARTIAL, InputError
    from clipcli.images.core import Skipped
    from clipcli.search.rank import SourceScan, query_embedding, rank_sources, rank_texts, refuse_flat_embeddings
    from clipcli.store.formats import NOT_UTF8, choose_format, is_utf8, open_writer, stdout_is_tty
    from clipcli.zeroshot.encode import encode_texts
    from clipcli.zeroshot.prompts import read_lines, resolve_templates

    args = list(arguments or [])
    if null and (output or fmt or texts_file or queries_file or image_queries):
        raise InputError(
            "-0/--null prints the paths of one query on stdout: leave out --output, --format, --texts-file, "
            "--queries-file and --image-queries"
        )
    out_format = choose_format(opt.output_format(fmt), output, stdout_is_tty(), FORMATS, piped=OutputFormat.TSV)
    if null:
        out_format = OutputFormat.TSV  # its writer prints nothing here: the paths go out as bytes
    from clipcli.store.formats import refuse_output_over_inputs

    refuse_output_over_inputs([output], [image, texts_file, queries_file, image_queries, index], datasets=args)
    if index and no_index:
        raise InputError("give --index or --no-index, not both")
    scan = SourceScan(batch_size, workers, exact, opt.max_pixels(max_megapixels), cache, _index_choice(index, no_index))
    if queries_file or image_queries:
        if image or texts_file or (queries_file and image_queries):
            raise InputError("--queries-file/--image-queries take the place of QUERY, --image and --texts-file")
        _rank_batch(
            queries_file,
            image_queries,
            args,
            ensemble_of(template, templates),
            top_k,
            threshold,
            output,
            out_format,
            model,
            device,
            precision,
            scan,
        )
        return
    if image is None and not args:
        raise InputError("no query: pass a text QUERY, or --image FILE")
    if image is not None and args and _looks_like_text(args[0]):
        raise InputError(f"give a QUERY or --image, not both ({args[0]!r} is not a file, folder or pattern)")
    query_text = None if image else args.pop(0)
    if texts_file and not image:
        raise InputError("--texts-file ranks texts for an image: pass --image FILE")
    if not args and not texts_file:
        hint = f" ({query_text!r} was taken as the query text)" if query_text and os.path.exists(query_text) else ""
        raise InputError(
            f"no sources to rank: pass a query, then images, folders, or embeddings written by `clipcli embed`{hint}"
        )
    refuse_flat_embeddings(args)
    ensemble = resolve_templates(template, templates) if (template or templates) else None

    key = "text" if texts_file else "path"
    schema = None
    if out_format is OutputFormat.PARQUET:
        import pyarrow as pa

        schema = pa.schema([(key, pa.string()), ("score", pa.float64())])
    tally = Tally()
    # Opened first: an output another run is writing, or one that cannot be written, is refused at once.
    with open_writer(out_format, output, schema=schema, columns=(key, "score")) as writer:
        lm = _load(model, [] if texts_file else args, device, precision)
        query = query_embedding(lm, query_text, image, ensemble, exact, scan.max_pixels)
        if texts_file:
            texts = read_lines(texts_file, "texts")
            with prompt_progress("encoding texts", len(texts)) as on_progress:
                embeddings = encode_texts(lm, texts, on_progress=on_progress).numpy()
            hits = rank_texts(query, texts, embeddings, top_k, threshold)
        else:
            hits = rank_sources(
                lm, query, args, top_k, threshold, replace(scan, on_skip=tally.on_skip, stdin=sys.stdin)
            )
        if out_format is OutputFormat.PARQUET:
            for h in hits:
                if not is_utf8(h.name):
                    tally.on_skip(Skipped(h.name, NOT_UTF8))
            hits = [h for h in hits if is_utf8(h.name)]
        if null:
            write_paths([h.name for h in hits], null=True)
        elif out_format is OutputFormat.TSV:  # score first, for sort -n and cut
            _refuse_newlines(h.name for h in hits)
            writer.write([{"score": round(h.score, 6), key: h.name} for h in hits])
        else:
            writer.write([{key: h.name, "score": round(h.score, 6)} for h in hits])
    found = f"ranked {len(hits)} result{'s' * (len(hits) != 1)}"
    say(found + (f", skipped {tally.skipped}" if tally.skipped else ""))
    if tally.skipped:
        raise typer.Exit(EXIT_PARTIAL)


def ensemble_of(template: list[str] | None, templates: list[str] | None) -> TemplateSet | None:
    from clipcli.zeroshot.prompts import resolve_templates

    return resolve_templates(template, templates) if (template or templates) else None


def _index_choice(index: str | None, no_index: bool) -> IndexChoice:
    from pathlib import Path

    from clipcli.commands.console import say
    from clipcli.search.rank import IndexChoice

    return IndexChoice(not no_index, Path(index) if index else None, say)


def _rank_batch(
    queries_file: str | None,
    image_queries: str | None,
    sources: list[str],
    ensemble: TemplateSet | None,
    top_k: int,
    threshold: float | None,
    output: str | None,
    out_format: OutputFormat,
    model: str | None,
    device: str,
    precision: opt.PrecisionChoice,
    scan: SourceScan,
) -> None:
    """Many queries, one pass over the sources: rows of (query, path, score), each query's best first."""
    from clipcli.commands.console import Tally, say
    from clipcli.errors import EXIT_PARTIAL, InputError
    from clipcli.search.rank import query_embeddings, rank_many, refuse_flat_embeddings
    from clipcli.store.formats import open_writer
    from clipcli.zeroshot.prompts import read_lines

    if not sources:
        raise InputError("no sources to rank: pass images, folders, or embeddings written by `clipcli embed`")
    refuse_flat_embeddings(sources)
    queries = read_lines(queries_file or image_queries or "-", "queries")
    schema = None
    if out_format is OutputFormat.PARQUET:
        import pyarrow as pa

        schema = pa.schema([("query", pa.string()), ("path", pa.string()), ("score", pa.float64())])
    tally = Tally()
    columns = ("query", "score", "path") if out_format is OutputFormat.TSV else ("query", "path", "score")
    with open_writer(out_format, output, schema=schema, columns=columns) as writer:
        lm = _load(model, sources, device, precision)
        if image_queries:
            vectors = query_embeddings(lm, images=queries, exact=scan.exact, max_pixels=scan.max_pixels)
        else:
            vectors = query_embeddings(lm, texts=queries, templates=ensemble)
        results = rank_many(
            lm, vectors, sources, top_k, threshold, replace(scan, on_skip=tally.on_skip, stdin=sys.stdin)
        )
        rows = [
            {"query": q, "path": h.name, "score": round(h.score, 6)}
            for q, hits in zip(queries, results, strict=True)
            for h in hits
        ]
        if out_format is OutputFormat.TSV:
            _refuse_newlines(h.name for hits in results for h in hits)
        writer.write([{c: r[c] for c in columns} for r in rows])
    say(
        f"answered {len(queries)} quer{'ies' if len(queries) != 1 else 'y'} with {len(rows)} results"
        + (f", skipped {tally.skipped}" if tally.skipped else "")
    )
    if tally.skipped:
        raise typer.Exit(EXIT_PARTIAL)


def _load(model: str | None, sources: list[str], device: str, precision: opt.PrecisionChoice) -> LoadedModel:
    """The model ``-m`` names; without it, the one saved embeddings among ``sources`` record (name and
    checksum, checked as they are read), else the default."""
    from pathlib import Path

    from clipcli.errors import ModelError
    from clipcli.store.saved import is_embedding_source, saved_tag

    if model is None:
        for source in sources:
            if source != "-" and is_embedding_source(source):
                tag, _ = saved_tag(Path(source))
                if not tag.sha256:  # no model recorded: the default, which the scan checks as ever
                    break
                try:
                    return opt.load(tag.name, device, precision)
                except ModelError as e:
                    raise ModelError(
                        f"{source}: made with {tag.name}, which cannot be loaded here ({e}); pass --model"
                    ) from e
    return opt.load(model, device, precision)


def write_paths(paths: list[str], null: bool) -> None:
    """Paths on stdout as the bytes of their names (a name that is not UTF-8 included), each ended by a
    NUL byte, or by a newline (the caller has refused names holding one)."""
    end = b"\0" if null else b"\n"
    sys.stdout.flush()
    sys.stdout.buffer.write(b"".join(os.fsencode(p) + end for p in paths))
    sys.stdout.buffer.flush()


def _refuse_newlines(names: Iterable[str]) -> None:
    """A line-separated output cannot carry a name holding a newline: `xargs -d '\\n'` would split it."""
    from clipcli.errors import InputError

    for name in names:
        if "\n" in name:
            raise InputError(
                f"{name!r}: a name holding a newline cannot be written one a line; pass -0 (NUL-separated "
                "paths, for xargs -0), or --format csv or jsonl"
            )


def _looks_like_text(argument: str) -> bool:
    """Whether the first argument given with --image is a query text rather than a source."""
    import glob
    import os

    return argument != "-" and not os.path.lexists(argument) and not glob.glob(argument)
