"""Found by a fault run against the search page, videos and WebDataset shards: each test reproduces one
finding as it was reported (outputs over the files behind saved rows and brace-pattern inputs, patterns
that expand for ever, shards cut at a header, link members, ``--every inf``, a filter that never ends, a
server stopped while a request runs)."""

from __future__ import annotations

import contextlib
import io
import signal
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import no_traceback, running_server
from wds_helpers import sample_items, write_shard

from clipcli.errors import InputError
from clipcli.search.where import WhereTable

MODEL = ("-m", "tiny-shapes", "--precision", "fp32")
SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def one_line_error(ran, *needles: str) -> None:
    lines = ran.stderr.strip().splitlines()
    assert ran.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), ran.stderr
    for needle in needles:
        assert needle in lines[0], ran.stderr


def test_an_output_over_the_file_behind_a_saved_row_is_refused(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("red-circle.jpg", "blue-star.jpg", "orange-hexagon.jpg"):
        (photos / name).write_bytes((SAMPLES / "busy" / name).read_bytes())
    write_shard(Path("s.tar"), sample_items()[:3])
    assert cli("embed", "photos", *MODEL, "-o", "emb/").exit_code == 0
    assert cli("embed", "s.tar", *MODEL, "-o", "shards.parquet").exit_code == 0
    before = {p: p.read_bytes() for p in [*photos.iterdir(), Path("s.tar")]}
    for argv in (
        ("rank", "a red circle", "emb", *MODEL, "--html", "photos/red-circle.jpg"),
        ("rank", "a red circle", "emb", *MODEL, "-f", "csv", "-o", "photos/orange-hexagon.jpg"),
        ("dedup", "emb", *MODEL, "-f", "csv", "-o", str(photos / "blue-star.jpg")),
        ("rank", "a red circle", "shards.parquet", *MODEL, "--html", "s.tar"),
    ):
        one_line_error(cli(*argv), "is also an input")
    assert {p: p.read_bytes() for p in before} == before


def test_an_output_over_a_file_a_brace_pattern_names_is_refused(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("im6.jpg").write_bytes((SAMPLES / "busy" / "red-circle.jpg").read_bytes())
    write_shard(Path("g5.tar"), sample_items()[:2])
    before = {p: p.read_bytes() for p in (Path("im6.jpg"), Path("g5.tar"))}
    one_line_error(
        cli("classify", "{im6,x}.jpg", "-l", "a,b", *MODEL, "-f", "csv", "-o", "im6.jpg"), "is also an input"
    )
    one_line_error(cli("dedup", "{im6,x}.jpg", *MODEL, "-f", "csv", "-o", "im6.jpg"), "is also an input")
    one_line_error(cli("rank", "a red circle", "{g5,x}.tar", *MODEL, "--html", "g5.tar"), "is also an input")
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("pattern", ["{0..999999}{0..999999}.tar", "{0..99999999999999999999}.tar"])
def test_a_brace_pattern_naming_too_many_files_is_one_line_at_once(cli, tmp_path, monkeypatch, pattern):
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    one_line_error(cli("embed", pattern, *MODEL, "-o", "o.parquet"), "names more than 100,000 files")
    assert time.monotonic() - started < 10  # it hung (or filled the memory) before


def test_a_shard_cut_at_a_header_says_so_and_link_members_are_named(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shard(Path("good.tar"), sample_items()[:5])
    data = Path("good.tar").read_bytes()
    with tarfile.open("good.tar") as tar:
        fourth = next(m for m in tar.getmembers() if m.name.startswith(sample_items()[3].key))
    Path("cut.tar").write_bytes(data[: fourth.offset])  # cut exactly where the 4th sample's header starts
    ran = cli("embed", "cut.tar", *MODEL, "-o", "cut.csv")
    assert ran.exit_code == 1, ran.stderr
    assert "cut.tar: truncated shard" in ran.stderr and "first 3 samples are used" in ran.stderr

    with tarfile.open("links.tar", "w") as tar:
        jpeg = (SAMPLES / "busy" / "red-circle.jpg").read_bytes()
        info = tarfile.TarInfo("000003.jpg")
        info.size = len(jpeg)
        tar.addfile(info, io.BytesIO(jpeg))
        for name, kind in (("000001.jpg", tarfile.SYMTYPE), ("000002.jpg", tarfile.LNKTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "/etc/passwd"
            tar.addfile(link)
    ran = cli("embed", "links.tar", *MODEL, "-o", "links.csv")
    assert "embedded 1" in ran.stderr
    for key in ("000001", "000002"):
        assert f"links.tar#{key}: member {key}.jpg is a link, not read" in ran.stderr, ran.stderr


def test_every_that_is_not_a_number_of_seconds_is_refused(cli, tmp_path):
    for value in ("inf", "nan", "-1", "0"):
        ran = cli("embed", str(tmp_path), *MODEL, "--every", value)
        assert ran.exit_code == 2 and "--every" in ran.stderr, (value, ran.stderr)


def test_a_filter_that_would_run_for_ever_is_stopped(samples_emb):
    table = WhereTable(samples_emb)
    table.limit_s = 0.5
    started = time.monotonic()
    with pytest.raises(InputError, match=r"took longer than 0\.5 s and was stopped"):
        table.rows("(SELECT sum(x) FROM range(100000000000) t(x) WHERE x % 7 = 3) > 0")
    assert time.monotonic() - started < 5
    assert len(table.rows("width > 0")) == 32  # the table answers the next filter


@pytest.mark.slow
def test_a_server_stopped_during_a_request_leaves_no_traceback(samples_emb, tmp_path):
    env = {"CLIPCLI_CACHE": str(tmp_path / "cache")}
    with running_server([str(samples_emb), "-m", "tiny-shapes"], tmp_path, env) as server:
        slow = "(SELECT sum(x) FROM range(100000000000) t(x) WHERE x % 7 = 3) > 0"
        params = {"q": "a red circle", "where": slow}

        def ask() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server goes away, as it is told to
                httpx.get(server.base + "/api/search", params=params, timeout=30)

        client = threading.Thread(target=ask)
        client.start()
        time.sleep(1.5)  # the filter is running
        assert server.stop(signal.SIGTERM) == 0
        client.join(30)
        assert no_traceback(server.stderr()) and "stopped" in server.stderr(), server.stderr()
        assert "ERROR" not in server.stderr()


@pytest.mark.parametrize("kind", ["shard", "video"])
def test_a_run_over_one_damaged_container_writes_its_empty_output_and_exits_1(cli, tmp_path, monkeypatch, kind):
    """As a run over damaged photos alone: the previous run's rows do not stay in a file output."""
    from video_helpers import write_video

    from clipcli.errors import EXIT_PARTIAL

    monkeypatch.chdir(tmp_path)
    name = write_shard(Path("a.tar"), sample_items()[:3]) if kind == "shard" else write_video(Path("v.mp4"), "h264")
    for out in ("rows.csv", "rows.jsonl"):
        assert cli("embed", str(name), *MODEL, "-o", out).exit_code == 0
    assert len(Path("rows.csv").read_text().splitlines()) > 1
    for damage in (b"", b"\x13" * 100):
        Path(name).write_bytes(damage)
        for out in ("rows.csv", "rows.jsonl"):
            ran = cli("embed", str(name), *MODEL, "-o", out)
            assert ran.exit_code == EXIT_PARTIAL and f"skipped {name}: " in ran.stderr, ran.stderr
        assert len(Path("rows.csv").read_text().splitlines()) == 1 and Path("rows.jsonl").read_text() == ""
        ran = cli("classify", str(name), *MODEL, "--labels", "a red circle,a blue star", "-f", "csv")
        assert ran.exit_code == EXIT_PARTIAL and ran.stdout.strip() == "path,rank,label,score", ran.stderr
