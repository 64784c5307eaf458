"""The checksum-verified, atomic download, against servers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clipcli.errors import DownloadError, ModelError
from clipcli.models.download import fetch

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.endswith("/missing.pt"):
            self.send_error(404)
            return
        if "/slow-headers/" in self.path:  # a status line, then a header one byte at a time, for ever
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._send_slowly(b"X-Pad: " + b"a" * 10_000, 1, 0.1)
            return
        if "/endless/" in self.path:  # no Content-Length, and a body that never ends
            self.send_response(200)
            self.end_headers()
            self._send_slowly(PAYLOAD * 10_000, 256 << 10, 0)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD) * (10_000 if "/huge/" in self.path else 1)))
        self.end_headers()
        for kind, piece, pause in (("trickle", 1, 0.1), ("steady", 64 << 10, 0.1), ("silent", 0, 30.0)):
            if f"/{kind}/" in self.path:
                self._send_slowly(PAYLOAD, piece, pause)
                return
        if "/hang/" in self.path:  # half the file, then nothing until the test ends
            self._send_slowly(PAYLOAD[: len(PAYLOAD) // 2], len(PAYLOAD) // 2, 0)
            self.server.stop.wait(60)  # type: ignore[attr-defined]
            return
        if "/cut/" in self.path:
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection mid-file
            return
        self.wfile.write(PAYLOAD)

    def _send_slowly(self, data: bytes, piece: int, pause: float) -> None:
        """``piece`` bytes every ``pause`` seconds (none: silence) until done, the client goes or the test ends."""
        stop: threading.Event = self.server.stop  # type: ignore[attr-defined]
        try:
            for start in range(0, len(data), piece or len(data)):
                if stop.wait(pause) or not piece:
                    return
                self.wfile.write(data[start : start + piece])
                self.wfile.flush()
        except OSError:
            return  # the client gave up


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.stop = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.stop.set()  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``'s result or exception, failing the test if it has neither after ``seconds``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_download_succeeds_with_progress(server: str, tmp_path: Path):
    seen: list[tuple[int, int | None]] = []
    dest = fetch(f"{server}/{SHA}/model.pt", tmp_path / "cache" / "model.pt", SHA, lambda n, t: seen.append((n, t)))
    assert dest.read_bytes() == PAYLOAD
    assert sum(n for n, _ in seen) == len(PAYLOAD) and seen[0][1] == len(PAYLOAD)
    assert [p.name for p in dest.parent.iterdir()] == ["model.pt"]


def test_wrong_hash_leaves_nothing(server: str, tmp_path: Path):
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(f"{server}/x/model.pt", tmp_path / "model.pt", "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_connection_cut_mid_file_leaves_nothing(server: str, tmp_path: Path):
    with pytest.raises(DownloadError, match="connection closed after"):
        fetch(f"{server}/cut/model.pt", tmp_path / "model.pt", SHA)
    assert list(tmp_path.iterdir()) == []


def test_http_error(server: str, tmp_path: Path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server}/missing.pt", tmp_path / "missing.pt", SHA)


def test_named_model_downloads_through_a_mirror_into_the_cache(server, tmp_path, monkeypatch, vit_ckpt):
    """The whole path a user takes: name -> mirror URL -> verified file in the cache -> model."""
    from clipcli.models import loader as models
    from clipcli.models.families import openai

    data = vit_ckpt.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(openai.OPENAI_MODELS, "RN50", f"{sha}/RN50.pt")
    monkeypatch.setattr(_Handler, "do_GET", lambda self: _serve(self, data))
    monkeypatch.setenv("CLIPCLI_MIRROR", server)
    monkeypatch.setenv("CLIPCLI_CACHE", str(tmp_path / "cache"))
    lm = models.load_model("RN50", "cpu", "fp32")
    assert lm.path == tmp_path / "cache" / "RN50.pt" and lm.path.read_bytes() == data
    # A second load uses the cache: with the server gone it still works.
    monkeypatch.setenv("CLIPCLI_MIRROR", "http://127.0.0.1:9")
    assert models.load_model("RN50", "cpu", "fp32").path == lm.path
    monkeypatch.setitem(openai.OPENAI_MODELS, "RN101", "0" * 64 + "/RN101.pt")
    with pytest.raises(ModelError, match="could not be downloaded"):
        models.load_model("RN101", "cpu")


def _serve(handler: http.server.BaseHTTPRequestHandler, data: bytes) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.mark.parametrize(("kind", "said"), [("endless", "sent more than"), ("huge", "would send")])
def test_a_body_longer_than_it_may_be_is_abandoned_as_it_arrives(server: str, tmp_path: Path, kind: str, said: str):
    """Found by attack: an endless body was written until the disk was full; the checksum comes only at the end."""
    dest = tmp_path / "m.pt"
    with pytest.raises(DownloadError, match=said):
        within(30, lambda: fetch(f"{server}/{kind}/m.pt", dest, SHA, max_bytes=4 << 20))
    assert list(tmp_path.iterdir()) == []


def test_a_trickling_server_is_given_up_on_as_stalled(server: str, tmp_path: Path):
    """Ten bytes a second never trip a per-read timeout; the stall rule ends it after its window."""
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"^download stalled: less than 1 MiB in 1 s from http"):
        within(20, lambda: fetch(f"{server}/trickle/model.pt", tmp_path / "model.pt", SHA, stall_seconds=1))
    assert time.monotonic() - started < 10
    assert list(tmp_path.iterdir()) == []


def test_a_silent_server_is_given_up_on_within_the_stall_window(server: str, tmp_path: Path):
    with pytest.raises(DownloadError, match=r"^download stalled: nothing received in 1 s"):
        within(20, lambda: fetch(f"{server}/silent/model.pt", tmp_path / "model.pt", SHA, stall_seconds=1))
    assert list(tmp_path.iterdir()) == []


def test_a_server_trickling_its_headers_is_given_up_on(server: str, tmp_path: Path):
    """urlopen returns only with the whole header, and each byte resets the socket's timeout."""
    with pytest.raises(DownloadError, match=r"^download stalled: no complete response in 1 s from http"):
        within(20, lambda: fetch(f"{server}/slow-headers/model.pt", tmp_path / "model.pt", SHA, stall_seconds=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_slow_but_steady_download_is_not_a_stall(server: str, tmp_path: Path):
    """64 KiB every 0.1 s for 1.6 s: every 0.5 s window brings its 128 KiB, so the download completes."""
    url = f"{server}/steady/model.pt"
    dest = within(20, lambda: fetch(url, tmp_path / "model.pt", SHA, stall_bytes=128 << 10, stall_seconds=0.5))
    assert dest.read_bytes() == PAYLOAD


def test_parts_left_by_dead_processes_are_removed_and_no_others(server: str, tmp_path: Path):
    dead = tmp_path / ".model.pt.99999999.part"
    live = tmp_path / f".model.pt.{os.getppid()}.part"  # another download of the same file, still running
    other = tmp_path / ".other.pt.99999999.part"  # another file's: the next fetch of that one removes it
    for part in (dead, live, other):
        part.write_bytes(b"partial")
    fetch(f"{server}/{SHA}/model.pt", tmp_path / "model.pt", SHA)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "model.pt"])


def test_a_download_killed_midway_leaves_a_part_that_the_next_fetch_removes(server: str, tmp_path: Path):
    dest = tmp_path / "cache" / "model.pt"
    script = (
        "import sys, pathlib, clipcli.models.download as d; "
        "d.fetch(sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3])"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, f"{server}/hang/model.pt", str(dest), SHA])
    part = dest.with_name(f".model.pt.{proc.pid}.part")
    try:
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
            assert proc.poll() is None, "the download ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)  # reaped: a zombie would still count as a live process
    assert part.exists() and 0 < part.stat().st_size <= len(PAYLOAD) // 2
    within(30, lambda: fetch(f"{server}/{SHA}/model.pt", dest, SHA))
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in dest.parent.iterdir()] == ["model.pt"]
