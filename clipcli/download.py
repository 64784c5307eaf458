"""Checksum-verified, atomic downloads: a file appears under its final name only once verified."""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from clipcli.errors import DownloadError

_CHUNK = 1 << 20


def fetch(
    url: str,
    dest: Path,
    sha256: str,
    progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download ``url`` to ``dest``, checking its SHA-256; never leaves a partial file at ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so the final rename is atomic; the pid keeps concurrent downloads apart.
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        digest = hashlib.sha256()
        received = 0
        with urllib.request.urlopen(url, timeout=timeout) as response, tmp.open("wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if progress:
                    progress(len(chunk), total)
            out.flush()
            os.fsync(out.fileno())
        if total is not None and received != total:
            raise DownloadError(f"connection closed after {received} of {total} bytes from {url}")
        if digest.hexdigest() != sha256.lower():
            raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest.hexdigest()}")
        os.replace(tmp, dest)
        return dest
    except http.client.IncompleteRead as e:
        raise DownloadError(f"connection closed after {received + len(e.partial)} bytes from {url}") from e
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot reach {url} ({e.reason})") from e
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"download of {url} failed ({e})") from e
    finally:
        tmp.unlink(missing_ok=True)
