"""`clipcli rank`: score images (or saved embeddings, or texts) against a text or image query."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.commands import options as opt
from clipcli.store.formats import OutputFormat, format_choices

FORMATS = (OutputFormat.TABLE, OutputFormat.TSV, OutputFormat.CSV, OutputFormat.JSONL, OutputFormat.PARQUET)
if TYPE_CHECKING:
    from clipcli.images.decode import ImageOptions
    from clipcli.models import ModelOptions

    Format = OutputFormat
else:
    Format = format_choices("Format", FORMATS)  # --format's choices


Arguments = Annotated[
    list[str] | None,
    typer.Argument(
        help="QUERY text then SOURCES (images, folders, globs, - for stdin, or embeddings written by "
        "embed); with --image, only SOURCES. QUERY may weigh and combine texts and images: "
        "'beach - people', '\"2:dog\" + ./x.jpg - fruit' (see docs/search.md).",
        metavar="[QUERY] SOURCES...",
        show_default=False,
    ),
]
QueryImage = Annotated[
    str | None, typer.Option("--image", "-i", metavar="FILE", help="Query by this image instead of a text.")
]
TextsFile = Annotated[str | None, opt.file_option("Rank the texts in this file (one per line) for the --image query.")]
QUERIES_HELP = (
    "Many text queries, one per line, answered in one pass over the sources; the output gains a query column."
)
QueriesFile = Annotated[str | None, opt.file_option(QUERIES_HELP)]
ImageQueries = Annotated[str | None, opt.file_option("As --queries-file, with one query image path per line.")]
IndexPath = Annotated[
    str | None,
    typer.Option(
        metavar="INDEX",
        help="Search saved embeddings through this index (built by `clipcli index`). Default: the "
        "index beside them (emb/ -> emb.index, emb.npy -> emb.npy.index) when there is one.",
    ),
]
NoIndex = Annotated[
    bool, typer.Option("--no-index", help="Scan every saved embedding exactly, even where an index exists.")
]
TopK = Annotated[int, typer.Option("--top-k", "-k", min=1, metavar="K", help="How many results to keep.")]
Threshold = Annotated[
    float | None,
    typer.Option("--threshold", "--min-score", metavar="SCORE", help="Drop results with a cosine score below this."),
]
Negative = Annotated[
    list[str] | None,
    typer.Option(
        "--negative",
        metavar="TEXT",
        help="Subtract this text from the query (as QUERY - TEXT); repeatable.",
        show_default=False,
    ),
]
Cutoff = Annotated[
    str | None,
    typer.Option(
        metavar="auto|Z",
        help="Keep only results that stand out: a z-score of at least Z against the same query's scores over "
        "a fixed sample of the dataset; auto asks more of bigger datasets, and returns nothing when "
        "nothing stands out.",
    ),
]
Where = Annotated[
    str | None,
    typer.Option(
        metavar="SQL",
        help="Only rows of saved embeddings whose columns satisfy this DuckDB SQL expression (e.g. "
        "\"folder LIKE '%holiday%' AND width >= 1000\"), applied before the top K (needs clipcli[sql]).",
    ),
]
Html = Annotated[
    str | None,
    typer.Option(metavar="FILE", help="Also write the results as a self-contained page of thumbnails (HTML)."),
]
Null = Annotated[
    bool,
    typer.Option(
        "--null",
        "-0",
        help="Print only the paths, best first, each ended by a NUL byte, for `xargs -0` (names may hold "
        "newlines; a line-separated output refuses such a name).",
    ),
]
FormatOpt = Annotated[
    Format | None,
    opt.format_option(
        "tsv is score<TAB>path lines; the others have path (or text) and score columns. Default: a "
        "table on a terminal, tsv in a pipe, else from --output's extension."
    ),
]
RawFrames = Annotated[
    bool,
    typer.Option(
        "--raw-frames",
        help="Videos: list the frames that rank (VIDEO#t=SECONDS), not the moments they make (VIDEO#t=START,END: "
        "adjacent frames of one video that score alike, as one result).",
    ),
]
Cache = Annotated[
    bool,
    typer.Option(
        help="Keep a memory-mapped copy of saved Parquet embeddings in the cache, so later searches "
        "skip Parquet decoding (rebuilt when a part file changes)."
    ),
]


@opt.grouped(models=opt.MODEL_OPTIONS, images=opt.IMAGE_OPTIONS)
def rank(
    arguments: Arguments = None,
    image: QueryImage = None,
    texts_file: TextsFile = None,
    queries_file: QueriesFile = None,
    image_queries: ImageQueries = None,
    index: IndexPath = None,
    no_index: NoIndex = False,
    template: opt.Template = None,
    templates: opt.Templates = None,
    top_k: TopK = 10,
    threshold: Threshold = None,
    output: opt.Output = None,
    null: Null = False,
    fmt: FormatOpt = None,
    negative: Negative = None,
    cutoff: Cutoff = None,
    where: Where = None,
    html: Html = None,
    raw_frames: RawFrames = False,
    *,
    models: ModelOptions,
    images: ImageOptions,
    cache: Cache = True,
) -> None:
    """Rank sources by similarity to a query, best first (cosine similarity of normalised embeddings)."""
    from clipcli.commands.console import Tally, prompt_progress, say
    from clipcli.errors import EXIT_PARTIAL
    from clipcli.search.run import RankHooks, RankRequest, run_rank

    query = RankRequest(arguments or [], image, texts_file, queries_file, image_queries, index, no_index, cache)
    request = replace(query, template=template, templates=templates, top_k=top_k, threshold=threshold, null=null)
    request = replace(request, output=output, format=opt.output_format(fmt))
    request = replace(request, negative=negative or (), cutoff=cutoff, where=where, html=html, raw_frames=raw_frames)
    tally = Tally()
    result = run_rank(request, models, images, RankHooks(opt.load, tally.on_skip, prompt_progress, say, sys.stdin))
    if result.paths is not None:
        write_paths(result.paths, null=True)
    if result.queries is None:
        found = f"ranked {result.results} result{'s' * (result.results != 1)}"
    else:
        n = result.queries
        found = f"answered {n} quer{'ies' if n != 1 else 'y'} with {result.results} results"
    say(found + (f", skipped {tally.skipped}" if tally.skipped else ""))
    if tally.skipped:
        raise typer.Exit(EXIT_PARTIAL)


def write_paths(paths: list[str], null: bool) -> None:
    """Paths on stdout as the bytes of their names (a name that is not UTF-8 included), each ended by a
    NUL byte, or by a newline (the caller has refused names holding one)."""
    end = b"\0" if null else b"\n"
    sys.stdout.flush()
    sys.stdout.buffer.write(b"".join(os.fsencode(p) + end for p in paths))
    sys.stdout.buffer.flush()
