"""One enum of output formats and one streaming writer per format; ``-`` or no path means stdout.

Writers receive rows batch by batch and flush as they go, so a long run interrupted half-way still
leaves every row computed so far in a readable file. A file already at the output's path is replaced
only if clipcli wrote it (:mod:`clipcli.store.ownership`).

The output-format extension point is kept in one module: the enum, the base writer (its file, lock and
signal handling) and each format's writer (a short subclass) are read together when a format is added.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from clipcli.atomic import (
    AtomicFile,
    OutputLock,
    describe_os_error,
    is_stream,
    real_path,
    remove_temporaries,
    signals_held,
)
from clipcli.errors import OutputError
from clipcli.store import ownership

if TYPE_CHECKING:
    from clipcli.images.sources import ImageRef, Skipped


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


def has_format_suffix(output: str) -> bool:
    """Whether ``output``'s extension names a format (``.csv``, ``.parquet``, ...)."""
    return Path(output).suffix.lower() in _BY_SUFFIX


def choose_format(
    explicit: OutputFormat | None,
    output: str | None,
    stdout_is_tty: bool,
    allowed: Sequence[OutputFormat],
    piped: OutputFormat = OutputFormat.CSV,
    format_flag: str | None = "--format",
) -> OutputFormat:
    """``--format`` wins, then the output file's extension, then table on a terminal, else ``piped``.

    ``format_flag`` is the option that names a format, for the error; None where there is none."""
    on_stdout = not output or output == "-"
    streamed = on_stdout or is_stream(Path(output or ""))  # stdout, or a FIFO, device or pipe given to -o
    if explicit is not None:
        fmt = explicit
    elif not streamed:
        suffix = Path(output or "").suffix.lower()
        if suffix not in _BY_SUFFIX and Path(output or "").is_dir():
            known = ", ".join(s for s, f in _BY_SUFFIX.items() if f in allowed)
            raise OutputError(f"{output}: is a directory; name a file to write, ending in {known}")
        if suffix not in _BY_SUFFIX:
            known = ", ".join(s for s, f in _BY_SUFFIX.items() if f in allowed)
            flag = f" or {format_flag}" if format_flag else ""
            raise OutputError(f"{output}: cannot tell the format from the extension (use {known}{flag})")
        fmt = _BY_SUFFIX[suffix]
    else:
        fmt = OutputFormat.TABLE if on_stdout and stdout_is_tty and OutputFormat.TABLE in allowed else piped
    if fmt not in allowed:
        raise OutputError(f"format {fmt.value} is not available here; use one of {', '.join(f.value for f in allowed)}")
    if fmt is OutputFormat.TABLE and not on_stdout:
        raise OutputError(f"{output}: a table is for the terminal; write csv, jsonl or parquet to files")
    if fmt is OutputFormat.NPY and (streamed or Path(output or "").suffix.lower() != ".npy"):
        raise OutputError("NPY is written to a file with its sidecar: pass -o FILE.npy")
    if fmt is OutputFormat.PARQUET and on_stdout and stdout_is_tty:
        raise OutputError("Parquet is binary: pass -o FILE.parquet, or pipe stdout into a program that reads it")
    return fmt


class RowWriter:
    """Base writer: a context manager taking batches of dict rows.

    A file output is held under an :class:`~clipcli.atomic.OutputLock` for the whole run and written
    under a temporary name, renamed onto its own when the run ends: so it always holds one run's
    result and never half of one. On an interruption or an error the rows written so far are kept
    (the file is completed and renamed) if there are any; with none, or when writing itself failed,
    the previous file is left as it was.
    """

    def __init__(self, output: str | None, columns: Sequence[str] | None = None) -> None:
        self.output = output if output not in (None, "-") else None
        self.columns = list(columns) if columns is not None else None
        self.rows_written = 0
        self._lock: OutputLock | None = None
        self._file: AtomicFile | None = None
        self._stream: IO[bytes] | None = None  # a FIFO, device or pipe named by -o, written in place
        self._text: io.TextIOWrapper | None = None
        if self.output is None:
            return
        path = Path(self.output)
        if is_stream(path):
            try:
                self._stream = open(path, "wb")  # noqa: SIM115 (closed by close/abort)
            except OSError as e:
                raise OutputError(f"{path}: cannot write ({describe_os_error(e)})") from e
            return
        self._lock = OutputLock(path, is_dir=False)
        try:
            self._refuse_foreign(path)
            remove_temporaries(real_path(path))
            self._file = AtomicFile(path, "wb")
        except BaseException:
            self._lock.release()
            raise

    def _refuse_foreign(self, path: Path) -> None:
        """Refuse to replace a file that is no output of this kind clipcli writes (see
        :mod:`clipcli.store.ownership`): one the user made is never overwritten."""
        head = ownership.read_head(path)
        if head is not None and not self._own(head, path):
            raise ownership.refuse(path, self.KIND)

    KIND = "file"

    def _own(self, head: bytes, path: Path) -> bool:
        """Whether a file that begins with ``head`` is an output of this writer's kind clipcli wrote."""
        return False

    @classmethod
    def create(cls, output: str | None, **details: Any) -> RowWriter:
        """The writer for ``output``; ``details`` are what its format uses (``columns`` for CSV, ``schema``
        for Parquet), the others ignored: one call opens any format (see :data:`ROW_WRITERS`)."""
        return cls(output)

    def _binary(self) -> IO[bytes]:
        if self._file is not None:
            return self._file.file
        return self._stream if self._stream is not None else sys.stdout.buffer

    def _text_stream(self) -> IO[str]:
        """The output as text: UTF-8, with file names that are not UTF-8 written as their own bytes."""
        if self._file is None and self._stream is None:
            if isinstance(sys.stdout, io.TextIOWrapper):
                sys.stdout.reconfigure(errors="surrogateescape")
            return sys.stdout
        self._text = io.TextIOWrapper(
            self._binary(), encoding="utf-8", errors="surrogateescape", newline="", write_through=True
        )
        return self._text

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        with self._write_errors(), self._whole():
            self._write(rows)
            self.rows_written += len(rows)  # counted before a held-back signal is acted on

    def _whole(self) -> contextlib.AbstractContextManager[None]:
        """Around a write to a file output: Ctrl-C and SIGTERM wait until it is done (see
        :func:`~clipcli.atomic.signals_held`), so that the rows kept on an interruption are whole. A
        stream (a pipe, a FIFO) is written as it is, as its write can wait on its reader for ever."""
        return signals_held() if self._file is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[None]:
        """A failed write (a full disk) as the one-line error. A reader of stdout that went away (``| head``)
        stays itself, which ends the run quietly; one of a stream named by ``-o`` (a FIFO, ``>(gzip > x)``)
        is an error: the rows it did not take are lost."""
        try:
            yield
        except BrokenPipeError as e:
            if self._stream is None:
                raise
            raise OutputError(
                f"{self.output}: its reader went away (broken pipe); the rows after the first "
                f"{self.rows_written} were not written"
            ) from e
        except OSError as e:
            if self.output is None:
                raise OutputError(f"stdout: cannot write ({describe_os_error(e)})") from e
            reason = describe_os_error(e, Path(self.output))
            raise OutputError(f"{self.output}: cannot write ({reason}); any previous file is left as it was") from e

    def _write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Complete the output (a header for no rows, a footer, a table) before it is committed."""

    def close(self) -> None:
        try:
            with self._write_errors(), self._whole():
                self._finish()
                if self._file is not None:
                    self._file.commit()
                else:
                    self._binary().flush()
        except BaseException:
            self.abort()
            raise
        finally:
            self._release()

    def abort(self) -> None:
        """Drop what this run wrote to a file output; the previous file stays as it was."""
        if self._file is not None:
            self._file.discard()
        self._release()

    def _release(self) -> None:
        if self._text is not None:
            with contextlib.suppress(ValueError, OSError):
                self._text.detach()  # the file is closed by commit or discard, not by the wrapper
            self._text = None
        if self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.close()
            self._stream = None
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if e is None or keep_partial(e, self.rows_written):
            try:
                self.close()
            except OutputError:
                if e is None:
                    raise  # otherwise the original error is the one to report
        else:
            self.abort()


def keep_partial(error: BaseException, rows: int) -> bool:
    """Whether a run that ended with ``error`` after ``rows`` rows should still write them: yes after an
    interruption or any failure but a failed write (a full disk), as long as there is something to keep."""
    return rows > 0 and not isinstance(error, OutputError | OSError)


class CsvWriter(RowWriter):
    KIND = "CSV"

    def __init__(self, output: str | None, columns: Sequence[str] | None = None) -> None:
        super().__init__(output, columns)
        self.stream = self._text_stream()
        self._line = io.StringIO()
        self.writer: csv.DictWriter[str] | None = None

    @classmethod
    def create(cls, output: str | None, **details: Any) -> RowWriter:
        return cls(output, details.get("columns"))

    def _own(self, head: bytes, path: Path) -> bool:
        return ownership.csv_is_own(head, self.columns[:1] if self.columns else ())

    def _write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        writer = self._start(list(rows[0]))
        lines = []
        for row in rows:
            writer.writerow(row)
            lines.append(self._taken())
        self.stream.write("".join(lines))
        self.stream.flush()

    def _start(self, columns: list[str]) -> csv.DictWriter[str]:
        if self.writer is None:
            # Rows are formatted with CRLF endings, which makes the csv module quote a field holding a
            # \r (legal in file names) as well as one holding a \n; each row then ends in \n alone.
            self.writer = csv.DictWriter(self._line, fieldnames=self.columns or columns, lineterminator="\r\n")
            self.writer.writeheader()
            self.stream.write(self._taken())
        return self.writer

    def _taken(self) -> str:
        """The row just formatted, with its line ending as \\n."""
        line = self._line.getvalue()
        self._line.seek(0)
        self._line.truncate()
        return line[:-2] + "\n"

    def _finish(self) -> None:
        if self.writer is None and self.columns:
            self._start(self.columns)  # no rows: still a header, so readers see the columns
        self.stream.flush()


class JsonlWriter(CsvWriter):
    KIND = "JSONL"

    def _own(self, head: bytes, path: Path) -> bool:
        return ownership.jsonl_is_own(head, self.columns[:1] if self.columns else ())

    def _write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.stream.write("".join(json_line(row) + "\n" for row in rows))
        self.stream.flush()

    def _finish(self) -> None:
        self.stream.flush()


class TsvWriter(CsvWriter):
    KIND = "TSV"

    def _own(self, head: bytes, path: Path) -> bool:
        return ownership.tsv_is_own(head)

    def _write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.stream.write("".join("\t".join(_cell(v) for v in row.values()) + "\n" for row in rows))
        self.stream.flush()

    def _finish(self) -> None:
        self.stream.flush()


def json_line(value: Any) -> str:
    """One JSON text on one line. A file name that is not UTF-8 (held as surrogate escapes) is written
    as ``\\udcXX`` escapes, which JSON allows and Python reads back to the same name."""
    line = json.dumps(value, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(value)
    return line


class ParquetWriter(RowWriter):
    """Rows are gathered into row groups of :data:`ROW_GROUP_ROWS` (one per image would make the file
    slow to write and to read); the footer is written when the run ends, also after an error."""

    ROW_GROUP_ROWS = 8192
    KIND = "Parquet"

    def __init__(self, output: str | None, schema: Any = None) -> None:
        self.schema = schema
        super().__init__(output)
        self.writer: Any = None
        self._pending: list[Mapping[str, Any]] = []

    @classmethod
    def create(cls, output: str | None, **details: Any) -> RowWriter:
        return cls(output, details.get("schema"))

    def _own(self, head: bytes, path: Path) -> bool:
        return ownership.parquet_is_own(path, self.schema.names[:1] if self.schema is not None else ())

    def write_table(self, table: Any) -> None:
        self.rows_written += table.num_rows  # as write counts its rows: before a held-back signal acts
        self._append(table)

    def _append(self, table: Any) -> None:
        import pyarrow.parquet as pq

        with self._write_errors(), self._whole():
            if self.writer is None:
                self.writer = pq.ParquetWriter(self._binary(), self.schema or table.schema)
            self.writer.write_table(table.cast(self.writer.schema) if self.schema else table)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._pending.extend(rows)
        self.rows_written += len(rows)
        if len(self._pending) >= self.ROW_GROUP_ROWS:
            self._write_pending()

    def _write_pending(self) -> None:
        import pyarrow as pa

        if self._pending:
            rows, self._pending = self._pending, []
            self._append(pa.Table.from_pylist(rows, schema=self.schema))

    def _finish(self) -> None:
        self._write_pending()
        if self.writer is None and self.schema is not None:
            import pyarrow as pa

            # No rows at all still gives a valid, empty file with the right columns.
            self._append(pa.Table.from_pylist([], schema=self.schema))
        if self.writer is not None:
            self.writer.close()


class TableWriter(RowWriter):
    """Collects rows and renders one rich table on stdout at the end."""

    KIND = "table"

    def __init__(self, output: str | None) -> None:
        super().__init__(output)
        self.rows: list[Mapping[str, Any]] = []

    def _own(self, head: bytes, path: Path) -> bool:
        return head.startswith("┏".encode())

    def _write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.rows.extend(rows)

    def _finish(self) -> None:
        from rich.console import Console
        from rich.table import Table

        if not self.rows:
            return
        table = Table()
        cells = [[printable(_cell(v)) for v in row.values()] for row in self.rows]
        for i, name in enumerate(self.rows[0]):
            numeric = isinstance(self.rows[0][name], int | float)
            # Paths are what users search the table for: wrap them rather than cut them short. A number
            # is never split; a long header wraps between its words rather than take a path's width.
            header = name.replace("_", " ")
            widest = max(len(row[i]) for row in cells) if numeric else None
            most = max(widest, *map(len, header.split())) if widest is not None else None
            table.add_column(
                header, justify="right" if numeric else "left", overflow="fold", min_width=widest, max_width=most
            )
        for row in cells:
            table.add_row(*row)
        Console(file=sys.stdout).print(table)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: what a terminal acts on
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` for a terminal: the bytes of a file name that is not UTF-8 shown as ``\\xNN``, and control
    characters (a newline in a name, the escape sequences of a hostile one) shown as escapes, never acted
    on: a message stays on its one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def is_utf8(text: str) -> bool:
    """Whether a name can be stored as UTF-8 text (names read from a non-UTF-8 disk cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


NOT_UTF8 = "file name is not UTF-8, which Parquet cannot store (rename it, or write .npy, .csv or .jsonl)"


def parquet_storable(refs: Sequence[ImageRef]) -> tuple[list[ImageRef], list[Skipped]]:
    """Split off images whose names Parquet cannot store: its strings are UTF-8, and a name read from
    a disk in another encoding is not (Python holds its stray bytes as surrogate escapes)."""
    from clipcli.images.sources import Skipped

    good = [r for r in refs if is_utf8(r.path)]
    return good, [Skipped(r.path, NOT_UTF8) for r in refs if not is_utf8(r.path)]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


ROW_WRITERS: dict[OutputFormat, type[RowWriter]] = {
    OutputFormat.CSV: CsvWriter,
    OutputFormat.JSONL: JsonlWriter,
    OutputFormat.TSV: TsvWriter,
    OutputFormat.PARQUET: ParquetWriter,
    OutputFormat.TABLE: TableWriter,
}
"""The writers of rows, by format; :data:`clipcli.store.output.WRITERS` adds NPY's."""


def open_writer(
    fmt: OutputFormat, output: str | None, schema: Any = None, columns: Sequence[str] | None = None
) -> RowWriter:
    """A writer for ``fmt``; ``columns`` (CSV) and ``schema`` (Parquet) give an empty run its header."""
    if fmt not in ROW_WRITERS:
        raise OutputError(f"format {fmt.value} cannot be written row by row")
    return ROW_WRITERS[fmt].create(output, schema=schema, columns=columns)


def format_choices(name: str, formats: Sequence[OutputFormat]) -> type[Enum]:
    """A command's ``--format`` choices: the subset ``formats`` of :class:`OutputFormat`, as the enum
    that typer needs to list exactly those in the help (values and order as in ``formats``)."""
    return Enum(name, [(f.name, f.value) for f in formats], type=str)  # type: ignore[return-value]


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
