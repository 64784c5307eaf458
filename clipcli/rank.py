"""Scoring sources against one query: images on the fly, or embeddings saved by ``embed``.

Saved embeddings are streamed in chunks (memory-mapped for NPY), scored with one matrix product per
chunk, and reduced with a partial sort, so a million rows never need a full sort or a second copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipcli.encode import iter_image_embeddings
from clipcli.errors import InputError, ModelError
from clipcli.images import Skipped, discover
from clipcli.models import LoadedModel
from clipcli.store import META_MODEL, META_NORMALIZED, META_SHA, npy_sidecar

if TYPE_CHECKING:
    import numpy as np

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
    names: list[str] = field(default_factory=list)

    def offer(self, scores: np.ndarray, name_of: Callable[[np.ndarray], list[str]]) -> None:
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
        return [Hit(s, n) for s, n in zip(self.scores, self.names, strict=True)]


def is_embedding_source(source: str) -> bool:
    path = Path(source)
    if path.is_file():
        return path.suffix.lower() in (".parquet", ".pq", ".npy")
    return path.is_dir() and any(p.suffix == ".parquet" for p in path.iterdir())


def _parquet_files(source: Path) -> list[Path]:
    return sorted(source.glob("*.parquet")) if source.is_dir() else [source]


def _check_tag(metadata: dict[bytes, bytes] | None, lm: LoadedModel, where: Path) -> bool:
    """Raise unless the file was made with ``lm``; returns whether its embeddings are normalised."""
    meta = metadata or {}
    if meta.get(META_SHA, b"").decode() != lm.checksum:
        made_with = meta.get(META_MODEL, b"an unknown model").decode()
        raise ModelError(f"{where}: embeddings were made with {made_with}, not {lm.name}; re-embed or pass --model")
    return meta.get(META_NORMALIZED, b"true") == b"true"


def iter_saved(source: Path, lm: LoadedModel) -> Iterator[tuple[np.ndarray, Callable[[np.ndarray], list[str]]]]:
    """Chunks of (N x D float32 embeddings, a function from chunk indices to their paths)."""
    import numpy as np

    dim = lm.architecture.embed_dim
    if source.suffix.lower() == ".npy":
        sidecar = npy_sidecar(source)
        if not sidecar.exists():
            raise InputError(f"{source}: no {sidecar.name} beside it (the paths of its rows)")
        matrix = np.load(source, mmap_mode="r")
        names = sidecar.read_text(encoding="utf-8").splitlines()
        if matrix.ndim != 2 or matrix.shape[1] != dim or len(names) != matrix.shape[0]:
            raise InputError(f"{source}: expected {len(names)} x {dim} embeddings, found {matrix.shape}")
        # NPY carries no metadata: embed writes all rows normalised or none, so a sample tells which.
        unit = _is_unit(np.asarray(matrix[:256], dtype=np.float32))
        for start in range(0, matrix.shape[0], CHUNK_ROWS):
            chunk = np.asarray(matrix[start : start + CHUNK_ROWS], dtype=np.float32)
            yield (chunk if unit else _normalized(chunk)), lambda idx, s=start: [names[s + int(i)] for i in idx]  # type: ignore[misc]
        return

    import pyarrow.parquet as pq

    for file in _parquet_files(source):
        try:
            reader = pq.ParquetFile(file)
        except (OSError, ValueError) as e:
            raise InputError(f"{file}: cannot read embeddings ({e})") from e
        if "embedding" not in reader.schema_arrow.names:
            raise InputError(f"{file}: no 'embedding' column (not written by clipcli embed?)")
        unit = _check_tag(reader.schema_arrow.metadata, lm, file)
        key = "path" if "path" in reader.schema_arrow.names else "text"
        for batch in reader.iter_batches(batch_size=CHUNK_ROWS, columns=[key, "embedding"]):
            column = batch.column("embedding")
            flat = column.values.to_numpy(zero_copy_only=False)
            chunk = flat.astype(np.float32, copy=False).reshape(len(batch), -1)
            names_col = batch.column(key)
            yield (chunk if unit else _normalized(chunk)), lambda idx, c=names_col: c.take(idx).to_pylist()  # type: ignore[misc]


def _is_unit(rows: np.ndarray) -> bool:
    import numpy as np

    return bool(np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-2))


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
    stdin: object = None,
) -> list[Hit]:
    """The ``top_k`` sources most similar to ``query`` (a unit vector), best first."""
    best = TopK(top_k, threshold)
    image_args = []
    for source in sources:
        if source != "-" and is_embedding_source(source):
            for chunk, name_of in iter_saved(Path(source), lm):
                best.offer(chunk @ query, name_of)
        else:
            image_args.append(source)
    if image_args:
        refs, missing = discover(image_args, stdin)  # type: ignore[arg-type]
        for m in missing:
            if on_skip:
                on_skip(m)
        for batch in iter_image_embeddings(lm, refs, batch_size, workers, exact):
            for s in batch.skipped:
                if on_skip:
                    on_skip(s)
            if batch.names:
                best.offer(batch.embeddings.numpy() @ query, lambda idx, n=batch.names: [n[int(i)] for i in idx])  # type: ignore[misc]
    return best.hits()


def rank_texts(
    query: np.ndarray, texts: Sequence[str], embeddings: np.ndarray, top_k: int, threshold: float | None = None
) -> list[Hit]:
    best = TopK(top_k, threshold)
    best.offer(embeddings @ query, lambda idx: [texts[int(i)] for i in idx])
    return best.hits()
