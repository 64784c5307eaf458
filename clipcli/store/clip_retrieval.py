"""clip-retrieval's layout: ``OUT/img_emb/img_emb_N.npy`` beside ``OUT/metadata/metadata_N.parquet``,
row-aligned, as ``clip-retrieval inference`` writes it and ``embedding-reader`` and ``autofaiss`` read it.

``embed --layout clip-retrieval -o OUT/`` writes it (:class:`ClipRetrievalStore`), incrementally as
clipcli's own Parquet dataset (:mod:`clipcli.store.dataset`) through the same plan (:class:`PlannedRows`):
the metadata carries each file's size and mtime beside ``image_path`` (and ``caption`` where known), so a
rerun embeds only new or changed files and drops the rows of files that are gone. ``OUT/clipcli.json``
records the model, the normalisation, the width and the type of the vectors (float16, as clip-retrieval
writes them, unless ``--dtype float32``), and marks the folder as clipcli's: a folder that holds any
file clipcli did not write is refused.

A part is a pair: both files are written whole under temporary names, then the matrix is renamed into
place, then the metadata, which commits the pair; a pair is removed metadata first. So a run killed at
any moment leaves whole pairs, and at worst a matrix without its metadata, which clipcli's readers
ignore and the next run removes: such a matrix is marked (``.img_emb_N.npy.pending``) from before it
stands alone until its pair is whole or gone, and a matrix without metadata and without that mark is
not clipcli's: the run is refused rather than remove it. Pairs are numbered as clipcli's parts are
(each run above every number it found), with six digits, so that both folders sort alike
(embedding-reader pairs files by sorted name).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.atomic import AtomicFile, OutputLock, describe_os_error, signals_held
from clipcli.errors import InputError, OutputError
from clipcli.store.parts import (
    KEPT_PARTS,
    PART_NAME,
    PartKey,
    PlannedRows,
    Stored,
    first_rows,
    read_parquet,
    refuse_unreachable,
    write_table,
)
from clipcli.store.rows import ModelTag, arrow_array, columns_as_found

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

LAYOUT = "clip-retrieval"
RECORD = "clipcli.json"
EMB_DIR, META_DIR = "img_emb", "metadata"
EMB_NAME = re.compile(r"^img_emb_(\d+)\.npy$")
META_NAME = re.compile(r"^metadata_(\d+)\.parquet$")
NAME_KEY = "image_path"  # clip-retrieval's name for the path column
_RECORD_FORMAT = 1


def is_layout(path: Path) -> bool:
    """Whether ``path`` is a folder in clip-retrieval's layout, written by clipcli (its record) or not
    (matrices in ``img_emb/``): an image folder that merely has subfolders of these names is not."""
    if not (path.is_dir() and (path / EMB_DIR).is_dir() and (path / META_DIR).is_dir()):
        return False
    return (path / RECORD).is_file() or any((path / EMB_DIR).glob("*.npy"))


def emb_file(folder: Path, number: int) -> Path:
    return folder / EMB_DIR / f"img_emb_{number:06d}.npy"


def meta_file(folder: Path, number: int) -> Path:
    return folder / META_DIR / f"metadata_{number:06d}.parquet"


@dataclass(frozen=True)
class Record:
    """``clipcli.json``: what the vectors of a layout folder were made with, and how they are stored."""

    tag: ModelTag
    dim: int
    dtype: str  # float16 or float32

    def text(self) -> str:
        return json.dumps(
            {
                "clipcli_layout": LAYOUT,
                "format": _RECORD_FORMAT,
                "model": self.tag.name,
                "model_sha256": self.tag.sha256,
                "normalized": self.tag.normalized,
                "dim": self.dim,
                "dtype": self.dtype,
            },
            indent=1,
        )


def read_record(folder: Path) -> Record:
    """The record of a layout folder clipcli wrote; a folder without one was not written by clipcli."""
    path = folder / RECORD
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("clipcli_layout") != LAYOUT or d.get("format") != _RECORD_FORMAT:
            raise ValueError("another layout")
        tag = ModelTag(str(d["model"]), str(d["model_sha256"]), bool(d["normalized"]))
        return Record(tag, int(d["dim"]), str(d["dtype"]))
    except FileNotFoundError:
        raise InputError(
            f"{folder}: no {RECORD} in it (the model its vectors were made with): not written by "
            "clipcli embed --layout clip-retrieval; embed the images with clipcli"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: not a record written by clipcli embed --layout clip-retrieval ({e})") from None


def _numbered(folder: Path, pattern: re.Pattern[str]) -> dict[int, Path]:
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): p for p in folder.iterdir() if (m := pattern.match(p.name))}


@dataclass(frozen=True)
class Pair:
    number: int
    emb: Path
    meta: Path


def pairs(folder: Path) -> list[Pair]:
    """The whole pairs of a layout folder, in order; a matrix without its metadata is not one."""
    embs = _numbered(folder / EMB_DIR, EMB_NAME)
    metas = _numbered(folder / META_DIR, META_NAME)
    for n, meta in metas.items():
        if n not in embs:
            raise InputError(f"{meta}: its matrix {emb_file(folder, n).name} is missing; the layout is damaged")
    return [Pair(n, embs[n], metas[n]) for n in sorted(metas)]


def open_pair(pair: Pair, dim: int) -> tuple[np.ndarray, int]:
    """A pair's matrix, memory-mapped, checked against its metadata's row count."""
    import numpy as np
    import pyarrow.parquet as pq

    try:
        matrix = np.load(pair.emb, mmap_mode="r")
        rows = int(pq.ParquetFile(pair.meta).metadata.num_rows)
    except (OSError, ValueError) as e:
        raise InputError(f"{pair.emb}: cannot read embeddings ({e})") from e
    if matrix.ndim != 2 or matrix.shape[0] != rows or matrix.shape[1] != dim:
        raise InputError(
            f"{pair.emb}: {matrix.shape} embeddings, but {pair.meta.name} has {rows} rows of width {dim}; "
            "the pair is damaged: run embed again"
        )
    return matrix, rows


def _regular(path: Path) -> bool:
    """A file of clipcli's in a layout folder is a regular file: a folder or a link by one of its names
    is someone else's."""
    return path.is_file() and not path.is_symlink()


def _allowed(name: str, pattern: re.Pattern[str]) -> bool:
    """One of clipcli's files in a layout subfolder, its temporary (``.NAME.PID.tmp``) or a matrix's
    pending mark (``.NAME.pending``)."""
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:].rsplit(".", 2)[0]
    elif name.startswith(".") and name.endswith(PENDING):
        name = name[1 : -len(PENDING)]
    return bool(pattern.match(name))


PENDING = ".pending"


def pending_mark(emb: Path) -> Path:
    """The mark clipcli leaves beside a matrix while it stands without its metadata (being committed, or
    being removed): a matrix without metadata is a killed run's only with this mark, else not clipcli's."""
    return emb.with_name(f".{emb.name}{PENDING}")


def _mark(emb: Path) -> None:
    try:
        pending_mark(emb).touch()
    except OSError as e:
        raise OutputError(f"{emb.parent}: cannot write ({describe_os_error(e, emb.parent)}); {KEPT_PARTS}") from e


def refuse_foreign(folder: Path) -> None:
    """Refuse a folder holding any file clipcli did not write there: clipcli writes into a folder
    that is new or empty, or that it wrote before (its record in it)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a directory")
    own = {RECORD, ".clipcli.lock", EMB_DIR, META_DIR}
    found = sorted(os.listdir(folder))
    record_tmp = re.compile(rf"^\.{re.escape(RECORD)}\.\d+\.tmp$")
    foreign = [n for n in found if n not in own and not (record_tmp.match(n) and _regular(folder / n))]
    if not foreign and (folder / RECORD).is_file():
        for sub, pattern in ((EMB_DIR, EMB_NAME), (META_DIR, META_NAME)):
            if (folder / sub).exists() and not (folder / sub).is_dir():
                foreign.append(sub)
            elif (folder / sub).is_dir():
                names = sorted(os.listdir(folder / sub))
                foreign += [f"{sub}/{n}" for n in names if not (_allowed(n, pattern) and _regular(folder / sub / n))]
    elif not foreign:
        foreign = [n for n in found if n in (EMB_DIR, META_DIR)]  # a layout clipcli did not write
    if foreign and PART_NAME.match(os.path.basename(foreign[0])):  # an older embed without --layout left it
        raise OutputError(
            f"{folder}: holds {foreign[0]}, rows in clipcli's Parquet layout that no reader of this layout "
            "sees; move it out and embed its images into this folder again"
        )
    if foreign:
        raise OutputError(
            f"{folder}: holds {foreign[0]}, which clipcli did not write; write the layout into a new or "
            "empty folder (or one that embed --layout clip-retrieval wrote)"
        )


def _meta_schema(sch: pa.Schema) -> pa.Schema:
    """The metadata's columns: clipcli's dataset schema without the vectors, ``path`` as ``image_path``."""
    kept = sch.remove(sch.get_field_index("embedding"))
    return kept.set(kept.get_field_index("path"), kept.field("path").with_name(NAME_KEY))


@dataclass
class ClipRetrievalStore(PlannedRows):
    """An incremental clip-retrieval layout folder (see the module's doc); one writer at a time."""

    path: Path
    schema: pa.Schema
    model: str
    _lock: OutputLock | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def record(self) -> Record:
        embedding = self.schema.field("embedding").type
        dtype = "float16" if str(embedding.value_type) == "halffloat" else "float32"
        return Record(ModelTag.from_metadata(self.schema.metadata), embedding.list_size, dtype)

    def open(self) -> None:
        """Lock the folder, refuse one clipcli did not write or written with another model or type, remove
        what killed runs left (temporaries, a matrix without its metadata), then read the stored rows."""
        if self.shard is not None:
            raise InputError(f"{self.path}: --shard writes clipcli's own layout (--layout parquet)")
        try:
            refuse_foreign(self.path)
            self._lock = OutputLock(self.path, is_dir=True)
            refuse_foreign(self.path)  # again, now that no other run can write it
            if (self.path / RECORD).is_file():
                self._check_record(read_record(self.path))
            self._remove_leftovers()
            found = pairs(self.path)
            metadata = None
            if found:
                import pyarrow.parquet as pq

                try:
                    metadata = pq.read_schema(found[0].meta)
                except (OSError, ValueError) as e:
                    raise OutputError(f"{found[0].meta}: cannot read existing embeddings ({e})") from e
                at = metadata.get_field_index(NAME_KEY)
                self.schema = columns_as_found(self.schema, metadata.set(at, metadata.field(at).with_name("path")))
            self.adopt_base(None if metadata is None else metadata.metadata, new=not found)
            self.stored = self._scan()
            refuse_unreachable(str(self.path), self.stored, self._reachable)
        except BaseException:
            self.release()
            raise

    def _check_record(self, found: Record) -> None:
        wanted = self.record
        if found.tag.sha256 != wanted.tag.sha256:
            found.tag.require_model(wanted.tag.name, wanted.tag.sha256, self.path)
        if found.tag.normalized != wanted.tag.normalized:
            raise InputError(f"{self.path}: normalisation differs from this run (--normalize/--no-normalize)")
        if found.dtype != wanted.dtype:
            raise InputError(f"{self.path}: holds {found.dtype} embeddings; pass --dtype {found.dtype}")

    def _remove_leftovers(self) -> None:
        """Temporaries of killed runs, and matrices whose metadata never came (their rows were never
        stored: the metadata commits a pair)."""
        for tmp in self.path.glob(f".{RECORD}.*.tmp"):
            if not tmp.name.endswith(f".{os.getpid()}.tmp"):
                tmp.unlink(missing_ok=True)
        for sub in (EMB_DIR, META_DIR):
            for tmp in (self.path / sub).glob(".*.tmp") if (self.path / sub).is_dir() else []:
                if not tmp.name.endswith(f".{os.getpid()}.tmp"):
                    tmp.unlink(missing_ok=True)
        metas = _numbered(self.path / META_DIR, META_NAME)
        for n, emb in _numbered(self.path / EMB_DIR, EMB_NAME).items():
            mark = pending_mark(emb)
            if not emb.is_file() or (n not in metas and not mark.exists()):
                what = "is not a file" if not emb.is_file() else "has no metadata, and no run of clipcli left it"
                raise OutputError(
                    f"{self.path}: {EMB_DIR}/{emb.name} {what}: move it out of the folder (clipcli removes "
                    "only matrices it wrote)"
                )
            if n not in metas:
                emb.unlink(missing_ok=True)  # a killed run's: it was being committed, or removed
            mark.unlink(missing_ok=True)
        for mark in (self.path / EMB_DIR).glob(f".*{PENDING}") if (self.path / EMB_DIR).is_dir() else []:
            mark.unlink(missing_ok=True)  # its matrix went before its mark did

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _scan(self) -> dict[str, list[Stored]]:
        stored: dict[str, list[Stored]] = {}
        for pair in pairs(self.path):
            try:
                table = read_parquet(pair.meta, [NAME_KEY, "bytes", "mtime"])
            except (OSError, ValueError) as e:
                raise OutputError(f"{pair.meta}: cannot read existing embeddings ({e})") from e
            self.record_rows(table.rename_columns(["path", "bytes", "mtime"]), (pair.number, ""), stored)
            self._next_part = max(self._next_part, pair.number + 1)
        return stored

    def _write_record(self) -> None:
        """The record, and both subfolders: an empty layout is still one."""
        for sub in (EMB_DIR, META_DIR):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        target = self.path / RECORD
        if target.is_file():
            return
        out = AtomicFile(target)
        try:
            out.file.write(self.record.text().encode() + b"\n")
        except OSError as e:
            out.discard()
            raise OutputError(f"{target}: cannot write ({describe_os_error(e, target)})") from e
        out.commit()

    def _write_pair(self, number: int, matrix: np.ndarray, meta: pa.Table) -> None:
        """One pair, whole or not at all: the matrix renamed into place first, the metadata last. Ctrl-C
        and SIGTERM wait until both are in place (see :func:`~clipcli.atomic.signals_held`)."""
        import numpy as np

        self._write_record()
        emb = emb_file(self.path, number)
        emb.parent.mkdir(parents=True, exist_ok=True)
        with signals_held():
            out = AtomicFile(emb)
            try:
                np.save(out.file, np.ascontiguousarray(matrix))
                out.file.flush()
            except BaseException as e:
                out.discard()
                if isinstance(e, OSError):
                    raise OutputError(f"{emb}: cannot write ({describe_os_error(e, emb)}); {KEPT_PARTS}") from e
                raise
            try:
                _mark(emb)
            except BaseException:
                out.discard()
                raise
            out.commit()
            try:
                write_table(meta, meta_file(self.path, number), _meta_schema(self.schema), KEPT_PARTS)
            except BaseException:
                emb.unlink(missing_ok=True)
                raise
            finally:
                pending_mark(emb).unlink(missing_ok=True)

    def _split(self, table: pa.Table) -> tuple[np.ndarray, pa.Table]:
        """A table of clipcli's schema as the pair's matrix (in the stored type) and its metadata."""
        import numpy as np

        column = table.column("embedding").combine_chunks()
        dim = self.schema.field("embedding").type.list_size
        values = column.values.to_numpy(zero_copy_only=False) if len(column) else np.empty(0, np.float32)
        matrix = values.reshape(len(column), dim).astype(np.dtype(self.record.dtype), copy=False)
        meta = table.drop_columns(["embedding"])
        return matrix, meta.rename_columns([NAME_KEY if n == "path" else n for n in meta.column_names])

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._pending:
            return
        matrix, meta = self._split(pa.concat_tables(self._pending))
        self._write_pair(self.reserve_number(), matrix, meta)
        self._pending, self._pending_rows = [], 0

    def reserve_number(self) -> int:
        number = self._next_part
        self._next_part += 1
        return number

    def finish(self) -> int:
        """Write what is pending, drop stale and duplicate rows, release the folder; returns how many
        paths were removed."""
        try:
            self._flush()
            removed = self.reconcile()
            self._write_record()  # an empty layout still says what it would hold
            return removed
        finally:
            self.release()

    def _clean_parts(self, keep: dict[str, PartKey]) -> None:
        import numpy as np

        written: set[str] = set()
        for pair in pairs(self.path):
            paths = read_parquet(pair.meta, [NAME_KEY]).column(0).to_pylist()
            wanted = first_rows(paths, [(pair.number, "")] * len(paths), keep, written, self.owns)
            if len(wanted) == len(paths):
                continue
            if wanted:
                # The cleaned copy is written before the original goes: a crash between leaves
                # duplicates that the next run resolves, never a lost row.
                matrix, _ = open_pair(pair, self.record.dim)
                rows = np.array(wanted, np.int64)
                meta = read_parquet(pair.meta).take(arrow_array(rows))
                self._write_pair(self.reserve_number(), np.asarray(matrix[rows]), meta)
            _mark(pair.emb)
            pair.meta.unlink()
            pair.emb.unlink()
            pending_mark(pair.emb).unlink(missing_ok=True)


def iter_pairs(folder: Path, dim: int) -> Iterator[tuple[Pair, np.ndarray]]:
    """Each whole pair with its matrix, memory-mapped."""
    for pair in pairs(folder):
        yield pair, open_pair(pair, dim)[0]


def names_of(pair: Pair) -> Any:
    """A pair's ``image_path`` column (an Arrow array)."""
    return read_parquet(pair.meta, [NAME_KEY]).column(0)


def fingerprint_files(folder: Path) -> list[Path]:
    """The files whose name, size and mtime change whenever embed rewrites the layout."""
    return [folder / RECORD, *(p for pair in pairs(folder) for p in (pair.emb, pair.meta))]
