"""SHA-256 of model files, read once per version of the file rather than on every run.

A checkpoint's digest names its weights in every output and cache, so each run needs it; hashing a
350 MB ViT-B/32 costs about 0.3 s on 2 cores, in proportion for larger files, on every `classify` of one
photo.
The digest is remembered under the file's identity on disk: path, device, inode, size, and the
modification and change times in nanoseconds. Rewriting a file changes its change time even when its
size and modification time are put back, so a remembered digest is never that of other bytes. A cache
that cannot be read or written (a read-only home) only means reading the file again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

from clipcli.cache import cache_dir

_HEX = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: Path) -> str:
    """The SHA-256 of ``path``'s bytes, from the cache when this version of the file was hashed before."""
    real = path.resolve()
    if real.parent.name == "blobs" and _HEX.fullmatch(real.name):  # a Hugging Face cache blob: named by its SHA-256
        return real.name
    st = real.stat()
    identity = f"{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    entry = cache_dir() / "clipcli-digests" / hashlib.sha256(identity.encode()).hexdigest()
    with contextlib.suppress(OSError, UnicodeDecodeError):
        remembered = entry.read_text(encoding="ascii").strip()
        if _HEX.fullmatch(remembered):
            return remembered
    digest = _read_sha256(real)
    with contextlib.suppress(OSError):
        _remember(entry, digest)
    return digest


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
