"""An approximate-nearest-neighbour index over embeddings saved by ``embed``, kept beside them.

An index is a folder (``emb.index`` beside ``emb/``, ``emb.npy.index`` beside ``emb.npy``) holding:

- ``meta.json``, the commit point: the model (name, SHA-256), which source it covers and that source's
  fingerprint (each file's name, size and mtime), the kind, and the names of the data files below.
  Data files carry a fresh token in their names and are written before ``meta.json`` is replaced, so
  a reader sees the old index or the new one, never a mix; files no ``meta.json`` names are removed.
- ``vectors-TOKEN.faiss`` (graph and IVF-PQ kinds): compressed vectors that faiss memory-maps.
- ``rows-TOKEN.npy``: index id -> row of the source (-1: a row that is gone, masked).
- ``keys-TOKEN.npy``: index id -> a 64-bit digest of (path, embedding), to bring the index up to date.

The index proposes candidates; they are re-scored exactly against the source's own (memory-mapped)
rows, so scores are exact cosines and a compressed index still ranks the top few right. An ``embed``
rerun changes the source's fingerprint: a search then scans exactly and says so, and ``clipcli index``
brings the index up to date (new rows added, gone or changed rows masked) without a rebuild.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.atomic import AtomicFile, OutputLock, describe_os_error, replace_file, temporary_sibling
from clipcli.errors import InputError, ModelError, OutputError
from clipcli.saved import Expect, SavedMatrix, open_matrix, saved_tag, source_fingerprint

if TYPE_CHECKING:
    import numpy as np

FORMAT = 1
META = "meta.json"
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


def _faiss() -> Any:
    import os

    # faiss's OpenMP threads spin while they wait by default: on a machine whose cores are busy with
    # anything else, a 20k-row IVF build took 18 s spinning against 1.3 s sleeping (measured here).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import faiss
    except ImportError:
        raise ModelError("indexes need faiss: pip install 'clipcli[index]' (or rank with --no-index)") from None
    return faiss


# --- building and updating ---------------------------------------------------------------------------


@dataclass
class BuildReport:
    kind: Kind
    rows: int
    added: int
    masked: int
    kept: int
    updated: bool  # an existing index was brought up to date rather than rebuilt


def build_index(
    source: Path,
    out: Path | None = None,
    kind: Kind = Kind.AUTO,
    rebuild: bool = False,
    on_progress: ProgressFn | None = None,
) -> BuildReport:
    """Build the index of ``source`` at ``out`` (default beside it), or bring an existing one up to date."""
    out = out or default_index_path(source)
    tag, dim = saved_tag(source)
    expect = Expect(tag.name, tag.sha256, dim)
    previous = _previous(out, tag.sha256, tag.name) if not rebuild else None
    with OutputLock(out, is_dir=True):
        fingerprint = source_fingerprint(source)
        saved = open_matrix(source, expect)
        keys = row_keys(saved)
        n = len(keys)
        # An update keeps the kind the index was built with; --kind (or --rebuild) changes it.
        chosen = Kind(previous.kind) if previous is not None and kind is Kind.AUTO else choose_kind(n, kind)
        if previous is not None and previous.kind == chosen.value and chosen is not Kind.FLAT:
            report, files, meta_total, params = _update(out, previous, saved, keys, on_progress)
        else:
            files, params = {}, {}
            rows = _arange(n)
            if chosen is not Kind.FLAT:
                vectors, params = _train_and_add(chosen, saved, n, on_progress)
                files["vectors"] = _write_faiss(out, vectors)
            files["rows"] = _write_npy(out, "rows", rows)
            files["keys"] = _write_npy(out, "keys", keys)
            report, meta_total = BuildReport(chosen, n, n, 0, 0, False), n
        meta = Meta(
            chosen.value,
            tag.name,
            tag.sha256,
            saved.tag.normalized,
            dim,
            str(source.resolve()),
            fingerprint,
            saved.key,
            n,
            meta_total,
            files,
            params,
        )
        _commit(out, meta)
    return report


def _previous(out: Path, sha256: str, model: str) -> Meta | None:
    """The index already at ``out``, if any; one for another model is refused rather than replaced."""
    if not (out / META).exists():
        if out.exists() and (not out.is_dir() or any(p.name != ".clipcli.lock" for p in out.iterdir())):
            raise OutputError(f"{out}: exists and is not an index; choose another output")
        return None
    try:
        meta = read_meta(out)
    except InputError:
        return None  # damaged: rebuilt
    if meta.model_sha256 != sha256:
        raise ModelError(
            f"{out}: is an index of embeddings made with {meta.model}, not {model}; "
            "delete it, choose another output, or pass --rebuild"
        )
    return meta


def _arange(n: int) -> np.ndarray:
    import numpy as np

    return np.arange(n, dtype=np.int64)


def row_keys(saved: SavedMatrix) -> np.ndarray:
    """A 64-bit digest of each row's name and stored embedding: equal keys, the same row."""
    import hashlib

    import numpy as np

    n, dim = saved.matrix.shape
    keys = np.empty(n, np.uint64)
    rng = np.random.default_rng(0x5EED)
    weights = rng.integers(1, 2**63, dim, dtype=np.uint64) | np.uint64(1)
    start = 0
    for names in saved.iter_names():
        stop = start + len(names)
        block = np.ascontiguousarray(saved.matrix[start:stop])
        bits = block.view(np.uint16 if block.dtype == np.float16 else np.uint32).astype(np.uint64)
        with np.errstate(over="ignore"):
            content = (bits * weights).sum(axis=1, dtype=np.uint64)
        named = np.array(
            [
                int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
                for s in names
            ],
            dtype=np.uint64,
        )
        keys[start:stop] = content ^ named
        start = stop
    if start != n:
        raise InputError(f"{saved.source}: {n} embeddings but {start} names; run embed again")
    return keys


def _chunks(saved: SavedMatrix, rows: np.ndarray) -> Iterator[np.ndarray]:
    """Unit float32 vectors of ``rows`` (ascending), a chunk at a time."""
    for start in range(0, len(rows), CHUNK):
        part = rows[start : start + CHUNK]
        if len(part) and part[-1] - part[0] == len(part) - 1:  # contiguous: a slice, no gather
            yield saved.unit_rows(int(part[0]), int(part[-1]) + 1)
        else:
            yield saved.take(part)


def _ivf_lists(n: int) -> int:
    """Inverted lists: about 2 sqrt(n), a power of two, at most 2048 (k-means time grows with their number)."""
    return max(64, min(2048, 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n))))))


def _train_and_add(
    kind: Kind, saved: SavedMatrix, n: int, on_progress: ProgressFn | None
) -> tuple[Any, dict[str, int]]:
    import numpy as np

    faiss = _faiss()
    dim = saved.matrix.shape[1]
    if kind is Kind.HNSW:
        params = {"M": 32, "ef_search": 160, "candidates": 100}
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        sample = 50_000
    else:
        nlist = _ivf_lists(n)
        params = {"nlist": nlist, "nprobe": min(nlist, 64), "candidates": 200}
        # 8-bit codes in plain inverted lists, which faiss memory-maps; its 4-bit fast-scan lists are
        # read into memory whole (720 MB at 10M rows), so they would set a search's memory.
        codes = max(16, dim // 8)
        index = faiss.index_factory(dim, f"IVF{nlist}_HNSW32,PQ{codes}", faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        sample = 40 * nlist  # faiss warns below 39 training points a list
    picked = np.sort(np.random.default_rng(0).choice(n, size=min(n, sample), replace=False))
    index.train(saved.take(picked))
    for chunk in _chunks(saved, _arange(n)):
        index.add(chunk)
        if on_progress:
            on_progress(len(chunk))
    return index, params


def _update(
    out: Path, meta: Meta, saved: SavedMatrix, keys: np.ndarray, on_progress: ProgressFn | None
) -> tuple[BuildReport, dict[str, str], int, dict[str, int]]:
    """Keep the ids whose row is unchanged (renumbered to its row now), mask the others, add new rows."""
    import numpy as np

    faiss = _faiss()
    old_keys = np.load(out / meta.files["keys"])
    old_rows = np.load(out / meta.files["rows"])
    live = old_rows >= 0
    order = np.argsort(keys, kind="stable")
    pos = np.searchsorted(keys[order], old_keys)
    found = live & (pos < len(keys))
    found[found] = keys[order[pos[found]]] == old_keys[found]
    rows = np.full(len(old_keys), -1, np.int64)
    rows[found] = order[pos[found]]
    covered = np.zeros(len(keys), bool)
    covered[rows[found]] = True
    new_rows = np.flatnonzero(~covered)
    index = faiss.read_index(str(out / meta.files["vectors"]))
    for chunk in _chunks(saved, new_rows):
        index.add(chunk)
        if on_progress:
            on_progress(len(chunk))
    rows = np.concatenate([rows, new_rows])
    all_keys = np.concatenate([np.where(found, old_keys, 0), keys[new_rows]]).astype(np.uint64)
    files = {
        "vectors": _write_faiss(out, index),
        "rows": _write_npy(out, "rows", rows),
        "keys": _write_npy(out, "keys", all_keys),
    }
    masked = int(live.sum() - found.sum())
    report = BuildReport(Kind(meta.kind), len(keys), len(new_rows), masked, int(found.sum()), True)
    return report, files, len(rows), meta.params


def _write_npy(out: Path, stem: str, array: np.ndarray) -> str:
    import numpy as np

    name = f"{stem}-{secrets.token_hex(4)}.npy"
    target = AtomicFile(out / name)
    try:
        np.save(target.file, array)
    except OSError as e:
        target.discard()
        raise OutputError(f"{out / name}: cannot write ({describe_os_error(e, out)})") from e
    target.commit()
    return name


def _write_faiss(out: Path, index: Any) -> str:
    name = f"vectors-{secrets.token_hex(4)}.faiss"
    tmp = temporary_sibling(out / name)
    try:
        _faiss().write_index(index, str(tmp))
        replace_file(tmp, out / name)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out / name}: cannot write ({e})") from e
    return name


def _commit(out: Path, meta: Meta) -> None:
    """Replace ``meta.json`` (the commit point), then remove data files it no longer names."""
    target = AtomicFile(out / META)
    target.file.write(json.dumps(asdict(meta)).encode())
    target.commit()
    keep = {META, *meta.files.values(), ".clipcli.lock"}
    for p in out.iterdir():
        if p.name not in keep and p.suffix in (".npy", ".faiss", ".tmp") and not p.name.startswith(".clipcli"):
            p.unlink(missing_ok=True)


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
        faiss = _faiss()
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
        for q, candidate_ids in enumerate(ids):
            candidate_ids = candidate_ids[candidate_ids >= 0]
            rows = np.unique(self.rows[candidate_ids])
            rows = rows[rows >= 0]
            if not len(rows):
                continue
            exact = self.saved.take(rows) @ queries[q]
            best = np.argsort(-exact, kind="stable")[:k]
            scores[q, : len(best)] = exact[best]
            found[q, : len(best)] = rows[best]
        return scores, found


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


def open_index(index: Path, source: Path, expect: Expect) -> OpenIndex:
    """Open ``index`` for ``source``: refused for another model or source, :class:`Stale` if the source
    changed since."""
    import numpy as np

    meta = read_meta(index)
    if meta.model_sha256 != expect.sha256:
        raise ModelError(
            f"{index}: is an index of embeddings made with {meta.model}, not {expect.name}; pass --model "
            f"{meta.model}, or rebuild it with `clipcli index {source}`"
        )
    if meta.fingerprint != json.loads(json.dumps(source_fingerprint(source))):
        if Path(meta.source) != source.resolve():  # moved together with its source, the index still serves
            raise InputError(f"{index}: indexes {meta.source}, not {source}")
        raise Stale(f"{index} is older than {source}; run `clipcli index {source}` to bring it up to date")
    saved = open_matrix(source, expect)
    vectors = None
    try:
        rows = np.load(index / meta.files["rows"], mmap_mode="r")
        if meta.kind != Kind.FLAT.value:
            faiss = _faiss()
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
            vectors = faiss.read_index(str(index / meta.files["vectors"]), flags)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{index}: cannot read the index ({e}); rebuild it with `clipcli index {source}`") from e
    if saved.matrix.shape[0] != meta.live or (vectors is not None and vectors.ntotal != meta.total):
        raise Stale(f"{index} does not match {source}; run `clipcli index {source}` to bring it up to date")
    return OpenIndex(index, meta, saved, rows, vectors)
