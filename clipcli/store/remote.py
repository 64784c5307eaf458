"""Parquet datasets in object stores: ``-o s3://bucket/emb/`` (or any URI ``pyarrow.fs`` opens).

The dataset is the one a local directory holds (see :mod:`clipcli.store.dataset`): the same part names, schema,
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

Every call into the object store (opening it, a listing, reading or uploading one part, a deletion)
runs in a daemon thread that this thread waits for at most ``$CLIPCLI_OBJECT_STORE_TIMEOUT`` seconds
(default 30; an upload gets a second more per 256 KiB): a store that does not answer (no credentials,
an endpoint that accepts and never replies) is one error line within that time, and Ctrl-C or SIGTERM
ends the run at once rather than after the store's own retries (``gs://`` retries for 15 minutes by
default). The filesystem is also given that limit where pyarrow lets it be set (S3's connect and
request timeouts, GCS's retry limit), so a call given up on ends soon after on its own.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from clipcli.errors import InputError, OutputError
from clipcli.store.dataset import ParquetStore
from clipcli.store.parts import (
    KEPT_PARTS,
    PART_NAME,
    PartKey,
    PartWriter,
    PlannedRows,
    Rows,
    Stored,
    any_exists,
    arrow_array,
    check_compatible,
    columns_as_found,
    first_rows,
    refuse_unreachable,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from clipcli.store.shard import Shard

_SHARD_TAG = re.compile(r"^-s(\d+)of(\d+)(?:-|$)")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
T = TypeVar("T")

TIMEOUT_VARIABLE = "CLIPCLI_OBJECT_STORE_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
UPLOAD_BYTES_PER_S = 256 * 1024  # the least upload speed waited for, on top of the timeout


def seconds_setting(variable: str, default: float) -> float:
    """A wait in seconds that ``$variable`` sets (a number above 0), else ``default``."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InputError(f"{variable}={raw}: give a number of seconds above 0")
    return seconds


def store_timeout() -> float:
    """Seconds one object-store call may take: ``$CLIPCLI_OBJECT_STORE_TIMEOUT``, else 30."""
    return seconds_setting(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S)


def bounded(where: str, doing: str, call: Callable[[], T], *, upload_bytes: int = 0) -> T:
    """``call()``, run in a daemon thread and waited for at most the store's timeout (see the module's
    doc); its exceptions are raised here. The wait is interruptible: a signal handler that raises
    (Ctrl-C, clipcli's SIGTERM) ends it at once, leaving the call to end on its own."""
    seconds = store_timeout() + upload_bytes / UPLOAD_BYTES_PER_S
    done = threading.Event()
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as e:  # handed to the waiting thread, which raises it
            outcome.append((False, e))
        finally:
            done.set()

    threading.Thread(target=run, name="clipcli-object-store", daemon=True).start()
    if not done.wait(seconds):
        raise OutputError(
            f"{where}: the object store did not answer within {seconds:g} s ({doing}); check the endpoint, the "
            f"network and the credentials, or set {TIMEOUT_VARIABLE} to wait longer"
        )
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def reason_of(error: BaseException) -> str:
    """An object store's error in one readable line (Google's client appends pages of context)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = text.split(" error_info={", 1)[0]
    return text if len(text) <= 400 else text[:397] + "..."


def _with_timeouts(fs: Any, seconds: float) -> Any:
    """``fs`` rebuilt with the store's timeout where its options allow one and the URI set none."""
    import datetime

    import pyarrow.fs as pafs

    try:
        kind = type(fs)
        options = dict(fs.__reduce__()[1][0])  # the options pickling carries: the URI's, and defaults
        if kind is getattr(pafs, "S3FileSystem", None):
            # Per request, up to 3 attempts: a call given up on ends about when the wait for it does.
            per_request = max(1.0, seconds / 3)
            for key in ("connect_timeout", "request_timeout"):
                if options.get(key) is None or options[key] < 0:
                    options[key] = per_request
        elif kind is getattr(pafs, "GcsFileSystem", None):
            if options.get("retry_time_limit") is None:
                options["retry_time_limit"] = datetime.timedelta(seconds=seconds)
        else:
            return fs
        return kind._reconstruct(options)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return fs  # another pyarrow: the wait in bounded() still applies


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

    seconds = store_timeout()
    try:
        fs, path = bounded(shown(uri), "opening it", lambda: pafs.FileSystem.from_uri(uri))
    except (OSError, ValueError, TypeError) as e:
        # reason_of: hdfs:// lists every JVM it tried
        raise InputError(f"{shown(uri)}: cannot open ({reason_of(e)})") from e
    return _with_timeouts(fs, seconds), path.rstrip("/")


def put_table(fs: Any, path: str, table: pa.Table, sch: pa.Schema, where: str) -> None:
    """``table`` as the object ``path``: serialised first, then uploaded whole (see the module's doc)."""
    import contextlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(sch.metadata), buffer, use_dictionary=["model"])
    data = buffer.getvalue()

    def upload() -> None:
        with fs.open_output_stream(path) as out:
            out.write(data)

    name = path.rsplit("/", 1)[-1]
    try:
        bounded(where, f"uploading {name}", upload, upload_bytes=data.size)
    except OSError as e:
        with contextlib.suppress(OSError, OutputError):
            bounded(where, f"deleting {name}", lambda: fs.delete_file(path))  # a failed upload is no part
        raise OutputError(f"{where}: cannot write {name} ({reason_of(e)}); {KEPT_PARTS}") from e
    except OutputError as e:  # no answer in time
        raise OutputError(f"{e}; {KEPT_PARTS}") from None


def read_table(fs: Any, path: str, columns: list[str] | None = None, where: str = "") -> tuple[pa.Schema, pa.Table]:
    import pyarrow.parquet as pq

    def read() -> tuple[pa.Schema, pa.Table]:
        with fs.open_input_file(path) as source, pq.ParquetFile(source) as file:
            return file.schema_arrow, file.read(columns=columns)

    return bounded(where or path, f"reading {path.rsplit('/', 1)[-1]}", read)


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
class RemoteStore(PlannedRows):
    """:class:`clipcli.store.dataset.ParquetStore`'s directory mode on a ``pyarrow.fs`` filesystem, unlocked."""

    uri: str
    schema: pa.Schema
    model: str
    _foreign: dict[PartKey, list[str]] = field(default_factory=dict)  # this run's paths in parts not its own

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
            if bounded(self.where, "looking it up", lambda: fs.get_file_info(root)).type == pafs.FileType.File:
                raise OutputError(f"{self.where}: exists and is not a directory")
            selector = pafs.FileSelector(root, allow_not_found=True)
            infos = bounded(self.where, "listing it", lambda: fs.get_file_info(selector))
        except OSError as e:
            raise OutputError(f"{self.where}: cannot list ({reason_of(e)})") from e
        found = []
        for info in infos:
            m = PART_NAME.match(info.base_name)
            if m and info.type == pafs.FileType.File:
                found.append(((int(m.group(1)), m.group(2)), info.path))
        return sorted(found)

    def open(self) -> None:
        """Read what earlier runs stored (paths, sizes, mtimes); refuse a shard run that would have to
        change parts it does not own."""
        fs, root = open_uri(self.uri)
        try:
            # A missing bucket, a refused write or missing credentials fail here, before any work.
            bounded(self.where, "creating the dataset's folder", lambda: fs.create_dir(root, recursive=True))
        except OSError as e:
            raise OutputError(f"{self.where}: cannot write ({reason_of(e)})") from e
        parts = self._parts()  # relative paths are relative to the folder the dataset records (store.py)
        try:
            found = read_table(fs, parts[0][1], ["path"], self.where)[0] if parts else None
        except OSError:
            found = None  # rewritten since the listing (by a shard): this run reads paths as given
        self.schema = columns_as_found(self.schema, found)
        self.adopt_base(None if found is None else found.metadata, not parts)
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

    def _scan(self) -> dict[str, list[Stored]]:
        fs, _ = open_uri(self.uri)
        stored: dict[str, list[Stored]] = {}
        self._foreign = {}
        for key, part in self._parts():
            self._next_part = max(self._next_part, key[0] + 1)
            if self._other_shards(key):
                # Not this shard's rows, but whether any stored path exists from here is the dataset's
                # question (refuse_unreachable): a shard whose own files are all gone is not a wrong folder.
                if not self._reachable:
                    self._note_reachable(fs, part)
                continue
            try:
                found, table = read_table(fs, part, ["path", "bytes", "mtime"], self.where)
            except FileNotFoundError:
                if self._mine(key):
                    raise OutputError(f"{self.where}: {part} vanished while this run read it") from None
                continue  # rewritten by its own writer since the listing: none of its rows are this run's
            except (OSError, ValueError) as e:
                raise OutputError(f"{self.where}: cannot read existing embeddings in {part} ({e})") from e
            check_compatible(found, self.schema, Path(part))
            for p in self.record_rows(table, key, stored):
                if not self._mine(key):
                    self._foreign.setdefault(key, []).append(p)
        return stored

    def _note_reachable(self, fs: Any, part: str) -> None:
        try:
            table = read_table(fs, part, ["path"], self.where)[1]
        except (OSError, ValueError):
            return  # rewritten by its own writer since the listing, or unreadable: it proves nothing
        self._reachable = any_exists(map(self.locate, table.column("path").to_pylist()))

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

    def finish(self) -> int:
        """Write what is pending, drop stale and duplicate rows from this run's parts; returns how many
        paths were removed."""
        self._flush()
        return self.reconcile()  # Ray workers wrote parts this process has not seen

    def _clean_parts(self, keep: dict[str, PartKey]) -> None:
        import numpy as np

        fs, _ = open_uri(self.uri)
        written: set[str] = set()
        for key, part in self._parts():
            if not self._mine(key):
                continue
            _, table = read_table(fs, part, ["path"], self.where)
            paths = table.column("path").to_pylist()
            wanted = first_rows(paths, [key] * len(paths), keep, written, self.owns)
            if len(wanted) == len(paths):
                continue
            _, whole = read_table(fs, part, None, self.where)
            kept = whole.take(arrow_array(np.array(wanted, np.int64)))
            # The cleaned copy is uploaded before the original goes: a crash between leaves duplicates
            # that the next run resolves, never a lost row.
            if kept.num_rows:
                self._put_new_part(kept)
            try:
                bounded(self.where, f"deleting {part}", lambda: fs.delete_file(part))  # noqa: B023 (waited for)
            except OSError as e:
                raise OutputError(f"{self.where}: cannot delete {part} ({reason_of(e)}); {KEPT_PARTS}") from e
        if not self._parts():
            self._put_new_part(self.schema.empty_table())


def parquet_store(
    output: str, sch: pa.Schema, model: str, *, part_rows: int = 4096, shard: Shard | None = None
) -> ParquetStore | RemoteStore:
    """The store for ``output``: an object store's for a remote URI, else the local one."""
    if is_remote(output):
        return RemoteStore(output, sch, model, part_rows=part_rows, shard=shard)
    return ParquetStore(Path(local_output(output) or output), sch, model, part_rows=part_rows, shard=shard)
