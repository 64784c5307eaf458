"""Reading embeddings that ``embed`` saved (Parquet files or directories, NPY, clip-retrieval's layout).

Every source is checked against the loaded model first (:func:`require_saved_model`), and yields N x D
float32 unit rows with a function that names the rows a search keeps. Parquet sources go through the
search cache (:mod:`clipcli.store.search_cache`) when allowed; NPY files (clip-retrieval's too) are mapped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import InputError, ModelError
from clipcli.models import LoadedModel
from clipcli.store import clip_retrieval as layout
from clipcli.store.npy import npy_sidecar, open_npy
from clipcli.store.parts import ModelTag, read_parquet

if TYPE_CHECKING:
    import numpy as np

    from clipcli.store.search_cache import Builder

CHUNK_ROWS = 1 << 16


def is_embedding_source(source: str) -> bool:
    """A saved-embeddings file, or a folder of Parquet files and no images (classify's output in a folder
    of images leaves it a folder of images)."""
    from clipcli.images.sources import IMAGE_EXTENSIONS

    path = Path(source)
    try:
        if layout.is_layout(path):
            return True
        if path.is_file():
            return path.suffix.lower() in (".parquet", ".pq", ".npy")
        if not path.is_dir():
            return False
        suffixes = {p.suffix.lower() for p in path.iterdir()}
        return ".parquet" in suffixes and not suffixes & IMAGE_EXTENSIONS
    except (OSError, ValueError):  # a name too long to be a file (a query), a folder that cannot be listed
        return False


def _parquet_files(source: Path) -> list[Path]:
    return sorted(source.glob("*.parquet")) if source.is_dir() else [source]


@dataclass(frozen=True)
class Expect:
    """The model saved embeddings must have been made with (a loaded model's, or an index's)."""

    name: str
    sha256: str
    dim: int

    @classmethod
    def of(cls, lm: LoadedModel) -> Expect:
        return cls(lm.name, lm.checksum, lm.embed_dim)


def _check_tag(tag: ModelTag, expect: Expect, where: Path) -> bool:
    """Raise unless the embeddings were made with the expected model; returns whether they are normalised."""
    require_saved_model(tag, expect, where)
    return tag.normalized


def require_saved_model(tag: ModelTag, expect: Expect, where: Path) -> None:
    """Refuse to search embeddings made with another model, saying what works: that model, or an embed
    with this one (an index beside them changes neither)."""
    if tag.sha256 == expect.sha256:
        return
    if not tag.sha256:
        raise ModelError(f"{where}: records no model (an older clipcli or another tool wrote it); embed it again")
    if tag.name != expect.name:
        raise ModelError(
            f"{where}: embeddings were made with {tag.name}, not {expect.name}; pass --model {tag.name}, "
            f"or embed the images again with {expect.name}"
        )
    raise ModelError(
        f"{where}: embeddings were made with {tag.name} of checksum {tag.sha256[:12]}, not the loaded "
        f"{expect.sha256[:12]}; load the weights they were made with, or embed the images again"
    )


Chunk = tuple["np.ndarray", Callable[["np.ndarray"], list[Any]]]
"""N x D float32 embeddings, and a function from chunk indices to the names of those rows."""


def iter_saved(source: Path, lm: LoadedModel, use_cache: bool = True) -> Iterator[Chunk]:
    """Chunks of saved embeddings, normalised; Parquet sources through the search cache if allowed."""

    expect = Expect.of(lm)
    if source.suffix.lower() == ".npy":
        saved = open_npy(source)
        unit = _check_tag(saved.header.tag, expect, source)
        yield from _chunks(saved.matrix, unit, lambda rows: [saved.name(r) for r in rows])
    elif layout.is_layout(source):
        yield from _iter_layout(source, expect, use_cache)
    else:
        yield from _iter_parquet(source, expect, use_cache)


def _iter_layout(source: Path, expect: Expect, use_cache: bool) -> Iterator[Chunk]:
    """clip-retrieval's matrices: one memory-mapped matrix (the only pair's, or their copy in the search
    cache, built by the first search), else pair by pair; the rows a search keeps are named from their
    metadata once it ends (:class:`PartRow`)."""
    record, found, parts = _layout_pairs(source, expect)
    whole = found[0][1] if len(found) == 1 else _layout_cached(source, found, record, expect) if use_cache else None
    if whole is not None:
        yield from _chunks(whole, record.tag.normalized, partial(_part_rows, parts, 0))
        return
    for (_, matrix), start in zip(found, parts.starts, strict=True):
        yield from _chunks(matrix, record.tag.normalized, partial(_part_rows, parts, start))


def _part_rows(parts: _Parts, start: int, rows: list[int]) -> list[Any]:
    return [PartRow(parts, start + r) for r in rows]


def _chunks(matrix: np.ndarray, unit: bool, name_rows: Callable[[list[int]], list[Any]]) -> Iterator[Chunk]:
    import numpy as np

    for start in range(0, matrix.shape[0], CHUNK_ROWS):
        chunk = np.asarray(matrix[start : start + CHUNK_ROWS], dtype=np.float32)
        yield _unit(chunk, unit, matrix.dtype), partial(_offset_names, name_rows, start)


# What a chunk's rows are called, bound per chunk (a lambda in a loop would see the last chunk's values).
def _offset_names(name_rows: Callable[[list[int]], list[Any]], start: int, idx: np.ndarray) -> list[Any]:
    return name_rows([start + int(i) for i in idx])


def _arrow_names(column: Any, idx: np.ndarray) -> list[Any]:
    return list(column.take(idx).to_pylist())


def _add_chunk(builder: Builder, chunk: np.ndarray) -> None:
    builder.add(chunk)


@dataclass(frozen=True)
class _Parts:
    """The part files behind a cached matrix: winners' names are read from them after the scan."""

    files: tuple[Path, ...]
    starts: tuple[int, ...]  # first matrix row of each part
    key: str

    def names(self, rows: list[int]) -> list[str]:
        import bisect

        found: dict[int, str] = {}
        by_part: dict[int, list[int]] = {}
        for row in rows:
            by_part.setdefault(bisect.bisect_right(self.starts, row) - 1, []).append(row)
        for part, part_rows in by_part.items():
            column = read_parquet(self.files[part], [self.key]).column(0)
            taken = column.take([r - self.starts[part] for r in part_rows]).to_pylist()
            found.update(zip(part_rows, taken, strict=True))
        return [found[r] for r in rows]


@dataclass(frozen=True)
class PartRow:
    parts: _Parts
    row: int


def _iter_parquet(source: Path, expect: Expect, use_cache: bool) -> Iterator[Chunk]:
    from itertools import accumulate

    from clipcli.store import search_cache

    files = _parquet_files(source)
    cached = search_cache.load(source, files, expect.sha256) if use_cache else None
    if cached is not None:
        parts = _Parts(tuple(files), tuple(accumulate(cached.rows, initial=0))[:-1], cached.key)
        yield from _chunks(cached.matrix, cached.normalized, lambda rows: [PartRow(parts, r) for r in rows])
        return
    readers = [_open_saved(file, expect) for file in files]
    builder = _start_cache(source, files, readers, expect) if use_cache else None
    try:
        for reader, unit, key in readers:
            for batch in reader.iter_batches(batch_size=CHUNK_ROWS, columns=[key, "embedding"]):
                stored = batch.column("embedding").values.to_numpy(zero_copy_only=False).reshape(len(batch), -1)
                builder = _cache_step(builder, partial(_add_chunk, chunk=stored))
                chunk = stored.astype("float32", copy=False)
                yield _unit(chunk, unit, stored.dtype), partial(_arrow_names, batch.column(key))
        _, unit, key = readers[0]
        builder = _cache_step(builder, lambda b: b.commit(expect.sha256, key, unit))
        builder = None  # committed, or abandoned by _cache_step
    finally:
        if builder is not None:
            builder.abandon()


def _cache_step(builder: Builder | None, step: Callable[[Builder], None]) -> Builder | None:
    """Run one step of a cache build; a failing disk ends the build, never the search."""
    if builder is None:
        return None
    try:
        step(builder)
        return builder
    except OSError:
        builder.abandon()
        return None


def _open_saved(file: Path, expect: Expect) -> tuple[Any, bool, str]:
    """(reader, whether its embeddings are normalised, its name column) for one Parquet file."""
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(file)
    except (OSError, ValueError) as e:
        raise InputError(f"{file}: cannot read embeddings ({e})") from e
    names = reader.schema_arrow.names
    if "embedding" not in names:
        raise InputError(f"{file}: no 'embedding' column (not written by clipcli embed?)")
    tag = ModelTag.from_metadata(reader.schema_arrow.metadata)
    return reader, _check_tag(tag, expect, file), "path" if "path" in names else "text"


def _start_cache(
    source: Path, files: list[Path], readers: list[tuple[Any, bool, str]], expect: Expect
) -> Builder | None:
    """A cache builder for these parts, or None when they cannot share one matrix (or the disk says no)."""
    import numpy as np

    from clipcli.store import search_cache

    if len({(unit, key) for _, unit, key in readers}) != 1:
        return None
    types = {r.schema_arrow.field("embedding").type.value_type for r, _, _ in readers}
    dtype = np.dtype(np.float16) if {str(t) for t in types} == {"halffloat"} else np.dtype(np.float32)
    rows = [r.metadata.num_rows for r, _, _ in readers]
    try:
        return search_cache.Builder(source, files, rows, expect.dim, dtype)
    except OSError:
        return None


def _unit(chunk: np.ndarray, normalized: bool, stored: np.dtype[Any]) -> np.ndarray:
    """Float32 ``chunk`` as unit rows: as it is if embed normalised it and it was stored in float32. A
    unit vector rounded to float16 is a few parts in 10,000 off (a row scored 1.0002 against itself)."""
    import numpy as np

    unit = normalized and stored.itemsize >= 4
    return chunk if unit else chunk / np.maximum(np.linalg.norm(chunk, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class SavedMatrix:
    """Saved embeddings opened whole: a memory-mapped N x D matrix in row order, as an index needs them."""

    source: Path
    matrix: np.ndarray  # as stored: float32 or float16, normalised or not
    tag: ModelTag
    key: str  # "path" or "text"
    name_rows: Callable[[list[int]], list[str]]
    iter_names: Callable[[], Iterator[list[str]]]  # every row's name, in order, a block at a time

    def unit_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as float32 unit vectors."""
        import numpy as np

        chunk = np.asarray(self.matrix[start:stop], dtype=np.float32)
        return _unit(chunk, self.tag.normalized, self.matrix.dtype)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Some rows as float32 unit vectors; read in row order, which a memory map pages in fastest."""
        import numpy as np

        order = np.argsort(rows, kind="stable")
        picked = np.empty((len(rows), self.matrix.shape[1]), np.float32)
        picked[order] = self.matrix[rows[order]]
        return _unit(picked, self.tag.normalized, self.matrix.dtype)


def saved_tag(source: Path) -> tuple[ModelTag, int]:
    """The model a saved source was made with and its embedding width, read from metadata alone."""
    import pyarrow.parquet as pq

    if source.suffix.lower() == ".npy":
        saved = open_npy(source)
        return saved.header.tag, int(saved.matrix.shape[1])
    if layout.is_layout(source):
        record = layout.read_record(source)
        return record.tag, record.dim
    files = _parquet_files(source)
    if not files:
        raise InputError(f"{source}: no Parquet files in it")
    try:
        schema = pq.read_schema(files[0])
    except (OSError, ValueError) as e:
        raise InputError(f"{files[0]}: cannot read embeddings ({e})") from e
    if "embedding" not in schema.names:
        raise InputError(f"{files[0]}: no 'embedding' column (not written by clipcli embed?)")
    return ModelTag.from_metadata(schema.metadata), int(schema.field("embedding").type.list_size)


def source_fingerprint(source: Path) -> list[Any]:
    """What changes whenever ``embed`` rewrites a source: each file's name, size and mtime."""
    from clipcli.store import search_cache

    if source.suffix.lower() == ".npy":
        return search_cache.fingerprint([source, npy_sidecar(source)])
    if layout.is_layout(source):
        return search_cache.fingerprint(layout.fingerprint_files(source))
    return search_cache.fingerprint(_parquet_files(source))


def open_matrix(source: Path, expect: Expect) -> SavedMatrix:
    """A saved source as one memory-mapped matrix: NPY directly, Parquet through the search cache (built
    on first use; read into memory when the cache cannot be written)."""
    import numpy as np

    if not source.exists():
        raise InputError(f"{source}: no such file or directory")
    if source.suffix.lower() == ".npy":
        saved = open_npy(source)
        _check_tag(saved.header.tag, expect, source)
        names = _npy_names(saved)
        n = saved.header.rows
        blocks = partial(_blocks_of, names, n)
        return SavedMatrix(source, saved.matrix, saved.header.tag, saved.header.key, names, blocks)
    if layout.is_layout(source):
        return _layout_matrix(source, expect)
    from itertools import accumulate

    from clipcli.store import search_cache

    files = _parquet_files(source)
    if not files:
        raise InputError(f"{source}: no Parquet files in it")
    tag, _ = saved_tag(source)
    cached = search_cache.load(source, files, expect.sha256)
    if cached is None:
        chunks = [np.array(c, np.float32) for c, _ in _iter_parquet(source, expect, True)]
        cached = search_cache.load(source, files, expect.sha256)
        if cached is None:  # no cache to be had: the rows in memory, normalised already
            key = _open_saved(files[0], expect)[2]
            rows = [pq_rows(f) for f in files]
            matrix = np.concatenate(chunks) if chunks else np.zeros((0, expect.dim), np.float32)
            cached = search_cache.Cached(matrix, rows, key, True)
    tag = ModelTag(tag.name, tag.sha256, cached.normalized)
    parts = _Parts(tuple(files), tuple(accumulate(cached.rows, initial=0))[:-1], cached.key)
    return SavedMatrix(source, cached.matrix, tag, cached.key, parts.names, partial(_part_names, parts))


def pq_rows(file: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(file).metadata.num_rows)


def _npy_names(saved: Any) -> Callable[[list[int]], list[str]]:
    return lambda rows: [saved.name(r) for r in rows]


def _blocks_of(name_rows: Callable[[list[int]], list[str]], n: int) -> Iterator[list[str]]:
    for start in range(0, n, CHUNK_ROWS):
        yield name_rows(list(range(start, min(n, start + CHUNK_ROWS))))


def _part_names(parts: _Parts) -> Iterator[list[str]]:
    for file in parts.files:
        yield [str(n) for n in read_parquet(file, [parts.key]).column(0).to_pylist()]


def _layout_pairs(source: Path, expect: Expect) -> tuple[layout.Record, list[tuple[layout.Pair, np.ndarray]], _Parts]:
    """A layout's record (checked against the model), its pairs with their matrices, and their metadata."""
    from itertools import accumulate

    record = layout.read_record(source)
    _check_tag(record.tag, expect, source)
    found = list(layout.iter_pairs(source, record.dim))
    starts = tuple(accumulate((int(m.shape[0]) for _, m in found), initial=0))[:-1]
    return record, found, _Parts(tuple(pair.meta for pair, _ in found), starts, layout.NAME_KEY)


def _layout_cached(
    source: Path, found: list[tuple[layout.Pair, np.ndarray]], record: layout.Record, expect: Expect
) -> np.ndarray | None:
    """The layout's matrices as one, from the search cache: built now if missing or stale; None when the
    cache cannot be written."""
    import numpy as np

    from clipcli.store import search_cache

    files = [pair.emb for pair, _ in found]
    cached = search_cache.load(source, files, expect.sha256)
    if cached is not None:
        return cached.matrix
    builder: Builder | None
    try:
        rows = [int(m.shape[0]) for _, m in found]
        builder = search_cache.Builder(source, files, rows, record.dim, np.dtype(record.dtype))
    except OSError:
        return None
    for _, matrix in found:
        builder = _cache_step(builder, partial(_add_chunk, chunk=matrix))
    builder = _cache_step(builder, lambda b: b.commit(expect.sha256, "path", record.tag.normalized))
    cached = search_cache.load(source, files, expect.sha256)
    return None if cached is None else cached.matrix


def _layout_matrix(source: Path, expect: Expect) -> SavedMatrix:
    """clip-retrieval's layout as one matrix: its only matrix memory-mapped, or its matrices copied once
    into the search cache (into memory when the cache cannot be written)."""
    import numpy as np

    record, found, parts = _layout_pairs(source, expect)
    matrix = found[0][1] if len(found) == 1 else _layout_cached(source, found, record, expect)
    if matrix is None:
        stored = [m for _, m in found]
        matrix = np.concatenate(stored) if stored else np.zeros((0, record.dim), np.dtype(record.dtype))
    return SavedMatrix(source, matrix, record.tag, "path", parts.names, partial(_part_names, parts))


def row_files(source: Path) -> tuple[list[Path], str]:
    """The Parquet files holding a saved source's rows (a layout's metadata), and their path column."""
    is_layout = layout.is_layout(source)
    return ([p.meta for p in layout.pairs(source)], layout.NAME_KEY) if is_layout else (_parquet_files(source), "path")


def stored_files(source: Path) -> Iterator[tuple[str, str | None]]:
    """Each row's file as ``embed`` recorded it (a member's container: the video, the shard), with the
    folder relative paths are relative to (None: the working folder); for refusing an output over one."""
    import pyarrow.parquet as pq

    from clipcli.images.containers import container_of
    from clipcli.store.parts import dataset_base

    if source.suffix.lower() == ".npy":
        saved = open_npy(source)
        entries = (saved.entry(row) for row in range(len(saved.matrix)))
        names = (e.get(saved.header.key) if isinstance(e, dict) else e for e in entries)
        yield from ((container_of(n) or n, None) for n in names if isinstance(n, str))
        return
    files, key = row_files(source)
    for part in files:
        found = pq.read_schema(part)
        names = read_parquet(part, [key]).column(0).to_pylist() if key in found.names else []
        yield from ((container_of(n) or n, dataset_base(found.metadata)) for n in names if isinstance(n, str))
