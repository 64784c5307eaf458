"""Scoring sources against one query: images on the fly, or embeddings saved by ``embed``.

Saved embeddings are streamed in chunks (memory-mapped for NPY), scored with one matrix product per
chunk, and reduced with a partial sort, so a million rows never need a full sort or a second copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from clipcli.encode import encode_texts, iter_image_embeddings
from clipcli.errors import InputError
from clipcli.images import DEFAULT_MAX_PIXELS, Skipped, discover
from clipcli.models import LoadedModel
from clipcli.prompts import TemplateSet, zero_shot_classifier
from clipcli.store import ModelTag, open_npy, read_parquet

if TYPE_CHECKING:
    import numpy as np

    from clipcli.search_cache import Builder

CHUNK_ROWS = 1 << 16


@dataclass(frozen=True)
class Hit:
    score: float
    name: str  # a path, or a text when ranking texts


@dataclass
class TopK:
    """The k best (score, name) pairs seen so far, above ``threshold``."""

    k: int
    threshold: float | None = None
    scores: list[float] = field(default_factory=list)
    names: list[Any] = field(default_factory=list)  # str, or a _RowOf named after the scan

    def offer(self, scores: np.ndarray, name_of: Callable[[np.ndarray], list[Any]]) -> None:
        import numpy as np

        candidates = np.arange(len(scores))
        if self.threshold is not None:
            candidates = candidates[scores[candidates] >= self.threshold]
        if len(candidates) > self.k:
            part = np.argpartition(-scores[candidates], self.k - 1)[: self.k]
            candidates = candidates[part]
        if not len(candidates):
            return
        merged_scores = self.scores + scores[candidates].astype(float).tolist()
        merged_names = self.names + name_of(candidates)
        order = sorted(range(len(merged_scores)), key=lambda i: -merged_scores[i])[: self.k]
        self.scores = [merged_scores[i] for i in order]
        self.names = [merged_names[i] for i in order]

    def hits(self) -> list[Hit]:
        """The winners, best first; rows of a cached source get their names now, k at most."""
        pending: dict[_Parts, list[int]] = {}
        for name in self.names:
            if isinstance(name, _RowOf):
                pending.setdefault(name.parts, []).append(name.row)
        named: dict[tuple[_Parts, int], str] = {}
        for parts, rows in pending.items():
            named.update(((parts, row), n) for row, n in zip(rows, parts.names(rows), strict=True))
        return [
            Hit(s, named[(n.parts, n.row)] if isinstance(n, _RowOf) else n)
            for s, n in zip(self.scores, self.names, strict=True)
        ]


def is_embedding_source(source: str) -> bool:
    path = Path(source)
    if path.is_file():
        return path.suffix.lower() in (".parquet", ".pq", ".npy")
    return path.is_dir() and any(p.suffix == ".parquet" for p in path.iterdir())


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


def _list_names(names: Sequence[str], idx: np.ndarray) -> list[Any]:
    return [names[int(i)] for i in idx]


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
class _RowOf:
    parts: _Parts
    row: int


def _iter_parquet(source: Path, lm: LoadedModel, use_cache: bool) -> Iterator[Chunk]:
    from itertools import accumulate

    from clipcli import search_cache

    files = _parquet_files(source)
    cached = search_cache.load(source, files, lm.checksum) if use_cache else None
    if cached is not None:
        parts = _Parts(tuple(files), tuple(accumulate(cached.rows, initial=0))[:-1], cached.key)
        yield from _chunks(cached.matrix, cached.normalized, lambda rows: [_RowOf(parts, r) for r in rows])
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
        return search_cache.Builder(source, files, rows, lm.architecture.embed_dim, dtype)
    except OSError:
        return None


def _normalized(chunk: np.ndarray) -> np.ndarray:
    import numpy as np

    return chunk / np.maximum(np.linalg.norm(chunk, axis=1, keepdims=True), 1e-12)


def rank_sources(
    lm: LoadedModel,
    query: np.ndarray,
    sources: Sequence[str],
    top_k: int,
    threshold: float | None = None,
    batch_size: int = 32,
    workers: int = 0,
    exact: bool = False,
    on_skip: Callable[[Skipped], None] | None = None,
    stdin: IO[str] | None = None,
    use_cache: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[Hit]:
    """The ``top_k`` sources most similar to ``query`` (a unit vector), best first.

    ``use_cache``: scan saved Parquet embeddings through the search cache (:mod:`clipcli.search_cache`).
    """
    best = TopK(top_k, threshold)
    image_args = []
    for source in sources:
        if source != "-" and is_embedding_source(source):
            for chunk, name_of in iter_saved(Path(source), lm, use_cache):
                best.offer(chunk @ query, name_of)
        else:
            image_args.append(source)
    if image_args:
        refs, missing = discover(image_args, stdin)
        if not refs and not missing:
            raise InputError(f"no images found in {', '.join(image_args)}")
        for m in missing:
            if on_skip:
                on_skip(m)
        for batch in iter_image_embeddings(lm, refs, batch_size, workers, exact, max_pixels=max_pixels):
            for s in batch.skipped:
                if on_skip:
                    on_skip(s)
            if batch.names:
                best.offer(batch.embeddings.numpy() @ query, partial(_list_names, batch.names))
    return best.hits()


def rank_texts(
    query: np.ndarray, texts: Sequence[str], embeddings: np.ndarray, top_k: int, threshold: float | None = None
) -> list[Hit]:
    best = TopK(top_k, threshold)
    best.offer(embeddings @ query, lambda idx: [texts[int(i)] for i in idx])
    return best.hits()


def query_embedding(
    lm: LoadedModel,
    text: str | None = None,
    image: str | None = None,
    templates: TemplateSet | None = None,
    exact: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """The unit vector a search compares with: an image's embedding, a text's, or a text's prompt
    ensemble when ``templates`` are given."""
    if image is not None:
        refs, missing = discover([image])
        batch = next(iter_image_embeddings(lm, refs, 1, 0, exact, max_pixels=max_pixels), None) if refs else None
        if batch is None or not batch.names:
            reason = (missing or (batch.skipped if batch else []) or [Skipped(image, "not an image")])[0].reason
            raise InputError(f"{image}: cannot use as the query ({reason})")
        return batch.embeddings[0].numpy()
    if text is None:
        raise InputError("no query: pass a text QUERY, or --image FILE")
    if templates is not None:
        return zero_shot_classifier(lm, [text], templates)[0].numpy()
    return encode_texts(lm, [text])[0].numpy()
