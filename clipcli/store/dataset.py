"""Embedding files that every data tool opens: Parquet (a file, or a directory of part files) and NPY.

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

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.atomic import AtomicFile, OutputLock, describe_os_error, real_path, remove_temporaries
from clipcli.errors import InputError, ModelError, OutputError
from clipcli.images.core import ImageRef
from clipcli.store.formats import json_line
from clipcli.store.shard import Shard, ShardLocks, compaction, refuse_shard_runs, release_fd

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

META_MODEL = b"clipcli.model"
META_SHA = b"clipcli.model_sha256"
META_NORMALIZED = b"clipcli.normalized"
META_BASE = b"clipcli.base"  # the folder that the dataset's relative paths are relative to
# A run that would remove more than this share of a dataset's rows, and more than PRUNE_FEW rows, is
# refused unless --prune: an unmounted share or a moved folder looks like files that are gone.
PRUNE_SHARE = 0.10
PRUNE_FEW = 5
_PART = re.compile(r"^part-(\d+)((?:-[0-9a-z]+)*)\.parquet$")
PartKey = tuple[int, str]  # (run number, tags): later keys supersede earlier ones


@dataclass(frozen=True)
class ModelTag:
    """What a set of embeddings was made with; mixing two is refused."""

    name: str
    sha256: str
    normalized: bool

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> ModelTag:
        """The tag in a Parquet file's metadata (unknown parts empty; unmarked files count as normalised)."""
        meta = metadata or {}
        return cls(
            meta.get(META_MODEL, b"an unknown model").decode(),
            meta.get(META_SHA, b"").decode(),
            meta.get(META_NORMALIZED, b"true") == b"true",
        )

    def require_model(self, name: str, sha256: str, where: Path) -> None:
        """Refuse embeddings made with another model than the one loaded (``name``, ``sha256``)."""
        if self.sha256 != sha256:
            made_with = self.name if self.name != name else f"{self.name} of checksum {self.sha256[:12]}"
            loaded = name if self.name != name else f"the loaded {sha256[:12]}"
            raise ModelError(
                f"{where}: embeddings were made with {made_with}, not {loaded}; "
                "write to another output, delete it, or pass the --model it was made with"
            )


@dataclass(frozen=True, slots=True)
class Stat:
    bytes: int
    mtime: float


def stat_of(path: str) -> Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Stat(st.st_size, st.st_mtime)


def schema(dim: int, dtype: str, tag: ModelTag) -> pa.Schema:
    import pyarrow as pa

    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("path", pa.string()),
            ("embedding", pa.list_(value, dim)),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("bytes", pa.int64()),
            ("mtime", pa.float64()),
            ("model", pa.string()),
        ],
        metadata={META_MODEL: tag.name, META_SHA: tag.sha256, META_NORMALIZED: str(tag.normalized).lower()},
    )


@dataclass
class Rows:
    """A batch of embedded images, column-wise."""

    paths: list[str]
    embeddings: np.ndarray  # N x D
    sizes: list[tuple[int, int]]
    stats: list[Stat]

    def table(self, sch: pa.Schema, model: str) -> pa.Table:
        import numpy as np
        import pyarrow as pa

        value_type = sch.field("embedding").type.value_type
        dim = sch.field("embedding").type.list_size
        flat = arrow_array(np.ascontiguousarray(self.embeddings, np.float32).reshape(-1)).cast(value_type)
        return pa.table(
            {
                "path": arrow_strings(self.paths),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
                "width": arrow_array(np.array([w for w, _ in self.sizes], np.int32)),
                "height": arrow_array(np.array([h for _, h in self.sizes], np.int32)),
                "bytes": arrow_array(np.array([s.bytes for s in self.stats], np.int64)),
                "mtime": arrow_array(np.array([s.mtime for s in self.stats], np.float64)),
                "model": arrow_strings([model] * len(self.paths)),
            },
            schema=sch,
        )


# Arrays are built from their buffers because pa.array() imports pandas on first use (to recognise
# pandas inputs): peak memory and start-up time that an embedding run never needs.
def arrow_array(values: np.ndarray) -> pa.Array:
    """A 1-d numeric numpy array as an Arrow array, sharing its memory."""
    import pyarrow as pa

    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def arrow_strings(values: Sequence[str]) -> pa.Array:
    """Python strings as an Arrow string array (UTF-8 bytes and their offsets)."""
    import numpy as np
    import pyarrow as pa

    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return pa.StringArray.from_buffers(len(encoded), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded)))


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file as a table (``pq.read_table`` goes through pyarrow.dataset, which imports pandas)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as file:
        return file.read(columns=columns)


def _check_compatible(found: pa.Schema, wanted: pa.Schema, where: Path) -> None:
    meta = found.metadata or {}
    want = wanted.metadata or {}
    if meta.get(META_SHA) != want.get(META_SHA):
        ModelTag.from_metadata(meta).require_model(want[META_MODEL].decode(), want[META_SHA].decode(), where)
    if meta.get(META_NORMALIZED) != want.get(META_NORMALIZED):
        raise InputError(f"{where}: normalisation differs from this run (--normalize/--no-normalize)")
    if found.field("embedding").type != wanted.field("embedding").type:
        raise InputError(f"{where}: holds {found.field('embedding').type} embeddings; use the same --dtype")


@dataclass(slots=True)  # one per stored row, kept for the whole run
class _Stored:
    part: PartKey  # order of writing: later parts supersede earlier ones
    stat: Stat


def write_table(table: pa.Table, target: Path, sch: pa.Schema, kept: str) -> None:
    """``table`` as the Parquet file ``target``, whole or not at all (see :class:`AtomicFile`);
    ``kept`` says what is left as it was when writing fails."""
    import pyarrow.parquet as pq

    out = AtomicFile(target)
    try:
        # Dictionary-encoding unique floats only to fall back to plain pages makes reads slower.
        pq.write_table(table.replace_schema_metadata(sch.metadata), out.file, use_dictionary=["model"])
    except OSError as e:
        reason = describe_os_error(e, target)
        out.discard()
        raise OutputError(f"{target}: cannot write ({reason}); {kept}") from e
    except BaseException:
        out.discard()
        raise
    out.commit()


_KEPT_PARTS = "the parts already written are kept: run again to resume"


@dataclass(frozen=True)
class PartWriter:
    """Writes whole parts into a dataset directory from any process (a Ray worker on another node):
    each under a name no other writer uses, so writers need no coordination beyond the run's number,
    which the store that planned the run reserved for them."""

    folder: str
    schema: pa.Schema
    model: str
    number: int
    tags: str  # "" or "-sIofN"

    def write(self, rows: Rows) -> str:
        """Write ``rows`` as one new part; returns its file name."""
        import uuid

        name = f"part-{self.number:06d}{self.tags}-r{uuid.uuid4().hex[:16]}.parquet"
        write_table(rows.table(self.schema, self.model), Path(self.folder) / name, self.schema, _KEPT_PARTS)
        return name


@dataclass
class Plan:
    to_embed: list[ImageRef]
    unchanged: int


def _here(path: str) -> str:
    return path


def plan_against(
    refs: Sequence[ImageRef],
    stored: Mapping[str, list[_Stored]],
    owns: Callable[[str], bool],
    locate: Callable[[str], str] = _here,
) -> Plan:
    """What a run embeds: the ``refs`` it owns whose file is new, or changed since ``stored`` recorded it.
    ``locate`` turns a stored path into one that opens from here (see :meth:`_PlannedRows.locate`)."""
    todo, unchanged = [], 0
    for ref in refs:
        if not owns(ref.path):
            continue
        current = stat_of(locate(ref.path))
        if current is not None and any(s.stat == current for s in stored.get(ref.path, [])):
            unchanged += 1
        else:
            todo.append(ref)
    return Plan(todo, unchanged)


def newest_unchanged(stored: Mapping[str, list[_Stored]], locate: Callable[[str], str] = _here) -> dict[str, PartKey]:
    """For each path whose file is unchanged on disk: the part holding its newest matching row."""
    keep = {}
    for p, rows in stored.items():
        current = stat_of(locate(p))
        valid = [r.part for r in rows if r.stat == current]
        if valid:
            keep[p] = max(valid)
    return keep


class _PlannedRows:
    """What a local and an object-store dataset share: which paths a run owns, its plan against the
    stored rows, and new rows buffered into parts of ``part_rows``."""

    schema: pa.Schema
    model: str
    part_rows: int
    shard: Shard | None
    stored: dict[str, list[_Stored]]
    _pending: list[pa.Table]
    _pending_rows: int
    _next_part: int

    @property
    def is_dir(self) -> bool:
        return True

    @property
    def tags(self) -> str:
        """What this run's part names carry after their number: its shard, if any."""
        return f"-{self.shard.tag}" if self.shard else ""

    def owns(self, path: str) -> bool:
        """Whether this run plans, stores and cleans ``path`` (every path, unless sharded)."""
        return self.shard is None or self.shard.owns(path)

    base: str | None = None  # the folder relative paths are relative to; None: the working folder
    prune: bool = False  # remove rows of gone files even past PRUNE_SHARE (embed --prune)

    def locate(self, path: str) -> str:
        """A stored path as it opens from here: a relative one is relative to the dataset's folder."""
        if self.base is None or os.path.isabs(path):
            return path
        return os.path.join(self.base, path)

    def adopt_base(self, recorded: Mapping[bytes, bytes] | None, new: bool) -> None:
        """Take the folder the dataset's relative paths are relative to from the metadata ``recorded``
        in one of its parts; for a ``new`` dataset, the working folder. Every part this run writes
        records it. A dataset written before clipcli recorded it has none: its paths stay relative to
        the working folder, as then."""
        self.base = working_folder() if new else dataset_base(recorded)
        metadata = {k: v for k, v in (self.schema.metadata or {}).items() if k != META_BASE}
        if self.base is not None:
            metadata[META_BASE] = os.fsencode(self.base)
        self.schema = self.schema.with_metadata(metadata)

    def rebase(self, ref: ImageRef) -> ImageRef:
        """``ref`` keyed as the dataset keys it: a relative path given in another working folder is
        made relative to the dataset's own folder, so that it names the same file from there."""
        if self.base is None or os.path.isabs(ref.path) or _same_folder(self.base):
            return ref
        return ImageRef(os.path.relpath(os.path.abspath(ref.path), self.base), ref.file)

    def plan(self, refs: Sequence[ImageRef]) -> Plan:
        plan = plan_against([self.rebase(r) for r in refs], self.stored, self.owns, self.locate)
        self._refuse_mass_removal(plan)
        return plan

    def _refuse_mass_removal(self, plan: Plan) -> None:
        """Refuse, before any work, a run that would remove more than PRUNE_SHARE of the rows (and more
        than PRUNE_FEW) without --prune: files that are merely unreachable are not gone."""
        if self.prune or len(self.stored) <= PRUNE_FEW:
            return
        embedding = {r.path for r in plan.to_embed}
        unchanged = newest_unchanged(self.stored, self.locate)
        doomed = sum(1 for p in self.stored if p not in embedding and p not in unchanged)
        if doomed > PRUNE_FEW and doomed > PRUNE_SHARE * len(self.stored):
            raise InputError(
                f"{self.where}: this run would remove {doomed} of its {len(self.stored)} rows (files missing or "
                f"changed from here, more than {PRUNE_SHARE:.0%}); if they are gone for good pass --prune, else "
                "run where they can be read (a share unmounted? a folder moved?)"
            )

    @property
    def where(self) -> str:
        raise NotImplementedError

    def add(self, rows: Rows) -> None:
        """Buffer ``rows``; in a directory, every ``part_rows`` rows are written as one part, whatever
        the size of the batches they come in (a batch may fill one part and start the next)."""
        if not rows.paths:
            return
        table = rows.table(self.schema, self.model)
        start = 0
        while start < table.num_rows:
            room = self.part_rows - self._pending_rows if self.is_dir else table.num_rows
            chunk = table.slice(start, max(room, 1))
            self._pending.append(chunk)
            self._pending_rows += chunk.num_rows
            end = start + chunk.num_rows
            for p, st in zip(rows.paths[start:end], rows.stats[start:end], strict=True):
                # The key of the part these rows go into: the number the next flush reserves.
                self.stored.setdefault(p, []).append(_Stored((self._next_part, self.tags), st))
            start = end
            if self.is_dir and self._pending_rows >= self.part_rows:
                self._flush()

    def _flush(self) -> None:
        raise NotImplementedError


@dataclass
class ParquetStore(_PlannedRows):
    """Incremental Parquet output: a directory of part files, or a single file rewritten atomically."""

    path: Path
    schema: pa.Schema
    model: str
    part_rows: int = 4096
    shard: Shard | None = None  # a --shard run: only this shard's paths are planned, stored and cleaned
    stored: dict[str, list[_Stored]] = field(default_factory=dict)
    _pending: list[pa.Table] = field(default_factory=list)
    _pending_rows: int = 0
    _next_part: int = 0
    _lock: OutputLock | ShardLocks | None = None
    _shards_fd: int | None = None
    _reachable: bool = False  # whether any path stored in the dataset, this shard's or not, exists from here

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
        found = [((int(m.group(1)), m.group(2)), p) for p in self.path.iterdir() if (m := _PART.match(p.name))]
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

    def _scan(self) -> dict[str, list[_Stored]]:
        """Path, size and mtime of every row of this run's paths in the parts on disk now."""
        import pyarrow.parquet as pq

        stored: dict[str, list[_Stored]] = {}
        for key, part in self._parts():
            try:
                _check_compatible(pq.read_schema(part), self.schema, part)
                table = read_parquet(part, ["path", "bytes", "mtime"])
            except (OSError, ValueError) as e:
                raise OutputError(f"{part}: cannot read existing embeddings ({e})") from e
            paths = table.column("path").to_pylist()
            self._reachable = self._reachable or any_exists(map(self.locate, paths))
            for p, b, m in zip(paths, *(table.column(c).to_pylist() for c in ("bytes", "mtime")), strict=True):
                if self.owns(p):
                    stored.setdefault(p, []).append(_Stored(key, Stat(b, m)))
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
        recorded = None
        for _, part in parts:
            try:
                recorded = pq.read_schema(part).metadata
            except (OSError, ValueError):
                continue  # reported by the scan that follows
            break
        self.adopt_base(recorded, new=not parts)

    def _write(self, table: pa.Table, target: Path) -> None:
        kept = _KEPT_PARTS if self.is_dir else "any previous file is left as it was"
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

    def _keep(self) -> dict[str, PartKey]:
        return newest_unchanged(self.stored, self.locate)

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
            if self.path.exists():
                tables.append(read_parquet(self.path))
                tags += [(0, "")] * tables[0].num_rows
            for t in self._pending:
                tables.append(t)
                tags += [(self._next_part, "")] * t.num_rows
            combined = pa.concat_tables(tables) if tables else self.schema.empty_table()
            paths = combined.column("path").to_pylist()
            wanted = _first_rows(paths, tags, keep, set(), self.owns)
            self._write(combined.take(arrow_array(np.array(wanted, np.int64))), self.path)
            return removed
        self._flush()
        with compaction(self.path, self.shard):
            # Read again from the parts themselves: other writers (Ray workers, other shards rewriting
            # parts that also hold this shard's rows) may have changed them since this run began.
            self.stored = {}
            self.stored = self._scan()
            keep = self._keep()
            removed = sum(1 for p in self.stored if p not in keep)
            self._clean_parts(keep)
        return removed

    def _clean_parts(self, keep: dict[str, PartKey]) -> None:
        import numpy as np

        written: set[str] = set()
        for key, part in self._parts():
            # Paths alone decide; the embeddings (most of the bytes) are read only for a part that changes.
            paths = read_parquet(part, ["path"]).column("path").to_pylist()
            wanted = _first_rows(paths, [key] * len(paths), keep, written, self.owns)
            if len(wanted) == len(paths):
                continue
            kept = read_parquet(part).take(arrow_array(np.array(wanted, np.int64)))
            # The cleaned copy is written before the original goes: a crash between leaves duplicates
            # that the next run resolves, never a lost row.
            if kept.num_rows:
                self._write(kept, self._new_part())
            part.unlink()
        if not self._parts():
            self.path.mkdir(parents=True, exist_ok=True)
            self._write(self.schema.empty_table(), self._new_part())


def _same_folder(folder: str) -> bool:
    """Whether ``folder`` is the working folder (through links)."""
    try:
        return os.path.samefile(folder, os.getcwd())
    except OSError:
        return False


def working_folder() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None  # the working folder was deleted: relative paths name nothing


def dataset_base(metadata: Mapping[bytes, bytes] | None) -> str | None:
    """The folder a dataset's relative paths are relative to, as its Parquet metadata records it; None
    for a dataset written before clipcli recorded it (its paths are relative to the working folder)."""
    value = (metadata or {}).get(META_BASE)
    return os.fsdecode(value) if value else None


def any_exists(paths: Iterable[str]) -> bool:
    return any(os.path.lexists(p) for p in paths)


def refuse_unreachable(where: str, stored: dict[str, list[_Stored]], reachable: bool) -> None:
    """Refuse a dataset whose paths all fail to exist from here: relative paths read from another folder,
    or an unmounted share, would otherwise make a rerun drop every row. ``reachable`` says whether any path
    the scan read exists, another shard's included: a shard whose own files were all deleted is not lost."""
    if stored and not reachable:
        raise InputError(
            f"{where}: none of its {len(stored)} paths exist from here; run from the folder it "
            "was made in (paths are stored as given), or, if those files are gone for good, delete it or "
            "choose another output"
        )


def _first_rows(
    paths: Sequence[str],
    tags: Sequence[PartKey],
    keep: dict[str, PartKey],
    written: set[str],
    owns: Callable[[str], bool],
) -> list[int]:
    """Rows to keep: each path once, from the part ``keep`` chose for it (``written`` spans parts);
    rows of paths this run does not own (another shard's) are kept as they are."""
    wanted = []
    for i, (p, tag) in enumerate(zip(paths, tags, strict=True)):
        if not owns(p):
            wanted.append(i)
        elif keep.get(p) == tag and p not in written:
            written.add(p)
            wanted.append(i)
    return wanted


NPY_FORMAT = 1


def npy_sidecar(path: Path) -> Path:
    """The file that names the rows of an NPY output and records the model: ``<stem>.rows.jsonl``
    beside the matrix. Where ``path`` is a symbolic link, that is beside the file it links to (the one
    written and read), so the pair is found through the link and without it."""
    if os.path.islink(path):
        path = real_path(path)
    return path.with_name(path.stem + ".rows.jsonl")


def npy_fingerprint(matrix: np.ndarray) -> str:
    """A digest of an NPY matrix's shape, type and 64 evenly spaced rows, so that a sidecar can tell
    its own matrix from another (a run that died between the two renames) without reading it all."""
    import hashlib

    import numpy as np

    n = matrix.shape[0]
    digest = hashlib.sha256(f"{matrix.shape}:{matrix.dtype.str}".encode())
    for row in np.unique(np.linspace(0, n - 1, num=min(n, 64)).astype(np.int64)) if n else []:
        digest.update(np.ascontiguousarray(matrix[int(row)]).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class NpyHeader:
    """The first line of an NPY sidecar; one JSON string per matrix row follows it."""

    rows: int
    key: str  # "path" or "text"
    tag: ModelTag
    fingerprint: str

    def line(self) -> str:
        return json.dumps(
            {
                "clipcli_npy": NPY_FORMAT,
                "rows": self.rows,
                "key": self.key,
                "model": self.tag.name,
                "model_sha256": self.tag.sha256,
                "normalized": self.tag.normalized,
                "fingerprint": self.fingerprint,
            }
        )

    @classmethod
    def parse(cls, text: str, where: Path) -> NpyHeader:
        try:
            d = json.loads(text)
            if d.get("clipcli_npy") != NPY_FORMAT:
                raise ValueError("unknown format")
            tag = ModelTag(str(d["model"]), str(d["model_sha256"]), bool(d["normalized"]))
            return cls(int(d["rows"]), str(d["key"]), tag, str(d["fingerprint"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"{where}: not an NPY sidecar written by clipcli embed") from None


def write_npy(path: Path, embeddings: np.ndarray, names: Sequence[str], tag: ModelTag, key: str = "path") -> Path:
    """``path`` (N x D) and its sidecar (the model, then each row's name as a JSON string).

    Both are written in full under temporary names before either is renamed, so a failure while
    writing (a full disk) leaves the previous pair as it was; the sidecar records the matrix's
    fingerprint, so a pair mixed by a crash between the two renames is refused, never misread.
    JSON strings represent every name, newlines and names that are not UTF-8 included.
    """
    import numpy as np

    sidecar = npy_sidecar(path)
    header = NpyHeader(len(names), key, tag, npy_fingerprint(embeddings))
    matrix_out = AtomicFile(path)
    try:
        sidecar_out = AtomicFile(sidecar)
    except BaseException:
        matrix_out.discard()
        raise
    try:
        np.save(matrix_out.file, embeddings)
        lines = [header.line(), *(json_line(n) for n in names)]
        sidecar_out.file.write("".join(line + "\n" for line in lines).encode())
    except BaseException as e:
        reason = describe_os_error(e, path) if isinstance(e, OSError) else ""  # before the space is freed
        matrix_out.discard()
        sidecar_out.discard()
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write ({reason}); the previous pair is left as it was") from e
        raise
    try:
        matrix_out.commit()
    except BaseException:
        sidecar_out.discard()
        raise
    sidecar_out.commit()
    return sidecar


class Lines:
    """The lines of a text file by number, decoded only when asked for.

    A search needs the names of ten rows out of a million: finding the line breaks with numpy takes a
    tenth of the time of splitting the whole file into strings.
    """

    def __init__(self, path: Path) -> None:
        import numpy as np

        self.path = path
        self.data = path.read_bytes()
        breaks = np.flatnonzero(np.frombuffer(self.data, np.uint8) == ord("\n"))
        if not self.data or self.data.endswith(b"\n"):
            self.ends = breaks
        else:  # a last line without its line break
            self.ends = np.append(breaks, len(self.data))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, row: int) -> str:
        start = int(self.ends[row - 1]) + 1 if row else 0
        try:
            return self.data[start : int(self.ends[row])].decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: line {row + 1} is not UTF-8 text") from None


@dataclass
class SavedNpy:
    """An NPY output opened for reading: the memory-mapped matrix, its header, and its row names."""

    matrix: np.ndarray
    header: NpyHeader
    lines: Lines

    def name(self, row: int) -> str:
        line = self.lines[row + 1]
        try:
            value: Any = json.loads(line)
        except ValueError:
            value = None
        if not isinstance(value, str):
            raise InputError(f"{self.lines.path}: line {row + 2} is not a JSON string")
        return value


def open_npy(path: Path) -> SavedNpy:
    """Open an NPY output and its sidecar, refusing a pair that does not belong together."""
    import numpy as np

    sidecar = npy_sidecar(path)
    if not sidecar.is_file():
        old = path.with_name(path.stem + ".paths.txt")
        hint = f" ({old.name} is from an older clipcli: run embed again)" if old.exists() else ""
        raise InputError(f"{path}: no {sidecar.name} beside it (the model and the names of its rows){hint}")
    try:
        matrix = np.load(path, mmap_mode="r")
        lines = Lines(sidecar)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read embeddings ({e})") from e
    header = NpyHeader.parse(lines[0] if len(lines) else "", sidecar)
    if matrix.ndim != 2 or matrix.shape[0] != header.rows or len(lines) != header.rows + 1:
        raise InputError(
            f"{path}: {matrix.shape} embeddings but {sidecar.name} names {len(lines) - 1} rows; "
            "the pair is damaged: run embed again"
        )
    if npy_fingerprint(matrix) != header.fingerprint:
        raise InputError(
            f"{path}: {sidecar.name} was written for another matrix (a run interrupted between writing "
            "the two?); run embed again"
        )
    return SavedNpy(matrix, header, lines)
