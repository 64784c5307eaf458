"""`clipcli dedup`: groups of near-duplicate images, from saved embeddings or from images."""

from __future__ import annotations

import sys
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.commands import options as opt
from clipcli.search.dedup import DEFAULT_THRESHOLD

if TYPE_CHECKING:
    from clipcli.models import ModelOptions
    from clipcli.search.dedup import Prefer
    from clipcli.search.duplicates import ImagesOf


class Keep(str, Enum):
    FIRST = "first"
    LARGEST = "largest"


# Images are read only where dedup embeds them: their options are checked there (saved rows never use them).
LAZY_IMAGE_OPTIONS = opt.OptionGroup(
    opt.IMAGE_OPTIONS.without("exact").params, lambda **values: partial(opt.image_options, **values)
)


Sources = Annotated[
    list[str],
    typer.Argument(
        metavar="EMB|IMAGES...",
        help="Embeddings written by embed (a Parquet file or folder, or an NPY), or images, folders, globs.",
    ),
]
Threshold = Annotated[
    float,
    typer.Option(
        min=-1.0, max=1.0, metavar="T", help="Cosine similarity at which two images count as copies of each other."
    ),
]
KeepOption = Annotated[
    Keep | None,
    typer.Option(
        case_sensitive=False,
        help="Print only the paths one could delete, one a line: all but the first path (natural order) or "
        "the largest file of each group, each at or above --threshold to the file kept. Saved rows are "
        "listed only while the file's size and mtime are as embedded. Nothing is ever deleted.",
    ),
]
Null = Annotated[
    bool,
    typer.Option(
        "--null",
        "-0",
        help="With --keep: end each path with a NUL byte instead of a newline, for `xargs -0` (names "
        "may hold newlines; without -0 such a name is refused).",
    ),
]
FormatOption = Annotated[
    opt.ResultFormat | None,
    opt.format_option(
        "Columns group, path, similarity_to_group_representative; the representative (largest file) "
        "first. Default: a table on a terminal, CSV in a pipe, else from --output's extension."
    ),
]
NoIndex = Annotated[bool, typer.Option("--no-index", help="Compare every pair exactly, even where an index exists.")]


@opt.grouped(models=opt.MODEL_OPTIONS, images=LAZY_IMAGE_OPTIONS)
def dedup(
    inputs: Sources,
    threshold: Threshold = DEFAULT_THRESHOLD,
    keep: KeepOption = None,
    null: Null = False,
    output: opt.Output = None,
    fmt: FormatOption = None,
    no_index: NoIndex = False,
    *,
    models: ModelOptions,
    images: ImagesOf,
) -> None:
    """Find near-duplicate images (resized, recompressed, cropped copies) and list them in groups.

    With saved embeddings, the source's index (clipcli index) supplies each row's neighbours when it is
    current; otherwise every pair is compared. Images are embedded first (--model).
    """
    from clipcli.commands.console import Tally, say
    from clipcli.commands.rank import write_paths
    from clipcli.errors import EXIT_PARTIAL
    from clipcli.search.duplicates import DedupHooks, DedupRequest, run_dedup

    prefer: Prefer | None = None if keep is None else ("first" if keep is Keep.FIRST else "largest")
    request = DedupRequest(inputs, threshold, prefer, null, output, opt.output_format(fmt), no_index)
    tally = Tally()
    hooks = DedupHooks(opt.load, tally.on_skip, say, sys.stdin)
    result = run_dedup(request, models, images, hooks)
    if result.paths is not None:
        write_paths(result.paths, null)
    groups = result.groups
    copies = sum(len(g) - 1 for g in groups)
    counted = f"{copies} cop{'ies' if copies != 1 else 'y'}"
    say(
        f"found {len(groups)} group{'s' * (len(groups) != 1)} of near-duplicates ({counted})"
        + (f", skipped {tally.skipped}" if tally.skipped else "")
    )
    if tally.skipped:
        raise typer.Exit(EXIT_PARTIAL)
