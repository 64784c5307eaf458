"""Thumbnails made once and kept on disk: ``$CLIPCLI_CACHE/clipcli-thumbs`` unless told otherwise.

An entry is named by a digest of the file's real path, size, mtime and the thumbnail's size, so a file
changed on disk gets a new thumbnail and the old one ages out. Entries are written to a temporary
sibling and renamed into place (a reader never sees half a JPEG); the folder is kept under a size
bound by removing the least recently used entries (the oldest mtime: a hit touches its entry). Only
files this cache wrote (``*.jpg`` in its two-letter subfolders) are ever removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

from clipcli.atomic import replace_file
from clipcli.cache import cache_dir
from clipcli.images.limits import DEFAULT_MAX_PIXELS

DEFAULT_MAX_BYTES = 512 << 20
TOUCH_AFTER_S = 3600.0  # a hit marks its entry as recently used at most this often


def thumbs_cache_dir() -> Path:
    return cache_dir() / "clipcli-thumbs"


class ThumbCache:
    def __init__(
        self,
        folder: Path | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.folder = folder or thumbs_cache_dir()
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.lock = threading.Lock()
        self.total: int | None = None  # bytes held, counted on the first write

    def key(self, file: Path, size: int, member: str | None = None) -> tuple[str, Path]:
        """The entry's digest (also the thumbnail's ETag) and its path; raises OSError for a missing file."""
        st = os.stat(file)
        name = f"{file}\0{st.st_size}\0{st.st_mtime_ns}\0{size}" + (f"\0{member}" if member is not None else "")
        digest = hashlib.sha256(name.encode()).hexdigest()[:40]
        return digest, self.folder / digest[:2] / f"{digest}.jpg"

    def get(self, file: Path, size: int, member: str | None = None) -> tuple[bytes, str]:
        """The thumbnail of ``file`` (a real path already checked by the caller; with ``member``, that
        member of it) and its ETag: from the cache, or made and kept. Raises OSError or ValueError for a
        file that is not a readable image."""
        from clipcli.images.thumbs import thumbnail_jpeg

        digest, entry = self.key(file, size, member)
        try:
            data = entry.read_bytes()
            if time.time() - entry.stat().st_mtime > TOUCH_AFTER_S:
                with contextlib.suppress(OSError):
                    os.utime(entry)
            return data, digest
        except OSError:
            pass
        data = thumbnail_jpeg(file, size, self.max_pixels, member)
        with contextlib.suppress(OSError):  # a cache that cannot be written still serves the thumbnail
            self._put(entry, data)
        return data, digest

    def _put(self, entry: Path, data: bytes) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(data)
            replace_file(tmp, entry)
        finally:
            tmp.unlink(missing_ok=True)
        with self.lock:
            if self.total is None:
                self.total = sum(size for _, size, _ in self._entries())
            else:
                self.total += len(data)
            if self.total > self.max_bytes:
                self._evict()

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every entry this cache wrote."""
        found: list[tuple[float, int, Path]] = []
        if not self.folder.is_dir():
            return found
        for sub in os.scandir(self.folder):
            if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                continue
            for f in os.scandir(sub.path):
                if f.name.endswith(".jpg") and not f.name.startswith(".") and f.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        st = f.stat(follow_symlinks=False)
                        found.append((st.st_mtime, st.st_size, Path(f.path)))
        return found

    def _evict(self) -> None:
        """Remove the least recently used entries until the cache holds 90% of its bound."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        goal = self.max_bytes * 9 // 10
        for _, size, path in entries:
            if total <= goal:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
        self.total = total
