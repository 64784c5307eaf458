"""An approximate-nearest-neighbour index over embeddings saved by ``embed``, kept beside them.

An index is a folder (``emb.index`` beside ``emb/``, ``emb.npy.index`` beside ``emb.npy``) holding:

- ``.clipcli-index``, the marker: a folder is written to only if it holds one (or is new or empty). It
  lists every data file clipcli has written there, and only files it lists are ever removed: a file
  clipcli did not write (a user's ``features.npy``) is never touched, and a folder of other files is
  refused, never taken over.
- ``meta.json``, the commit point: the model (name, SHA-256), which source it covers and that source's
  fingerprint (each file's name, size and mtime), the kind, and the names of the data files below.
  Data files carry a fresh token in their names and are written before ``meta.json`` is replaced, so
  a reader sees the old index or the new one, never a mix; listed files it no longer names are removed.
- ``vectors-TOKEN.faiss`` (graph and IVF-PQ kinds): compressed vectors that faiss memory-maps.
- ``rows-TOKEN.npy``: index id -> row of the source (-1: a row that is gone, masked).
- ``keys-TOKEN.npy``: index id -> a 64-bit digest of (path, embedding), to bring the index up to date.
- ``content-TOKEN.npy``: index id -> a 64-bit digest of the embedding alone, checked at search time.

The index proposes candidates; they are re-scored exactly against the source's own (memory-mapped)
rows, so scores are exact cosines and a compressed index still ranks the top few right. An ``embed``
rerun changes the source's fingerprint: a search then scans exactly and says so, and ``clipcli index``
brings the index up to date (new rows added, gone or changed rows masked) without a rebuild. A source
changed behind a restored fingerprint (``cp -p``, ``touch -r``) is caught by content: the candidates'
digests are compared with the rows re-scored, and a mismatch raises :class:`Stale` (callers scan).

This module holds the format and searching; building and updating are :mod:`clipcli.store.index_build`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.errors import InputError, ModelError
from clipcli.store.saved import Expect, SavedMatrix, open_matrix, require_saved_model, saved_tag, source_fingerprint

if TYPE_CHECKING:
    import numpy as np

FORMAT = 1
META = "meta.json"
MARKER = ".clipcli-index"  # makes a folder an index clipcli made; lists the data files it wrote there
IVFPQ_MIN_ROWS = 256  # faiss trains 256 centroids per product-quantiser code book
FLAT_BELOW = 50_000  # a scan of fewer rows takes a few milliseconds: no index beats it
CHUNK = 1 << 16
ProgressFn = Callable[[int], None]


class Kind(str, Enum):
    AUTO = "auto"
    FLAT = "flat"  # no structure: every query scans the source (exact)
    HNSW = "hnsw"  # a graph over 8-bit vectors (faiss IndexHNSWSQ)
    IVFPQ = "ivfpq"  # inverted lists of product-quantised codes (faiss IVF..._HNSW32,PQ...)


def choose_kind(rows: int, kind: Kind = Kind.AUTO) -> Kind:
    """Flat for small sets, else IVF-PQ: on clustered rows the graph's recall stalled at 0.82-0.91 over
    1M rows while IVF-PQ reached 0.98 in a third of the build time (README, "Search at scale")."""
    if kind is not Kind.AUTO:
        return kind
    return Kind.FLAT if rows < FLAT_BELOW else Kind.IVFPQ


def default_index_path(source: Path) -> Path:
    """Where ``rank`` looks for a source's index: beside it, its name plus ``.index``."""
    name = source.name or source.resolve().name
    return source.with_name(name + ".index")


@dataclass
class Meta:
    kind: str
    model: str
    model_sha256: str
    normalized: bool
    dim: int
    source: str  # as resolved when built
    fingerprint: list[Any]
    key: str
    live: int  # rows the index answers for
    total: int  # ids ever given (masked ones included)
    files: dict[str, str] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    format: int = FORMAT


def read_meta(index: Path) -> Meta:
    path = index / META
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError("another format")
        return Meta(**data)
    except FileNotFoundError:
        raise InputError(f"{index}: not an index (no {META}); build one with `clipcli index EMB`") from None
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"{index}: cannot read the index ({e}); rebuild it with `clipcli index EMB`") from None


def load_faiss(way_out: str = "or pass --no-index") -> Any:
    import os

    # faiss's OpenMP threads spin while they wait by default: on a machine whose cores are busy with
    # anything else, a 20k-row IVF build took 18 s spinning against 1.3 s sleeping (measured here).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import faiss
    except ImportError:
        raise ModelError(f"indexes need faiss: pip install 'clipcli[index]' ({way_out})") from None
    return faiss


def content_digests(block: np.ndarray) -> np.ndarray:
    """A 64-bit digest of each stored embedding (rows as stored: float32 or float16 bits)."""
    import numpy as np

    block = np.ascontiguousarray(block)
    weights = np.random.default_rng(0x5EED).integers(1, 2**63, block.shape[1], dtype=np.uint64) | np.uint64(1)
    bits = block.view(np.uint16 if block.dtype == np.float16 else np.uint32).astype(np.uint64)
    with np.errstate(over="ignore"):
        return (bits * weights).sum(axis=1, dtype=np.uint64)


# --- searching ---------------------------------------------------------------------------------------


class Stale(Exception):
    """The source changed since the index was built (the message says how)."""


@dataclass
class OpenIndex:
    """An index opened for searching, with the source rows it re-scores against."""

    path: Path
    meta: Meta
    saved: SavedMatrix
    rows: np.ndarray  # id -> source row, -1 masked
    vectors: Any  # a faiss index, or None for the flat kind
    content: np.ndarray | None = None  # id -> digest of the embedding it was built from

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, source rows), Q x k each, best first; rows of -1 (and scores of -inf) pad short lists."""
        if self.vectors is None:
            return exact_search(self.saved, queries, k)
        return self._candidates_rescored(queries, k)

    def _candidates_rescored(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        live = max(1, self.meta.live)
        # Candidates re-scored exactly: 4-bit PQ codes rank coarsely, so IVF-PQ hands over more of them.
        floor = self.meta.params.get("candidates", 100)
        wanted = min(self.meta.total, math.ceil(max(4 * k, floor) * self.meta.total / live))
        faiss = load_faiss()
        if self.meta.kind == Kind.HNSW.value:
            params = faiss.SearchParametersHNSW(efSearch=max(self.meta.params.get("ef_search", 160), wanted))
        else:
            nprobe = self.meta.params.get("nprobe", 64)
            # The lists to probe come from a graph over the centroids: searched as shallowly as faiss's
            # default (16), it misses a query's own cluster now and then, and every result with it.
            coarse = faiss.SearchParametersHNSW(efSearch=max(128, 2 * nprobe))
            params = faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=coarse)
        _, ids = self.vectors.search(np.ascontiguousarray(queries, np.float32), wanted, params=params)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        found = np.full((len(queries), k), -1, np.int64)
        n = self.saved.matrix.shape[0]
        for q, candidate_ids in enumerate(ids):
            candidate_ids = candidate_ids[candidate_ids >= 0]
            if len(candidate_ids) and candidate_ids.max() >= len(self.rows):
                raise self._damaged(f"id {int(candidate_ids.max())} beyond its {len(self.rows)} rows")
            rows, first = np.unique(self.rows[candidate_ids], return_index=True)
            masked = rows < 0
            rows, first = rows[~masked], first[~masked]
            if not len(rows):
                continue
            if rows[-1] >= n:
                raise self._damaged(f"row {int(rows[-1])} of a source of {n}")
            self._check_content(rows, candidate_ids[first])
            exact = self.saved.take(rows) @ queries[q]
            best = np.argsort(-exact, kind="stable")[:k]
            scores[q, : len(best)] = exact[best]
            found[q, : len(best)] = rows[best]
        return scores, found

    def verified(self) -> OpenIndex:
        """Every live id's row checked against its content digest, chunk by chunk: for a caller that
        reads every row anyway (dedup); :class:`Stale` on a mismatch."""
        import numpy as np

        if self.vectors is None or self.content is None:
            return self
        n = self.saved.matrix.shape[0]
        for start in range(0, len(self.rows), CHUNK):
            part = np.asarray(self.rows[start : start + CHUNK])
            live = np.flatnonzero(part >= 0)
            rows = part[live]
            if len(rows) and rows.max() >= n:
                raise self._damaged(f"row {int(rows.max())} of a source of {n}")
            order = np.argsort(rows, kind="stable")
            self._check_content(rows[order], start + live[order])
        return self

    def _damaged(self, what: str) -> InputError:
        return InputError(
            f"{self.path}: a damaged index ({what}); rebuild it with `clipcli index {self.saved.source} --rebuild`"
        )

    def _check_content(self, rows: np.ndarray, ids: np.ndarray) -> None:
        """The rows about to be re-scored must hold the embeddings these ids were built from: a source
        rewritten behind a restored fingerprint (``cp -p``, ``touch -r``) is caught here, for free."""
        if self.content is None:
            return
        if (content_digests(self.saved.matrix[rows]) != self.content[ids]).any():
            raise Stale(
                f"{self.path} does not match the rows of {self.saved.source} (changed, its sizes and times "
                f"restored); run `clipcli index {self.saved.source}` to bring it up to date"
            )


def exact_search(saved: SavedMatrix, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row scored against every query, chunk by chunk: the reference an index is measured by."""
    import numpy as np

    q = np.ascontiguousarray(queries, np.float32)
    n = saved.matrix.shape[0]
    scores = np.full((len(q), k), -np.inf, np.float32)
    rows = np.full((len(q), k), -1, np.int64)
    for start in range(0, n, CHUNK):
        block = saved.unit_rows(start, min(n, start + CHUNK)) @ q.T  # rows x Q
        take = min(k, len(block))
        top = np.argpartition(-block, take - 1, axis=0)[:take].T  # Q x take
        merged_s = np.concatenate([scores, np.take_along_axis(block.T, top, axis=1)], axis=1)
        merged_r = np.concatenate([rows, top + start], axis=1)
        order = np.argsort(-merged_s, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(merged_s, order, axis=1)
        rows = np.take_along_axis(merged_r, order, axis=1)
    return scores, rows


def open_index(index: Path, source: Path, expect: Expect, command: str = "rank") -> OpenIndex:
    """Open ``index`` for ``source``: refused for another model or source, :class:`Stale` if the source
    changed since (``command`` names the one searching, for the way round a missing faiss)."""
    import numpy as np

    meta = read_meta(index)
    if not source.exists():
        raise InputError(f"{source}: does not exist")
    # The source's own model first: a mismatch there is the user's model, whatever the index says.
    require_saved_model(saved_tag(source)[0], expect, source)
    if meta.model_sha256 != expect.sha256:
        raise ModelError(
            f"{index}: is an index of embeddings made with {meta.model}, but {source} holds embeddings of "
            f"{expect.name} now; rebuild it with `clipcli index {source} --rebuild`, or {command} with --no-index"
        )
    if meta.fingerprint != json.loads(json.dumps(source_fingerprint(source))):
        if Path(meta.source) != source.resolve():  # moved together with its source, the index still serves
            raise InputError(f"{index}: indexes {meta.source}, not {source}")
        raise Stale(f"{index} is older than {source}; run `clipcli index {source}` to bring it up to date")
    saved = open_matrix(source, expect)
    vectors = content = None
    rebuild = f"rebuild it with `clipcli index {source} --rebuild`"
    try:
        rows = np.load(index / meta.files["rows"], mmap_mode="r")
        if meta.kind != Kind.FLAT.value:
            if "content" not in meta.files:  # built before content digests were kept: an update adds them
                raise Stale(f"{index} predates content checks; run `clipcli index {source}` to bring it up to date")
            content = np.load(index / meta.files["content"], mmap_mode="r")
            faiss = load_faiss(f"or {command} with --no-index")
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
            vectors = faiss.read_index(str(index / meta.files["vectors"]), flags)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{index}: cannot read the index ({e}); {rebuild}") from e
    if saved.matrix.shape[0] != meta.live or (vectors is not None and vectors.ntotal != meta.total):
        raise Stale(f"{index} does not match {source}; run `clipcli index {source}` to bring it up to date")
    for name, array in (("rows", rows), ("content", content)):
        if array is not None and (array.shape != (meta.total,) or array.dtype.kind not in "iu"):
            raise InputError(f"{index}: a damaged index ({name} for {meta.total} ids, found {array.shape}); {rebuild}")
    return OpenIndex(index, meta, saved, rows, vectors, content)
