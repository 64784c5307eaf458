"""Embedding files that every data tool opens: Parquet (a file, or a directory of part files) and NPY.

A Parquet output is incremental: rows carry each file's size and mtime, so a rerun embeds only files
that are new or changed and drops rows of files that are gone. In a directory every part file is
written under a temporary name and renamed when complete, so a run killed at any moment leaves only
whole parts behind; the next run reconciles them (one row per path, the newest valid one wins).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipcli.errors import InputError, ModelError, OutputError
from clipcli.images import ImageRef
from clipcli.io import atomic_path

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

META_MODEL = b"clipcli.model"
META_SHA = b"clipcli.model_sha256"
META_NORMALIZED = b"clipcli.normalized"
_PART = re.compile(r"^part-(\d+)\.parquet$")


@dataclass(frozen=True)
class ModelTag:
    """What a set of embeddings was made with; mixing two is refused."""

    name: str
    sha256: str
    normalized: bool


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
# pandas inputs): about 145 MiB of peak memory and 0.3 s of start-up that an embedding run never needs.
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
        made_with = (meta.get(META_MODEL) or b"an unknown model").decode()
        raise ModelError(
            f"{where}: holds embeddings made with {made_with}, not {want[META_MODEL].decode()}; "
            "write to another output or delete it"
        )
    if meta.get(META_NORMALIZED) != want.get(META_NORMALIZED):
        raise InputError(f"{where}: normalisation differs from this run (--normalize/--no-normalize)")
    if found.field("embedding").type != wanted.field("embedding").type:
        raise InputError(f"{where}: holds {found.field('embedding').type} embeddings; use the same --dtype")


@dataclass(slots=True)  # one per stored row, kept for the whole run
class _Stored:
    part: int  # order of writing: later parts supersede earlier ones
    stat: Stat


@dataclass
class Plan:
    to_embed: list[ImageRef]
    unchanged: int


@dataclass
class ParquetStore:
    """Incremental Parquet output: a directory of part files, or a single file rewritten atomically."""

    path: Path
    schema: pa.Schema
    model: str
    part_rows: int = 4096
    stored: dict[str, list[_Stored]] = field(default_factory=dict)
    _pending: list[pa.Table] = field(default_factory=list)
    _pending_rows: int = 0
    _next_part: int = 0
    embedded: int = 0

    @property
    def is_dir(self) -> bool:
        return self.path.suffix.lower() not in (".parquet", ".pq")

    def _parts(self) -> list[tuple[int, Path]]:
        if not self.is_dir:
            return [(0, self.path)] if self.path.exists() else []
        if not self.path.exists():
            return []
        if not self.path.is_dir():
            raise OutputError(f"{self.path}: exists and is not a directory")
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := _PART.match(p.name))]
        return sorted(found)

    def _remove_dead_temporaries(self) -> None:
        """Temporary parts left by a run that was killed while writing them."""
        for tmp in self.path.glob(".part-*.tmp"):
            pid = tmp.name.rsplit(".", 2)[-2]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)

    def open(self) -> None:
        """Read what earlier runs stored: paths with their size and mtime (not the embeddings)."""
        import pyarrow.parquet as pq

        if self.is_dir and self.path.is_dir():
            self._remove_dead_temporaries()
        for number, part in self._parts():
            try:
                _check_compatible(pq.read_schema(part), self.schema, part)
                table = read_parquet(part, ["path", "bytes", "mtime"])
            except (OSError, ValueError) as e:
                raise OutputError(f"{part}: cannot read existing embeddings ({e})") from e
            for p, b, m in zip(*(table.column(c).to_pylist() for c in ("path", "bytes", "mtime")), strict=True):
                self.stored.setdefault(p, []).append(_Stored(number, Stat(b, m)))
            self._next_part = max(self._next_part, number + 1)
        if self.stored and not any(os.path.lexists(p) for p in self.stored):
            raise InputError(
                f"{self.path}: none of its {len(self.stored)} paths exist from here; run from the folder it "
                "was made in (paths are stored as given) or choose another output"
            )

    def plan(self, refs: Sequence[ImageRef]) -> Plan:
        todo, unchanged = [], 0
        for ref in refs:
            current = stat_of(ref.path)
            if current is not None and any(s.stat == current for s in self.stored.get(ref.path, [])):
                unchanged += 1
            else:
                todo.append(ref)
        return Plan(todo, unchanged)

    def add(self, rows: Rows) -> None:
        if not rows.paths:
            return
        self._pending.append(rows.table(self.schema, self.model))
        self._pending_rows += len(rows.paths)
        self.embedded += len(rows.paths)
        for p, st in zip(rows.paths, rows.stats, strict=True):
            self.stored.setdefault(p, []).append(_Stored(self._next_part, st))
        if self.is_dir and self._pending_rows >= self.part_rows:
            self._flush()

    def _write(self, table: pa.Table, target: Path) -> None:
        import pyarrow.parquet as pq

        tmp = atomic_path(target)
        try:
            # Dictionary-encoding unique floats only to fall back to plain pages makes reads slower.
            pq.write_table(table.replace_schema_metadata(self.schema.metadata), tmp, use_dictionary=["model"])
            os.replace(tmp, target)
        except OSError as e:
            raise OutputError(f"{target}: cannot write ({e})") from e
        finally:
            tmp.unlink(missing_ok=True)

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._pending:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._write(pa.concat_tables(self._pending), self.path / f"part-{self._next_part:06d}.parquet")
        self._pending, self._pending_rows = [], 0
        self._next_part += 1

    def _keep(self) -> dict[str, int]:
        """For each path whose file is unchanged on disk: the part holding its newest matching row."""
        keep = {}
        for p, rows in self.stored.items():
            current = stat_of(p)
            valid = [r.part for r in rows if r.stat == current]
            if valid:
                keep[p] = max(valid)
        return keep

    def finish(self) -> int:
        """Write what is pending and drop stale rows; returns how many paths were removed."""
        import numpy as np
        import pyarrow as pa

        keep = self._keep()
        removed = sum(1 for p in self.stored if p not in keep)
        if not self.is_dir:
            tables, tags = [], []
            if self.path.exists():
                tables.append(read_parquet(self.path))
                tags += [0] * tables[0].num_rows
            for t in self._pending:
                tables.append(t)
                tags += [self._next_part] * t.num_rows
            combined = pa.concat_tables(tables) if tables else self.schema.empty_table()
            paths = combined.column("path").to_pylist()
            wanted = [i for i, (p, tag) in enumerate(zip(paths, tags, strict=True)) if keep.get(p) == tag]
            self._write(combined.take(arrow_array(np.array(wanted, np.int64))), self.path)
            return removed
        self._flush()
        for number, part in self._parts():
            # Paths alone decide; the embeddings (most of the bytes) are read only for a part that changes.
            paths = read_parquet(part, ["path"]).column("path").to_pylist()
            wanted = [i for i, p in enumerate(paths) if keep.get(p) == number]
            if len(wanted) == len(paths):
                continue
            kept = read_parquet(part).take(arrow_array(np.array(wanted, np.int64)))
            # The cleaned copy is written before the original goes: a crash between leaves duplicates
            # that the next run resolves, never a lost row.
            if kept.num_rows:
                self._write(kept, self.path / f"part-{self._next_part:06d}.parquet")
                self._next_part += 1
            part.unlink()
        if not self._parts():
            self.path.mkdir(parents=True, exist_ok=True)
            self._write(self.schema.empty_table(), self.path / f"part-{self._next_part:06d}.parquet")
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_npy(path: Path, embeddings: np.ndarray, paths: Iterable[str]) -> Path:
    """``path`` (N x D) and its sidecar ``<stem>.paths.txt`` (one path per line, in row order)."""
    import numpy as np

    sidecar = npy_sidecar(path)
    for target, write in (
        (path, lambda f: np.save(f, embeddings)),
        (sidecar, lambda f: f.write("".join(f"{p}\n" for p in paths).encode())),
    ):
        tmp = atomic_path(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                write(f)
            os.replace(tmp, target)
        except OSError as e:
            raise OutputError(f"{target}: cannot write ({e})") from e
        finally:
            tmp.unlink(missing_ok=True)
    return sidecar


def npy_sidecar(path: Path) -> Path:
    return path.with_name(path.stem + ".paths.txt")


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
