"""Whether a file already at an output's path is one clipcli wrote: clipcli replaces only its own outputs.

A file output is written under a temporary name and renamed onto its own (:mod:`clipcli.atomic`), which
replaces whatever was there. Before that, what is there is read: a file of the output's format that
clipcli writes, judged from its start (below), an empty file, or none, is replaced; anything else (a
user's notes named ``results.csv``, a matrix of their own named ``emb.npy``) is refused with one line,
and stays as it was.

What tells a clipcli output, by format (row outputs always begin with one of :data:`OWN_FIRST_COLUMNS`
and hold one of :data:`OWN_MARK_COLUMNS`: a score, an embedding, a similarity):

- CSV: a header of column names (lower case, ``a-z0-9_``), the first and one more of those;
- JSONL: a JSON object whose first key and one more are of those;
- TSV (rank's only, no header): a first line whose first or second field is a score (``0.8123``);
- Parquet: a file whose first column and one more are of those;
- NPY: its sidecar (``NAME.rows.jsonl``), whose first line clipcli's header is; the matrix and the
  sidecar are refused together;
- ``eval``'s JSON report: an object that opens with its ``schema_version``; ``rank --html``'s page: its
  title;
- ``train``'s model and checkpoint: a PyTorch archive (a zip) holding clipcli's mark, :data:`MODEL_MARK`,
  beside the weights (which ``clip`` and ``torch.load`` read as before, the mark unread).
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from clipcli.atomic import describe_os_error, note_checked
from clipcli.errors import OutputError
from clipcli.store.rows import META_COLUMNS

HEAD_BYTES = 64 * 1024  # what is read of an existing output to tell whether clipcli wrote it
OWN_FIRST_COLUMNS = frozenset({"path", "text", "id", "group", "model", "query", "score"})
# Every row output clipcli writes has one of these columns (or keys); a user's manifest (path,label), a
# list of texts (text,label), has none.
OWN_MARK_COLUMNS = frozenset({"score", "e0", "embedding", "predictions", "similarity_to_group_representative"})
# The columns (and JSONL keys) of each row output clipcli writes, as (every one of these, any of these):
# a file whose columns are no one output's (a user's ``model,dataset,score``, ``id,label,score``,
# ``path,label,score``) is not clipcli's, even where each column is one clipcli uses somewhere.
# tests/test_output_safety.py checks each writer's columns against this table.
_NESTED = frozenset({"label", "score"})  # a JSONL record's predictions, read as text with the keys around them
_SIGNATURES: tuple[tuple[frozenset[str], frozenset[str]], ...] = (
    (frozenset({"path", "rank", "label", "score"}), frozenset()),  # classify
    (frozenset({"path", "predictions"}), _NESTED),  # classify, JSONL
    (frozenset({"path", "start", "end", "label", "score"}), frozenset()),  # classify: a video's timeline
    (frozenset({"text", "rank", "label", "score"}), frozenset({"id"})),  # classify-text
    (frozenset({"text", "predictions"}), _NESTED | {"id"}),  # classify-text, JSONL
    (frozenset({"score", "path"}), frozenset({"query", "start", "end", "t"})),  # rank: images, moments
    (frozenset({"score", "text"}), frozenset({"query"})),  # rank: texts
    (frozenset({"group", "path", "similarity_to_group_representative"}), frozenset()),  # dedup
    (frozenset({"model", "templates", "path", "true_label", "predicted_label", "score", "true_rank"}), frozenset()),
    (
        frozenset({"model", "hypothesis", "row", "text", "true_label", "predicted_label", "score"}),
        frozenset({"true_rank"}),
    ),
)
# embed's columns besides the name and the vector (rows.schema)
_EMBED_EXTRA = frozenset({"width", "height", "bytes", "mtime", "model", *META_COLUMNS})
_VECTOR_COLUMN = re.compile(r"e\d+")
_COLUMN = re.compile(r"[a-z][a-z0-9_]*")
_JSON_KEY = re.compile(rb'"([a-z][a-z0-9_]*)": ')
_FIRST_KEY = re.compile(rb'\{"([a-z][a-z0-9_]*)": ')
_SCORE = re.compile(r"-?[01]\.\d{4}")  # rank's TSV score: a cosine with four decimals
_REMOVE = "clipcli replaces only its own outputs: remove it first, or choose another name"
MODEL_MARK = "clipcli.json"  # a member of a trained model's archive: ARCHIVE/clipcli.json


def read_head(path: Path) -> bytes | None:
    """The start of the regular file at ``path``; None where there is none (a missing or empty file; a
    FIFO, a device or a folder, which the output's opening deals with, and which are never read).
    What is there is noted first (:func:`~clipcli.atomic.note_checked`): the end of the run replaces that
    and nothing another program puts there meanwhile."""
    note_checked(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
    except (OSError, ValueError):
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
    """The first line of a file's ``head`` as text (bytes that are not UTF-8 kept as escapes), if it
    ends within it."""
    line, found, _ = head.partition(b"\n")
    return line.rstrip(b"\r").decode("utf-8", "surrogateescape") if found else None


def _firsts(extra: Iterable[str]) -> frozenset[str]:
    return OWN_FIRST_COLUMNS | frozenset(extra)


def columns_are_own(names: Iterable[str]) -> bool:
    """Whether ``names`` are the columns of one of clipcli's row outputs (:data:`_SIGNATURES`; or embed's:
    a path or a text, the vector as ``embedding`` or ``e0, e1...``, and its own extra columns)."""
    found = set(names)
    vector = {n for n in found if _VECTOR_COLUMN.fullmatch(n)}
    rest = found - vector
    if any(need <= rest <= need | may for need, may in _SIGNATURES):
        return True
    key = {"path", "text"} & rest
    return len(key) == 1 and bool(vector or "embedding" in rest) and rest - key - {"embedding"} <= _EMBED_EXTRA


def csv_is_own(head: bytes, first: Iterable[str] = ()) -> bool:
    """A header of column names (lower case), the first one of :data:`OWN_FIRST_COLUMNS`, with one of
    :data:`OWN_MARK_COLUMNS` among them, and its columns those of one of clipcli's outputs (:func:`columns_are_own`)."""
    line = first_line(head)
    fields = next(csv.reader([line]), []) if line is not None else []
    return (
        bool(fields)
        and fields[0] in _firsts(first)
        and all(_COLUMN.fullmatch(f) for f in fields)
        and bool(OWN_MARK_COLUMNS & set(fields))
        and columns_are_own(fields)
    )


def jsonl_is_own(head: bytes, first: Iterable[str] = ()) -> bool:
    """A JSON object whose first key is one of :data:`OWN_FIRST_COLUMNS`, with a key of
    :data:`OWN_MARK_COLUMNS`, and its keys those of one of clipcli's outputs (read as text: a first row may be
    longer than what is read)."""
    found = _FIRST_KEY.match(head)
    keys = {k.decode() for k in _JSON_KEY.findall(head.partition(b"\n")[0])}
    return (
        found is not None
        and found.group(1).decode() in _firsts(first)
        and bool(OWN_MARK_COLUMNS & keys)
        and columns_are_own(keys)
    )


def tsv_is_own(head: bytes) -> bool:
    """No header to tell it by: rank's lines, ``score<TAB>path`` or ``query<TAB>score<TAB>path``, the
    score a cosine written with four decimals; since a user's ``0.9500<TAB>The Godfather`` looks the same,
    the first lines' paths must also name files that are there (from the working folder, as rank wrote
    them; a member ``FILE#KEY`` by its file). Rows of texts are so never replaced: remove the file first."""
    lines = [ln for ln in head.split(b"\n")[:-1][:5] if ln]
    if not lines:
        return False
    for raw in lines:
        fields = raw.rstrip(b"\r").decode("utf-8", "surrogateescape").split("\t")
        if not (2 <= len(fields) <= 3 and any(_SCORE.fullmatch(f) for f in fields[:2])):
            return False
        name = fields[-1]
        if not (os.path.isfile(name) or ("#" in name and os.path.isfile(name.rsplit("#", 1)[0]))):
            return False
    return True


def parquet_is_own(path: Path, first: Iterable[str] = ()) -> bool:
    """A Parquet file whose first column is one of :data:`OWN_FIRST_COLUMNS`, with one of
    :data:`OWN_MARK_COLUMNS` among its columns, and its columns those of one of clipcli's outputs
    (:func:`columns_are_own`)."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception:  # a damaged or foreign file, however pyarrow fails on it
        return False
    return bool(names) and names[0] in _firsts(first) and bool(OWN_MARK_COLUMNS & set(names)) and columns_are_own(names)


def refuse_foreign_npy(path: Path, sidecar: Path) -> None:
    """Refuse to replace an NPY output's matrix or sidecar unless clipcli wrote them (its sidecar's
    header says so; an NPY of clipcli's before the sidecar had a ``NAME.paths.txt`` beside it). Empty
    files, or none, are replaced; a FIFO or a device at either name is refused (they are files)."""
    note_checked(path)
    note_checked(sidecar)
    present = []
    for p in (path, sidecar):
        try:
            st = os.stat(p)
        except (OSError, ValueError):
            continue
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{p}: is not a file; an NPY output is a matrix and its sidecar, two files")
        if st.st_size:
            present.append(p)
    if not present:
        return
    head = read_head(sidecar) or b""
    legacy = not sidecar.exists() and path.with_suffix(".paths.txt").is_file()
    if not (head.startswith(b'{"clipcli_npy": ') or legacy):
        raise OutputError(
            f"{present[0]}: exists and is not an NPY output clipcli writes (the matrix and its sidecar "
            f"{sidecar.name}); {_REMOVE}"
        )


def report_is_own(head: bytes) -> bool:
    """``eval``'s JSON report: an object whose first key is its ``schema_version``."""
    return re.match(rb'\{\s*"schema_version"', head) is not None


def page_is_own(head: bytes) -> bool:
    """``rank --html``'s page: its title says so."""
    return b"<title>clipcli rank: " in head


def training_mark(folder: str, kind: str) -> tuple[str, str]:
    """The member ``train`` adds to a model's or checkpoint's PyTorch archive (its folder ``folder``)."""
    return f"{folder}/{MODEL_MARK}", json.dumps({"written_by": "clipcli train", "kind": kind})


def training_file_is_own(path: Path, kind: str) -> bool:
    """``train``'s model or checkpoint (``kind``): a PyTorch archive, its pickle and beside it the mark
    :func:`training_mark` writes, word for word (nothing in it is unpickled). A zip of a user's that
    merely holds a file of the mark's name (a zipped clip-retrieval folder has a ``clipcli.json``) is not."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            folder = names[0].split("/", 1)[0] if names else ""
            member, text = training_mark(folder, kind)
            if f"{folder}/data.pkl" not in names or member not in names:
                return False
            return archive.read(member) == text.encode()
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


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
