"""`clipcli dedup`: groups of near-duplicate images, from saved embeddings or from images."""

from __future__ import annotations

import sys
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.commands import options as opt
from clipcli.search.dedup import DEFAULT_THRESHOLD
from clipcli.store.formats import OutputFormat

if TYPE_CHECKING:
    from pathlib import Path

    from clipcli.search.dedup import Member, Prefer, StoredFiles


class Keep(str, Enum):
    FIRST = "first"
    LARGEST = "largest"


COLUMNS = ("group", "path", "similarity_to_group_representative")


def dedup(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="EMB|IMAGES...",
            help="Embeddings written by embed (a Parquet file or folder, or an NPY), or images, folders, globs.",
        ),
    ],
    threshold: Annotated[
        float,
        typer.Option(
            min=-1.0, max=1.0, metavar="T", help="Cosine similarity at which two images count as copies of each other."
        ),
    ] = DEFAULT_THRESHOLD,
    keep: Annotated[
        Keep | None,
        typer.Option(
            case_sensitive=False,
            help="Print only the paths one could delete, one a line: all but the first path (natural order) or "
            "the largest file of each group, each at or above --threshold to the file kept. Saved rows are "
            "listed only while the file's size and mtime are as embedded. Nothing is ever deleted.",
        ),
    ] = None,
    null: Annotated[
        bool,
        typer.Option(
            "--null",
            "-0",
            help="With --keep: end each path with a NUL byte instead of a newline, for `xargs -0` (names "
            "may hold newlines; without -0 such a name is refused).",
        ),
    ] = False,
    output: opt.Output = None,
    fmt: Annotated[
        opt.ResultFormat | None,
        opt.format_option(
            "Columns group, path, similarity_to_group_representative; the representative (largest file) "
            "first. Default: a table on a terminal, CSV in a pipe, else from --output's extension."
        ),
    ] = None,
    no_index: Annotated[
        bool, typer.Option("--no-index", help="Compare every pair exactly, even where an index exists.")
    ] = False,
    model: opt.Model = None,
    device: opt.Device = "auto",
    precision: opt.Precision = opt.PrecisionChoice.AUTO,
    batch_size: opt.BatchSize = 32,
    workers: opt.Workers = 0,
    max_megapixels: opt.MaxMegapixels = opt.DEFAULT_MAX_MEGAPIXELS,
) -> None:
    """Find near-duplicate images (resized, recompressed, cropped copies) and list them in groups.

    With saved embeddings, the source's index (clipcli index) supplies each row's neighbours when it is
    current; otherwise every pair is compared. Images are embedded first (--model).
    """
    from clipcli.commands.console import Tally, say
    from clipcli.errors import EXIT_PARTIAL, InputError
    from clipcli.search.rank import refuse_flat_embeddings
    from clipcli.store.formats import choose_format, open_writer, refuse_output_over_inputs, stdout_is_tty
    from clipcli.store.saved import is_embedding_source

    refuse_output_over_inputs([output], [], datasets=inputs)
    saved = [i for i in inputs if i != "-" and is_embedding_source(i)]
    if saved and (len(saved) > 1 or len(inputs) > 1):
        raise InputError("give one embeddings source, or images (not both)")
    if null and keep is None:
        raise InputError("-0/--null ends the paths --keep prints: add --keep first or --keep largest")
    if keep is not None and saved:
        _refuse_unverifiable(saved[0])
    refuse_flat_embeddings(inputs)
    tally = Tally()
    if keep is None:
        out_format = choose_format(
            opt.output_format(fmt), output, stdout_is_tty(), opt.RESULT_FORMATS, piped=OutputFormat.CSV
        )
        schema = None
        if out_format is OutputFormat.PARQUET:
            import pyarrow as pa

            schema = pa.schema([(COLUMNS[0], pa.int64()), (COLUMNS[1], pa.string()), (COLUMNS[2], pa.float64())])
        with open_writer(out_format, output, schema=schema, columns=COLUMNS) as writer:
            groups, _ = _groups(
                saved, inputs, threshold, no_index, model, device, precision, batch_size, workers, max_megapixels, tally
            )
            writer.write(
                [dict(zip(COLUMNS, (m.group, m.path, round(m.similarity, 6)), strict=True)) for g in groups for m in g]
            )
    else:
        if output or fmt:
            raise InputError("--keep prints paths one a line on stdout: leave out --output and --format")
        from clipcli.commands.rank import write_paths
        from clipcli.images.core import Skipped
        from clipcli.search.dedup import deletable, listable

        groups, stored = _groups(
            saved,
            inputs,
            threshold,
            no_index,
            model,
            device,
            precision,
            batch_size,
            workers,
            max_megapixels,
            tally,
            keep.value,
        )
        paths = deletable(groups)
        if stored is not None:  # saved rows: listed only while the files are those embedded
            paths, refused = listable(groups, stored)
            for path, reason in refused:
                tally.on_skip(Skipped(path, reason))
        if not null:
            for p in paths:
                if "\n" in p:
                    raise InputError(
                        f"{p!r}: a name holding a newline cannot be listed one a line; pass -0 (NUL-separated "
                        "paths, for xargs -0)"
                    )
        write_paths(paths, null)
    copies = sum(len(g) - 1 for g in groups)
    say(
        f"found {len(groups)} group{'s' * (len(groups) != 1)} of near-duplicates ({copies} copies)"
        + (f", skipped {tally.skipped}" if tally.skipped else "")
    )
    if tally.skipped:
        raise typer.Exit(EXIT_PARTIAL)


def _groups(
    saved: list[str],
    inputs: list[str],
    threshold: float,
    no_index: bool,
    model: str | None,
    device: str,
    precision: opt.PrecisionChoice,
    batch_size: int,
    workers: int,
    max_megapixels: float,
    tally: object,
    prefer: Prefer = "largest",
) -> tuple[list[list[Member]], StoredFiles | None]:
    """The groups, and what embed recorded of the files behind saved rows (None for images)."""
    from pathlib import Path

    from clipcli.search.dedup import find_duplicates, matrix_search

    if saved:
        if model is not None:  # asked for by name: the saved rows must be that model's, as rank requires
            from clipcli.store.saved import Expect, require_saved_model, saved_tag

            lm = opt.load(model, device, precision)
            require_saved_model(saved_tag(Path(saved[0]))[0], Expect.of(lm), Path(saved[0]))
        return _saved_groups(Path(saved[0]), threshold, no_index, prefer)
    import numpy as np

    from clipcli.images.core import discover, nothing_found
    from clipcli.zeroshot.encode import iter_image_embeddings

    refs, missing = discover(inputs, sys.stdin)
    if not refs:
        raise nothing_found(inputs, missing)
    on_skip = tally.on_skip  # type: ignore[attr-defined]
    for m in missing:
        on_skip(m)
    lm = opt.load(model, device, precision)
    names: list[str] = []
    rows = []
    for batch in iter_image_embeddings(lm, refs, batch_size, workers, max_pixels=opt.max_pixels(max_megapixels)):
        for s in batch.skipped:
            on_skip(s)
        names += batch.names
        rows.append(batch.embeddings.numpy())
    matrix = np.concatenate(rows) if rows else np.zeros((0, lm.embed_dim), np.float32)
    groups = find_duplicates(
        len(names),
        lambda r: matrix[r],
        lambda r: [names[i] for i in r],
        threshold,
        None,
        matrix_search(matrix),
        prefer=prefer,
    )
    return groups, None


def _parquet_parts(path: Path) -> list[str]:
    return [str(p) for p in (sorted(path.glob("*.parquet")) if path.is_dir() else [path])]


def _refuse_unverifiable(source: str) -> None:
    """--keep lists saved rows only once their files are checked: an NPY stores nothing to check with."""
    from pathlib import Path

    from clipcli.errors import InputError

    if Path(source).suffix.lower() == ".npy":
        raise InputError(
            f"{source}: an NPY records no file sizes or mtimes, so --keep cannot check that its files are "
            "still those embedded; embed to Parquet (-o emb.parquet or a folder) for --keep, or leave --keep out"
        )


def _saved_groups(
    source: object, threshold: float, no_index: bool, prefer: Prefer
) -> tuple[list[list[Member]], StoredFiles | None]:
    from functools import partial
    from pathlib import Path

    from clipcli.commands.console import say
    from clipcli.search.dedup import StoredFiles, file_size, find_duplicates
    from clipcli.store.index import META, Stale, default_index_path, exact_search, open_index
    from clipcli.store.saved import Expect, open_matrix, saved_tag

    path = Path(str(source))
    tag, dim = saved_tag(path)
    expect = Expect(tag.name, tag.sha256, dim)
    opened = None
    index_path = default_index_path(path)
    if not no_index and (index_path / META).exists():
        try:
            opened = open_index(index_path, path, expect, command="dedup").verified()
        except Stale as e:
            say(f"{e}; comparing every pair meanwhile")
    saved = opened.saved if opened is not None else open_matrix(path, expect)
    if opened is not None and opened.vectors is None:
        opened = None  # a flat index is the exact search itself
    stored = None if path.suffix.lower() == ".npy" else StoredFiles(_parquet_parts(path), _recorded_base(path))
    groups = find_duplicates(
        saved.matrix.shape[0],
        saved.take,
        saved.name_rows,
        threshold,
        opened,
        partial(exact_search, saved),
        prefer=prefer,
        size_of=stored.size if stored is not None else file_size,
    )
    return groups, stored


def _recorded_base(source: Path) -> str | None:
    """The folder the dataset's relative paths are relative to, as its first readable part records it;
    None for a dataset written before clipcli recorded one: its paths are relative to the working folder,
    and are checked from here like any other (what does not match is not listed)."""
    import pyarrow.parquet as pq

    from clipcli.store.dataset import dataset_base

    for part in _parquet_parts(source):
        try:
            return dataset_base(pq.read_schema(part).metadata)
        except (OSError, ValueError):
            continue
    return None
