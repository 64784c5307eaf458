"""The checksum-verified, atomic download, against servers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipcli.download import fetch
from clipcli.errors import DownloadError, ModelError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.endswith("/missing.pt"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if "/cut/" in self.path:
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)  # drop the connection mid-file
            return
        self.wfile.write(PAYLOAD)


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


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
    from clipcli import models

    data = vit_ckpt.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(models.OPENAI_MODELS, "RN50", f"{sha}/RN50.pt")
    monkeypatch.setattr(_Handler, "do_GET", lambda self: _serve(self, data))
    monkeypatch.setenv("CLIPCLI_MIRROR", server)
    monkeypatch.setenv("CLIPCLI_CACHE", str(tmp_path / "cache"))
    lm = models.load_model("RN50", "cpu", "fp32")
    assert lm.path == tmp_path / "cache" / "RN50.pt" and lm.path.read_bytes() == data
    # A second load uses the cache: with the server gone it still works.
    monkeypatch.setenv("CLIPCLI_MIRROR", "http://127.0.0.1:9")
    assert models.load_model("RN50", "cpu", "fp32").path == lm.path
    monkeypatch.setitem(models.OPENAI_MODELS, "RN101", "0" * 64 + "/RN101.pt")
    with pytest.raises(ModelError, match="could not be downloaded"):
        models.load_model("RN101", "cpu")


def _serve(handler: http.server.BaseHTTPRequestHandler, data: bytes) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
