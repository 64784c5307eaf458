"""Scoring sources against one query: images on the fly, or embeddings saved by ``embed``.

Saved embeddings are streamed in chunks (memory-mapped for NPY), scored with one matrix product per
chunk, and reduced with a partial sort, so a million rows never need a full sort or a second copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from clipcli.encode import encode_texts, iter_image_embeddings
from clipcli.errors import InputError
from clipcli.images import DEFAULT_MAX_PIXELS, Skipped, discover, nothing_found
from clipcli.models import LoadedModel
from clipcli.prompts import TemplateSet, zero_shot_classifier
from clipcli.saved import PartRow, is_embedding_source, iter_saved

if TYPE_CHECKING:
    import numpy as np


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
    names: list[Any] = field(default_factory=list)  # str, or a PartRow named after the scan

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
        pending: dict[Any, list[int]] = {}
        for name in self.names:
            if isinstance(name, PartRow):
                pending.setdefault(name.parts, []).append(name.row)
        named: dict[tuple[Any, int], str] = {}
        for parts, rows in pending.items():
            named.update(((parts, row), n) for row, n in zip(rows, parts.names(rows), strict=True))
        return [
            Hit(s, named[(n.parts, n.row)] if isinstance(n, PartRow) else n)
            for s, n in zip(self.scores, self.names, strict=True)
        ]


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
        if not refs and len(image_args) == len(sources):  # nothing at all to rank
            raise nothing_found(image_args, missing)
        for m in missing:
            if on_skip:
                on_skip(m)
        for batch in iter_image_embeddings(lm, refs, batch_size, workers, exact, max_pixels=max_pixels):
            for s in batch.skipped:
                if on_skip:
                    on_skip(s)
            if batch.names:
                best.offer(batch.embeddings.numpy() @ query, partial(_names_at, batch.names))
    return best.hits()


def _names_at(names: Sequence[str], idx: np.ndarray) -> list[Any]:
    return [names[int(i)] for i in idx]


def rank_texts(
    query: np.ndarray, texts: Sequence[str], embeddings: np.ndarray, top_k: int, threshold: float | None = None
) -> list[Hit]:
    best = TopK(top_k, threshold)
    best.offer(embeddings @ query, partial(_names_at, texts))
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
