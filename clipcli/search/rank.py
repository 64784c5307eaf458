"""Scoring sources against one query: images on the fly, or embeddings saved by ``embed``.

Saved embeddings are streamed in chunks (memory-mapped for NPY), scored with one matrix product per
chunk, and reduced with a partial sort, so a million rows never need a full sort or a second copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from clipcli.errors import InputError
from clipcli.images.decode import DEFAULT_MAX_PIXELS
from clipcli.images.sources import Skipped, discover, found_nothing, nothing_found
from clipcli.models import LoadedModel
from clipcli.store.saved import PartRow, is_embedding_source, iter_saved
from clipcli.zeroshot.encode import encode_texts, iter_image_embeddings
from clipcli.zeroshot.prompts import TemplateSet, zero_shot_classifier

if TYPE_CHECKING:
    import numpy as np

    from clipcli.images.refs import ContainerOptions
    from clipcli.search.query import Query


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


@dataclass(frozen=True)
class IndexChoice:
    """How saved embeddings are searched: through the index beside them (or ``path``), or by a scan."""

    use: bool = True
    path: Path | None = None
    on_note: Callable[[str], None] | None = None  # told when an index is skipped, and why


@dataclass(frozen=True)
class SourceScan:
    """How sources are read: images decoded and embedded (``batch_size``, ``workers``, ``exact``,
    ``max_pixels``; unreadable ones told to ``on_skip``; ``-`` read from ``stdin``), saved embeddings
    scanned through the search cache (``use_cache``, see :mod:`clipcli.store.search_cache`) or searched through
    an index (``index``)."""

    batch_size: int = 32
    workers: int = 0
    exact: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    use_cache: bool = True
    index: IndexChoice = field(default_factory=IndexChoice)
    on_skip: Callable[[Skipped], None] | None = None
    stdin: IO[str] | None = None
    containers: ContainerOptions | None = None  # how videos are sampled into frames (--every, --frames)
    on_rows: Callable[[np.ndarray], None] | None = None  # told each batch of images embedded (unit rows)
    where: str | None = None  # a --where filter over saved embeddings' columns (see clipcli.search.where)


def rank_many(
    lm: LoadedModel,
    queries: np.ndarray,
    sources: Sequence[str],
    top_k: int,
    threshold: float | None = None,
    scan: SourceScan | None = None,
) -> list[list[Hit]]:
    """For each row of ``queries`` (Q x D unit vectors), its ``top_k`` sources, best first: every source
    is read once for all the queries (one query: ``query[None, :]``). With ``scan.where``, only saved
    embeddings are taken, and only their rows that the filter keeps, before the top k are chosen."""
    import numpy as np

    from clipcli.store.located import names_from_here

    scan = scan or SourceScan()
    choice = scan.index
    saved = [s for s in sources if s != "-" and is_embedding_source(s)]
    # A file may be in several sources (photos/ and the rows saved from it): each gives its row, so the
    # k best names are among the k x (number of sources) best rows; a name is kept once, at its best.
    spread = max(1, len(saved) + (len(saved) < len(sources)))
    best = [TopK(top_k * spread, threshold) for _ in range(len(queries))]
    image_args = []
    explicit = _explicit_index_source(choice, saved)
    if scan.where is not None:
        _refuse_where_on_images(sources, saved)
    for source in sources:
        if source not in saved:
            image_args.append(source)
            continue
        relocate = names_from_here(Path(source))  # rows named as they open from here, once they are chosen
        into = best if relocate is None else [TopK(b.k, b.threshold) for b in best]
        if scan.where is not None:
            _offer_where(lm, queries, Path(source), into, scan.where)
        # The index re-scores against the search cache, which --no-cache forbids writing for Parquet.
        elif not (
            (scan.use_cache or Path(source).suffix.lower() == ".npy")
            and _offer_from_index(lm, queries, Path(source), into, choice, explicit)
        ):
            for chunk, name_of in iter_saved(Path(source), lm, scan.use_cache):
                _offer_all(into, chunk, queries, name_of)
        if relocate is not None:
            for b, mine in zip(best, into, strict=True):
                hits = mine.hits()
                b.offer(np.array([h.score for h in hits]), partial(_names_at, [relocate(h.name) for h in hits]))
    if image_args:
        refs, missing = discover(image_args, scan.stdin, scan.containers)
        if found_nothing(refs, missing) and len(image_args) == len(sources):  # nothing at all to rank
            raise nothing_found(image_args, missing)
        on_skip = scan.on_skip or (lambda skipped: None)
        for m in missing:
            on_skip(m)
        batches = iter_image_embeddings(lm, refs, scan.batch_size, scan.workers, scan.exact, max_pixels=scan.max_pixels)
        for batch in batches:
            for s in batch.skipped:
                on_skip(s)
            if batch.names and scan.on_rows is not None:
                scan.on_rows(batch.embeddings.numpy())
            if batch.names:
                _offer_all(best, batch.embeddings.numpy(), queries, partial(_names_at, batch.names))
    if spread == 1:  # one source names each of its rows once
        return [b.hits() for b in best]
    return [_each_name_once(b.hits(), top_k) for b in best]


def _each_name_once(hits: list[Hit], k: int) -> list[Hit]:
    """The best hit of each file, however its sources spell it (``../A/x.jpg``, ``/abs/A/x.jpg``, a link).
    (Within one source a link and its file are two rows, and a source is read as it was given.)"""
    import os

    kept: dict[str, Hit] = {}
    for hit in hits:  # best first
        kept.setdefault(os.path.realpath(hit.name), hit)
    return list(kept.values())[:k]


QUERY_GROUP = 256  # queries scored against a chunk at once: 64k rows x 256 x 4 bytes = 64 MB of scores


def _offer_all(best: list[TopK], chunk: np.ndarray, queries: np.ndarray, name_of: Callable[[Any], list[Any]]) -> None:
    for start in range(0, len(queries), QUERY_GROUP):
        scores = chunk @ queries[start : start + QUERY_GROUP].T
        for j in range(scores.shape[1]):
            best[start + j].offer(scores[:, j], name_of)


WHERE_BLOCK = 1 << 16  # matching rows scored at once


def _refuse_where_on_images(sources: Sequence[str], saved: Sequence[str]) -> None:
    for source in sources:
        if source not in saved:
            raise InputError(
                f"{source}: --where filters the columns of embeddings saved by `clipcli embed` (Parquet), "
                "not images; embed them first"
            )


def _offer_where(lm: LoadedModel, queries: np.ndarray, source: Path, best: list[TopK], where: str) -> None:
    """Score exactly the rows of ``source`` that ``where`` keeps (an index, built over all rows, would
    return fewer than k of them): the filter runs first, then the top k of what it kept."""
    from clipcli.search.where import WhereTable
    from clipcli.store.saved import Expect, open_matrix

    table = WhereTable(source)  # the filter's errors (a missing column) come before any model check
    rows = table.rows(where)
    saved = open_matrix(source, Expect.of(lm))
    if len(rows) and int(rows[-1]) >= saved.matrix.shape[0]:
        raise InputError(f"{source}: changed while it was read; run the search again")
    import numpy as np

    local = [TopK(b.k, b.threshold) for b in best]  # rows by number, named once at the end
    bounds = np.searchsorted(rows, np.arange(0, saved.matrix.shape[0] + WHERE_BLOCK, WHERE_BLOCK))
    for i, (lo, hi) in enumerate(pairwise(bounds)):
        block = rows[lo:hi]
        if not len(block):
            continue
        start = i * WHERE_BLOCK
        stop = min(start + WHERE_BLOCK, saved.matrix.shape[0])
        if len(block) == stop - start:  # every row of the block
            vectors = saved.unit_rows(start, stop)
        elif 4 * len(block) >= WHERE_BLOCK:  # many of them: read the block whole, in order
            vectors = saved.unit_rows(start, stop)[block - start]
        else:
            vectors = saved.take(block)
        _offer_all(local, vectors, queries, partial(_rows_at, block))
    wanted = sorted({r for t in local for r in t.names})
    names = dict(zip(wanted, saved.name_rows(wanted), strict=True))
    for b, t in zip(best, local, strict=True):
        b.offer(np.asarray(t.scores, np.float64), partial(_names_at, [names[r] for r in t.names]))


def _rows_at(block: np.ndarray, idx: np.ndarray) -> list[Any]:
    return [int(block[int(i)]) for i in idx]


def _explicit_index_source(choice: IndexChoice, saved: Sequence[str]) -> str | None:
    """The source that ``--index PATH`` indexes (it must be one of the saved sources given)."""
    from clipcli.store.index import read_meta

    if not choice.use or choice.path is None:
        return None
    meta = read_meta(choice.path)
    if not Path(meta.source).exists() and len(saved) != 1:  # one source given may be it, moved
        raise InputError(f"{choice.path}: indexes {meta.source}, which does not exist (moved or deleted?)")
    for source in saved:
        if Path(source).resolve() == Path(meta.source):
            return source
    if len(saved) == 1:  # moved since it was built: open_index checks that it still fits
        return saved[0]
    raise InputError(f"{choice.path}: indexes {meta.source}, which is not among the sources given")


def _offer_from_index(
    lm: LoadedModel, queries: np.ndarray, source: Path, best: list[TopK], choice: IndexChoice, explicit: str | None
) -> bool:
    """Search ``source`` through its index; False when there is none to use (the caller scans)."""
    import numpy as np

    from clipcli.store.index import META, Stale, default_index_path, open_index
    from clipcli.store.saved import Expect

    if not choice.use:
        return False
    path = choice.path if explicit is not None and Path(explicit) == source else default_index_path(source)
    if path is None or not (path / META).exists():
        return False
    try:
        opened = open_index(path, source, Expect.of(lm))
    except Stale as e:
        if choice.on_note:
            choice.on_note(f"{e}; scanning every row meanwhile")
        return False
    if not best:  # no queries (an empty --queries-file): nothing to search for, as a scan finds
        return True
    k = max(b.k for b in best)
    try:
        scores, rows = opened.search(queries, k)
    except Stale as e:  # rows rewritten behind a restored fingerprint, caught by their content
        if choice.on_note:
            choice.on_note(f"{e}; scanning every row meanwhile")
        return False
    wanted = sorted({int(r) for r in rows.ravel() if r >= 0})
    names = dict(zip(wanted, opened.saved.name_rows(wanted), strict=True))
    for b, q_scores, q_rows in zip(best, scores, rows, strict=True):
        keep = q_rows >= 0
        found = [names[int(r)] for r in q_rows[keep]]
        b.offer(np.asarray(q_scores[keep], np.float64), partial(_names_at, found))
    return True


def _names_at(names: Sequence[str], idx: np.ndarray) -> list[Any]:
    return [names[int(i)] for i in idx]


def rank_texts(
    query: np.ndarray, texts: Sequence[str], embeddings: np.ndarray, top_k: int, threshold: float | None = None
) -> list[Hit]:
    best = TopK(top_k, threshold)
    best.offer(embeddings @ query, partial(_names_at, texts))
    return best.hits()


def query_embeddings(
    lm: LoadedModel,
    texts: Sequence[str] | None = None,
    images: Sequence[str] | None = None,
    templates: TemplateSet | None = None,
    exact: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Q x D unit vectors for many queries at once: texts (prompt ensembles with ``templates``), or
    image files; an image that cannot be used is an error naming it."""
    import numpy as np

    if images is not None:
        refs, missing = discover(list(images))
        if missing:
            raise InputError(f"{missing[0].path}: cannot use as a query ({missing[0].reason})")
        rows = []
        for batch in iter_image_embeddings(lm, refs, 32, 0, exact, max_pixels=max_pixels):
            if batch.skipped:
                raise InputError(f"{batch.skipped[0].path}: cannot use as a query ({batch.skipped[0].reason})")
            rows.append(batch.embeddings.numpy())
        if len(refs) != len(images):
            raise InputError("each query image must be one file (not a folder or a pattern)")
        return np.concatenate(rows) if rows else np.zeros((0, lm.embed_dim), np.float32)
    if not texts:
        return np.zeros((0, lm.embed_dim), np.float32)
    if templates is not None:
        return zero_shot_classifier(lm, list(texts), templates).numpy()
    return encode_texts(lm, list(texts)).numpy()


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


def language_query_vector(
    lm: LoadedModel,
    query: Query,
    sources: Sequence[str] = (),
    templates: TemplateSet | None = None,
    exact: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """The unit vector of a parsed query (:mod:`clipcli.search.query`): texts through the model (prompt
    ensembles with ``templates``); an image term is the saved embedding of the row of that name among
    ``sources``, else the file of that name embedded by the model."""
    from clipcli.search.query import query_vector

    def texts(batch: list[str]) -> np.ndarray:
        if templates is not None:
            return zero_shot_classifier(lm, batch, templates).numpy()
        return encode_texts(lm, batch).numpy()

    def image(path: str) -> np.ndarray:
        return image_query_vector(lm, path, sources, exact, max_pixels, "query term")

    return query_vector(query, texts, image)


def image_query_vector(
    lm: LoadedModel,
    path: str,
    sources: Sequence[str] = (),
    exact: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    given_as: str = "--image",
) -> np.ndarray:
    """The unit vector of a query image: the saved embedding of the row of that name among ``sources``
    (a video's frame, a shard's sample or a file, as the results name it), else the file embedded. For
    ``--image`` a file is embedded as it always was, and only a name that is no file is looked for among
    the rows (a scan of every row's name, which a file spares)."""
    import os

    if path.startswith(("http://", "https://")):
        raise InputError(f"{path}: rank does not fetch URLs for a query; download the image and give its path")
    local = os.path.expanduser(path)
    if given_as == "--image" and os.path.isfile(local):
        return query_embedding(lm, image=local, exact=exact, max_pixels=max_pixels)
    found = saved_row_vector(lm, sources, path)  # a row of the dataset: its saved embedding
    if found is not None:
        return found
    if not os.path.isfile(local):
        raise InputError(f"{path}: no such image file, nor a row of the embeddings given ({given_as})")
    return query_embedding(lm, image=local, exact=exact, max_pixels=max_pixels)


def saved_row_vector(lm: LoadedModel, sources: Sequence[str], name: str) -> np.ndarray | None:
    """The saved unit embedding of the first row named ``name`` (or, for ``./x``, ``x``) in the saved
    ``sources``, or None."""
    import os

    from clipcli.store.saved import Expect, open_matrix

    names = dict.fromkeys([name, os.path.normpath(name)] if not name.startswith("~") else [name])
    for source in sources:
        if source == "-" or not is_embedding_source(source):
            continue
        saved = open_matrix(Path(source), Expect.of(lm))
        start = 0
        for block in saved.iter_names():
            for wanted in names:
                if wanted in block:
                    return saved.unit_rows(start + block.index(wanted), start + block.index(wanted) + 1)[0]
            start += len(block)
    return None
