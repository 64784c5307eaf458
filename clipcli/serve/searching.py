"""What the search page asks, answered over every dataset served: a query (the language of
:mod:`clipcli.search.query`, an uploaded picture, a row to find more like), a filter (``--where``'s SQL
and a date range), a cutoff (a minimum score and the calibrated ``auto`` one of
:mod:`clipcli.search.cutoff`) and a page of results, best first.

With a filter, only the rows it matches are scored (exactly), so a page is full whenever enough rows
match; without one, each dataset's index (or an exact scan) proposes the best ``page x size`` rows.
A dataset holding video frames answers with moments, as ``rank`` does (:mod:`clipcli.search.moments`):
the frames proposed are more, and a video's adjacent frames of one scene are one result.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Literal

from clipcli.errors import InputError
from clipcli.serve.catalog import Catalog, Dataset

if TYPE_CHECKING:
    import numpy as np

    from clipcli.models import LoadedModel
    from clipcli.search.dedup import Member

Cutoff = Literal["auto", "none"]
MAX_PAGE_SIZE = 200
MAX_RESULTS = 10_000  # pages reach this far into a ranking at most
SAMPLE_ROWS = 4096  # rows per dataset the calibrated cutoff compares a query's scores with
FILTERS_KEPT = 32  # filters remembered per dataset (paging through one runs its SQL once)
TEXTS_KEPT = 1024  # text embeddings remembered


@dataclass(frozen=True)
class Search:
    """One request of the page: ``q`` (may be empty with ``upload`` or ``similar``), ``negative`` texts,
    an uploaded picture's id, a row path to find more like, filters, cutoff and the page wanted."""

    q: str = ""
    negative: tuple[str, ...] = ()
    upload: str | None = None
    similar: str | None = None
    where: str | None = None
    after: date | None = None
    before: date | None = None
    min_score: float | None = None
    cutoff: Cutoff = "none"
    page: int = 1
    page_size: int = 24


@dataclass(frozen=True)
class Hit:
    path: str  # a row's path, or a video moment's (``clip.mp4#t=4.000,8.000``)
    score: float
    dataset: int
    row: str  # the row behind it: the image's path, or a moment's best frame


@dataclass(frozen=True)
class Found:
    hits: list[Hit]  # the page asked for
    more: bool  # whether a next page has results
    cutoff: float | None  # the score results had to reach (None: no cutoff)
    notes: list[str]


class Searcher:
    """Answers :class:`Search` requests with one loaded model over a :class:`Catalog`; thread-safe."""

    def __init__(
        self,
        lm: LoadedModel,
        catalog: Catalog,
        uploads: Callable[[str], np.ndarray | None],
        model_lock: threading.Lock | None = None,
    ) -> None:
        self.lm = lm
        self.catalog = catalog
        self.uploads = uploads
        self.model_lock = model_lock or threading.Lock()  # one forward pass at a time
        self.texts: OrderedDict[str, np.ndarray] = OrderedDict()

    # --- the query vector -------------------------------------------------------------------------

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        from clipcli.zeroshot.encode import encode_texts

        with self.model_lock:  # the remembered texts change under it too
            missing = [t for t in dict.fromkeys(texts) if t not in self.texts]
            if missing:
                for text, vector in zip(missing, encode_texts(self.lm, missing).numpy(), strict=True):
                    self.texts[text] = vector
            rows = np.stack([self.texts[t] for t in texts])
            for text in texts:
                self.texts.move_to_end(text)
            while len(self.texts) > TEXTS_KEPT:
                self.texts.popitem(last=False)
        return rows

    def row_vector(self, path: str) -> np.ndarray:
        """A row's own embedding, for an image term or "more like this": a row's path, or a thumbnail URL
        of this server (as the page shows it); only rows served can be named, nothing else is read."""
        import os
        from urllib.parse import parse_qs, urlsplit

        import numpy as np

        if "?" in path and urlsplit(path).path.endswith(("/api/thumb", "/api/similar")):
            path = (parse_qs(urlsplit(path).query).get("path") or [""])[0]  # a URL the page shows
        found = self.catalog.row_of(path) or self.catalog.row_of(os.path.normpath(path))
        if found is None:
            raise InputError(
                f"{path}: not an image of the datasets served (name one by its path as results show it, "
                "or drop the picture on the page)"
            )
        dataset, row = found
        return dataset.saved.take(np.array([row], np.int64))[0]

    def vector(self, s: Search) -> np.ndarray:
        import numpy as np

        from clipcli.search.query import Query, Term, parse_query, query_vector

        parts = []
        if s.q.strip():
            parts.append(query_vector(parse_query(s.q, s.negative), self.encode_texts, self.row_vector))
        elif s.negative:  # beside a picture: "like this one, but not ..."
            query = Query(tuple(Term(-1.0, text=n) for n in s.negative))
            parts.append(query_vector(query, self.encode_texts, self.row_vector))
        if s.upload is not None:
            uploaded = self.uploads(s.upload)
            if uploaded is None:
                raise InputError(f"upload {s.upload}: unknown or expired; drop the picture again")
            parts.append(uploaded)
        if s.similar is not None:
            parts.append(self.row_vector(s.similar))
        if not parts:
            raise InputError("no query: type a text, drop a picture, or pick 'more like this' on a result")
        total = np.sum(np.asarray(parts, np.float64), axis=0)
        norm = float(np.linalg.norm(total))
        if norm < 1e-6:
            raise InputError("the query's terms cancel out: nothing is left to search for")
        return (total / norm).astype(np.float32)

    # --- the search -------------------------------------------------------------------------------

    def search(self, s: Search) -> Found:
        from clipcli.search.moments import candidates

        if not 1 <= s.page_size <= MAX_PAGE_SIZE:
            raise InputError(f"page_size must be 1 to {MAX_PAGE_SIZE}, not {s.page_size}")
        want = s.page * s.page_size + 1  # one more than the page: is there a next one?
        if s.page < 1 or want > MAX_RESULTS + 1:
            raise InputError(f"page must be 1 or more, and reach at most result {MAX_RESULTS}")
        datasets = self.catalog.current()
        vector = self.vector(s)
        threshold = s.min_score
        if s.cutoff == "auto":
            auto = self.auto_cutoff(vector, datasets)
            threshold = auto if threshold is None else max(threshold, auto)
        hits: list[Hit] = []
        notes = [d.note for d in datasets if d.note]
        skip = s.similar
        for dataset in datasets:
            allowed = self.allowed_rows(dataset, s)
            frames = has_frames(dataset)
            scores, rows = self.best(
                dataset, vector, candidates(want) if frames else want + (skip is not None), allowed
            )
            keep = rows >= 0
            if threshold is not None:
                keep &= scores >= threshold
            names = [dataset.names[int(r)] for r in rows[keep]]
            found = [(n, float(sc)) for n, sc in zip(names, scores[keep], strict=True)]
            if frames:  # the moment "more like this" was asked of is left out whole, not split around its frame
                hits += as_moments(found, dataset.number, skip)
            else:
                hits += [Hit(n, sc, dataset.number, n) for n, sc in found if n != skip]
        hits.sort(key=lambda h: -h.score)
        start = (s.page - 1) * s.page_size
        page = hits[start : start + s.page_size]
        return Found(page, len(hits) > start + s.page_size, None if threshold is None else float(threshold), notes)

    def best(
        self, dataset: Dataset, vector: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the ``k`` best rows of ``dataset``, among ``allowed`` rows when given."""
        import numpy as np

        if allowed is None:
            scores, rows = dataset.search(vector[None, :], k)
            return scores[0], rows[0]
        if not len(allowed):
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        scores = dataset.saved.take(allowed) @ vector
        take = min(k, len(scores))
        top = np.argpartition(-scores, take - 1)[:take]
        top = top[np.argsort(-scores[top], kind="stable")]
        return scores[top], allowed[top]

    def allowed_rows(self, dataset: Dataset, s: Search) -> np.ndarray | None:
        """The rows the request's filters let through, sorted (None: every row); one SQL run per filter."""

        where = filter_sql(dataset, s.where, s.after, s.before)
        if where is None:
            return None
        with dataset.lock:  # a DuckDB connection answers one thread at a time
            filters = dataset.cache.setdefault("filters", OrderedDict())
            if where not in filters:
                from clipcli.search.where import WhereTable

                if "where" not in dataset.cache:
                    dataset.cache["where"] = WhereTable(dataset.source)
                filters[where] = dataset.cache["where"].rows(where)
                while len(filters) > FILTERS_KEPT:
                    filters.popitem(last=False)
            filters.move_to_end(where)
            allowed: np.ndarray = filters[where]
        return allowed

    def auto_cutoff(self, vector: np.ndarray, datasets: list[Dataset]) -> float:
        import numpy as np

        from clipcli.search.cutoff import auto_cutoff, sample_rows

        samples = []
        for dataset in datasets:
            with dataset.lock:
                if "sample" not in dataset.cache:
                    dataset.cache["sample"] = sample_rows(dataset.saved, SAMPLE_ROWS)
            samples.append(dataset.cache["sample"])
        rows = sum(d.size for d in datasets)
        return float(auto_cutoff(vector, np.concatenate(samples), rows=rows))

    # --- near-duplicates --------------------------------------------------------------------------

    def duplicates(self, threshold: float) -> list[tuple[int, list[Member]]]:
        """Each dataset's groups of near-duplicates at ``threshold`` (dataset number, members), computed
        once per dataset and threshold, through the index when there is one."""
        from functools import partial

        from clipcli.search.dedup import find_duplicates
        from clipcli.store.index import exact_search

        out = []
        for dataset in self.catalog.current():
            with dataset.lock:
                groups = dataset.cache.setdefault("groups", {})
                if threshold not in groups:
                    groups[threshold] = find_duplicates(
                        dataset.size,
                        dataset.saved.take,
                        partial(_names, dataset),
                        threshold,
                        dataset.index,
                        partial(exact_search, dataset.saved),
                        size_of=partial(_file_size, dataset),
                    )
                found = groups[threshold]
            out += [(dataset.number, group) for group in found]
        return out


def _names(dataset: Dataset, rows: list[int]) -> list[str]:
    return [dataset.names[r] for r in rows]


def _file_size(dataset: Dataset, path: str) -> int:
    from clipcli.search.dedup import file_size

    return file_size(dataset.locate(path))


def filter_sql(dataset: Dataset, where: str | None, after: date | None, before: date | None) -> str | None:
    """``where`` and the date range as one SQL condition over the dataset's columns: the capture time
    (``taken``) where embed recorded it, else the file's ``mtime``."""
    clauses = [f"({where})"] if where and where.strip() else []
    if after is not None or before is not None:
        if "taken" in dataset.columns:
            if after is not None:
                clauses.append(f"taken >= '{after.isoformat()}'")
            if before is not None:
                clauses.append(f"taken < '{before.isoformat()}'::DATE + INTERVAL 1 DAY")
        elif "mtime" in dataset.columns:
            if after is not None:
                clauses.append(f"mtime >= {_epoch(after)}")
            if before is not None:
                clauses.append(f"mtime < {_epoch(before) + 86400}")
        else:
            raise InputError(f"{dataset.source}: records no capture time or mtime to filter dates by")
    return " AND ".join(clauses) or None


def _epoch(day: date) -> float:
    """The start of ``day`` in the server's local time, as files' mtimes count (seconds since 1970)."""
    return datetime(day.year, day.month, day.day).timestamp()


def has_frames(dataset: Dataset) -> bool:
    """Whether any row of ``dataset`` is a video's frame (found once per dataset served)."""
    from clipcli.images.video import split_frame

    with dataset.lock:
        if "frames" not in dataset.cache:
            dataset.cache["frames"] = any(split_frame(n) is not None for n in dataset.names if "#t=" in n)
        return bool(dataset.cache["frames"])


def as_moments(found: list[tuple[str, float]], number: int, without: str | None = None) -> list[Hit]:
    """Ranked rows of one dataset with each video's frames merged into moments, less the one that holds
    the row ``without``; a moment's row is its best frame (what "more like this" and its thumbnail take)."""
    from clipcli.search.moments import holds, moments

    return [Hit(m.name, m.score, number, m.row) for m in moments(found) if without is None or not holds(m, without)]
