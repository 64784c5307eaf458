"""One enum of output formats and one streaming writer per format; ``-`` or no path means stdout.

Writers receive rows batch by batch and flush as they go, so a long run interrupted half-way still
leaves every row computed so far in a readable file.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from clipcli.errors import OutputError


class OutputFormat(str, Enum):
    TABLE = "table"
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"
    NPY = "npy"
    TSV = "tsv"  # header-less, tab-separated: `score<TAB>path`, for cut, sort and xargs


_BY_SUFFIX = {
    ".csv": OutputFormat.CSV,
    ".jsonl": OutputFormat.JSONL,
    ".ndjson": OutputFormat.JSONL,
    ".parquet": OutputFormat.PARQUET,
    ".pq": OutputFormat.PARQUET,
    ".npy": OutputFormat.NPY,
    ".tsv": OutputFormat.TSV,
}


def choose_format(
    explicit: OutputFormat | None,
    output: str | None,
    stdout_is_tty: bool,
    allowed: Sequence[OutputFormat],
    piped: OutputFormat = OutputFormat.CSV,
) -> OutputFormat:
    """``--format`` wins, then the output file's extension, then table on a terminal, else ``piped``."""
    if explicit is not None:
        fmt = explicit
    elif output and output != "-":
        suffix = Path(output).suffix.lower()
        if suffix not in _BY_SUFFIX:
            known = ", ".join(s for s, f in _BY_SUFFIX.items() if f in allowed)
            raise OutputError(f"{output}: cannot tell the format from the extension (use {known} or --format)")
        fmt = _BY_SUFFIX[suffix]
    else:
        fmt = OutputFormat.TABLE if stdout_is_tty and OutputFormat.TABLE in allowed else piped
    if fmt not in allowed:
        raise OutputError(f"format {fmt.value} is not available here; use one of {', '.join(f.value for f in allowed)}")
    if fmt is OutputFormat.TABLE and output and output != "-":
        raise OutputError(f"{output}: a table is for the terminal; write csv, jsonl or parquet to files")
    return fmt


class RowWriter:
    """Base writer: a context manager taking batches of dict rows."""

    def __init__(self, output: str | None) -> None:
        self.output = output if output not in (None, "-") else None
        self.count = 0

    def _open_text(self) -> IO[str]:
        if self.output is None:
            return sys.stdout
        try:
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
            return open(self.output, "w", encoding="utf-8", newline="")
        except OSError as e:
            raise OutputError(f"{self.output}: cannot write ({e.strerror or e})") from e

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class CsvWriter(RowWriter):
    def __init__(self, output: str | None) -> None:
        super().__init__(output)
        self.stream = self._open_text()
        self.writer: csv.DictWriter[str] | None = None

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        if self.writer is None:
            self.writer = csv.DictWriter(self.stream, fieldnames=list(rows[0]), lineterminator="\n")
            self.writer.writeheader()
        self.writer.writerows(rows)
        self.stream.flush()
        self.count += len(rows)

    def close(self) -> None:
        if self.stream is not sys.stdout:
            self.stream.close()


class JsonlWriter(CsvWriter):
    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            self.stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.stream.flush()
        self.count += len(rows)


class TsvWriter(CsvWriter):
    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            self.stream.write("\t".join(_cell(v) for v in row.values()) + "\n")
        self.stream.flush()
        self.count += len(rows)


class ParquetWriter(RowWriter):
    """Row groups are written per batch; the footer is written on close, also after an error."""

    def __init__(self, output: str | None, schema: Any = None) -> None:
        super().__init__(output)
        self.schema = schema
        self.writer: Any = None

    def _sink(self) -> Any:
        if self.output is None:
            return sys.stdout.buffer
        try:
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.output}: cannot write ({e.strerror or e})") from e
        return self.output

    def write_table(self, table: Any) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:
            try:
                self.writer = pq.ParquetWriter(self._sink(), self.schema or table.schema)
            except OSError as e:
                raise OutputError(f"{self.output}: cannot write ({e})") from e
        self.writer.write_table(table.cast(self.writer.schema) if self.schema else table)
        self.count += table.num_rows

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        import pyarrow as pa

        if rows:
            self.write_table(pa.Table.from_pylist(list(rows), schema=self.schema))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        elif self.schema is not None:
            import pyarrow as pa

            # No rows at all still gives a valid, empty file with the right columns.
            self.write_table(pa.Table.from_pylist([], schema=self.schema))
            self.close()


class TableWriter(RowWriter):
    """Collects rows and renders one rich table on stdout at the end."""

    def __init__(self, output: str | None, title: str | None = None) -> None:
        super().__init__(output)
        self.rows: list[Mapping[str, Any]] = []
        self.title = title

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.rows.extend(rows)
        self.count += len(rows)

    def close(self) -> None:
        from rich.console import Console
        from rich.table import Table

        if not self.rows:
            return
        table = Table(title=self.title)
        for name in self.rows[0]:
            numeric = isinstance(self.rows[0][name], int | float)
            # Paths are what users search the table for: wrap them rather than cut them short.
            table.add_column(name, justify="right" if numeric else "left", overflow="fold")
        for row in self.rows:
            table.add_row(*(_cell(v) for v in row.values()))
        Console(file=sys.stdout).print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def open_writer(fmt: OutputFormat, output: str | None, schema: Any = None) -> RowWriter:
    if fmt is OutputFormat.CSV:
        return CsvWriter(output)
    if fmt is OutputFormat.JSONL:
        return JsonlWriter(output)
    if fmt is OutputFormat.TSV:
        return TsvWriter(output)
    if fmt is OutputFormat.PARQUET:
        return ParquetWriter(output, schema)
    if fmt is OutputFormat.TABLE:
        return TableWriter(output)
    raise OutputError(f"format {fmt.value} cannot be written row by row")


def atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path``: write there, then ``os.replace`` onto ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
