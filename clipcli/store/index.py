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
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.atomic import LOCK_NAME, AtomicFile, OutputLock, describe_os_error, remove_temporaries
from clipcli.errors import InputError, ModelError, OutputError
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


def _faiss(way_out: str = "or pass --no-index") -> Any:
    import os

    # faiss's OpenMP threads spin while they wait by default: on a machine whose cores are busy with
    # anything else, a 20k-row IVF build took 18 s spinning against 1.3 s sleeping (measured here).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import faiss
    except ImportError:
        raise ModelError(f"indexes need faiss: pip install 'clipcli[index]' ({way_out})") from None
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
    if not source.exists():
        raise InputError(f"{source}: does not exist")
    tag, dim = saved_tag(source)
    expect = Expect(tag.name, tag.sha256, dim)
    _folder_state(out)  # a folder of other files is refused before anything is written into it
    previous = _previous(out, tag.sha256, tag.name) if not rebuild else None
    with OutputLock(out, is_dir=True):
        ledger = _Ledger.claim(out)  # checked again under the lock
        fingerprint = source_fingerprint(source)
        saved = open_matrix(source, expect)
        keys, content = row_digests(saved)
        n = len(keys)
        # An update keeps the kind the index was built with; --kind (or --rebuild) changes it.
        chosen = Kind(previous.kind) if previous is not None and kind is Kind.AUTO else choose_kind(n, kind)
        updatable = previous is not None and previous.kind == chosen.value and chosen is not Kind.FLAT
        old = _previous_arrays(out, previous) if previous is not None and updatable else None
        if old is not None and previous is not None:
            report, arrays, meta_total, params, vectors = _interruptible(
                partial(_update, out, previous, old, saved, keys, content, on_progress)
            )
        else:
            _require_rows(source, chosen, n)  # an update trains nothing: it needs no minimum
            arrays, params, vectors = {"rows": _arange(n), "keys": keys, "content": content}, {}, None
            if chosen is not Kind.FLAT:
                vectors, params = _interruptible(partial(_train_and_add, chosen, saved, n, on_progress))
            report, meta_total = BuildReport(chosen, n, n, 0, 0, False), n
        ledger.start()  # the marker exists before the first data file does
        files = {"vectors": _write_faiss(out, vectors, ledger)} if vectors is not None else {}
        files.update((stem, _write_npy(out, stem, array, ledger)) for stem, array in arrays.items())
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
        _commit(out, meta, ledger)
    return report


def _require_rows(source: Path, kind: Kind, n: int) -> None:
    """Refuse a kind that cannot be built over ``n`` rows (faiss would fail half-way)."""
    if kind is Kind.FLAT:
        return
    if n == 0:
        raise InputError(f"{source}: no rows to index (--kind {kind.value}); embed some images first")
    if kind is Kind.IVFPQ and n < IVFPQ_MIN_ROWS:
        raise InputError(
            f"{source}: {n} rows, and --kind ivfpq needs at least {IVFPQ_MIN_ROWS}; use --kind flat or hnsw"
        )


def _interruptible(work: Callable[[], Any]) -> Any:
    """Run ``work`` (faiss's training and adding, minutes of C++ that holds off signal handlers) in a
    thread while this one waits in short steps, so that SIGTERM or Ctrl-C takes effect at once: the
    handler's exception leaves here, nothing has been written yet, and the process exits."""
    import threading

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as e:  # handed to the waiting thread
            outcome["error"] = e

    worker = threading.Thread(target=run, name="clipcli-index-build", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _folder_state(out: Path) -> Meta | bool | None:
    """What ``out`` is: None (new or empty), True (an index folder clipcli marked), a :class:`Meta` (an
    index written before folders were marked, adopted). Anything else is refused, naming the folder."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not an index folder; choose another output")
    try:
        names = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    except OSError as e:
        raise OutputError(f"{out}: cannot read ({describe_os_error(e)})") from e
    if MARKER in names:
        return True
    if not names:
        return None
    if META in names:
        try:
            return read_meta(out)
        except InputError:
            pass
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise OutputError(
        f"{out}: not an index folder clipcli made (it holds {shown}); choose a new or empty folder for the index"
    )


class _Ledger:
    """The marker file: what makes a folder an index clipcli made, and the data files it wrote there
    (each named before it is created, so a build killed half-way leaves nothing unaccounted for)."""

    def __init__(self, out: Path, written: list[str], marked: bool) -> None:
        self.out = out
        self.written = written
        self.marked = marked

    @classmethod
    def claim(cls, out: Path) -> _Ledger:
        state = _folder_state(out)
        if state is None:
            return cls(out, [], False)
        if isinstance(state, Meta):  # adopted: the files its meta.json names are clipcli's
            return cls(out, list(state.files.values()), False)
        try:
            written = json.loads((out / MARKER).read_text()).get("written", [])
        except (OSError, ValueError, AttributeError):
            written = []  # a damaged marker proves nothing: nothing it might have named is removed
        plain = [w for w in written if isinstance(w, str) and w == Path(w).name and w not in (META, MARKER)]
        return cls(out, plain, True)

    def start(self) -> None:
        if not self.marked:
            self.save()
            self.marked = True
        for name in (META, MARKER):  # temporaries of runs killed while replacing these two
            remove_temporaries(self.out / name)

    def add(self, name: str) -> None:
        self.written.append(name)
        self.save()

    def save(self) -> None:
        target = AtomicFile(self.out / MARKER)
        try:
            target.file.write(json.dumps({"clipcli": "index", "format": FORMAT, "written": self.written}).encode())
        except OSError as e:
            target.discard()
            raise OutputError(f"{self.out / MARKER}: cannot write ({describe_os_error(e, self.out)})") from e
        target.commit()


def _previous_arrays(out: Path, meta: Meta) -> tuple[np.ndarray, np.ndarray] | None:
    """The previous index's (keys, rows), or None when they do not fit together (then it is rebuilt)."""
    import numpy as np

    try:
        keys = np.load(out / meta.files["keys"])
        rows = np.load(out / meta.files["rows"])
    except (OSError, ValueError, KeyError):
        return None
    if keys.shape != (meta.total,) or rows.shape != (meta.total,) or rows.dtype.kind not in "iu":
        return None
    return keys.astype(np.uint64, copy=False), rows.astype(np.int64, copy=False)


def _previous(out: Path, sha256: str, model: str) -> Meta | None:
    """The index already at ``out``, if any; one for another model is refused rather than replaced."""
    if not (out / META).exists():
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


def content_digests(block: np.ndarray) -> np.ndarray:
    """A 64-bit digest of each stored embedding (rows as stored: float32 or float16 bits)."""
    import numpy as np

    block = np.ascontiguousarray(block)
    weights = np.random.default_rng(0x5EED).integers(1, 2**63, block.shape[1], dtype=np.uint64) | np.uint64(1)
    bits = block.view(np.uint16 if block.dtype == np.float16 else np.uint32).astype(np.uint64)
    with np.errstate(over="ignore"):
        return (bits * weights).sum(axis=1, dtype=np.uint64)


def row_digests(saved: SavedMatrix) -> tuple[np.ndarray, np.ndarray]:
    """Each row's key, a 64-bit digest of its name and stored embedding (equal keys, the same row), and
    the digest of its embedding alone."""
    import hashlib

    import numpy as np

    n = saved.matrix.shape[0]
    keys = np.empty(n, np.uint64)
    contents = np.empty(n, np.uint64)
    start = 0
    for names in saved.iter_names():
        stop = start + len(names)
        content = content_digests(saved.matrix[start:stop])
        named = np.array(
            [
                int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
                for s in names
            ],
            dtype=np.uint64,
        )
        keys[start:stop] = content ^ named
        contents[start:stop] = content
        start = stop
    if start != n:
        raise InputError(f"{saved.source}: {n} embeddings but {start} names; run embed again")
    return keys, contents


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

    faiss = _faiss("or build a flat index: --kind flat")
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
    out: Path,
    meta: Meta,
    old: tuple[np.ndarray, np.ndarray],
    saved: SavedMatrix,
    keys: np.ndarray,
    content: np.ndarray,
    on_progress: ProgressFn | None,
) -> tuple[BuildReport, dict[str, np.ndarray], int, dict[str, int], Any]:
    """Keep the ids whose row is unchanged (renumbered to its row now), mask the others, add new rows."""
    import numpy as np

    faiss = _faiss("or build a flat index: --kind flat")
    old_keys, old_rows = old
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
    try:
        index = faiss.read_index(str(out / meta.files["vectors"]))
    except (OSError, KeyError, RuntimeError) as e:
        raise InputError(f"{out}: cannot read the index ({e}); rebuild it with `clipcli index --rebuild`") from e
    for chunk in _chunks(saved, new_rows):
        index.add(chunk)
        if on_progress:
            on_progress(len(chunk))
    kept_rows = np.where(found, rows, 0)
    arrays = {
        "rows": np.concatenate([rows, new_rows]),
        "keys": np.concatenate([np.where(found, old_keys, 0), keys[new_rows]]).astype(np.uint64),
        "content": np.concatenate([np.where(found, content[kept_rows], 0), content[new_rows]]).astype(np.uint64),
    }
    masked = int(live.sum() - found.sum())
    report = BuildReport(Kind(meta.kind), len(keys), len(new_rows), masked, int(found.sum()), True)
    return report, arrays, len(arrays["rows"]), meta.params, index


def _durable(path: Path) -> None:
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_npy(out: Path, stem: str, array: np.ndarray, ledger: _Ledger) -> str:
    """A data file under a fresh name, listed in the marker before it is created; no ``meta.json``
    names it until it is whole, so it is written in place."""
    import numpy as np

    name = f"{stem}-{secrets.token_hex(4)}.npy"
    ledger.add(name)
    try:
        with open(out / name, "xb") as f:
            np.save(f, array)
        _durable(out / name)
    except OSError as e:
        raise OutputError(f"{out / name}: cannot write ({describe_os_error(e, out)})") from e
    return name


def _write_faiss(out: Path, index: Any, ledger: _Ledger) -> str:
    name = f"vectors-{secrets.token_hex(4)}.faiss"
    ledger.add(name)
    try:
        _faiss().write_index(index, str(out / name))
        _durable(out / name)
    except (OSError, RuntimeError) as e:
        raise OutputError(f"{out / name}: cannot write ({e})") from e
    return name


def _commit(out: Path, meta: Meta, ledger: _Ledger) -> None:
    """Replace ``meta.json`` (the commit point), then remove the data files clipcli wrote here that it
    no longer names: only files the marker lists, never anything else in the folder."""
    target = AtomicFile(out / META)
    target.file.write(json.dumps(asdict(meta)).encode())
    target.commit()
    keep = set(meta.files.values())
    for name in ledger.written:
        if name not in keep:
            (out / name).unlink(missing_ok=True)
    ledger.written = [name for name in ledger.written if name in keep]
    ledger.save()


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
            faiss = _faiss(f"or {command} with --no-index")
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
