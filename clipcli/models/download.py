"""Checksum-verified, atomic downloads: a file appears under its final name only once verified."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipcli.atomic import replace_file, temporary_sibling
from clipcli.errors import DownloadError

_CHUNK = 1 << 20
_PART = "part"

# A download slower than this is stalled: urllib's timeout bounds each socket read, so a server that
# trickles a byte every few seconds would otherwise hold the run for ever.
STALL_BYTES = 1 << 20
STALL_SECONDS = 60.0
# A response longer than this (or than its Content-Length) is abandoned as it arrives: an endless body
# would otherwise fill the disk before the checksum is ever checked. OpenAI's largest model is 1.3 GB.
MAX_BYTES = 2 << 30


def fetch(
    url: str,
    dest: Path,
    sha256: str,
    progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 30.0,
    stall_bytes: int = STALL_BYTES,
    stall_seconds: float = STALL_SECONDS,
    max_bytes: int = MAX_BYTES,
) -> Path:
    """Download ``url`` to ``dest``, checking its SHA-256; never leaves a partial file at ``dest``.

    Gives up with :class:`DownloadError` when fewer than ``stall_bytes`` arrive in ``stall_seconds``, and
    as soon as more than ``max_bytes`` arrive (or a Content-Length says they would).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_parts(dest)
    # Same folder, so the final rename is atomic; the pid keeps concurrent downloads apart.
    tmp = temporary_sibling(dest, _PART)
    # A server that sends nothing at all is caught by the socket timeout, within one stall window too.
    read_timeout = min(timeout, stall_seconds)
    try:
        digest = hashlib.sha256()
        received = 0
        with (
            _open_within(url, read_timeout, stall_seconds) as response,
            tmp.open("wb") as out,
        ):
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            # read() waits for the whole chunk, which a trickle can take hours to fill; read1() returns
            # what one socket read brings, so the stall check below runs as each piece arrives.
            read = getattr(response, "read1", response.read)
            stall = _StallCheck(stall_bytes, stall_seconds)
            if total is not None and total > max_bytes:
                raise DownloadError(f"{url} would send {total} bytes, more than a model download may be ({max_bytes})")
            while chunk := read(_CHUNK):  # http.client reads no further than a Content-Length
                if received + len(chunk) > max_bytes:
                    raise DownloadError(f"{url} sent more than a model download may be ({max_bytes} bytes); abandoned")
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if progress:
                    progress(len(chunk), total)
                stall.received(len(chunk))
        if total is not None and received != total:
            raise DownloadError(f"connection closed after {received} of {total} bytes from {url}")
        if digest.hexdigest() != sha256.lower():
            raise DownloadError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest.hexdigest()}")
        replace_file(tmp, dest)
        return dest
    except _Stalled as e:
        raise DownloadError(f"download stalled: {e} from {url}") from None
    except http.client.IncompleteRead as e:
        raise DownloadError(f"connection closed after {received + len(e.partial)} bytes from {url}") from e
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot reach {url} ({e.reason})") from e
    except TimeoutError as e:
        raise DownloadError(f"download stalled: nothing received in {read_timeout:g} s from {url}") from e
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"download of {url} failed ({e})") from e
    finally:
        tmp.unlink(missing_ok=True)


class _Stalled(Exception):
    pass


def _open_within(url: str, read_timeout: float, deadline: float) -> Any:
    """``urlopen``, abandoned when the status line and headers take longer than ``deadline`` seconds.

    A server that trickles its headers a byte at a time never trips the socket's per-read timeout, and
    urlopen returns only once they are complete: so it runs in a thread the download waits on for at
    most ``deadline``. An abandoned thread holds only its socket, which the process's exit closes.
    """
    import threading

    opened: list[Any] = []
    failed: list[BaseException] = []

    def open_url() -> None:
        try:
            opened.append(urllib.request.urlopen(url, timeout=read_timeout))
        except BaseException as e:
            failed.append(e)

    opener = threading.Thread(target=open_url, name="clipcli-download", daemon=True)
    opener.start()
    opener.join(deadline)
    if opener.is_alive():
        raise _Stalled(f"no complete response in {deadline:g} s")
    if failed:
        raise failed[0]
    return opened[0]


class _StallCheck:
    """Raises :class:`_Stalled` once ``stall_bytes`` take longer than ``stall_seconds`` to arrive.

    Windows follow one another: each starts when the previous one has received its ``stall_bytes``.
    """

    def __init__(self, stall_bytes: int, stall_seconds: float) -> None:
        self.stall_bytes = stall_bytes
        self.stall_seconds = stall_seconds
        self.window_start = time.monotonic()
        self.in_window = 0

    def received(self, n: int) -> None:
        now = time.monotonic()
        self.in_window += n
        if self.in_window >= self.stall_bytes:
            self.window_start, self.in_window = now, 0
        elif now - self.window_start > self.stall_seconds:
            raise _Stalled(f"less than {_describe_bytes(self.stall_bytes)} in {self.stall_seconds:g} s")


def _describe_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def remove_abandoned_parts(dest: Path) -> None:
    """Remove partial downloads of ``dest`` whose process is gone (killed mid-download).

    Other processes may be downloading into the same cache, this very file included: only a part whose
    pid names no live process is abandoned.
    """
    with contextlib.suppress(OSError):
        for part in dest.parent.glob(f".{glob.escape(dest.name)}.*.{_PART}"):
            pid = part.name[len(dest.name) + 2 : -len(_PART) - 1]
            if pid.isdigit() and not _process_alive(int(pid)):
                part.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # os.kill(pid, 0) would end the process there; keep the part rather than guess
    try:
        os.kill(pid, 0)  # signal 0: checks that the process exists, sends nothing
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid we cannot ask about): not ours to judge
    return True
