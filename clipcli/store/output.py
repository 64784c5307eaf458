"""What ``-o``/``--format`` mean, decided in one place: :func:`parse_output` turns them into an
:class:`Output` (its kind, its format, its lock); :data:`WRITERS` is the one table of writers, by format.

Kinds of output:

- a **stream**: stdout (no ``-o``, or ``-o -``), or a FIFO, a device or a pipe named by ``-o``; written
  in place, never locked nor replaced;
- a **file**: written under a temporary name and renamed onto its own (see :class:`clipcli.store.formats.RowWriter`);
- a **dataset directory** (commands that write Parquet datasets: ``embed``): a name ending with a slash or
  without an extension, or an existing folder named ``*.parquet`` (as Spark writes them);
- an **object-store URI** (``s3://b/emb/``): a dataset directory in an object store, which has no locks.

The NPY writer is here rather than in :mod:`clipcli.store.formats` with the row writers: it writes through
:func:`clipcli.store.npy.write_npy`, and that module imports :mod:`clipcli.store.formats`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.atomic import OutputLock, is_stream, real_path, remove_temporaries, signals_held
from clipcli.errors import InputError
from clipcli.store import ownership
from clipcli.store.formats import ROW_WRITERS, OutputFormat, RowWriter, choose_format, has_format_suffix

if TYPE_CHECKING:
    import numpy as np

    from clipcli.store.parts import ModelTag
    from clipcli.store.shard import Shard


class Layout(str, Enum):
    """How a dataset directory is laid out (``embed --layout``)."""

    PARQUET = "parquet"  # clipcli's Parquet parts: clipcli.store.dataset
    CLIP_RETRIEVAL = "clip-retrieval"  # NPY matrices beside Parquet metadata: clipcli.store.clip_retrieval


class OutputKind(str, Enum):
    STREAM = "stream"  # stdout, or a FIFO, device or pipe
    FILE = "file"
    DATASET = "dataset"  # a local directory of Parquet parts
    URI = "uri"  # a dataset directory in an object store


@dataclass(frozen=True)
class Output:
    """What ``-o`` names (``target``: None for stdout), as what and in which format."""

    target: str | None
    kind: OutputKind
    format: OutputFormat
    shard: Shard | None = None
    layout: Layout = Layout.PARQUET  # of a dataset directory

    @property
    def on_stdout(self) -> bool:
        return self.target is None

    @property
    def is_dataset(self) -> bool:
        return self.kind in (OutputKind.DATASET, OutputKind.URI)

    def written_files(self) -> list[str]:
        """The files (or the folder) a run writes: the output, and an NPY output's sidecar."""
        if self.target is None:
            return []
        if self.format is OutputFormat.NPY:
            from clipcli.store.npy import npy_sidecar

            return [self.target, str(npy_sidecar(Path(self.target)))]
        return [self.target]

    def lock(self) -> AbstractContextManager[object]:
        """The output's lock, to hold from before anything is read: none for a stream or an object store
        (which has no locks, see :mod:`clipcli.store.remote`); a shard run's locks for a ``--shard`` run
        into a dataset (they let the other shards write the same directory); else the output's own."""
        if self.target is None or self.kind in (OutputKind.STREAM, OutputKind.URI):
            return nullcontext()
        if self.shard is not None:
            from clipcli.store.shard import ShardLocks

            return ShardLocks(Path(self.target), self.shard)
        return OutputLock(Path(self.target), self.kind is OutputKind.DATASET)


def is_dataset_dir(output: str | None) -> bool:
    """A directory of Parquet parts: named with a trailing slash or without an extension, or an existing
    folder named ``*.parquet`` (as Spark writes them); an existing ``x.csv`` folder is not. A URI names
    one when its path ends with ``/`` or has no extension."""
    from urllib.parse import urlsplit

    from clipcli.store.remote import is_remote

    if is_remote(output):
        path = urlsplit(output or "").path
        return path.endswith("/") or not Path(path).suffix
    if not output or output == "-" or is_stream(Path(output)):
        return False
    suffix = Path(output).suffix.lower()
    return output.endswith(("/", os.sep)) or not suffix or (suffix in (".parquet", ".pq") and Path(output).is_dir())


def _kind(target: str | None) -> OutputKind:
    if target is None or is_stream(Path(target)):
        return OutputKind.STREAM
    return OutputKind.FILE


def parse_output(
    output: str | None,
    fmt: Enum | None,
    allowed: Sequence[OutputFormat],
    *,
    tty: bool = False,
    piped: OutputFormat = OutputFormat.CSV,
    format_flag: str | None = "--format",
) -> Output:
    """``-o`` and ``--format`` (a command's own choice of formats, or None) as an :class:`Output` of a
    command that writes one file or stream: the format from ``--format``, else the file's extension, else
    a table on a terminal (``tty``), else ``piped`` (see :func:`clipcli.store.formats.choose_format`)."""
    chosen = choose_format(_as_format(fmt), output, tty, allowed, piped, format_flag)
    target = None if not output or output == "-" else output
    return Output(target, _kind(target), chosen, None)


def parse_dataset_output(
    output: str | None,
    fmt: Enum | None,
    allowed: Sequence[OutputFormat],
    *,
    tty: bool,
    text: bool = False,
    layout: Layout | None = None,
) -> Output:
    """``-o``/``--format`` of a command that can also write a Parquet dataset directory of image
    embeddings, locally or in an object store (``embed``; ``text``: it writes texts, which go to one
    file). A ``file://`` URI is its local path; a URI that names no dataset directory is refused.
    ``layout`` ``clip-retrieval`` writes that layout into a local folder instead
    (:mod:`clipcli.store.clip_retrieval`); with no ``layout``, a folder already in that layout goes on
    in it, so that no clipcli part is left where no reader of the layout would see its rows."""
    from clipcli.store.clip_retrieval import is_layout
    from clipcli.store.remote import check_remote_output, is_remote, local_output

    output = local_output(output)
    local = output is not None and output not in ("", "-") and not is_remote(output)
    in_layout = local and is_layout(Path(output or ""))
    if local and any(is_layout(folder) for folder in Path(os.path.realpath(output or "")).parents):
        raise InputError(f"{output}: is inside a folder in clip-retrieval's layout; name the folder itself, or another")
    if layout is Layout.CLIP_RETRIEVAL or (layout is None and in_layout and not text and fmt is None):
        return _layout_output(output, fmt, text)
    if in_layout and (layout is Layout.PARQUET or (fmt is not None and not text)):
        flag = "--layout parquet" if layout is Layout.PARQUET else "--format"
        raise InputError(
            f"{output}: is a folder in clip-retrieval's layout, where clipcli's Parquet parts would not be "
            f"read; drop {flag} to add to it, or name another folder"
        )
    into_dir = is_dataset_dir(output) and _as_format(fmt) in (None, OutputFormat.PARQUET)
    check_remote_output(output, into_dir, text)
    if into_dir:
        kind = OutputKind.URI if is_remote(output) else OutputKind.DATASET
        return Output(output, kind, OutputFormat.PARQUET)
    if output and not text and fmt is None and not has_format_suffix(output) and Path(output).is_dir():
        raise InputError(
            f"{output}: is a directory; to write a Parquet dataset into it, end the name with a slash "
            f"(-o {output.rstrip('/' + os.sep)}/), or name a file (.parquet, .npy, .csv or .jsonl)"
        )
    return parse_output(output, fmt, allowed, tty=tty)


def _layout_output(output: str | None, fmt: Enum | None, text: bool) -> Output:
    """``--layout clip-retrieval``: a local folder of image embeddings, whatever its name."""
    from clipcli.store.remote import is_remote

    flag = "--layout clip-retrieval"
    if text:
        raise InputError(f"{flag}: writes image embeddings; drop it to embed texts")
    if fmt is not None:
        raise InputError(f"{flag} writes .npy matrices beside .parquet metadata: drop --format")
    if not output or output == "-" or is_stream(Path(output)):
        raise InputError(f"{flag} writes a folder: pass -o DIR/")
    if is_remote(output):
        raise InputError(f"{output}: {flag} writes a local folder, not an object store")
    if Path(output).exists() and not Path(output).is_dir():
        raise InputError(f"{output}: exists and is not a folder; {flag} writes a folder: pass -o DIR/")
    from clipcli.store.clip_retrieval import refuse_foreign

    refuse_foreign(Path(output))  # before the model loads
    return Output(output, OutputKind.DATASET, OutputFormat.PARQUET, layout=Layout.CLIP_RETRIEVAL)


def dataset_output(path: str) -> Output:
    """``path`` as a Parquet dataset directory (for callers that name one themselves: benchmarks, tests)."""
    from clipcli.store.remote import is_remote

    return Output(path, OutputKind.URI if is_remote(path) else OutputKind.DATASET, OutputFormat.PARQUET)


def _as_format(fmt: Enum | None) -> OutputFormat | None:
    """A command's own format choice (an enum of what it can write) as the shared OutputFormat."""
    return None if fmt is None else OutputFormat(fmt.value)


def prediction_format(predictions: str | None) -> OutputFormat | None:
    """The format of ``eval``'s ``--predictions`` file (CSV or Parquet, by its extension)."""
    if not predictions:
        return None
    allowed = (OutputFormat.CSV, OutputFormat.PARQUET)
    return parse_output(predictions, None, allowed, format_flag=None).format


def lock_files(*files: str | Path | None, folders: Sequence[Path | None] = ()) -> ExitStack:
    """Every named output file and folder locked now (and so found writable), not after the work."""
    held = ExitStack()
    try:
        for file in files:
            if file:
                held.enter_context(OutputLock(Path(file), is_dir=False))
        for folder in folders:
            if folder is not None:
                held.enter_context(OutputLock(folder, is_dir=True))
    except BaseException:
        held.close()
        raise
    return held


class NpyWriter(RowWriter):
    """An NPY matrix and its sidecar (:func:`clipcli.store.npy.npy_sidecar`): rows gathered in memory
    and written once, under the locks of both files, through :func:`clipcli.store.npy.write_npy`.

    Rows are ``{key: name, "embedding": vector}``; :meth:`write_matrix` takes a batch as a matrix."""

    def __init__(
        self, output: str | None, *, tag: ModelTag, dim: int, dtype: str = "float32", key: str = "path"
    ) -> None:
        from clipcli.store.npy import npy_sidecar

        self.output, self.rows_written = output, 0
        self.path = Path(output or "")
        self.tag, self.dim, self.dtype, self.key = tag, dim, dtype, key
        self._locks = ExitStack()
        try:
            self._locks.enter_context(OutputLock(self.path, is_dir=False))
            # The sidecar is written too: no one else may.
            self._locks.enter_context(OutputLock(npy_sidecar(self.path), is_dir=False))
            ownership.refuse_foreign_npy(real_path(self.path), npy_sidecar(real_path(self.path)))
            remove_temporaries(real_path(self.path))
            remove_temporaries(real_path(npy_sidecar(self.path)))
        except BaseException:
            self._locks.close()
            raise
        self.parts: list[np.ndarray] = []
        self.names: list[str] = []

    @classmethod
    def create(cls, output: str | None, **details: Any) -> RowWriter:
        keys = ("tag", "dim", "dtype", "key")
        return cls(output, **{k: v for k, v in details.items() if k in keys and v is not None})

    def write(self, rows: Sequence[Any]) -> None:
        import numpy as np

        if rows:
            self.write_matrix([r[self.key] for r in rows], np.asarray([r["embedding"] for r in rows]))

    def write_matrix(self, names: Sequence[str], matrix: np.ndarray) -> None:
        import numpy as np

        self.parts.append(matrix.astype(np.float16) if self.dtype == "float16" else matrix)
        self.names.extend(names)
        self.rows_written += len(names)

    def close(self) -> None:
        import numpy as np

        from clipcli.store.npy import write_npy

        try:
            empty = np.empty((0, self.dim), np.dtype(self.dtype))
            matrix = np.concatenate(self.parts) if self.parts else empty
            with signals_held():  # the rows are written whole (see RowWriter._whole)
                write_npy(self.path, matrix, self.names, self.tag, key=self.key)
        finally:
            self._locks.close()

    def abort(self) -> None:
        self._locks.close()


WRITERS: dict[OutputFormat, type[RowWriter]] = {**ROW_WRITERS, OutputFormat.NPY: NpyWriter}


def open_writer(out: Output, **details: Any) -> RowWriter:
    """The writer of ``out``'s format; ``details`` are what that writer needs (``columns`` for CSV,
    ``schema`` for Parquet, ``tag``/``dim``/``dtype``/``key`` for NPY)."""
    return WRITERS[out.format].create(out.target, **details)
