"""`clipcli serve`'s JSON API, tested with an HTTP client against a real server process on 127.0.0.1.

One server over a copy of samples/ (embedded with the bundled tiny-shapes model) answers most tests;
the tests that change a dataset, stop a server or listen beyond loopback start servers of their own.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serve_helpers import OLD_FILES, SAMPLES, Server, embed, no_traceback, photo_tree, running_server


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A server over photos/ (samples/ copied, two files dated 2019), with a file outside the tree."""
    root = tmp_path_factory.mktemp("serve")
    env = {"CLIPCLI_CACHE": str(root / "cache")}
    photos = photo_tree(root)
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes((SAMPLES / "seen" / "red-square.jpg").read_bytes())
    # A row whose file is a link out of the tree, embedded as any other file.
    os.symlink(outside / "secret.jpg", photos / "seen" / "linked-out.jpg")
    embed(root, ["photos"], "emb/", env)
    with running_server(["emb", "-m", "tiny-shapes", "--max-upload-mb", "1"], root, env) as server:
        yield server, root


@pytest.fixture
def client(site: tuple[Server, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=site[0].base, timeout=30) as c:
        yield c


def search(client: httpx.Client, **params: object) -> dict:
    response = client.get("/api/search", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_text_query_finds_its_shape_first_and_its_thumbnail_is_served(client: httpx.Client) -> None:
    data = search(client, q="a red circle", page_size=5)
    paths = [r["path"] for r in data["results"]]
    scores = [r["score"] for r in data["results"]]
    assert paths[0].endswith("red-circle.jpg"), paths
    assert scores == sorted(scores, reverse=True)
    thumb = client.get(data["results"][0]["thumb"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert max(im.size) <= 256
    again = client.get(data["results"][0]["thumb"], headers={"If-None-Match": thumb.headers["etag"]})
    assert again.status_code == 304
    odd = client.get("/api/thumb", params={"path": paths[0], "size": 100})
    assert odd.status_code == 400 and "size must be one of" in odd.json()["detail"], odd.text


def test_pages_follow_each_other_without_overlap(client: httpx.Client) -> None:
    whole = [r["path"] for r in search(client, q="a blue star", page_size=10)["results"]]
    first, second = (search(client, q="a blue star", page_size=5, page=p) for p in (1, 2))
    assert first["more"] and [r["path"] for r in first["results"] + second["results"]] == whole


def test_the_auto_cutoff_keeps_what_stands_out(client: httpx.Client) -> None:
    present = search(client, q="a red circle", cutoff="auto")
    assert present["results"] and all(r["path"].endswith("red-circle.jpg") for r in present["results"])
    assert all(r["score"] >= present["cutoff"] for r in present["results"])
    plain = search(client, q="a red circle", page_size=10)
    assert len(plain["results"]) > len(present["results"])


def test_a_date_filter_keeps_the_photos_of_those_days(client: httpx.Client) -> None:
    old = search(client, q="a shape", before="2019-12-31", page_size=50)["results"]
    assert sorted(r["path"] for r in old) == sorted(f"photos/{name}" for name in OLD_FILES)
    recent = search(client, q="a shape", after="2020-01-01", page_size=50)["results"]
    assert recent and not {r["path"] for r in recent} & {r["path"] for r in old}


def test_a_where_filter_and_its_errors(client: httpx.Client) -> None:
    found = search(client, q="a red circle", where="folder LIKE '%held-out%'", page_size=50)["results"]
    assert found and all(r["path"].startswith("photos/held-out/") for r in found)
    bad = client.get("/api/search", params={"q": "x", "where": "colour = 'red'"})
    assert bad.status_code == 400 and "colour" in bad.json()["detail"]
    sneaky = client.get("/api/search", params={"q": "x", "where": "length(read_text('/etc/passwd')) > 0"})
    assert sneaky.status_code == 400


def test_a_malformed_query_is_one_message_naming_the_column(client: httpx.Client) -> None:
    response = client.get("/api/search", params={"q": '"a red circle" +'})
    assert response.status_code == 400 and "column" in response.json()["detail"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_min_score_that_is_no_number_is_refused(client: httpx.Client, value: str) -> None:
    """`min_score=nan` answered 200 with no results: every comparison with NaN is false."""
    response = client.get("/api/search", params={"q": "a red circle", "min_score": value})
    assert response.status_code == 422 and "min_score" in response.text


def test_negative_texts_are_the_query_language_s_minus(client: httpx.Client) -> None:
    with_negative = search(client, q="a blue star", negative="blue", page_size=8)["results"]
    written_out = search(client, q='"a blue star" - "blue"', page_size=8)["results"]
    assert [(r["path"], r["score"]) for r in with_negative] == [(r["path"], r["score"]) for r in written_out]
    plain = search(client, q="a blue star", page_size=8)["results"]
    assert [r["path"] for r in plain] != [r["path"] for r in with_negative]


def test_info_names_the_model_and_the_date_column(client: httpx.Client, site: tuple[Server, Path]) -> None:
    info = client.get("/api/info").json()
    assert info["model"] == "tiny-shapes" and info["max_upload_bytes"] == 1 << 20
    (dataset,) = info["datasets"]
    assert (
        dataset["rows"] == len(list((site[1] / "photos").rglob("*.jpg")))
        and dataset["date_column"] in ("taken", "mtime")
        and "folder" in dataset["columns"]
    )


def test_more_like_this_leaves_the_image_out_and_finds_its_copy(client: httpx.Client) -> None:
    response = client.get("/api/similar", params={"path": "photos/held-out/red-circle.jpg", "page_size": 3})
    assert response.status_code == 200, response.text
    paths = [r["path"] for r in response.json()["results"]]
    assert "photos/held-out/red-circle.jpg" not in paths and paths[0] == "photos/busy/red-circle.jpg"
    assert client.get("/api/similar", params={"path": "/etc/passwd"}).status_code == 400


def test_duplicate_groups_come_from_dedup(client: httpx.Client) -> None:
    data = client.get("/api/dedup", params={"threshold": 0.95}).json()
    groups = [sorted(m["path"] for m in g["members"]) for g in data["groups"]]
    assert ["photos/busy/red-circle.jpg", "photos/held-out/red-circle.jpg"] in groups
    assert data["total"] == len(groups)


THUMB_TRICKS = [
    "/api/thumb?path=%2Fetc%2Fpasswd",
    "/api/thumb?path=..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/thumb?path=photos%2Fseen%2F..%2Fseen%2Fblue-star.jpg",
    "/api/thumb?path=photos%252Fseen%252Fblue-star.jpg",
    "/api/thumb?path=photos%2Fseen%2Fblue-star.jpg%00",
    "/api/thumb?path=photos%2Fseen%2Fblue-star.jpg%2F",
    "/api/thumb?path=photos%5Cseen%5Cblue-star.jpg",
    "/api/thumb?path=.%2Fphotos%2Fseen%2Fblue-star.jpg",
    "/api/thumb?path=%2E%2E%2Foutside%2Fsecret.jpg",
    "/api/thumb?path=photos",
    "/api/thumb?path=photos%2Fseen",
    "/api/thumb",
    "/api/thumb/photos/seen/blue-star.jpg",
    "/api/thumb/..%2F..%2Fetc%2Fpasswd",
    "/photos/seen/blue-star.jpg",
    "/photos/",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/..%2f..%2fetc%2fpasswd",
    "/static/",
    "/page/",
    "/page/index.html",
]


def raw_get(server: Server, target: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """A GET of ``target`` exactly as written (no client normalising dots or escapes on the way)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}:{server.port}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, reply.split(b"\r\n\r\n", 1)[1]


def test_only_rows_are_served_every_other_path_is_404(site: tuple[Server, Path]) -> None:
    server, _ = site
    assert raw_get(server, "/api/thumb?path=photos%2Fseen%2Fblue-star.jpg")[0] == 200  # the test can fail
    for target in THUMB_TRICKS:
        status, body = raw_get(server, target)
        assert status == 404, (target, status, body[:200])
        assert b"root:" not in body


def test_a_row_that_links_out_of_the_tree_or_was_swapped_for_a_link_is_404(site: tuple[Server, Path]) -> None:
    server, root = site
    assert raw_get(server, "/api/thumb?path=photos%2Fseen%2Flinked-out.jpg")[0] == 404
    row = root / "photos" / "held-out" / "pink-arrow.jpg"
    saved = row.read_bytes()
    assert raw_get(server, "/api/thumb?path=photos%2Fheld-out%2Fpink-arrow.jpg&size=128")[0] == 200
    row.unlink()
    os.symlink(root / "outside" / "secret.jpg", row)
    try:
        assert raw_get(server, "/api/thumb?path=photos%2Fheld-out%2Fpink-arrow.jpg&size=512")[0] == 404
    finally:
        row.unlink()
        row.write_bytes(saved)


def test_a_foreign_host_name_is_refused_on_loopback(site: tuple[Server, Path]) -> None:
    assert raw_get(site[0], "/api/info", host="attacker.example")[0] == 403


def test_the_api_is_documented(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/similar", "/api/thumb", "/api/dedup", "/api/upload"} <= set(paths)
    narrowing = {"where", "after", "before", "min_score", "cutoff", "page", "page_size"}
    for route, own in (("/api/search", {"q", "negative", "upload"}), ("/api/similar", {"path"})):
        documented = {p["name"]: p for p in paths[route]["get"]["parameters"]}
        assert set(documented) == narrowing | own and all(p["in"] == "query" for p in documented.values())
        assert documented["page_size"]["schema"]["maximum"] > 1 and documented["where"]["description"]
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]


def test_an_uploaded_picture_finds_itself(client: httpx.Client) -> None:
    picture = (SAMPLES / "held-out" / "orange-hexagon.jpg").read_bytes()
    upload = client.post("/api/upload", content=picture, headers={"Content-Type": "image/jpeg"})
    assert upload.status_code == 200, upload.text
    best = search(client, upload=upload.json()["id"], page_size=1)["results"][0]
    assert best["path"] == "photos/held-out/orange-hexagon.jpg" and best["score"] > 0.999


def test_an_upload_over_the_limit_is_413(client: httpx.Client) -> None:
    big = os.urandom(1_200_000)  # the server was started with --max-upload-mb 1
    assert client.post("/api/upload", content=big).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield os.urandom(64 * 1024)

    response = client.post("/api/upload", content=chunks())
    assert response.status_code == 413 and "limit" in response.json()["detail"]


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n(hello) print\nshowpage\n"


def test_another_sites_page_cannot_post_to_the_server(client: httpx.Client, site: tuple[Server, Path]) -> None:
    """A page elsewhere can make the browser post to 127.0.0.1 (a form, a no-cors fetch): its Origin says so."""
    picture = (SAMPLES / "held-out" / "orange-hexagon.jpg").read_bytes()
    for origin in ("http://evil.example", "null", f"http://localhost:{site[0].port}"):
        response = client.post("/api/upload", content=picture, headers={"Origin": origin, "Content-Type": "text/plain"})
        assert response.status_code == 403, origin
        assert client.get("/api/info", headers={"Origin": origin}).status_code == 403
    own = client.post("/api/upload", content=picture, headers={"Origin": site[0].base.rstrip("/")})
    assert own.status_code == 200, own.text


def test_a_postscript_upload_is_no_image_and_never_reaches_ghostscript(client: httpx.Client) -> None:
    """Pillow would hand EPS to Ghostscript to run; clipcli's readers are the image formats it takes."""
    response = client.post("/api/upload", content=EPS, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 400 and "not an image" in response.json()["detail"]


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` zero pixels: tens of kilobytes that decode to gigapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    pixels = zlib.compressobj(9)
    body = b"".join(pixels.compress(row) for _ in range(height)) + pixels.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_a_decompression_bomb_upload_is_refused(client: httpx.Client) -> None:
    bomb = png_bomb(20_000, 20_000)  # 400 Mpx, over the 250 Mpx guard
    assert len(bomb) < 1_000_000
    response = client.post("/api/upload", content=bomb, headers={"Content-Type": "image/png"})
    assert response.status_code == 400 and "too large" in response.json()["detail"]
    text = client.post("/api/upload", content=b"not a picture at all")
    assert text.status_code == 400 and "not an image" in text.json()["detail"]


def test_thumbnails_are_cached_on_disk(site: tuple[Server, Path], client: httpx.Client) -> None:
    _, root = site
    first = client.get("/api/thumb", params={"path": "photos/busy/blue-star.jpg", "size": 512})
    assert first.status_code == 200
    cached = [p for p in (root / "cache" / "clipcli-thumbs").rglob("*.jpg") if p.read_bytes() == first.content]
    assert len(cached) == 1


def test_a_port_in_use_is_one_line(site: tuple[Server, Path], cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("serve", str(site[1] / "emb"), "--port", str(site[0].port))
    assert result.exit_code == 2 and "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_serve_takes_saved_embeddings_only(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("serve", str(SAMPLES / "seen"), "--port", "0")
    assert result.exit_code == 2 and "not embeddings" in result.stderr


@pytest.mark.slow
def test_a_dataset_changed_while_serving(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("red-circle.jpg", "blue-square.jpg", "green-cross.jpg"):
        (photos / name).write_bytes((SAMPLES / "held-out" / name).read_bytes())
    env = {"CLIPCLI_CACHE": str(tmp_path / "cache")}
    embed(tmp_path, ["photos"], "emb/", env)
    subprocess.run(
        [sys.executable, "-m", "clipcli", "index", "emb"], cwd=tmp_path, env={**os.environ, **env}, check=True
    )
    with running_server(["emb", "-m", "tiny-shapes"], tmp_path, env) as server:
        client = httpx.Client(base_url=server.base, timeout=60)
        first = search(client, q="a blue star", page_size=1)
        assert first["results"][0]["path"] != "photos/blue-star.jpg" and not first["notes"]
        (photos / "blue-star.jpg").write_bytes((SAMPLES / "seen" / "blue-star.jpg").read_bytes())
        embed(tmp_path, ["photos"], "emb/", env)
        after = search(client, q="a blue star", page_size=1)
        assert after["results"][0]["path"] == "photos/blue-star.jpg"
        assert any("clipcli index" in note for note in after["notes"])  # the index is behind: rows are scanned
        part = next((tmp_path / "emb").glob("*.parquet"))
        saved = part.read_bytes()
        part.write_bytes(b"half a parquet file")
        broken = client.get("/api/search", params={"q": "a blue star"})
        assert broken.status_code == 503 and "changed while serving" in broken.json()["detail"]
        part.write_bytes(saved)
        assert search(client, q="a blue star", page_size=1)["results"][0]["path"] == "photos/blue-star.jpg"
        client.close()
        assert server.stop() == 0 and no_traceback(server.stderr())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_cleanly(site: tuple[Server, Path], sig: int) -> None:
    _, root = site
    with running_server(["emb", "-m", "tiny-shapes"], root, {"CLIPCLI_CACHE": str(root / "cache")}) as server:
        with httpx.Client(base_url=server.base, timeout=30) as client:  # a client still connected
            assert client.get("/api/info").status_code == 200
            assert server.stop(sig) == 0
        assert no_traceback(server.stderr()) and "stopped" in server.stderr()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.base + "/api/info", timeout=5)


@pytest.mark.slow
def test_beyond_loopback_a_token_is_required(site: tuple[Server, Path]) -> None:
    _, root = site
    env = {"CLIPCLI_CACHE": str(root / "cache")}
    with running_server(["emb", "-m", "tiny-shapes", "--host", "0.0.0.0"], root, env) as server:
        err = server.stderr()
        assert "warning" in err and "?token=" in server.url
        token = server.url.split("?token=", 1)[1]
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(base + "/api/info").status_code == 401
        wrong = token[:-1] + ("y" if token.endswith("x") else "x")  # always one character off
        assert httpx.get(base + "/api/info", params={"token": wrong}).status_code == 401
        assert httpx.get(base + "/api/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        page = httpx.get(base + "/", params={"token": token})
        assert page.status_code == 200 and "clipcli_token" in page.headers["set-cookie"]
        thumb = httpx.get(base + "/api/thumb", params={"path": "photos/seen/blue-star.jpg"}, cookies=page.cookies)
        assert thumb.status_code == 200
        assert server.stop() == 0


@pytest.mark.slow
def test_fifty_clients_for_ten_seconds(site: tuple[Server, Path], capsys: pytest.CaptureFixture[str]) -> None:
    server, _ = site
    queries = ["a red circle", "a blue star", "a green cross", "a yellow heart", "a purple arrow"]
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + 10

    def one_client(n: int) -> None:
        with httpx.Client(base_url=server.base, timeout=60) as c:
            i = n
            while time.monotonic() < stop:
                i += 1
                started = time.perf_counter()
                try:
                    if i % 3 == 0:
                        r = c.get("/api/thumb", params={"path": "photos/seen/blue-star.jpg"})
                    else:
                        r = c.get("/api/search", params={"q": f"{queries[i % 5]} {i % 7}", "page_size": 24})
                except httpx.HTTPError as e:
                    errors.append(repr(e))
                    continue
                latencies.append(time.perf_counter() - started)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")

    threads = [threading.Thread(target=one_client, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    quantiles = statistics.quantiles(latencies, n=20)
    with capsys.disabled():  # the figures belong in the test log
        print(
            f"\n50 clients for 10 s: {len(latencies)} requests, no error; "
            f"p50 {quantiles[9] * 1000:.0f} ms, p95 {quantiles[18] * 1000:.0f} ms"
        )
    assert len(latencies) > 50


def test_a_thumbnail_is_small_upright_and_guarded(tmp_path: Path) -> None:
    from clipcli.images.decode import ImageTooLarge
    from clipcli.images.thumbs import thumbnail_jpeg

    picture = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.new("RGB", (800, 400), "red").save(picture, exif=exif)
    with Image.open(io.BytesIO(thumbnail_jpeg(picture, 100))) as im:
        assert im.size == (50, 100) and im.format == "JPEG"
    with pytest.raises(ImageTooLarge):
        thumbnail_jpeg(picture, 100, max_pixels=1000)


def test_the_thumbnail_cache_stays_under_its_bound(tmp_path: Path) -> None:
    from clipcli.serve.thumbcache import ThumbCache

    folder = tmp_path / "thumbs"
    cache = ThumbCache(folder, max_bytes=6000)
    cache.claim()
    (folder / "ab").mkdir(parents=True)
    (folder / "ab" / "notes.txt").write_text("not the cache's")
    theirs = folder / "ab" / "IMG_0001.jpg"  # named as no entry is: left alone, whatever its age
    theirs.write_bytes(b"\xff\xd8" + b"x" * 3000)
    os.utime(theirs, (0, 0))
    pictures = sorted(SAMPLES.rglob("*.jpg"))[:12]
    made = [cache.get(p.resolve(), 128)[0] for p in pictures]
    entries = [e for e in folder.rglob("*.jpg") if e != theirs]
    assert 0 < len(entries) < len(pictures) and sum(e.stat().st_size for e in entries) <= 6000
    assert (folder / "ab" / "notes.txt").exists() and theirs.exists()
    assert cache.get(pictures[-1].resolve(), 128)[0] == made[-1]  # the most recent entries stay
    assert not list(folder.rglob("*.tmp"))


def test_a_thumb_cache_folder_of_the_users_files_is_refused_and_left_whole(
    site: tuple[Server, Path], tmp_path: Path
) -> None:
    """A photo folder sorted by month (01/IMG_0.jpg) looked like the cache's two-letter folders, and
    its photos were removed as the oldest thumbnails once it passed the bound."""
    _, root = site
    photos = tmp_path / "photos2024"
    for month in ("01", "02"):
        (photos / month).mkdir(parents=True)
        for i in range(3):
            (photos / month / f"IMG_{i}.jpg").write_bytes((SAMPLES / "seen" / "red-square.jpg").read_bytes())
            os.utime(photos / month / f"IMG_{i}.jpg", (0, 0))
    before = sorted(p.relative_to(photos) for p in photos.rglob("*"))
    env = {**os.environ, "CLIPCLI_CACHE": str(root / "cache")}
    args = ["emb", "-m", "tiny-shapes", "--port", "0", "--thumb-cache", str(photos), "--thumb-cache-mb", "1"]
    ran = subprocess.run(
        [sys.executable, "-m", "clipcli", "serve", *args], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 2 and "is not a thumbnail cache clipcli made" in ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1 and "Traceback" not in ran.stderr
    assert sorted(p.relative_to(photos) for p in photos.rglob("*")) == before
    from clipcli.serve.thumbcache import ThumbCache

    cache = ThumbCache(photos, max_bytes=1)  # even a cache made without its claim removes none of them
    cache.get((SAMPLES / "seen" / "blue-star.jpg").resolve(), 128)
    assert all((photos / p).exists() for p in before)


def test_another_tools_cache_tag_does_not_make_a_folder_the_thumbnail_cache(tmp_path: Path) -> None:
    """A folder tagged by another tool (the same standard signature) was taken for clipcli's cache, and a
    file of the user's there, named as an entry is, was evicted."""
    from clipcli.errors import InputError
    from clipcli.serve.thumbcache import TAG_SIGNATURE, ThumbCache

    folder = tmp_path / "target"
    (folder / "ab").mkdir(parents=True)
    (folder / "CACHEDIR.TAG").write_bytes(TAG_SIGNATURE + b"\n# This file is a cache directory tag created by cargo.\n")
    theirs = folder / "ab" / ("ab" + "0" * 38 + ".jpg")
    theirs.write_bytes(b"x" * 5000)
    cache = ThumbCache(folder, max_bytes=1000)
    with pytest.raises(InputError, match="is not a thumbnail cache clipcli made"):
        cache.claim()
    cache.get((SAMPLES / "seen" / "blue-star.jpg").resolve(), 128)  # even unclaimed, it evicts nothing there
    assert theirs.exists()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="is a link to nothing"):
        ThumbCache(dangling).claim()
