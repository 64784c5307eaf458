"""Thumbnails made once and kept on disk: ``$CLIPCLI_CACHE/clipcli-thumbs`` unless told otherwise.

An entry is named by a digest of the file's real path, size, mtime and the thumbnail's size, so a file
changed on disk gets a new thumbnail and the old one ages out. Entries are written to a temporary
sibling and renamed into place (a reader never sees half a JPEG); the folder is kept under a size
bound by removing the least recently used entries (the oldest mtime: a hit touches its entry).

Only files this cache wrote are ever removed: entries named as it names them (``ab/ab12…(40 hex).jpg``)
in a folder that carries its ``CACHEDIR.TAG`` (the cache directory tag that backup tools skip). A folder
given to it must be new, empty or tagged (:meth:`ThumbCache.claim`): a photo folder sorted by month
(``01/IMG_0001.jpg``) is never taken for a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from pathlib import Path

from clipcli.atomic import replace_file
from clipcli.cache import cache_dir
from clipcli.errors import InputError
from clipcli.images.limits import DEFAULT_MAX_PIXELS

DEFAULT_MAX_BYTES = 512 << 20
TOUCH_AFTER_S = 3600.0  # a hit marks its entry as recently used at most this often
TAG_NAME = "CACHEDIR.TAG"
TAG_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"  # https://bford.info/cachedir/
TAG_TEXT = TAG_SIGNATURE + b"\n# clipcli's thumbnail cache: clipcli removes only the thumbnails it made here.\n"
ENTRY_NAME = re.compile(r"^[0-9a-f]{40}\.jpg$")


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

    def claim(self) -> None:
        """Tag the folder as this cache (creating it), or refuse one that holds anything else: only a new
        or empty folder, one already tagged, or clipcli's own default folder becomes a cache. Raises
        InputError; a folder that cannot be written is left alone (thumbnails are then made each time)."""
        if self.tagged():
            return
        if self.folder.is_symlink() and not self.folder.exists():
            raise InputError(f"{self.folder}: is a link to nothing; name a new or empty folder for --thumb-cache")
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"{self.folder}: is not a folder; name a new or empty one for --thumb-cache")
        try:
            held = os.listdir(self.folder) if self.folder.is_dir() else []
        except OSError:
            return
        if held and self.folder != thumbs_cache_dir():
            raise InputError(
                f"{self.folder}: holds {sorted(held)[0]} and is not a thumbnail cache clipcli made (it has no "
                f"{TAG_NAME} of clipcli's); name a new or empty folder for --thumb-cache"
            )
        with contextlib.suppress(OSError):
            _write_whole(self.folder / TAG_NAME, TAG_TEXT)

    def tagged(self) -> bool:
        """Whether the folder carries this cache's own tag, word for word (its entries may then be removed):
        another tool's tag, which has the same signature, does not make a folder clipcli's."""
        try:
            with open(self.folder / TAG_NAME, "rb") as f:
                return f.read(len(TAG_TEXT)) == TAG_TEXT
        except OSError:
            return False

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
        _write_whole(entry, data)
        with self.lock:
            if self.total is None:
                self.total = sum(size for _, size, _ in self._entries())
            else:
                self.total += len(data)
            if self.total > self.max_bytes:
                self._evict()

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every entry this cache wrote: none in a folder without its tag."""
        found: list[tuple[float, int, Path]] = []
        if not self.folder.is_dir() or not self.tagged():
            return found
        for sub in os.scandir(self.folder):
            if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                continue
            for f in os.scandir(sub.path):
                own = ENTRY_NAME.match(f.name) and f.name.startswith(sub.name)
                if own and f.is_file(follow_symlinks=False):
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


def _write_whole(path: Path, data: bytes) -> None:
    """``data`` as ``path`` (its folder made if need be), written to a temporary sibling of this thread's
    and renamed into place: a reader never sees half of it, and a killed writer leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
