"""The datasets a server was given: their rows, their index, and the only files it will ever read.

A :class:`Dataset` is one embeddings source opened whole (memory-mapped, as ``rank`` and ``dedup`` open
it), with its index when there is a current one, and every row's stored path. The :class:`Catalog`
holds them all and notices when a source changes on disk (``embed`` run again while serving): the next
request reopens it, and sees the new rows, or gets :class:`Unavailable` with the reason when the source
cannot be read at that moment. Never a half-read dataset.

Files are reached through :meth:`Catalog.file_of` alone: a path is served only when it is, character
for character, the stored path of a row, and the file it names (links followed) lies inside the tree the
dataset's rows were in when it was opened. Nothing is ever joined onto a folder from a request.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import ClipCliError, InputError

if TYPE_CHECKING:
    import numpy as np

    from clipcli.store.index import OpenIndex
    from clipcli.store.saved import Expect, SavedMatrix


class Unavailable(ClipCliError):
    """A dataset that changed while serving and cannot be read now (the message says why)."""


@dataclass
class Dataset:
    """One source opened for serving (see the module's docstring)."""

    number: int  # its place among the sources given, from 0
    source: Path
    saved: SavedMatrix
    index: OpenIndex | None  # a current index with a structure of its own (None: exact scans)
    names: list[str]  # every row's stored path, in row order
    rows: dict[str, int]  # stored path -> row
    base: str | None  # the folder relative paths are relative to (None: the working folder)
    root: str  # the real folder every served file must lie in
    fingerprint: list[Any]
    columns: frozenset[str]  # the Parquet columns beside the embeddings (empty for NPY)
    note: str | None = None  # why the index is not used, when there is one
    cache: dict[Any, Any] = field(default_factory=dict)  # results derived from these rows (filters, groups)
    lock: threading.RLock = field(default_factory=threading.RLock)  # over ``cache``

    @property
    def size(self) -> int:
        return int(self.saved.matrix.shape[0])

    def locate(self, path: str) -> str:
        """Where a stored path is from the working folder (relative ones against the recorded base)."""
        if self.base is None or os.path.isabs(path):
            return os.path.abspath(path)
        return os.path.abspath(os.path.join(self.base, path))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), Q x k, best first: through the index when there is one, else exactly."""
        from clipcli.store.index import Stale, exact_search

        k = max(1, min(k, self.size))
        if self.index is not None:
            try:
                return self.index.search(queries, k)
            except Stale as e:  # rows rewritten behind a restored fingerprint: exact until reindexed
                self.index, self.note = None, f"{e}; scanning every row meanwhile"
        return exact_search(self.saved, queries, k)


def open_dataset(number: int, source: Path, expect: Expect, use_index: bool = True) -> Dataset:
    """Open ``source`` for serving; raises :class:`~clipcli.errors.ClipCliError` when it cannot be used."""
    from clipcli.store.index import META, Stale, default_index_path, open_index
    from clipcli.store.saved import open_matrix, source_fingerprint

    if not source.exists():
        raise InputError(f"{source}: no such file or directory")
    fingerprint = source_fingerprint(source)
    index, note = None, None
    index_path = default_index_path(source)
    if use_index and (index_path / META).exists():
        try:
            index = open_index(index_path, source, expect, command="serve")
        except Stale as e:
            note = f"{e}; scanning every row meanwhile"
    saved = index.saved if index is not None else open_matrix(source, expect)
    if index is not None and index.vectors is None:
        index = None  # a flat index is the exact scan itself
    if saved.key != "path":
        raise InputError(f"{source}: holds embeddings of texts, not of images; serve shows images")
    names = [name for block in saved.iter_names() for name in block]
    base, columns = _parquet_facts(source)
    dataset = Dataset(number, source, saved, index, names, {}, base, "", fingerprint, columns, note)
    dataset.rows = {name: row for row, name in enumerate(names)}
    dataset.root = _tree_of(dataset)
    return dataset


def _parquet_facts(source: Path) -> tuple[str | None, frozenset[str]]:
    """The recorded base folder and the column names of a Parquet source (None and none for NPY)."""
    import pyarrow.parquet as pq

    from clipcli.store.parts import dataset_base

    if source.suffix.lower() == ".npy":
        return None, frozenset()
    parts = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    try:
        schema = pq.read_schema(parts[0])
    except (OSError, ValueError, IndexError) as e:
        raise InputError(f"{source}: cannot read its schema ({e})") from e
    base = dataset_base(schema.metadata)
    if base is not None and _same_folder(base):
        base = None
    return base, frozenset(schema.names) - {"embedding"}


def _same_folder(folder: str) -> bool:
    try:
        return os.path.samefile(folder, os.curdir)
    except OSError:
        return False


def _tree_of(dataset: Dataset) -> str:
    """The deepest real folder holding every row's file: the tree a served file must lie in."""
    if not dataset.names:
        return os.path.realpath(dataset.locate("."))
    folders = {os.path.dirname(dataset.locate(name)) for name in dataset.names}
    return os.path.realpath(os.path.commonpath(sorted(folders)))


class Catalog:
    """Every dataset being served, reopened when its source changes (see the module's docstring)."""

    def __init__(self, sources: list[Path], expect: Expect, use_index: bool = True) -> None:
        self.sources = sources
        self.expect = expect
        self.use_index = use_index
        self.lock = threading.Lock()
        self.datasets = [open_dataset(i, s, expect, use_index) for i, s in enumerate(sources)]

    def current(self) -> list[Dataset]:
        """The datasets as they are on disk now: any whose source changed is reopened first."""
        from clipcli.store.saved import source_fingerprint

        with self.lock:
            for i, dataset in enumerate(self.datasets):
                try:
                    changed = source_fingerprint(dataset.source) != dataset.fingerprint
                    if changed:
                        self.datasets[i] = open_dataset(i, dataset.source, self.expect, self.use_index)
                except (ClipCliError, OSError, ValueError) as e:
                    raise Unavailable(
                        f"{dataset.source}: changed while serving and cannot be read now ({e}); "
                        "try again once it is written"
                    ) from e
            return list(self.datasets)

    def row_of(self, path: str) -> tuple[Dataset, int] | None:
        """The dataset and row whose stored path is exactly ``path``, if any."""
        for dataset in self.current():
            row = dataset.rows.get(path)
            if row is not None:
                return dataset, row
        return None

    def file_of(self, path: str) -> tuple[Path, str | None] | None:
        """The file behind a row's stored path, with the member of it the row is (a video's frame, a
        WebDataset sample; None for a plain image), or None (serve a 404): not a row, not inside its
        dataset's tree once links are followed, or not a regular file."""
        from clipcli.images.containers import container_of

        found = self.row_of(path)
        if found is None:
            return None
        dataset, _ = found
        container = container_of(path)
        member = None if container is None else path[len(container) + 1 :]
        real = os.path.realpath(dataset.locate(path if container is None else container))
        if os.path.commonpath([real, dataset.root]) != dataset.root:
            return None
        try:
            if not stat.S_ISREG(os.stat(real).st_mode):
                return None
        except (OSError, ValueError):
            return None
        return Path(real), member
