"""``--where``: a DuckDB SQL filter over the columns ``embed`` stores beside the vectors.

The dataset's Parquet parts (every column but the embedding) are a DuckDB view, read at each filter
(only the columns it names); file access is limited to those parts (``allowed_paths``; a DuckDB older
than 1.2 copies the columns into memory first, then has none) and the configuration locked, so a filter
reads the dataset and nothing else (``read_text('/etc/passwd')`` in a filter is refused), whoever typed
it. A filter is one SQL expression (``taken >= '2024-06-01' AND folder LIKE '%holiday%'``): a second
statement, an unknown column or a syntax error is a one-line :class:`InputError`.

Rows are answered as positions in the saved matrix (part files in name order, rows in file order: the
order of :func:`clipcli.store.saved.open_matrix`), so a search can score the matching rows alone.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import InputError

if TYPE_CHECKING:
    import numpy as np

_PART, _ROW = "__clipcli_part", "__clipcli_row"


def _duckdb() -> Any:
    from clipcli.models.contract import require_extra

    return require_extra("duckdb", "sql", "--where filters")


FILTER_SECONDS = 10.0  # the longest a --where filter may run


def parquet_parts(source: Path) -> list[Path]:
    """The Parquet files of a saved dataset, in the order of its matrix; NPY (no columns) is refused."""
    if (source / "metadata").is_dir() and (source / "img_emb").is_dir():
        raise InputError(
            f"{source}: --where reads clipcli's Parquet datasets; this is clip-retrieval's layout (its columns are "
            f"in {source / 'metadata'}: query them with DuckDB directly)"
        )
    if source.suffix.lower() == ".npy":
        raise InputError(f"{source}: --where needs embeddings saved as Parquet (NPY stores no columns to filter on)")
    if not source.exists():
        raise InputError(f"{source}: no such file or directory")
    files = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    if not files:
        raise InputError(f"{source}: no Parquet files in it")
    return files


class WhereTable:
    """One dataset's columns in DuckDB, opened once; :meth:`rows` and :meth:`paths` answer filters (one
    thread at a time: a DuckDB connection is not shared between threads)."""

    def __init__(self, source: Path) -> None:
        import pyarrow.parquet as pq

        duckdb = _duckdb()
        self.source = source
        self.files = parquet_parts(source)
        self.con = duckdb.connect(":memory:")
        selects = []
        for i, file in enumerate(self.files):
            try:
                names = pq.read_schema(file).names
            except (OSError, ValueError) as e:
                raise InputError(f"{file}: cannot read embeddings ({e})") from e
            cols = "".join(f"{_quote(n)}, " for n in names if n not in ("embedding", _PART, _ROW))
            selects.append(
                f"SELECT {cols}{i} AS {_PART}, file_row_number AS {_ROW} "
                f"FROM read_parquet({_literal(str(file.resolve()))}, file_row_number=true)"
            )
        union = " UNION ALL BY NAME ".join(selects)
        try:
            # Read where the filter needs it (only its columns), from these files and no other ...
            allowed = ", ".join(_literal(str(f.resolve())) for f in self.files)
            self.con.execute(f"SET allowed_paths = [{allowed}]")
            self.con.execute("SET enable_external_access = false")
            self.con.execute(f"CREATE VIEW rows AS {union}")
        except duckdb.Error:  # ... or, before DuckDB knew allowed_paths (1.2), copied in first
            self.con = duckdb.connect(":memory:")
            try:
                self.con.execute(f"CREATE TABLE rows AS {union}")
            except duckdb.Error as e:
                raise InputError(f"{source}: cannot read its columns ({_first_line(e)})") from None
            self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        try:
            described = self.con.execute("DESCRIBE rows").fetchall()
        except duckdb.Error as e:
            raise InputError(f"{source}: cannot read its columns ({_first_line(e)})") from None
        self.columns = [r[0] for r in described if r[0] not in (_PART, _ROW)]
        self.starts = _starts(self.files)

    def _select(self, what: str, where: str) -> Any:
        """The DuckDB result of ``SELECT what FROM rows WHERE (where)``, its errors as one line."""
        duckdb = _duckdb()
        if not where.strip():
            raise InputError("--where: an empty filter")
        try:
            statements = len(duckdb.extract_statements(f"SELECT 1 WHERE {where}"))
        except duckdb.Error as e:
            raise InputError(f"--where {where!r}: {_first_line(e)}") from None
        if statements != 1:
            raise InputError(f"--where {where!r}: one SQL expression, not statements (no ';')")
        try:
            with self._time_limit():
                return self.con.execute(f"SELECT {what} FROM rows WHERE ({where})")
        except duckdb.InterruptException:
            raise InputError(
                f"--where {where!r}: took longer than {self.limit_s:g} s and was stopped; "
                "filter on the columns directly"
            ) from None
        except duckdb.BinderException as e:
            column = re.search(r'column "([^"]+)" not found', str(e))
            if column:
                raise InputError(
                    f"--where: {self.source} has no column {column.group(1)!r} (it has: {', '.join(self.columns)})"
                ) from None
            raise InputError(f"--where {where!r}: {_first_line(e)}") from None
        except duckdb.Error as e:
            raise InputError(f"--where {where!r}: {_first_line(e)}") from None

    limit_s = FILTER_SECONDS

    @contextlib.contextmanager
    def _time_limit(self) -> Iterator[None]:
        """Interrupt the query past :data:`FILTER_SECONDS` (a filter can be made to run for ever, as with
        ``(SELECT sum(x) FROM range(1e12) t(x)) > 0``, and on the search page it would hold the table)."""
        timer = threading.Timer(self.limit_s, self.con.interrupt)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def rows(self, where: str) -> np.ndarray:
        """The matrix rows (sorted, int64) whose columns satisfy ``where``."""
        import numpy as np

        duckdb = _duckdb()
        try:
            found = self._select(f"{_PART}, {_ROW}", where).fetchnumpy()
        except duckdb.Error as e:
            raise InputError(f"--where {where!r}: {_first_line(e)}") from None
        starts = np.asarray(self.starts, np.int64)
        rows = starts[np.asarray(found[_PART], np.int64)] + np.asarray(found[_ROW], np.int64)
        rows.sort()
        return rows

    def paths(self, where: str) -> set[str]:
        key = "path" if "path" in self.columns else "text"
        return {str(r[0]) for r in self._select(_quote(key), where).fetchall()}


def _starts(files: list[Path]) -> list[int]:
    """The first matrix row of each part, from the parts' own row counts (Parquet metadata)."""
    from clipcli.store.saved import pq_rows

    starts, at = [], 0
    for file in files:
        starts.append(at)
        at += pq_rows(file)
    return starts


def matching_paths(source: Path, where: str) -> set[str]:
    """The paths of the rows of ``source`` (a Parquet file or folder of parts) that satisfy ``where``."""
    return WhereTable(source).paths(where)


def matching_rows(source: Path, where: str) -> np.ndarray:
    """The matrix rows of ``source`` that satisfy ``where``, sorted."""
    return WhereTable(source).rows(where)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")[0].split())


__all__ = ["WhereTable", "matching_paths", "matching_rows", "parquet_parts"]
