"""Issue 21, dedup and rank: what `dedup --keep` lists for deletion, NUL-separated paths, stored rows
checked against the files before they are listed, and rank's choices over saved embeddings.

The deletion tests run the installed console script in a subprocess and pipe it into the real `xargs rm`
in a temporary folder, as the README tells users to.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
CLIPCLI = str(Path(sys.executable).with_name("clipcli"))
NEWLINE_NAME = "z copy\nb.jpg"


def run(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [CLIPCLI, *args], cwd=cwd, env=env, input=stdin.encode() if stdin else None, capture_output=True, timeout=300
    )


def pipe(shell: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """``clipcli ... | xargs ...`` through a real shell; ``clipcli`` is the installed console script."""
    env = {**os.environ, "COLUMNS": "200", "PATH": f"{Path(CLIPCLI).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["sh", "-c", shell], cwd=cwd, env=env, capture_output=True, timeout=300)


# ---- item 2: every path --keep lists is itself a near-duplicate of the file kept ----------------------


def _chained(tmp_path: Path, cli) -> tuple[Path, dict[str, Path]]:
    """Three real files, copies of one picture, whose saved embeddings chain: a~b and b~c at 0.95, a and c
    at 0.81 (threshold 0.9).
    ``a`` is the largest file and the first in natural order, so either --keep keeps it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder = tmp_path / "chain"
    folder.mkdir()
    picture = Image.open(SAMPLES / "seen" / "red-square.jpg").convert("RGB")
    files = {}
    for name, side in (("a", 160), ("b", 90), ("c", 60)):  # one picture at three sizes: copies, pixel for pixel
        files[name] = folder / f"{name}.png"
        picture.resize((side, side), Image.Resampling.LANCZOS).save(files[name])
    emb = tmp_path / "emb.parquet"
    assert cli("embed", str(folder), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    table = pq.read_table(emb)
    dim = table.schema.field("embedding").type.list_size
    step = math.acos(0.95)  # b is 0.95 from a, c 0.95 from b: 2 steps from a, cos = 0.805
    vectors = {}
    for name, angle in (("a", 0.0), ("b", step), ("c", 2 * step)):
        v = np.zeros(dim, np.float32)
        v[0], v[1] = math.cos(angle), math.sin(angle)
        vectors[str(files[name])] = v
    rows = [vectors[p] for p in table.column("path").to_pylist()]
    flat = pa.array(np.concatenate(rows).astype(np.float32)).cast(table.schema.field("embedding").type.value_type)
    column = pa.FixedSizeListArray.from_arrays(flat, dim)
    table = table.set_column(table.schema.get_field_index("embedding"), table.schema.field("embedding"), column)
    pq.write_table(table, emb)
    return emb, files


@pytest.mark.parametrize("keep", ["largest", "first"])
def test_keep_never_lists_a_file_below_the_threshold_to_the_one_kept(cli, tmp_path, keep):
    emb, files = _chained(tmp_path, cli)
    ran = cli("dedup", str(emb), "--keep", keep)
    assert ran.exit_code == 0, ran.stderr
    assert ran.stdout.splitlines() == [str(files["b"])]  # c is 0.81 to a, the file kept: never listed
    assert files["a"].exists()


def test_group_similarities_are_never_below_the_threshold(cli, tmp_path):
    emb, files = _chained(tmp_path, cli)
    ran = cli("dedup", str(emb), "-f", "csv")
    assert ran.exit_code == 0, ran.stderr
    rows = list(csv.DictReader(io.StringIO(ran.stdout)))
    assert [r["path"] for r in rows] == [str(files["a"]), str(files["b"])]
    assert all(float(r["similarity_to_group_representative"]) >= 0.9 for r in rows)
    assert "found 1 group of near-duplicates (1 copy)" in ran.stderr


# ---- item 3: -0/--null, and no newline-holding name on a newline-separated stream ----------------------


@pytest.fixture
def newline_copy(tmp_path: Path) -> Path:
    """b.jpg, a byte-for-byte copy of it named "z copy\\nb.jpg", and a distinct photo."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(SAMPLES / "held-out" / "red-circle.jpg", folder / "b.jpg")
    shutil.copy(SAMPLES / "held-out" / "red-circle.jpg", folder / NEWLINE_NAME)
    shutil.copy(SAMPLES / "seen" / "blue-star.jpg", folder / "star.jpg")
    return folder


@pytest.mark.slow
def test_null_separated_keep_through_xargs_deletes_only_the_duplicate(newline_copy):
    ran = pipe("clipcli dedup . -m tiny-shapes --keep largest -0 | xargs -0 rm", newline_copy)
    assert ran.returncode == 0, ran.stderr.decode()
    assert sorted(p.name for p in newline_copy.iterdir()) == ["b.jpg", "star.jpg"]


@pytest.mark.slow
def test_keep_refuses_a_newline_name_on_a_line_separated_stream(newline_copy):
    ran = run("dedup", ".", "-m", "tiny-shapes", "--keep", "largest", cwd=newline_copy)
    assert ran.returncode == 2 and ran.stdout == b""
    assert len(ran.stderr.decode().splitlines()) == 1 and "-0" in ran.stderr.decode()
    # The README's old pipeline deletes nothing now (today it deletes b.jpg, a distinct file).
    piped = pipe("clipcli dedup . -m tiny-shapes --keep largest | xargs -r -d '\\n' rm", newline_copy)
    assert "-0" in piped.stderr.decode()
    assert sorted(p.name for p in newline_copy.iterdir()) == ["b.jpg", "star.jpg", NEWLINE_NAME]


@pytest.mark.slow
def test_rank_null_prints_paths_and_refuses_a_newline_name_in_lines(newline_copy):
    ran = run("rank", "a red circle", ".", "-m", "tiny-shapes", "-0", cwd=newline_copy)
    assert ran.returncode == 0, ran.stderr.decode()
    paths = ran.stdout.decode().split("\0")
    assert paths[-1] == "" and sorted(paths[:-1]) == sorted(["b.jpg", NEWLINE_NAME, "star.jpg"])
    lines = run("rank", "a red circle", ".", "-m", "tiny-shapes", cwd=newline_copy)  # tsv in a pipe
    assert lines.returncode == 2 and lines.stdout == b""
    assert len(lines.stderr.decode().splitlines()) == 1 and "-0" in lines.stderr.decode()


def test_null_goes_with_keep(cli, newline_copy):
    ran = cli("dedup", str(newline_copy), "-m", "tiny-shapes", "-0")
    assert ran.exit_code == 2 and ran.stdout == "" and "--keep" in ran.stderr


# ---- item 4: stored rows are checked against the files before they are listed -------------------------


@pytest.fixture
def embedded_copies(tmp_path: Path) -> Path:
    """work/p: two photos and an exact copy of one (c2.png), embedded from work/ with relative paths."""
    work = tmp_path / "work"
    p = work / "p"
    p.mkdir(parents=True)
    shutil.copy(SAMPLES / "held-out" / "red-circle.jpg", p / "c1.png")
    shutil.copy(SAMPLES / "held-out" / "red-circle.jpg", p / "c2.png")
    shutil.copy(SAMPLES / "seen" / "blue-star.jpg", p / "star.png")
    ran = run("embed", "p", "-m", "tiny-shapes", "-o", "emb.parquet", cwd=work)
    assert ran.returncode == 0, ran.stderr.decode()
    listed = run("dedup", "emb.parquet", "--keep", "first", cwd=work)
    assert listed.stdout.decode().splitlines() == ["p/c2.png"], listed.stderr.decode()  # the planted copy
    return work


@pytest.mark.slow
def test_keep_does_not_list_a_file_replaced_since_it_was_embedded(embedded_copies):
    work = embedded_copies
    shutil.copy(SAMPLES / "held-out" / "green-hexagon.jpg", work / "p" / "c2.png")  # cp rocket.webp p/c2.png
    ran = run("dedup", "emb.parquet", "--keep", "first", cwd=work)
    assert ran.stdout == b""
    err = ran.stderr.decode()
    assert "p/c2.png" in err and "changed" in err


@pytest.mark.slow
def test_keep_does_not_list_a_missing_kept_file_s_copies(embedded_copies):
    work = embedded_copies
    (work / "p" / "c1.png").unlink()  # the file kept: its copy is now the only one
    ran = run("dedup", "emb.parquet", "--keep", "first", cwd=work)
    assert ran.stdout == b""
    assert "p/c1.png" in ran.stderr.decode()


@pytest.mark.slow
def test_keep_from_another_folder_never_names_unrelated_files_there(embedded_copies):
    work = embedded_copies
    elsewhere = work.parent / "elsewhere"
    (elsewhere / "p").mkdir(parents=True)
    for name in ("c1.png", "c2.png", "star.png"):  # same names, unrelated pictures
        shutil.copy(SAMPLES / "held-out" / "blue-triangle.jpg", elsewhere / "p" / name)
    ran = run("dedup", str(work / "emb.parquet"), "--keep", "first", cwd=elsewhere)
    listed = ran.stdout.decode().splitlines()
    for line in listed:  # what is listed must be the planted copy, wherever it is named from
        assert (elsewhere / line).resolve() == (work / "p" / "c2.png").resolve()
    if not listed:
        assert "p/c2.png" in ran.stderr.decode()
    assert ran.returncode != 0 or listed


@pytest.mark.slow
def test_keep_over_a_dataset_without_a_base_checks_files_from_here(embedded_copies):
    """A dataset written before clipcli recorded its base: relative paths are checked from the working
    folder; the unrelated files of the same names there are not listed."""
    import pyarrow.parquet as pq

    emb = embedded_copies / "emb.parquet"
    table = pq.read_table(emb)
    metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"clipcli.base"}
    pq.write_table(table.replace_schema_metadata(metadata), emb)
    elsewhere = embedded_copies.parent / "elsewhere"
    (elsewhere / "p").mkdir(parents=True)
    for name in ("c1.png", "c2.png", "star.png"):
        shutil.copy(SAMPLES / "held-out" / "blue-triangle.jpg", elsewhere / "p" / name)
    ran = run("dedup", str(emb), "--keep", "first", cwd=elsewhere)
    assert ran.stdout == b"" and ran.returncode == 1
    assert "p/c1.png" in ran.stderr.decode() and "p/c2.png" in ran.stderr.decode()
    assert run("dedup", str(emb), "--keep", "first", cwd=embedded_copies).stdout == b"p/c2.png\n"


@pytest.mark.slow
def test_keep_over_npy_is_refused_for_want_of_sizes_and_mtimes(cli, embedded_copies, tmp_path):
    npy = tmp_path / "emb.npy"
    assert cli("embed", str(embedded_copies / "p"), "-m", "tiny-shapes", "-o", str(npy)).exit_code == 0
    ran = cli("dedup", str(npy), "--keep", "first")
    assert ran.exit_code == 2 and ran.stdout == ""
    assert len(ran.stderr.splitlines()) == 1 and str(npy) in ran.stderr


# ---- item 12: rank over saved embeddings uses the model they record ------------------------------------


@pytest.mark.slow
def test_rank_over_saved_embeddings_uses_their_model(embedded_copies, tmp_path):
    env_free = {k: v for k, v in os.environ.items() if k != "CLIPCLI_MODEL"}
    ran = subprocess.run(
        [CLIPCLI, "rank", "a red circle", "emb.parquet", "-f", "tsv"],
        cwd=embedded_copies,
        env={**env_free, "COLUMNS": "200"},
        capture_output=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr.decode()
    assert "ViT-B/32" not in ran.stderr.decode()
    assert len(ran.stdout.decode().splitlines()) == 3


# ---- item 17 (rank): an empty queries file, with an index beside the embeddings ------------------------


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
@pytest.mark.parametrize("option", ["--queries-file", "--image-queries"])
@pytest.mark.slow
def test_empty_queries_file_beside_an_index_answers_0_queries(cli, embedded_copies, tmp_path, content, option):
    emb = embedded_copies / "emb.parquet"
    assert cli("index", str(emb)).exit_code == 0
    queries = tmp_path / "q.txt"
    queries.write_text(content)
    ran = cli("rank", option, str(queries), str(emb), "-m", "tiny-shapes", "-f", "csv")
    assert ran.exit_code == 0, ran.stderr
    assert "answered 0 queries" in ran.stderr and "max()" not in ran.stderr


# ---- item 19 (rank): a CSV written by embed is named for what it is --------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.slow
def test_rank_over_embeddings_in_csv_says_why_not(cli, embedded_copies, tmp_path, suffix):
    flat = tmp_path / f"embc{suffix}"
    assert cli("embed", str(embedded_copies / "p"), "-m", "tiny-shapes", "-o", str(flat)).exit_code == 0
    ran = cli("rank", "q", str(flat), "-m", "tiny-shapes")
    assert ran.exit_code == 2 and ran.stdout == ""
    assert len(ran.stderr.splitlines()) == 1
    assert str(flat) in ran.stderr and "not an image" not in ran.stderr and ".parquet" in ran.stderr


@pytest.mark.parametrize("source", ["images", "saved rows"])
def test_keep_never_lists_a_file_whose_only_other_name_is_kept(cli, tmp_path, monkeypatch, source):
    """Found by attack: with `a.jpg` a symbolic link to `b.jpg`, --keep kept the link and listed b.jpg:
    `xargs rm` deleted the only copy. A link, a hard link and a path through a linked folder are names
    of a file already in the group, never copies of it; a real copy beside them is still listed."""
    monkeypatch.chdir(tmp_path)
    d = Path("d")
    d.mkdir()
    shutil.copy(SAMPLES / "busy" / "blue-star.jpg", d / "b.jpg")
    (d / "a.jpg").symlink_to("b.jpg")
    os.link(d / "b.jpg", d / "c.jpg")
    Path("e").symlink_to("d")  # e/b.jpg: the same file through a linked folder
    inputs = ["d", "e/b.jpg"]
    if source == "saved rows":
        assert cli("embed", *inputs, "-m", "tiny-shapes", "-o", "emb.parquet").exit_code == 0
        inputs = ["emb.parquet"]
    for keep in ("first", "largest"):
        ran = cli("dedup", *inputs, "-m", "tiny-shapes", "--keep", keep, "-0")
        assert ran.exit_code == 0 and ran.stdout == "", (keep, ran.stdout, ran.stderr)
    shutil.copy(d / "b.jpg", "copy.jpg")  # a copy of its own: one of the two is listed
    inputs = [*inputs, "copy.jpg"] if source == "images" else inputs
    if source == "saved rows":
        assert cli("embed", "d", "e/b.jpg", "copy.jpg", "-m", "tiny-shapes", "-o", "emb.parquet").exit_code == 0
    ran = cli("dedup", *inputs, "-m", "tiny-shapes", "--keep", "first", "-0")
    listed = ran.stdout.split("\0")[:-1]
    assert ran.exit_code == 0 and len(listed) == 1 and not Path(listed[0]).is_symlink(), ran.stdout
    Path(listed[0]).unlink()  # as `xargs -0 rm` would: a copy of the picture is still there
    assert any(p.is_file() and p.read_bytes() == (SAMPLES / "busy" / "blue-star.jpg").read_bytes()
               for p in (d / "b.jpg", d / "c.jpg", Path("copy.jpg")))  # fmt: skip


def test_keep_lists_copies_of_the_kept_picture_and_no_picture_merely_alike(cli, tmp_path):
    """Found by a newcomer: `dedup samples/ --keep largest` (the README's pipeline into `rm`) listed a red
    hexagon as a copy of a red circle, alike at 0.90 by the bundled model's embeddings. A file is now
    listed only when its pixels are the kept file's, at any size or JPEG quality."""
    from PIL import Image

    photos = tmp_path / "photos"
    shutil.copytree(SAMPLES, photos)
    star = Image.open(photos / "seen" / "blue-star.jpg")
    star.resize((star.width // 2, star.height // 2), Image.Resampling.LANCZOS).save(
        photos / "star-small.jpg", quality=70
    )
    ran = cli("dedup", str(photos), "-m", "tiny-shapes", "--keep", "largest")
    listed = ran.stdout.splitlines()
    assert str(photos / "star-small.jpg") in listed
    for path in listed:  # each listed file is a copy of a picture kept: here, only the small star
        assert Path(path).name in ("star-small.jpg", "blue-star.jpg"), ran.stderr
    assert str(photos / "seen" / "red-hexagon.jpg") not in listed
    assert "not listed: its picture" in ran.stderr


def test_a_copy_is_told_from_a_lookalike_pixel_by_pixel(tmp_path):
    """Found by attack on the first version (a mean over 32x32 grey cells): two invoices, a blank page and
    the same page signed, and two animated GIFs sharing their first frame passed as copies."""
    import io

    from PIL import Image, ImageDraw

    from clipcli.search.pictures import Pictures

    def save(image: Image.Image, name: str, **options: object) -> str:
        image.save(tmp_path / name, **options)
        return str(tmp_path / name)

    def invoice(n: int) -> Image.Image:
        page = Image.new("RGB", (1240, 1754), "white")
        draw = ImageDraw.Draw(page)
        for i in range(40):
            draw.text((80, 120 + i * 36), f"Item {i + n * 7} .... {(i * n * 37) % 1000} EUR", fill="black")
        return page

    blank = Image.new("RGB", (800, 600), "white")
    signed = blank.copy()
    ImageDraw.Draw(signed).text((500, 550), "Signed: J. Smith", fill="black")
    star = Image.open(SAMPLES / "seen" / "blue-star.jpg").convert("RGB")
    frames = {c: [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), c)] for c in ("green", "blue")}
    gifs = {c: save(f[0], f"{c}.gif", save_all=True, append_images=f[1:]) for c, f in frames.items()}
    buf = io.BytesIO()
    star.resize((star.width // 2, star.height // 2), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=70)
    pictures = Pictures()
    different = [
        (save(invoice(1), "invoice-1.png"), save(invoice(2), "invoice-2.png")),
        (save(blank, "blank.png"), save(signed, "signed.png")),
        (gifs["green"], gifs["blue"]),
        (save(star, "star.png"), save(star.crop((8, 8, star.width - 8, star.height - 8)), "crop.png")),
    ]
    for kept, copy in different:
        assert pictures.differs(kept, copy) is not None, (kept, copy)
    (tmp_path / "small.jpg").write_bytes(buf.getvalue())
    same = [
        (str(tmp_path / "star.png"), str(tmp_path / "small.jpg")),  # half the size, JPEG quality 70
        (str(tmp_path / "invoice-1.png"), save(invoice(1), "invoice-1.jpg", quality=60)),
    ]
    for kept, copy in same:
        assert pictures.differs(kept, copy) is None, (kept, copy)
    (tmp_path / "copy.gif").write_bytes(Path(gifs["green"]).read_bytes())
    assert pictures.differs(gifs["green"], str(tmp_path / "copy.gif")) is None  # byte for byte
