"""``rank`` as one call: a :class:`RankRequest` (the query, the sources, what to keep, where the rows go)
in, the rows written and a :class:`RankResult` out.

What the terminal shows stays with the command, handed in as :class:`RankHooks`: loading a model (with
its download bar), skipped inputs, notes, and the bar for encoding texts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from clipcli.errors import ClipCliError, InputError, ModelError
from clipcli.models import LoadedModel, ModelOptions
from clipcli.search.moments import candidates, moment_hits
from clipcli.search.rank import IndexChoice, SourceScan
from clipcli.store.formats import OutputFormat

if TYPE_CHECKING:
    import numpy as np

    from clipcli.images.decode import ImageOptions
    from clipcli.images.sources import Skipped
    from clipcli.search.cutoff import SampleOfScan
    from clipcli.search.query import Query
    from clipcli.search.rank import Hit
    from clipcli.store.formats import RowWriter

# What rank can write; tsv is score<TAB>path lines (the piped default).
RANK_FORMATS = (OutputFormat.TABLE, OutputFormat.TSV, OutputFormat.CSV, OutputFormat.JSONL, OutputFormat.PARQUET)


@dataclass(frozen=True)
class RankRequest:
    """``rank``'s arguments as given: ``arguments`` is ``[QUERY] SOURCES...`` (only SOURCES with ``image``);
    ``template``/``templates`` as ``--template``/``--templates`` (none: the bare query text)."""

    arguments: Sequence[str] = ()
    image: str | None = None
    texts_file: str | None = None
    queries_file: str | None = None
    image_queries: str | None = None
    index: str | None = None
    no_index: bool = False
    cache: bool = True
    template: list[str] | None = None
    templates: list[str] | None = None
    top_k: int = 10
    threshold: float | None = None
    output: str | None = None
    format: OutputFormat | None = None
    null: bool = False
    negative: Sequence[str] = ()  # --negative TEXT: terms subtracted from the query
    cutoff: str | None = None  # --cutoff auto|Z (see clipcli.search.cutoff)
    where: str | None = None  # --where SQL over saved embeddings' columns (see clipcli.search.where)
    html: str | None = None  # --html FILE: the results as a page (see clipcli.search.html)
    raw_frames: bool = False  # --raw-frames: a video's frames as they rank, not moments (clipcli.search.moments)


@dataclass(frozen=True)
class RankHooks:
    """What a run tells its caller: ``load`` loads a model; ``on_skip`` hears of each input left out;
    ``progress(description, total)`` gives a callback counting texts encoded."""

    load: Callable[[ModelOptions], LoadedModel]
    on_skip: Callable[[Skipped], None]
    progress: Callable[[str, int], AbstractContextManager[Callable[[int], None]]]
    on_note: Callable[[str], None] | None = None
    stdin: IO[str] | None = None


@dataclass(frozen=True)
class RankResult:
    """``results`` rows written; ``queries``: how many were answered (None for one query); ``paths``: with
    ``null``, the paths for the caller to print, best first (the rows writer wrote none)."""

    results: int
    queries: int | None = None
    paths: list[str] | None = None


def run_rank(request: RankRequest, models: ModelOptions, images: ImageOptions, hooks: RankHooks) -> RankResult:
    """Check the request, then rank its sources and write the rows to its output.

    The output is opened before the model loads: an output another run is writing, or one that cannot
    be written, is refused at once.
    """
    from clipcli.store.formats import stdout_is_tty
    from clipcli.store.output import parse_output
    from clipcli.store.refusals import refuse_output_over_inputs

    r = request
    args = list(r.arguments)
    if r.null and (r.output or r.format or r.texts_file or r.queries_file or r.image_queries):
        raise InputError(
            "-0/--null prints the paths of one query on stdout: leave out --output, --format, --texts-file, "
            "--queries-file and --image-queries"
        )
    out_format = parse_output(r.output, r.format, RANK_FORMATS, tty=stdout_is_tty(), piped=OutputFormat.TSV).format
    if r.null:
        out_format = OutputFormat.TSV  # its writer prints nothing here: the paths go out as bytes
    queries = [r.image, r.texts_file, r.queries_file, r.image_queries, r.index, *(r.templates or [])]
    refuse_output_over_inputs([r.output, r.html], queries, datasets=args)
    if r.index and r.no_index:
        raise InputError("give --index or --no-index, not both")
    _check_extras(r)
    index = IndexChoice(not r.no_index, Path(r.index) if r.index else None, hooks.on_note)
    scan = SourceScan(
        images.batch_size, images.workers, images.exact, images.max_pixels, r.cache, index, hooks.on_skip, hooks.stdin
    )
    scan = replace(scan, where=r.where, containers=images.containers)
    if r.queries_file or r.image_queries:
        if r.image or r.texts_file or (r.queries_file and r.image_queries):
            raise InputError("--queries-file/--image-queries take the place of QUERY, --image and --texts-file")
        return _rank_batch(r, args, out_format, models, scan, hooks)
    return _rank_one(r, args, out_format, models, scan, hooks)


def _rank_one(
    r: RankRequest, args: list[str], out_format: OutputFormat, models: ModelOptions, scan: SourceScan, hooks: RankHooks
) -> RankResult:
    from clipcli.images.sources import Skipped
    from clipcli.search.rank import (
        image_query_vector,
        language_query_vector,
        query_embedding,
        rank_many,
        rank_texts,
    )
    from clipcli.store.formats import NOT_UTF8, is_utf8
    from clipcli.store.parts import refuse_flat_embeddings
    from clipcli.zeroshot.encode import encode_texts
    from clipcli.zeroshot.prompts import optional_templates, read_lines

    if r.image is None and not args:
        raise InputError("no query: pass a text QUERY, or --image FILE")
    if r.image is not None and args and _looks_like_text(args[0]):
        raise InputError(f"give a QUERY or --image, not both ({args[0]!r} is not a file, folder or pattern)")
    query_text = None if r.image else args.pop(0)
    if r.texts_file and not r.image:
        raise InputError("--texts-file ranks texts for an image: pass --image FILE")
    if not args and not r.texts_file:
        hint = f" ({query_text!r} was taken as the query text)" if query_text and os.path.exists(query_text) else ""
        raise InputError(
            f"no sources to rank: pass a query, then images, folders, or embeddings written by `clipcli embed`{hint}"
        )
    refuse_flat_embeddings(args)
    parsed = _language(query_text, r.image, r.negative)
    ensemble = optional_templates(r.template, r.templates)
    key = "text" if r.texts_file else "path"
    sampler = _sampler(r)
    if sampler is not None:
        scan = replace(scan, on_rows=sampler.see)
    with _open(out_format, r.output, (key, "score")) as writer:
        lm = _load(models, [] if r.texts_file else args, hooks.load)
        if parsed is None and r.image is not None:
            query = image_query_vector(lm, r.image, args, scan.exact, scan.max_pixels)
        elif parsed is None:
            query = query_embedding(lm, query_text, None, ensemble, scan.exact, scan.max_pixels)
        else:
            query = language_query_vector(lm, parsed, args, ensemble, scan.exact, scan.max_pixels)
        if r.texts_file:
            texts = read_lines(r.texts_file, "texts")
            with hooks.progress("encoding texts", len(texts)) as on_progress:
                embeddings = encode_texts(lm, texts, on_progress=on_progress).numpy()
            hits = rank_texts(query, texts, embeddings, r.top_k, r.threshold)
            if sampler is not None:
                sampler.see(embeddings)
        else:
            hits = rank_many(lm, query[None, :], args, candidates(r.top_k, r.raw_frames), r.threshold, scan)[0]
            hits = hits if r.raw_frames else moment_hits(hits, r.top_k)
        if sampler is not None:
            hits = _cut(r, lm, query[None, :], [hits], [] if r.texts_file else args, scan, sampler)[0]
        if out_format is OutputFormat.PARQUET:
            for h in hits:
                if not is_utf8(h.name):
                    hooks.on_skip(Skipped(h.name, NOT_UTF8))
            hits = [h for h in hits if is_utf8(h.name)]
        if r.html:
            _write_html(r, lm, [(_label(query_text, r.image, r.negative), hits)], args, scan)
        if r.null:
            return RankResult(len(hits), paths=[h.name for h in hits])
        if out_format is OutputFormat.TSV:  # score first, for sort -n and cut
            refuse_newlines(h.name for h in hits)
        writer.write([_row(out_format, ("score", round(h.score, 6)), (key, h.name)) for h in hits])
    return RankResult(len(hits))


def _rank_batch(
    r: RankRequest,
    sources: list[str],
    out_format: OutputFormat,
    models: ModelOptions,
    scan: SourceScan,
    hooks: RankHooks,
) -> RankResult:
    """Many queries, one pass over the sources: rows of (query, path, score), each query's best first."""
    from clipcli.search.rank import query_embeddings, rank_many
    from clipcli.store.parts import refuse_flat_embeddings
    from clipcli.zeroshot.prompts import optional_templates, read_lines

    ensemble = optional_templates(r.template, r.templates)
    if not sources:
        raise InputError("no sources to rank: pass images, folders, or embeddings written by `clipcli embed`")
    refuse_flat_embeddings(sources)
    queries = read_lines(r.queries_file or r.image_queries or "-", "queries")
    columns = ("query", "score", "path") if out_format is OutputFormat.TSV else ("query", "path", "score")
    with _open(out_format, r.output, columns) as writer:
        lm = _load(models, sources, hooks.load)
        if r.image_queries:
            vectors = query_embeddings(lm, images=queries, exact=scan.exact, max_pixels=scan.max_pixels)
        else:
            vectors = query_embeddings(lm, texts=queries, templates=ensemble)
        sampler = _sampler(r)
        if sampler is not None:
            scan = replace(scan, on_rows=sampler.see)
        results = rank_many(lm, vectors, sources, candidates(r.top_k, r.raw_frames), r.threshold, scan)
        results = results if r.raw_frames else [moment_hits(hits, r.top_k) for hits in results]
        if sampler is not None:
            results = _cut(r, lm, vectors, results, sources, scan, sampler)
        if r.html:
            _write_html(r, lm, list(zip(queries, results, strict=True)), sources, scan)
        if out_format is OutputFormat.TSV:
            refuse_newlines(h.name for hits in results for h in hits)
        rows = [
            _row(out_format, ("query", q), ("score", round(h.score, 6)), ("path", h.name))
            for q, hits in zip(queries, results, strict=True)
            for h in hits
        ]
        writer.write(rows)
    return RankResult(len(rows), queries=len(queries))


def _check_extras(r: RankRequest) -> None:
    """Refuse, before any work, what --negative, --cutoff and --where cannot go with."""
    from clipcli.search.cutoff import parse_cutoff

    parse_cutoff(r.cutoff)
    if r.negative and (r.queries_file or r.image_queries):
        raise InputError("--negative goes with one QUERY (or --image), not --queries-file or --image-queries")
    if r.where is not None and r.texts_file:
        raise InputError("--where filters saved embeddings by their columns: it cannot go with --texts-file")
    if r.html == "-":
        raise InputError("--html needs a file name: the rows are what goes to stdout")
    from clipcli.store.refusals import refuse_one_file_twice

    refuse_one_file_twice({"--output": r.output, "--html": r.html})
    if r.html:
        from clipcli.store.ownership import page_is_own, refuse_unless_own

        refuse_unless_own(Path(r.html), page_is_own, "rank --html page")


def _language(text: str | None, image: str | None, negative: Sequence[str]) -> Query | None:
    """The parsed query, or None for a plain one (one text, or --image alone), answered as ever."""
    from clipcli.search.query import Query, Term, negative_terms, parse_query

    if text is None:
        if not negative:
            return None
        return Query((Term(1.0, image=image), *negative_terms(negative)))
    parsed = parse_query(text, negative)
    return None if parsed.plain_text == text and not negative else parsed


def _label(text: str | None, image: str | None, negative: Sequence[str]) -> str:
    return (text if text is not None else f"image {image}") + "".join(f" - {n}" for n in negative)


def _sampler(r: RankRequest) -> SampleOfScan | None:
    from clipcli.search.cutoff import SampleOfScan

    return SampleOfScan() if r.cutoff is not None else None


def _cut(
    r: RankRequest,
    lm: LoadedModel,
    queries: np.ndarray,
    results: list[list[Hit]],
    sources: Sequence[str],
    scan: SourceScan,
    sampler: SampleOfScan,
) -> list[list[Hit]]:
    """Each query's hits that stand out from its scores over a sample of the whole dataset (--cutoff):
    saved sources sampled at fixed random rows, images and texts from the rows embedded."""
    import numpy as np

    from clipcli.search.cutoff import auto_cutoff, combine, parse_cutoff, source_sample
    from clipcli.store.saved import is_embedding_source

    z = parse_cutoff(r.cutoff)
    samples = [source_sample(Path(s), lm, scan.use_cache) for s in sources if s != "-" and is_embedding_source(s)]
    if sampler.rows:
        samples.append((np.concatenate(sampler.rows), sampler.total))
    sample, total = combine(samples, lm.embed_dim)
    z_value = None if z == "auto" else float(z or 0.0)
    out = []
    for q, hits in zip(queries, results, strict=True):
        threshold = auto_cutoff(q, sample, z_value, total)
        out.append([h for h in hits if h.score >= threshold])
    return out


def _write_html(
    r: RankRequest, lm: LoadedModel, sections: list[tuple[str, list[Hit]]], sources: Sequence[str], scan: SourceScan
) -> None:
    from clipcli.search.html import Section, dataset_locator, write_page

    pages = [Section(title, hits, texts=bool(r.texts_file)) for title, hits in sections]
    write_page(pages, Path(r.html or ""), lm.name, scan.max_pixels, dataset_locator(sources))


def _row(fmt: OutputFormat, *cells: tuple[str, Any]) -> dict[str, Any]:
    """A row with the score before the name in TSV (for sort -n and cut), after it elsewhere."""
    if fmt is OutputFormat.TSV:
        return dict(cells)
    return {k: v for k, v in cells if k != "score"} | {"score": dict(cells)["score"]}


def _open(fmt: OutputFormat, output: str | None, columns: tuple[str, ...]) -> RowWriter:
    """The writer of the rows: string columns and a float score (Parquet's schema)."""
    from clipcli.store.formats import open_writer

    schema = None
    if fmt is OutputFormat.PARQUET:
        import pyarrow as pa

        schema = pa.schema([(c, pa.float64() if c == "score" else pa.string()) for c in columns])
    return open_writer(fmt, output, schema=schema, columns=columns)


def _load(models: ModelOptions, sources: list[str], load: Callable[[ModelOptions], LoadedModel]) -> LoadedModel:
    """The model ``-m`` names; without it, the one saved embeddings among ``sources`` record (name and
    checksum, checked as they are read), else the default."""
    from clipcli.store.saved import is_embedding_source, saved_tag

    if models.spec is None:
        for source in sources:
            if source != "-" and is_embedding_source(source):
                tag, _ = saved_tag(Path(source))
                if not tag.sha256:  # no model recorded: the default, which the scan checks as ever
                    break
                try:
                    return load(replace(models, spec=tag.name))
                except ModelError as e:
                    raise ModelError(
                        f"{source}: made with {tag.name}, which cannot be loaded here ({e}); pass --model"
                    ) from e
    try:
        return load(models)
    except ModelError as e:  # asked for by name: say first which model the saved rows need
        try:
            made = [(s, saved_tag(Path(s))[0].name) for s in sources if s != "-" and is_embedding_source(s)]
        except ClipCliError:
            raise e from None  # a source that cannot be read is reported once the model loads
        other = [(s, name) for s, name in made if name and name != models.spec]
        if not other:
            raise
        source, name = other[0]
        raise ModelError(f"{source}: made with {name}, not {models.spec}, which cannot be loaded here ({e}); "
                         f"pass --model {name}") from e  # fmt: skip


def refuse_newlines(names: Iterable[str]) -> None:
    """A line-separated output cannot carry a name holding a newline: `xargs -d '\\n'` would split it."""
    for name in names:
        if "\n" in name:
            raise InputError(
                f"{name!r}: a name holding a newline cannot be written one a line; pass -0 (NUL-separated "
                "paths, for xargs -0), or --format csv or jsonl"
            )


def _looks_like_text(argument: str) -> bool:
    """Whether the first argument given with --image is a query text rather than a source."""
    import glob

    return argument != "-" and not os.path.lexists(argument) and not glob.glob(argument)


__all__ = ["RANK_FORMATS", "RankHooks", "RankRequest", "RankResult", "refuse_newlines", "run_rank"]
