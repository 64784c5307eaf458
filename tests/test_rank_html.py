"""`rank --html FILE`: the results as one self-contained page of thumbnails (inlined, EXIF-rotated),
written atomically and never over an input."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from conftest import make_image
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
DATA_URI = re.compile(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"')


def _tsv(text: str) -> list[tuple[float, str]]:
    return [(float(s), p) for s, p in (line.split("\t") for line in text.splitlines())]


@pytest.fixture(scope="module")
def emb(tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from clipcli.cli import app

    out = tmp_path_factory.mktemp("html") / "emb"
    ran = CliRunner().invoke(app, ["embed", str(SAMPLES), "-m", "tiny-shapes", "-o", f"{out}/"])
    assert ran.exit_code == 0, ran.output
    return out


def test_page_shows_each_result_with_its_thumbnail_score_and_path(cli, emb, tmp_path):
    page = tmp_path / "out" / "page.html"
    ran = cli("rank", "a red circle", str(emb), "-m", "tiny-shapes", "-k", "4", "--html", str(page))
    assert ran.exit_code == 0, ran.stderr
    hits = _tsv(ran.stdout)  # the rows still go to stdout
    text = page.read_text()
    thumbs = DATA_URI.findall(text)
    assert len(thumbs) == 4 and "<script" not in text and "http" not in text  # self-contained
    for (score, path), thumb in zip(hits, thumbs, strict=True):
        assert path in text and f"{score:.4f}" in text
        with Image.open(io.BytesIO(base64.b64decode(thumb))) as im:
            assert im.format == "JPEG" and max(im.size) <= 256
    assert text.index(hits[0][1]) < text.index(hits[1][1])  # best first
    assert "a red circle" in text


@pytest.mark.slow
def test_thumbnails_are_upright_names_escaped_and_missing_files_kept(cli, tmp_path):
    folder = tmp_path / "imgs"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    make_image(folder / "rotated.jpg", (120, 60), exif=exif.tobytes())
    make_image(folder / "<b>&'odd\".png", (50, 50), seed=2)
    page = tmp_path / "page.html"
    ran = cli("rank", "a red circle", str(folder), "-m", "tiny-shapes", "--html", str(page))
    assert ran.exit_code == 0, ran.stderr
    text = page.read_text()
    assert "<b>&" not in text and "&lt;b&gt;&amp;" in text
    sizes = []
    for thumb in DATA_URI.findall(text):
        with Image.open(io.BytesIO(base64.b64decode(thumb))) as im:
            sizes.append(im.size)
    assert sorted(sizes) == [(50, 50), (60, 120)]
    (folder / "rotated.jpg").unlink()  # gone since it was embedded: its place stays, without a picture
    emb = tmp_path / "emb.parquet"
    make_image(folder / "rotated.jpg", (120, 60), exif=exif.tobytes())
    assert cli("embed", str(folder), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    (folder / "rotated.jpg").unlink()
    ran = cli("rank", "a red circle", str(emb), "-m", "tiny-shapes", "--html", str(page))
    assert ran.exit_code == 0 and "no preview" in page.read_text() and "rotated.jpg" in page.read_text()


def test_page_is_not_written_over_an_input_nor_left_half_written(cli, emb, tmp_path):
    part = next(emb.glob("*.parquet"))
    before = part.read_bytes()
    ran = cli("rank", "x", str(emb), "-m", "tiny-shapes", "--html", str(part))
    assert ran.exit_code == 2 and ran.stderr.count("\n") == 1 and "input" in ran.stderr
    assert part.read_bytes() == before
    image = tmp_path / "imgs" / "a.jpg"
    make_image(image)
    ran = cli("rank", "x", str(image.parent), "-m", "tiny-shapes", "--html", str(image))
    assert ran.exit_code == 2 and "input" in ran.stderr
    ran = cli("rank", "x", str(emb), "-m", "tiny-shapes", "--html", "-")
    assert ran.exit_code == 2 and "needs a file name" in ran.stderr
    page = tmp_path / "page.html"
    page.write_text("previous page")
    ran = cli("rank", "dog + ", str(emb), "-m", "tiny-shapes", "--html", str(page))  # fails: page untouched
    assert ran.exit_code == 2 and page.read_text() == "previous page"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".page.html") or "tmp" in p.name]
    ran = cli("rank", "dog", str(emb), "-m", "tiny-shapes", "--html", str(page))  # a page of the user's
    assert ran.exit_code == 2 and "is not a rank --html page output clipcli writes" in ran.stderr, ran.stderr
    assert page.read_text() == "previous page"
    page.unlink()
    for _ in range(2):  # an earlier page of clipcli's is replaced
        assert cli("rank", "dog", str(emb), "-m", "tiny-shapes", "--html", str(page)).exit_code == 0


def test_many_queries_get_a_section_each(cli, emb, tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("a red circle\na blue star\n")
    page = tmp_path / "page.html"
    ran = cli("rank", "--queries-file", str(queries), str(emb), "-m", "tiny-shapes", "-k", "2", "--html", str(page))
    assert ran.exit_code == 0, ran.stderr
    text = page.read_text()
    assert "<h2>a red circle</h2>" in text and "<h2>a blue star</h2>" in text
    assert len(DATA_URI.findall(text)) == 4
