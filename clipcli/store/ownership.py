"""Whether a file already at an output's path is one clipcli wrote: clipcli replaces only its own outputs.

A file output is written under a temporary name and renamed onto its own (:mod:`clipcli.atomic`), which
replaces whatever was there. Before that, what is there is read: a file of the output's format that
clipcli writes, judged from its start (below), an empty file, or none, is replaced; anything else (a
user's notes named ``results.csv``, a matrix of their own named ``emb.npy``) is refused with one line,
and stays as it was.

What tells a clipcli output, by format (row outputs always begin with one of :data:`OWN_FIRST_COLUMNS`):

- CSV: a header of column names (lower case, ``a-z0-9_``), the first one of those;
- JSONL: a JSON object on the first line whose first key is one of those;
- TSV (no header): a first line of as many tab-separated fields as the output has columns;
- Parquet: a file whose first column is one of those;
- NPY: its sidecar (``NAME.rows.jsonl``), whose first line clipcli's header is; the matrix and the
  sidecar are refused together;
- ``eval``'s JSON report: an object that opens with its ``schema_version``; ``rank --html``'s page: its
  title.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from clipcli.atomic import describe_os_error
from clipcli.errors import OutputError

HEAD_BYTES = 64 * 1024  # what is read of an existing output to tell whether clipcli wrote it
OWN_FIRST_COLUMNS = frozenset({"path", "text", "id", "group", "model", "query", "score"})
_COLUMN = re.compile(r"[a-z][a-z0-9_]*")
_REMOVE = "clipcli replaces only its own outputs: remove it first, or choose another name"


def read_head(path: Path) -> bytes | None:
    """The start of the regular file at ``path``; None where there is none (a missing or empty file; a
    FIFO, a device or a folder, which the output's opening deals with, and which are never read)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
    except OSError:
        return None  # nothing there, or nothing that can be reached: the output's opening says which
    try:
        with open(path, "rb") as f:
            return f.read(HEAD_BYTES) or None
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OutputError(f"{path}: cannot read what is there ({describe_os_error(e, path)})") from e


def refuse(path: Path, kind: str) -> OutputError:
    return OutputError(f"{path}: exists and is not a {kind} output clipcli writes; {_REMOVE}")


def first_line(head: bytes) -> str | None:
    """The first line of a file's ``head`` as text, if it is UTF-8 and ends within it."""
    line, found, _ = head.partition(b"\n")
    try:
        return line.rstrip(b"\r").decode("utf-8") if found else None
    except UnicodeDecodeError:
        return None


def _firsts(extra: Iterable[str]) -> frozenset[str]:
    return OWN_FIRST_COLUMNS | frozenset(extra)


def csv_is_own(head: bytes, first: Iterable[str] = ()) -> bool:
    line = first_line(head)
    fields = next(csv.reader([line]), []) if line is not None else []
    return bool(fields) and fields[0] in _firsts(first) and all(_COLUMN.fullmatch(f) for f in fields)


def jsonl_is_own(head: bytes, first: Iterable[str] = ()) -> bool:
    line = first_line(head)
    try:
        row = json.loads(line) if line is not None else None
    except ValueError:
        return False
    return isinstance(row, dict) and bool(row) and next(iter(row)) in _firsts(first)


def tsv_is_own(head: bytes, columns: int | None) -> bool:
    line = first_line(head)
    return line is not None and columns is not None and len(line.split("\t")) == columns


def parquet_is_own(path: Path, first: Iterable[str] = ()) -> bool:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (OSError, ValueError):
        return False
    return bool(names) and names[0] in _firsts(first)


def refuse_foreign_npy(path: Path, sidecar: Path) -> None:
    """Refuse to replace an NPY output's matrix or sidecar unless clipcli wrote them (its sidecar's
    header says so). Empty files, or none, are replaced."""
    present = [p for p in (path, sidecar) if p.exists() and not (p.is_file() and p.stat().st_size == 0)]
    if not present:
        return
    try:
        with open(sidecar, "rb") as f:
            header = json.loads(f.readline(HEAD_BYTES))
        own = isinstance(header, dict) and "clipcli_npy" in header
    except (OSError, ValueError):
        own = False
    if not own:
        raise OutputError(
            f"{present[0]}: exists and is not an NPY output clipcli writes (the matrix and its sidecar "
            f"{sidecar.name}); {_REMOVE}"
        )


def report_is_own(head: bytes) -> bool:
    """``eval``'s JSON report: an object whose first key is its ``schema_version``."""
    return head.lstrip().startswith(b"{") and head.lstrip()[1:].lstrip().startswith(b'"schema_version"')


def page_is_own(head: bytes) -> bool:
    """``rank --html``'s page: its title says so."""
    return b"<title>clipcli rank: " in head


def rows_are_own(path: Path, fmt: str, head: bytes, first: Iterable[str] = ()) -> bool:
    """A row output of format ``fmt`` (csv, jsonl, parquet) clipcli wrote, as its writer tells it."""
    if fmt == "parquet":
        return parquet_is_own(path, first)
    return jsonl_is_own(head, first) if fmt == "jsonl" else csv_is_own(head, first)


def refuse_unless_own(path: Path | None, is_own: Callable[[bytes], bool], kind: str) -> None:
    """Before any work: refuse an output file at ``path`` that ``is_own`` does not take for clipcli's."""
    head = read_head(path) if path is not None else None
    if path is not None and head is not None and not is_own(head):
        raise refuse(path, kind)
