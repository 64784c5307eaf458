"""The Parquet building blocks of an embeddings dataset, shared by a local directory
(:mod:`clipcli.store.dataset`) and an object store (:mod:`clipcli.store.remote`): the model tag and schema
its metadata records and rows (both in :mod:`clipcli.store.rows`, re-exported here), writing one part
whole, and a run's plan against the rows already stored (which files are new or changed, which rows to keep).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipcli.atomic import AtomicFile, describe_os_error, signals_held
from clipcli.errors import InputError, OutputError
from clipcli.images.containers import container_of
from clipcli.images.sources import ImageRef
from clipcli.store.rows import (
    META_BASE,
    META_COLUMNS,
    META_MODEL,
    META_NORMALIZED,
    META_SHA,
    ModelTag,
    Rows,
    Stat,
    arrow_array,
    arrow_nullable,
    arrow_strings,
    columns_as_found,
    schema,
    stat_of,
)
from clipcli.store.shard import Shard

if TYPE_CHECKING:
    import pyarrow as pa

# The names of clipcli.store.rows that the stores' modules have always imported from here.
__all__ = [
    "META_BASE",
    "META_COLUMNS",
    "META_MODEL",
    "META_NORMALIZED",
    "META_SHA",
    "ModelTag",
    "Rows",
    "Stat",
    "arrow_array",
    "arrow_nullable",
    "arrow_strings",
    "columns_as_found",
    "schema",
    "stat_of",
]

# A run that would remove more than this share of a dataset's rows, and more than PRUNE_FEW rows, is
# refused unless --prune: an unmounted share or a moved folder looks like files that are gone.
PRUNE_SHARE = 0.10
PRUNE_FEW = 5
PART_NAME = re.compile(r"^part-(\d+)((?:-[0-9a-z]+)*)\.parquet$")
PartKey = tuple[int, str]  # (run number, tags): later keys supersede earlier ones


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file as a table (``pq.read_table`` goes through pyarrow.dataset, which imports pandas)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as file:
        return file.read(columns=columns)


def check_compatible(found: pa.Schema, wanted: pa.Schema, where: Path) -> None:
    meta = found.metadata or {}
    want = wanted.metadata or {}
    if meta.get(META_SHA) != want.get(META_SHA):
        ModelTag.from_metadata(meta).require_model(want[META_MODEL].decode(), want[META_SHA].decode(), where)
    if meta.get(META_NORMALIZED) != want.get(META_NORMALIZED):
        raise InputError(f"{where}: normalisation differs from this run (--normalize/--no-normalize)")
    if found.field("embedding").type != wanted.field("embedding").type:
        kind = str(getattr(found.field("embedding").type, "value_type", found.field("embedding").type))
        name = {"float": "float32", "halffloat": "float16"}.get(kind, kind)
        raise InputError(f"{where}: holds {name} embeddings; pass --dtype {name}")


@dataclass(slots=True)  # one per stored row, kept for the whole run
class Stored:
    part: PartKey  # order of writing: later parts supersede earlier ones
    stat: Stat


def write_table(table: pa.Table, target: Path, sch: pa.Schema, kept: str) -> None:
    """``table`` as the Parquet file ``target``, whole or not at all (see :class:`AtomicFile`);
    ``kept`` says what is left as it was when writing fails. Ctrl-C and SIGTERM wait until the file
    is in place (see :func:`~clipcli.atomic.signals_held`): the rows it holds are kept, not embedded again."""
    import pyarrow.parquet as pq

    with signals_held():
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


KEPT_PARTS = "the parts already written are kept: run again to resume"


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
        write_table(rows.table(self.schema, self.model), Path(self.folder) / name, self.schema, KEPT_PARTS)
        return name


@dataclass
class Plan:
    to_embed: list[ImageRef]
    unchanged: int


def _here(path: str) -> str:
    return path


def plan_against(
    refs: Sequence[ImageRef],
    stored: Mapping[str, list[Stored]],
    owns: Callable[[str], bool],
    locate: Callable[[str], str] = _here,
) -> Plan:
    """What a run embeds: the ``refs`` it owns whose file is new, or changed since ``stored`` recorded it.
    ``locate`` turns a stored path into one that opens from here (see :meth:`PlannedRows.locate`)."""
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


def newest_unchanged(stored: Mapping[str, list[Stored]], locate: Callable[[str], str] = _here) -> dict[str, PartKey]:
    """For each path whose file is unchanged on disk: the part holding its newest matching row."""
    keep = {}
    for p, rows in stored.items():
        current = stat_of(locate(p))
        valid = [r.part for r in rows if r.stat == current]
        if valid:
            keep[p] = max(valid)
    return keep


class _Described:
    """The fields every store declares first, positionally, after where it writes."""

    schema: pa.Schema
    model: str


@dataclass(kw_only=True)
class PlannedRows(_Described):
    """What a local and an object-store dataset share: which paths a run owns, its plan against the
    stored rows, and new rows buffered into parts of ``part_rows``."""

    part_rows: int = 4096
    shard: Shard | None = None  # a --shard run: only this shard's paths are planned, stored and cleaned
    stored: dict[str, list[Stored]] = field(default_factory=dict)
    _pending: list[pa.Table] = field(default_factory=list)
    _pending_rows: int = 0
    _next_part: int = 0
    _reachable: bool = False  # whether any path stored in the dataset, this shard's or not, exists from here
    _open_container: str | None = None  # the container of the last row added (see add)

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

    def record_rows(self, table: pa.Table, key: PartKey, stored: dict[str, list[Stored]]) -> list[str]:
        """Record in ``stored`` the rows of ``table`` (a part's path, bytes and mtime columns) that this
        run owns, as rows of the part ``key``; returns their paths, in order. Notes whether any path exists."""
        paths = table.column("path").to_pylist()
        self._reachable = self._reachable or any_exists(map(self.locate, paths))
        owned = []
        for p, b, m in zip(paths, *(table.column(c).to_pylist() for c in ("bytes", "mtime")), strict=True):
            if self.owns(p):
                stored.setdefault(p, []).append(Stored(key, Stat(b, m)))
                owned.append(p)
        return owned

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
        return ImageRef(os.path.relpath(os.path.abspath(ref.path), self.base), ref.file, ref.member)

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
        # A video or a shard embedded again replaces all its rows: those its new version lacks (a cut
        # made shorter) are no file missing from here.
        redone = {container_of(p) for p in embedding} - {None}
        doomed = sum(
            1 for p in self.stored if p not in embedding and p not in unchanged and container_of(p) not in redone
        )
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
        the size of the batches they come in (a batch may fill one part and start the next). The rows of
        one container (a WebDataset shard's samples) are never split between parts: a part that fills
        in the middle of one grows to its end, so a run killed at any moment leaves all of a
        container's rows or none, and the next run embeds it whole."""
        if not rows.paths:
            return
        table = rows.table(self.schema, self.model)
        groups = [container_of(p) for p in rows.paths]
        start, count = 0, table.num_rows
        while start < count:
            if self.is_dir and self._pending_rows >= self.part_rows and groups[start] != self._open_container:
                self._flush()  # a part held open for its container's last rows ends where they do
            room = self.part_rows - self._pending_rows if self.is_dir else count
            end = min(count, start + max(room, 1))
            while self.is_dir and end < count and groups[end - 1] is not None and groups[end] == groups[end - 1]:
                end += 1
            chunk = table.slice(start, end - start)
            self._pending.append(chunk)
            self._pending_rows += chunk.num_rows
            for p, st in zip(rows.paths[start:end], rows.stats[start:end], strict=True):
                # The key of the part these rows go into: the number the next flush reserves.
                self.stored.setdefault(p, []).append(Stored((self._next_part, self.tags), st))
            self._open_container = groups[end - 1]
            start = end
            if self.is_dir and self._pending_rows >= self.part_rows and self._open_container is None:
                self._flush()

    def drop_container(self, container: str) -> None:
        """Forget the pending rows of ``container`` (a video's frames, a WebDataset shard's samples), for
        a run stopped inside it (Ctrl-C, SIGTERM): a container's rows are written all or none (see
        :meth:`add`), so the next run embeds it whole. Its rows are all still pending, since a part never
        ends inside a container."""
        import pyarrow as pa

        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        paths = table.column("path").to_pylist()
        keep = [i for i, p in enumerate(paths) if container_of(p) != container]
        self._pending, self._pending_rows = [table.take(pa.array(keep, pa.int64()))] if keep else [], len(keep)
        for p in {p for p in paths if container_of(p) == container}:
            self.stored[p] = [s for s in self.stored.get(p, []) if s.part != (self._next_part, self.tags)]
            if not self.stored[p]:
                del self.stored[p]
        if self._open_container == container:
            self._open_container = None

    def _flush(self) -> None:
        raise NotImplementedError

    def _scan(self) -> dict[str, list[Stored]]:
        raise NotImplementedError

    def _keep(self) -> dict[str, PartKey]:
        """For each path whose file is unchanged on disk: the part holding its newest matching row."""
        return newest_unchanged(self.stored, self.locate)

    def _clean_parts(self, keep: dict[str, PartKey]) -> None:
        raise NotImplementedError

    def reconcile(self) -> int:
        """Read the stored rows again from the parts themselves (other writers, Ray workers or other
        shards, may have changed them since this run began), then drop stale and duplicate rows from this
        run's parts; returns how many paths were removed."""
        self.stored = {}
        self.stored = self._scan()
        keep = self._keep()
        removed = sum(1 for p in self.stored if p not in keep)
        self._clean_parts(keep)
        return removed


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
    """Whether any of ``paths`` names a file (a member's, its container) that exists."""
    return any(os.path.lexists(p) or os.path.lexists(container_of(p) or p) for p in paths)


def refuse_unreachable(where: str, stored: dict[str, list[Stored]], reachable: bool) -> None:
    """Refuse a dataset whose paths all fail to exist from here: relative paths read from another folder,
    or an unmounted share, would otherwise make a rerun drop every row. ``reachable`` says whether any path
    the scan read exists, another shard's included: a shard whose own files were all deleted is not lost."""
    if stored and not reachable:
        raise InputError(
            f"{where}: none of its {len(stored)} paths exist from here; run from the folder it "
            "was made in (paths are stored as given), or, if those files are gone for good, delete it or "
            "choose another output"
        )


def first_rows(
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


FLAT_SUFFIXES = {".csv": "CSV", ".jsonl": "JSONL"}


def refuse_flat_embeddings(sources: Sequence[str]) -> None:
    """Refuse embeddings that embed wrote as CSV or JSONL: they record no model, so nothing can check
    that a query's model made them; told apart from images by their first line, never taken for one."""
    import json

    for source in sources:
        kind = FLAT_SUFFIXES.get(Path(source).suffix.lower())
        if kind is None or not os.path.isfile(source):
            continue
        try:
            with open(source, "rb") as f:
                first = f.readline(1 << 20).decode("utf-8", "replace").rstrip("\r\n")
        except OSError:
            continue  # the image reader says why
        if kind == "CSV":
            flat = first.split(",")[:2] in (["path", "e0"], ["text", "e0"])
        else:
            try:
                row = json.loads(first)
            except ValueError:
                row = None
            flat = isinstance(row, dict) and "embedding" in row
        if flat:
            raise InputError(
                f"{source}: embeddings in {kind} (as embed writes them) record no model, so they cannot be "
                "searched; embed to .parquet or .npy (or a folder) for rank, dedup and index"
            )
