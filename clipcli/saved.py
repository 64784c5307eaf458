"""Reading embeddings that ``embed`` saved (Parquet files or directories, NPY), chunk by chunk.

Every source is checked against the loaded model first (:meth:`clipcli.store.ModelTag.require_model`),
and yields N x D float32 unit rows with a function that names the rows a search keeps. Parquet sources
go through the memory-mapped search cache (:mod:`clipcli.search_cache`) when allowed; NPY files are
memory-mapped directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import InputError
from clipcli.models import LoadedModel
from clipcli.store import ModelTag, open_npy, read_parquet

if TYPE_CHECKING:
    import numpy as np

    from clipcli.search_cache import Builder

CHUNK_ROWS = 1 << 16


def is_embedding_source(source: str) -> bool:
    """A saved-embeddings file, or a folder of Parquet files and no images (an image folder that
    happens to hold a Parquet file, classify's output say, is still ranked as images)."""
    from clipcli.images import IMAGE_EXTENSIONS

    path = Path(source)
    if path.is_file():
        return path.suffix.lower() in (".parquet", ".pq", ".npy")
    if not path.is_dir():
        return False
    suffixes = {p.suffix.lower() for p in path.iterdir()}
    return ".parquet" in suffixes and not suffixes & IMAGE_EXTENSIONS


def _parquet_files(source: Path) -> list[Path]:
    return sorted(source.glob("*.parquet")) if source.is_dir() else [source]


def _check_tag(tag: ModelTag, lm: LoadedModel, where: Path) -> bool:
    """Raise unless the embeddings were made with ``lm``; returns whether they are normalised."""
    tag.require_model(lm.name, lm.checksum, where)
    return tag.normalized


Chunk = tuple["np.ndarray", Callable[["np.ndarray"], list[Any]]]
"""N x D float32 embeddings, and a function from chunk indices to the names of those rows."""


def iter_saved(source: Path, lm: LoadedModel, use_cache: bool = True) -> Iterator[Chunk]:
    """Chunks of saved embeddings, normalised; Parquet sources through the search cache if allowed."""

    if source.suffix.lower() == ".npy":
        saved = open_npy(source)
        unit = _check_tag(saved.header.tag, lm, source)
        yield from _chunks(saved.matrix, unit, lambda rows: [saved.name(r) for r in rows])
    else:
        yield from _iter_parquet(source, lm, use_cache)


def _chunks(matrix: np.ndarray, unit: bool, name_rows: Callable[[list[int]], list[Any]]) -> Iterator[Chunk]:
    import numpy as np

    for start in range(0, matrix.shape[0], CHUNK_ROWS):
        chunk = np.asarray(matrix[start : start + CHUNK_ROWS], dtype=np.float32)
        yield (chunk if unit else _normalized(chunk)), partial(_offset_names, name_rows, start)


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


def _iter_parquet(source: Path, lm: LoadedModel, use_cache: bool) -> Iterator[Chunk]:
    from itertools import accumulate

    from clipcli import search_cache

    files = _parquet_files(source)
    cached = search_cache.load(source, files, lm.checksum) if use_cache else None
    if cached is not None:
        parts = _Parts(tuple(files), tuple(accumulate(cached.rows, initial=0))[:-1], cached.key)
        yield from _chunks(cached.matrix, cached.normalized, lambda rows: [PartRow(parts, r) for r in rows])
        return
    readers = [_open_saved(file, lm) for file in files]
    builder = _start_cache(source, files, readers, lm) if use_cache else None
    try:
        for reader, unit, key in readers:
            for batch in reader.iter_batches(batch_size=CHUNK_ROWS, columns=[key, "embedding"]):
                stored = batch.column("embedding").values.to_numpy(zero_copy_only=False).reshape(len(batch), -1)
                builder = _cache_step(builder, partial(_add_chunk, chunk=stored))
                chunk = stored.astype("float32", copy=False)
                yield (chunk if unit else _normalized(chunk)), partial(_arrow_names, batch.column(key))
        _, unit, key = readers[0]
        builder = _cache_step(builder, lambda b: b.commit(lm.checksum, key, unit))
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


def _open_saved(file: Path, lm: LoadedModel) -> tuple[Any, bool, str]:
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
    return reader, _check_tag(tag, lm, file), "path" if "path" in names else "text"


def _start_cache(
    source: Path, files: list[Path], readers: list[tuple[Any, bool, str]], lm: LoadedModel
) -> Builder | None:
    """A cache builder for these parts, or None when they cannot share one matrix (or the disk says no)."""
    import numpy as np

    from clipcli import search_cache

    if len({(unit, key) for _, unit, key in readers}) != 1:
        return None
    types = {r.schema_arrow.field("embedding").type.value_type for r, _, _ in readers}
    dtype = np.dtype(np.float16) if {str(t) for t in types} == {"halffloat"} else np.dtype(np.float32)
    rows = [r.metadata.num_rows for r, _, _ in readers]
    try:
        return search_cache.Builder(source, files, rows, lm.embed_dim, dtype)
    except OSError:
        return None


def _normalized(chunk: np.ndarray) -> np.ndarray:
    import numpy as np

    return chunk / np.maximum(np.linalg.norm(chunk, axis=1, keepdims=True), 1e-12)
