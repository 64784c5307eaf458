"""`clipcli index`: build (or bring up to date) the ANN index of embeddings saved by `embed`."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer


class KindChoice(str, Enum):
    AUTO = "auto"
    FLAT = "flat"
    HNSW = "hnsw"
    IVFPQ = "ivfpq"


def index(
    source: Annotated[
        str, typer.Argument(metavar="EMB", help="Embeddings written by embed: a Parquet file or folder, or an NPY.")
    ],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="INDEX",
            help="The index folder. Default: beside EMB (emb/ -> emb.index, emb.npy -> emb.npy.index), "
            "where rank finds it.",
        ),
    ] = None,
    kind: Annotated[
        KindChoice,
        typer.Option(
            case_sensitive=False,
            help="flat: no structure, every search scans (exact); hnsw: a graph over 8-bit vectors; ivfpq: "
            "compressed inverted lists (IVF-PQ). auto: flat under 50k rows, else ivfpq.",
        ),
    ] = KindChoice.AUTO,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Build from scratch even where an index can be brought up to date.")
    ] = False,
) -> None:
    """Index saved embeddings so that rank answers from the index instead of scanning every row.

    Run it again after embed has added or removed images: the index is brought up to date (new rows
    added, gone or changed rows masked) without a rebuild.
    """
    from pathlib import Path

    from clipcli.commands.console import Progress, say
    from clipcli.errors import InputError
    from clipcli.store.index import Kind, default_index_path
    from clipcli.store.index_build import build_index
    from clipcli.store.refusals import refuse_output_over_inputs
    from clipcli.store.saved import is_embedding_source

    refuse_output_over_inputs([output], [], datasets=[source])
    if not Path(source).exists():
        raise InputError(f"{source}: does not exist")
    if not is_embedding_source(source):
        raise InputError(f"{source}: not embeddings written by `clipcli embed` (a Parquet file or folder, or an NPY)")
    out = Path(output) if output else default_index_path(Path(source))
    with Progress("indexing", None, unit="row") as bar:
        report = build_index(Path(source), out, Kind(kind.value), rebuild, bar.advance)
    if report.updated:
        say(
            f"updated {out} ({report.kind.value}): {report.rows:,} rows, added {report.added:,}, "
            f"masked {report.masked:,}, unchanged {report.kept:,}"
        )
    else:
        say(f"indexed {report.rows:,} rows of {source} into {out} ({report.kind.value})")
