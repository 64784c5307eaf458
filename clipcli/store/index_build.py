"""Building an index and bringing it up to date (see :mod:`clipcli.store.index` for what an index folder holds):
the marker's ledger of the files clipcli wrote, faiss training and adding in chunks, masking gone rows, and the
commit (data files first, ``meta.json`` last)."""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.atomic import LOCK_NAME, AtomicFile, OutputLock, describe_os_error, remove_temporaries
from clipcli.errors import InputError, ModelError, OutputError
from clipcli.store.index import (
    CHUNK,
    FORMAT,
    IVFPQ_MIN_ROWS,
    MARKER,
    META,
    Kind,
    Meta,
    ProgressFn,
    choose_kind,
    content_digests,
    default_index_path,
    load_faiss,
    read_meta,
)
from clipcli.store.saved import Expect, SavedMatrix, open_matrix, saved_tag, source_fingerprint

if TYPE_CHECKING:
    import numpy as np


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


DATA_FILE = re.compile(r"[a-z]+-[0-9a-f]{8}\.(?:npy|faiss)")  # as _write_npy and _write_faiss name them


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
        if isinstance(state, Meta):
            # An index from before folders were marked is taken over, but a meta.json proves nothing about
            # who wrote the files it names: they are left where they are, never removed.
            return cls(out, [], False)
        try:
            written = json.loads((out / MARKER).read_text()).get("written", [])
        except (OSError, ValueError, AttributeError):
            written = []  # a damaged marker proves nothing: nothing it might have named is removed
        # Only names of the form clipcli gives its data files: a marker copied or forged to list other
        # files (photo.jpg, ../x) gets none of them removed.
        plain = [w for w in written if isinstance(w, str) and DATA_FILE.fullmatch(w)]
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

    faiss = load_faiss("or build a flat index: --kind flat")
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

    faiss = load_faiss("or build a flat index: --kind flat")
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
        load_faiss().write_index(index, str(out / name))
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
