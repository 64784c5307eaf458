"""Parquet datasets in object stores: ``-o s3://bucket/emb/`` (or any URI ``pyarrow.fs`` opens).

The dataset is the one a local directory holds (see :mod:`clipcli.store`): the same part names, schema,
metadata and incremental rules, so readers need not know where it was written from. What differs is how
a part becomes whole and who may write at once:

- A part is uploaded as one object, serialised in memory first; an object store makes an object visible
  only when its upload completes, so a run killed at any moment leaves whole parts and nothing to clean.
- Object stores have no ``flock``. Two unsharded runs into one URI at once are not refused: run one.
  Shard runs (``--shard I/N``) are safe at once because each writes, and rewrites or deletes, only the
  parts named with its own tag (``-sIofN``). Parts without that tag (an unsharded run's, or another N's)
  are read, never changed: a shard run that would have to drop its own stale rows from one is refused
  before it embeds anything (run once without --shard to compact the dataset, then shard again).

``file://`` URIs are local paths: they get the local store, with its locks and atomic renames.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from clipcli.errors import InputError, OutputError
from clipcli.store import (
    _KEPT_PARTS,
    _PART,
    ParquetStore,
    PartKey,
    PartWriter,
    Rows,
    Stat,
    _check_compatible,
    _first_rows,
    _PlannedRows,
    _Stored,
    any_exists,
    arrow_array,
    newest_unchanged,
    refuse_unreachable,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from clipcli.shard import Shard

_SHARD_TAG = re.compile(r"^-s(\d+)of(\d+)(?:-|$)")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(output: str | None) -> bool:
    return bool(output) and bool(_URI.match(output or ""))


def is_remote(output: str | None) -> bool:
    """A URI that is not a local path (``s3://``, ``gs://``, ``hdfs://``...; not ``file://``)."""
    return is_uri(output) and urlsplit(output or "").scheme.lower() != "file"


def local_output(output: str | None) -> str | None:
    """``file:///data/emb/`` as the local path ``/data/emb/``; anything else as it is."""
    if not is_uri(output) or is_remote(output):
        return output
    parts = urlsplit(output or "")
    if parts.netloc not in ("", "localhost"):
        raise InputError(f"{output}: a file:// URI names a path on this machine (file:///path/)")
    return unquote(parts.path)


def shown(uri: str) -> str:
    """The URI without its query, which may carry credentials (``?access_key=...``), for messages."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def is_remote_dataset(output: str) -> bool:
    """A URI names a dataset directory when its path ends with ``/`` or has no extension."""
    path = urlsplit(output).path
    return path.endswith("/") or not Path(path).suffix


def check_remote_output(output: str | None, into_dir: bool, text: bool) -> None:
    """A URI output is a Parquet dataset of images: refuse the rest before anything is read."""
    if not is_remote(output):
        return
    if text or not into_dir:
        raise InputError(
            f"{shown(output or '')}: a URI output is a Parquet dataset directory of image embeddings "
            "(-o s3://bucket/emb/); write texts and other formats to a local file"
        )


@lru_cache(maxsize=16)
def open_uri(uri: str) -> tuple[Any, str]:
    """The filesystem and the dataset's path in it (one filesystem per URI and process: Ray workers
    writing a part per batch reuse its connections)."""
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # hdfs:// lists every JVM it tried
        raise InputError(f"{shown(uri)}: cannot open ({reason})") from e
    return fs, path.rstrip("/")


def put_table(fs: Any, path: str, table: pa.Table, sch: pa.Schema, where: str) -> None:
    """``table`` as the object ``path``: serialised first, then uploaded whole (see the module's doc)."""
    import contextlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(sch.metadata), buffer, use_dictionary=["model"])
    data = buffer.getvalue()
    try:
        with fs.open_output_stream(path) as out:
            out.write(data)
    except OSError as e:
        with contextlib.suppress(OSError):
            fs.delete_file(path)  # an upload that failed half way must not stay as a part
        raise OutputError(f"{where}: cannot write {path.rsplit('/', 1)[-1]} ({e}); {_KEPT_PARTS}") from e


def read_table(fs: Any, path: str, columns: list[str] | None = None) -> tuple[pa.Schema, pa.Table]:
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as source, pq.ParquetFile(source) as file:
        return file.schema_arrow, file.read(columns=columns)


@dataclass(frozen=True)
class RemotePartWriter(PartWriter):
    """A :class:`PartWriter` whose folder is a URI: Ray workers reopen the filesystem from it (the URI
    carries its options; credentials come from each node's environment, as for any pyarrow client)."""

    def write(self, rows: Rows) -> str:
        import uuid

        name = f"part-{self.number:06d}{self.tags}-r{uuid.uuid4().hex[:16]}.parquet"
        fs, root = open_uri(self.folder)
        put_table(fs, f"{root}/{name}", rows.table(self.schema, self.model), self.schema, shown(self.folder))
        return name


@dataclass
class RemoteStore(_PlannedRows):
    """:class:`clipcli.store.ParquetStore`'s directory mode on a ``pyarrow.fs`` filesystem, unlocked."""

    uri: str
    schema: pa.Schema
    model: str
    part_rows: int = 4096
    shard: Shard | None = None
    stored: dict[str, list[_Stored]] = field(default_factory=dict)
    _pending: list[pa.Table] = field(default_factory=list)
    _pending_rows: int = 0
    _next_part: int = 0
    _foreign: dict[PartKey, list[str]] = field(default_factory=dict)  # this run's paths in parts not its own
    _reachable: bool = False  # as ParquetStore's

    @property
    def where(self) -> str:
        return shown(self.uri)

    def _mine(self, key: PartKey) -> bool:
        """Parts this run may rewrite or delete: every part, unless sharded; then its shard's."""
        return self.shard is None or key[1] == self.tags or key[1].startswith(self.tags + "-")

    def _parts(self) -> list[tuple[PartKey, str]]:
        import pyarrow.fs as pafs

        fs, root = open_uri(self.uri)
        try:
            if fs.get_file_info(root).type == pafs.FileType.File:
                raise OutputError(f"{self.where}: exists and is not a directory")
            infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        except OSError as e:
            raise OutputError(f"{self.where}: cannot list ({e})") from e
        found = []
        for info in infos:
            m = _PART.match(info.base_name)
            if m and info.type == pafs.FileType.File:
                found.append(((int(m.group(1)), m.group(2)), info.path))
        return sorted(found)

    def open(self) -> None:
        """Read what earlier runs stored (paths, sizes, mtimes); refuse a shard run that would have to
        change parts it does not own."""
        fs, root = open_uri(self.uri)
        try:
            fs.create_dir(root, recursive=True)  # a missing bucket or a refused write fails here, at once
        except OSError as e:
            raise OutputError(f"{self.where}: cannot write ({e})") from e
        self.stored = self._scan()
        refuse_unreachable(self.where, self.stored, self._reachable)
        stale = self._stale_foreign(self._keep())
        if stale:
            raise OutputError(
                f"{self.where}: parts not written by shard {self.shard} ({stale}) hold its rows of files that "
                "changed or are gone; an object store has no lock to rewrite shared parts safely: run once "
                "without --shard to compact the dataset, then shard again"
            )

    def release(self) -> None:
        """Nothing is held: object stores have no locks (see the module's doc)."""

    def _scan(self) -> dict[str, list[_Stored]]:
        fs, _ = open_uri(self.uri)
        stored: dict[str, list[_Stored]] = {}
        self._foreign = {}
        for key, part in self._parts():
            self._next_part = max(self._next_part, key[0] + 1)
            if self._other_shards(key):
                continue
            try:
                found, table = read_table(fs, part, ["path", "bytes", "mtime"])
            except FileNotFoundError:
                if self._mine(key):
                    raise OutputError(f"{self.where}: {part} vanished while this run read it") from None
                continue  # rewritten by its own writer since the listing: none of its rows are this run's
            except (OSError, ValueError) as e:
                raise OutputError(f"{self.where}: cannot read existing embeddings in {part} ({e})") from e
            _check_compatible(found, self.schema, Path(part))
            paths = table.column("path").to_pylist()
            self._reachable = self._reachable or any_exists(paths)
            for p, b, m in zip(paths, *(table.column(c).to_pylist() for c in ("bytes", "mtime")), strict=True):
                if self.owns(p):
                    stored.setdefault(p, []).append(_Stored(key, Stat(b, m)))
                    if not self._mine(key):
                        self._foreign.setdefault(key, []).append(p)
        return stored

    def _other_shards(self, key: PartKey) -> bool:
        """A part of another shard of the same count holds none of this shard's paths: not read."""
        if self.shard is None:
            return False
        m = _SHARD_TAG.match(key[1])
        return m is not None and int(m.group(2)) == self.shard.count and int(m.group(1)) != self.shard.index

    def _stale_foreign(self, keep: dict[str, PartKey]) -> str:
        """The first part this run may not change that holds a row of its own it would drop."""
        for key, paths in self._foreign.items():
            if len(set(paths)) < len(paths) or any(keep.get(p) != key for p in paths):
                return f"part-{key[0]:06d}{key[1]}.parquet"
        return ""

    def reserve_number(self) -> int:
        number = self._next_part
        self._next_part += 1
        return number

    def part_writer(self) -> RemotePartWriter:
        return RemotePartWriter(self.uri, self.schema, self.model, self.reserve_number(), self.tags)

    def _put_new_part(self, table: pa.Table) -> None:
        fs, root = open_uri(self.uri)
        name = f"part-{self.reserve_number():06d}{self.tags}.parquet"
        put_table(fs, f"{root}/{name}", table, self.schema, self.where)

    def _flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            self._put_new_part(pa.concat_tables(self._pending))
            self._pending, self._pending_rows = [], 0

    def _keep(self) -> dict[str, PartKey]:
        return newest_unchanged(self.stored)

    def finish(self) -> int:
        """Write what is pending, drop stale and duplicate rows from this run's parts; returns how many
        paths were removed."""
        self._flush()
        # Read again from the parts themselves: Ray workers wrote parts this process has not seen.
        self.stored = self._scan()
        keep = self._keep()
        removed = sum(1 for p in self.stored if p not in keep)
        self._clean_parts(keep)
        return removed

    def _clean_parts(self, keep: dict[str, PartKey]) -> None:
        import numpy as np

        fs, _ = open_uri(self.uri)
        written: set[str] = set()
        for key, part in self._parts():
            if not self._mine(key):
                continue
            _, table = read_table(fs, part, ["path"])
            paths = table.column("path").to_pylist()
            wanted = _first_rows(paths, [key] * len(paths), keep, written, self.owns)
            if len(wanted) == len(paths):
                continue
            _, whole = read_table(fs, part)
            kept = whole.take(arrow_array(np.array(wanted, np.int64)))
            # The cleaned copy is uploaded before the original goes: a crash between leaves duplicates
            # that the next run resolves, never a lost row.
            if kept.num_rows:
                self._put_new_part(kept)
            try:
                fs.delete_file(part)
            except OSError as e:
                raise OutputError(f"{self.where}: cannot delete {part} ({e}); {_KEPT_PARTS}") from e
        if not self._parts():
            self._put_new_part(self.schema.empty_table())


def parquet_store(
    output: str, sch: pa.Schema, model: str, *, part_rows: int = 4096, shard: Shard | None = None
) -> ParquetStore | RemoteStore:
    """The store for ``output``: an object store's for a remote URI, else the local one."""
    if is_remote(output):
        return RemoteStore(output, sch, model, part_rows=part_rows, shard=shard)
    return ParquetStore(Path(local_output(output) or output), sch, model, part_rows=part_rows, shard=shard)
