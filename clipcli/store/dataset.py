"""Embedding datasets that every data tool opens: a Parquet file, or a directory of part files (NPY is in
:mod:`clipcli.store.npy`, the parts' building blocks in :mod:`clipcli.store.parts`).

A Parquet output is incremental: rows carry each file's size and mtime, so a rerun embeds only files
that are new or changed and drops rows of files that are gone. In a directory every part file is
written under a temporary name and renamed when complete, so a run killed at any moment leaves only
whole parts behind; the next run reconciles them (one row per path, the newest valid one wins).

Parts are named ``part-NNNNNN[-TAG...].parquet``: NNNNNN orders runs (each run numbers its parts above
every part it found), the tags keep the names of writers that run at once apart: ``-sIofN`` for a
``--shard`` run, ``-rXXXX`` for each part a Ray worker writes. Readers of ``DIR/*.parquet`` need not
know: every part has the same schema and metadata, whoever wrote it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clipcli.atomic import OutputLock, file_identity, note_checked, real_path, remove_temporaries
from clipcli.errors import InputError, OutputError
from clipcli.store.parts import (
    KEPT_PARTS,
    PART_NAME,
    PartKey,
    PartWriter,
    PlannedRows,
    Stored,
    arrow_array,
    check_compatible,
    columns_as_found,
    first_rows,
    read_parquet,
    refuse_unreachable,
    write_table,
)
from clipcli.store.shard import ShardLocks, compaction, refuse_shard_runs, release_fd

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class ParquetStore(PlannedRows):
    """Incremental Parquet output: a directory of part files, or a single file rewritten atomically."""

    path: Path
    schema: pa.Schema
    model: str
    _lock: OutputLock | ShardLocks | None = None
    _shards_fd: int | None = None
    _found: tuple[int, int, int, int] | None = None  # the single file read at the start (see _finish)

    @property
    def is_dir(self) -> bool:
        """A directory of parts, unless named ``*.parquet``; an existing ``*.parquet`` folder (as Spark
        writes them) is a directory too."""
        return self.path.suffix.lower() not in (".parquet", ".pq") or self.path.is_dir()

    @property
    def where(self) -> str:
        return str(self.path)

    def _parts(self) -> list[tuple[PartKey, Path]]:
        if not self.is_dir:
            return [((0, ""), self.path)] if self.path.exists() else []
        if not self.path.exists():
            return []
        if not self.path.is_dir():
            raise OutputError(f"{self.path}: exists and is not a directory")
        found = [((int(m.group(1)), m.group(2)), p) for p in self.path.iterdir() if (m := PART_NAME.match(p.name))]
        return sorted(found)

    def _remove_dead_temporaries(self) -> None:
        """Temporaries left by a run that was killed while writing: of any run when this one holds the
        directory alone; of this shard's runs (named with its tag) when sharded."""
        if not self.is_dir:
            remove_temporaries(self.path)
            return
        mine = re.compile(rf"^\.part-\d+{re.escape(self.tags)}(?:-[0-9a-z]+)*\.parquet\.\d+\.tmp$")
        for tmp in self.path.glob(".part-*.tmp"):
            if mine.match(tmp.name) and not tmp.name.endswith(f".{os.getpid()}.tmp"):
                tmp.unlink(missing_ok=True)

    def open(self) -> None:
        """Lock the output for this run, then read what earlier runs stored: paths with their size and
        mtime (not the embeddings). A second run into the same output is refused here, at once."""
        if self.shard is not None and not self.is_dir:
            raise InputError(f"{self.path}: --shard writes into a Parquet dataset directory: name one (-o DIR/)")
        try:
            if self.shard is not None:
                self._lock = ShardLocks(self.path, self.shard)
            else:
                self._lock = OutputLock(self.path, self.is_dir)
                if self.is_dir:
                    self._shards_fd = refuse_shard_runs(real_path(self.path), self.path)
            if not self.is_dir:  # what the end of the run re-reads and replaces: this file, and no other
                note_checked(self.path)
                self._found = file_identity(real_path(self.path))
            with compaction(self.path, self.shard):
                self._remove_dead_temporaries()
                self._read_stored()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        release_fd(self._shards_fd)
        self._shards_fd = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _scan(self) -> dict[str, list[Stored]]:
        """Path, size and mtime of every row of this run's paths in the parts on disk now."""
        import pyarrow.parquet as pq

        stored: dict[str, list[Stored]] = {}
        for key, part in self._parts():
            try:
                check_compatible(pq.read_schema(part), self.schema, part)
                table = read_parquet(part, ["path", "bytes", "mtime"])
            except (OSError, ValueError) as e:
                raise OutputError(
                    f"{part}: cannot read existing embeddings ({e}); remove this part and run embed again "
                    "to embed its files anew"
                ) from e
            self.record_rows(table, key, stored)
            self._next_part = max(self._next_part, key[0] + 1)
        return stored

    def reserve_number(self) -> int:
        """A run number for parts written elsewhere (see :class:`PartWriter`), above every part here."""
        number = self._next_part
        self._next_part += 1
        return number

    def part_writer(self) -> PartWriter:
        return PartWriter(str(self.path), self.schema, self.model, self.reserve_number(), self.tags)

    def _read_stored(self) -> None:
        self._set_base()
        self.stored = self._scan()
        refuse_unreachable(str(self.path), self.stored, self._reachable)

    def _set_base(self) -> None:
        import pyarrow.parquet as pq

        parts = self._parts()
        found = None
        for _, part in parts:
            try:
                found = pq.read_schema(part)
            except (OSError, ValueError):
                continue  # reported by the scan that follows
            break
        self.schema = columns_as_found(self.schema, found)
        self.adopt_base(None if found is None else found.metadata, new=not parts)

    def _write(self, table: pa.Table, target: Path) -> None:
        kept = KEPT_PARTS if self.is_dir else "any previous file is left as it was"
        write_table(table, target, self.schema, kept)

    def _new_part(self) -> Path:
        return self.path / f"part-{self.reserve_number():06d}{self.tags}.parquet"

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._pending:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        # The key the rows were stored under (see add) is the number before it is reserved.
        self._write(pa.concat_tables(self._pending), self._new_part())
        self._pending, self._pending_rows = [], 0

    def finish(self) -> int:
        """Write what is pending, drop stale and duplicate rows, release the output; returns how many
        paths were removed."""
        try:
            return self._finish()
        finally:
            self.release()

    def _finish(self) -> int:
        import numpy as np
        import pyarrow as pa

        if not self.is_dir:
            keep = self._keep()
            removed = sum(1 for p in self.stored if p not in keep)
            tables, tags = [], []
            # A file another program put at the name meanwhile is not read: the write sets this run's rows
            # aside beside it, and says so (see AtomicFile.commit).
            if self.path.exists() and file_identity(real_path(self.path)) == self._found:
                tables.append(read_parquet(self.path))
                tags += [(0, "")] * tables[0].num_rows
            for t in self._pending:
                tables.append(t)
                tags += [(self._next_part, "")] * t.num_rows
            combined = pa.concat_tables(tables) if tables else self.schema.empty_table()
            paths = combined.column("path").to_pylist()
            wanted = first_rows(paths, tags, keep, set(), self.owns)
            self._write(combined.take(arrow_array(np.array(wanted, np.int64))), self.path)
            return removed
        self._flush()
        with compaction(self.path, self.shard):
            # Other shards may rewrite parts that also hold this shard's rows: one compaction at a time.
            return self.reconcile()

    def _clean_parts(self, keep: dict[str, PartKey]) -> None:
        import numpy as np

        written: set[str] = set()
        empty: list[Path] = []
        for key, part in self._parts():
            # Paths alone decide; the embeddings (most of the bytes) are read only for a part that changes.
            paths = read_parquet(part, ["path"]).column("path").to_pylist()
            if not paths:
                empty.append(part)
                continue
            wanted = first_rows(paths, [key] * len(paths), keep, written, self.owns)
            if len(wanted) == len(paths):
                continue
            kept = read_parquet(part).take(arrow_array(np.array(wanted, np.int64)))
            # The cleaned copy is written before the original goes: a crash between leaves duplicates
            # that the next run resolves, never a lost row.
            if kept.num_rows:
                self._write(kept, self._new_part())
            part.unlink()
        # An empty part only keeps an empty dataset readable (a shard that owned no file writes one
        # when it runs first); once any part holds rows it has no purpose.
        if len(empty) < len(self._parts()):
            for part in empty:
                part.unlink()
        elif not self._parts():
            self.path.mkdir(parents=True, exist_ok=True)
            self._write(self.schema.empty_table(), self._new_part())
