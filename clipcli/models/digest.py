"""SHA-256 of model files, read once per version of the file rather than on every run.

A checkpoint's digest names its weights in every output and cache, so each run needs it; hashing a
350 MB ViT-B/32 costs about 0.3 s on 2 cores, in proportion for larger files, on every `classify` of one
photo.
The digest is remembered under the file's identity on disk: path, device, inode, size, and the
modification and change times in nanoseconds. Rewriting a file changes its change time even when its
size and modification time are put back, so a remembered digest is never that of other bytes. A cache
that cannot be read or written (a read-only home) only means reading the file again. No digest is ever
taken from a file's name (a Hugging Face cache blob is named by its SHA-256, but a path can be made to
look like one), so a replaced or corrupted blob is caught too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from pathlib import Path

from clipcli.cache import cache_dir

_HEX = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: Path) -> str:
    """The SHA-256 of ``path``'s bytes, from the cache when this version of the file was hashed before."""
    real = path.resolve()
    st = real.stat()
    identity = f"{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    entry = cache_dir() / "clipcli-digests" / hashlib.sha256(identity.encode()).hexdigest()
    with contextlib.suppress(OSError, UnicodeDecodeError):
        remembered = _read_entry(entry)
        if _HEX.fullmatch(remembered):
            return remembered
    digest = _read_sha256(real)
    with contextlib.suppress(OSError):
        _remember(entry, digest)
    return digest


def _read_entry(entry: Path) -> str:
    """An entry's text; anything but a small regular file (a FIFO would block for ever) is no entry."""
    fd = os.open(entry, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return f.read(100).decode("ascii").strip()


def _read_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _remember(entry: Path, digest: str) -> None:
    """Written whole or not at all, so that two runs at once never leave half a digest."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(digest + "\n", encoding="ascii")
        os.replace(tmp, entry)
    finally:
        tmp.unlink(missing_ok=True)
