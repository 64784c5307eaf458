"""A memory-mapped copy of saved Parquet embeddings, so that repeated searches skip Parquet decoding.

Decoding Parquet's nested ``embedding`` column costs an order of magnitude more than scanning the same
rows memory-mapped from an ``.npy`` file (figures in the README's benchmark section). So the first search over
a Parquet file or directory copies its embeddings, row for row, to
``$CLIPCLI_CACHE/clipcli-search/<key>/matrix.npy``; later searches use that copy for as long as every
part file keeps its name, size, mtime, inode and ctime, and rebuild it when one changes: a file put
back with its old size and mtime (``cp -p``, ``touch -r``, a restored backup) still has a new ctime,
which no user call can set. Paths are not copied: the few that win a search are read back from their
part files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.atomic import replace_file, temporary_sibling
from clipcli.cache import cache_dir

if TYPE_CHECKING:
    import numpy as np

_VERSION = 2  # 2: parts identified by inode and ctime too


def search_cache_dir() -> Path:
    return cache_dir() / "clipcli-search"


def _entry(source: Path) -> Path:
    return search_cache_dir() / hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:32]


def fingerprint(parts: list[Path]) -> list[list[Any]]:
    """What must not change for a cached copy to stand: each part's name, size and mtime."""
    stats = [(p, p.stat()) for p in parts]
    return [[p.name, st.st_size, st.st_mtime_ns] for p, st in stats]


def identity(parts: list[Path]) -> list[list[Any]]:
    """What must not change for a cached copy to stand: the fingerprint, and each part's inode and
    ctime (rewriting or replacing a file sets its ctime to now, whatever mtime it is given)."""
    stats = [(p, p.stat()) for p in parts]
    return [[p.name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns] for p, st in stats]


@dataclass(frozen=True)
class Cached:
    matrix: np.ndarray  # memory-mapped, rows in part order, as stored (float32 or float16)
    rows: list[int]  # rows per part, in the order of the fingerprint
    key: str  # "path" or "text"
    normalized: bool


def load(source: Path, parts: list[Path], model_sha256: str) -> Cached | None:
    """The cached copy of ``parts`` if it is complete and current, else None."""
    import numpy as np

    entry = _entry(source)
    try:  # anything missing, stale or damaged means no copy: the search decodes the parts instead
        manifest = json.loads((entry / "manifest.json").read_text())
        if not isinstance(manifest, dict):
            return None
        if (
            manifest.get("version") != _VERSION
            or manifest.get("model_sha256") != model_sha256
            or manifest.get("parts") != identity(parts)
        ):
            return None
        rows = [int(n) for n in manifest["rows"]]
        cached = Cached(np.load(entry / "matrix.npy", mmap_mode="r"), rows, manifest["key"], manifest["normalized"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if cached.matrix.ndim != 2 or cached.matrix.shape[0] != sum(rows):
        return None
    return cached


class Builder:
    """Fills a new copy chunk by chunk while the first search decodes the parts; commits at the end.

    The manifest is removed before and written after the matrix, so a build that dies half-way leaves
    no copy that would be trusted. Any OSError (read-only cache, full disk) just means no copy.
    """

    def __init__(self, source: Path, parts: list[Path], rows: list[int], dim: int, dtype: np.dtype) -> None:
        import numpy as np

        self.entry = _entry(source)
        self.manifest: dict[str, Any] = {"version": _VERSION, "parts": identity(parts), "rows": rows}
        self.entry.mkdir(parents=True, exist_ok=True)
        (self.entry / "manifest.json").unlink(missing_ok=True)
        self.tmp = temporary_sibling(self.entry / "matrix.npy")
        self.matrix = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=(sum(rows), dim))
        self.filled = 0

    def add(self, chunk: np.ndarray) -> None:
        self.matrix[self.filled : self.filled + len(chunk)] = chunk
        self.filled += len(chunk)

    def commit(self, model_sha256: str, key: str, normalized: bool) -> None:
        if self.filled != self.matrix.shape[0]:
            return self.abandon()
        self.matrix.flush()
        del self.matrix
        replace_file(self.tmp, self.entry / "matrix.npy")
        self.manifest.update(model_sha256=model_sha256, key=key, normalized=normalized)
        manifest_tmp = temporary_sibling(self.entry / "manifest.json")
        manifest_tmp.write_text(json.dumps(self.manifest))
        replace_file(manifest_tmp, self.entry / "manifest.json")

    def abandon(self) -> None:
        self.__dict__.pop("matrix", None)
        self.tmp.unlink(missing_ok=True)
