"""Where the texts to classify come from: arguments, lines of a file or of stdin, or a CSV/Parquet column.

Texts are read lazily, so a file of millions of lines is never held in memory. A text read from a file
or stdin keeps its 1-based line (or data row) number as its ``id``, so that results can be joined back
to the source. Blank lines separate nothing and are passed over silently; an empty cell in a column is
a row without a text, and comes back as :class:`EmptyText` for the caller to report.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from clipcli.errors import InputError

TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
DEFAULT_COLUMN = "text"
CHUNK_ROWS = 4096
BOM = "\ufeff"


@dataclass(frozen=True)
class EmptyText:
    """A row of a CSV/Parquet file whose text cell is empty or missing."""

    id: int
    where: str  # "FILE row N", for the message


TextItem = tuple[int | None, str]  # (line or row number, or None for an argument; the text)


@dataclass
class TextSource:
    name: str  # "arguments", "stdin" or the file, for messages
    items: Iterator[TextItem | EmptyText]
    total: int | None  # how many texts (and empty rows), where that is known without reading twice
    with_ids: bool  # texts came from a file or stdin, so each has a line or row number


def open_texts(
    args: Sequence[str], texts_file: str | None, column: str | None, stdin: IO[str] | None = None
) -> TextSource:
    """Texts from exactly one source: ``args``, ``-`` (lines on stdin), or ``texts_file``."""
    if args and texts_file:
        raise InputError("give texts as arguments or with --texts-file, not both")
    if "-" in args and len(args) > 1:
        raise InputError("- reads the texts from stdin: give it alone")
    if texts_file is None and args != ["-"]:
        if column:
            raise InputError("--column picks a column of a CSV/Parquet --texts-file")
        if not args:
            raise InputError("no texts: pass them as arguments, with --texts-file FILE, or - to read lines on stdin")
        texts = [a.strip() for a in args]
        if not all(texts):
            raise InputError("an empty text was given as an argument")
        return TextSource("arguments", iter((None, t) for t in texts), len(texts), with_ids=False)
    if texts_file in (None, "-"):
        if column:
            raise InputError("--column picks a column of a CSV/Parquet --texts-file, not of stdin")
        import sys

        stream = stdin if stdin is not None else sys.stdin
        return TextSource("stdin", _lines(stream, "stdin"), None, with_ids=True)
    return _file_source(Path(texts_file), column)


def _file_source(path: Path, column: str | None) -> TextSource:
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise InputError(f"{path}: cannot read texts file ({e.strerror or e})") from e
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a directory; --texts-file takes a file")
    if kind == "csv":
        return TextSource(str(path), _csv_cells(path, column or DEFAULT_COLUMN), None, with_ids=True)
    if kind == "parquet":
        cells, rows = _parquet_cells(path, column or DEFAULT_COLUMN)
        return TextSource(str(path), cells, rows, with_ids=True)
    if column:
        raise InputError(f"{path}: --column is for .csv and .parquet files; this one is read as lines of text")
    total = _count_lines(path) if stat.S_ISREG(mode) else None
    try:
        stream = path.open(encoding="utf-8-sig", newline=None)  # a byte-order mark is not part of line 1
    except OSError as e:
        raise InputError(f"{path}: cannot read texts file ({e.strerror or e})") from e
    return TextSource(str(path), _closing_lines(stream, str(path)), total, with_ids=True)


def _closing_lines(stream: IO[str], name: str) -> Iterator[TextItem]:
    with stream:
        yield from _lines(stream, name)


def _lines(stream: IO[str], name: str) -> Iterator[TextItem]:
    """Each non-blank line, stripped, with its 1-based line number (a byte-order mark before line 1 is not
    text: stdin is decoded as plain UTF-8, which keeps it)."""
    number = 0
    try:
        for number, line in enumerate(stream, start=1):
            text = (line.removeprefix(BOM) if number == 1 else line).strip()
            if text:
                yield number, text
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: line {number + 1} is not UTF-8 text ({e.reason})") from e
    except OSError as e:
        raise InputError(f"{name}: cannot read texts ({e.strerror or e})") from e


def _count_lines(path: Path) -> int:
    """Non-blank lines, for the progress bar's total: one cheap pass over the bytes."""
    n = 0
    try:
        with path.open("rb") as f:
            for line in f:
                n += bool(line.strip())
    except OSError as e:
        raise InputError(f"{path}: cannot read texts file ({e.strerror or e})") from e
    return n


def _cell_items(values: Iterator[Any], start: int, path: Path) -> Iterator[TextItem | EmptyText]:
    import pandas as pd

    for row, value in enumerate(values, start=start):
        missing = pd.isna(value)
        text = "" if isinstance(missing, bool) and missing else str(value).strip()
        yield (row, text) if text else EmptyText(row, f"{path} row {row}")


def _csv_cells(path: Path, column: str) -> Iterator[TextItem | EmptyText]:
    import pandas as pd

    try:
        header = list(pd.read_csv(path, nrows=0).columns)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read CSV ({_first_line(e)})") from e
    _check_column(path, column, header)

    def cells() -> Iterator[TextItem | EmptyText]:
        row = 1  # 1-based data rows, as eval's manifests number them
        try:
            chunks = pd.read_csv(path, usecols=[column], dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS)
            for chunk in chunks:
                yield from _cell_items(iter(chunk[column].tolist()), row, path)
                row += len(chunk)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read CSV near row {row} ({_first_line(e)})") from e

    return cells()


def _parquet_cells(path: Path, column: str) -> tuple[Iterator[TextItem | EmptyText], int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read Parquet ({_first_line(e)})") from e
    _check_column(path, column, file.schema_arrow.names)

    def cells() -> Iterator[TextItem | EmptyText]:
        row = 1
        try:
            for batch in file.iter_batches(batch_size=CHUNK_ROWS, columns=[column]):
                yield from _cell_items(iter(batch.column(0).to_pylist()), row, path)
                row += batch.num_rows
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{path}: cannot read Parquet near row {row} ({_first_line(e)})") from e

    return cells(), file.metadata.num_rows


def _check_column(path: Path, column: str, names: Sequence[str]) -> None:
    if column not in names:
        choices = f"; pick one with --column: {', '.join(map(str, names))}" if names else " (it has no columns)"
        raise InputError(f"{path}: no column {column!r}{choices}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
