"""clip-retrieval's layout out (issue 25): ``embed --layout clip-retrieval`` read back by the real
``embedding-reader`` and by rank, index and dedup; incremental, atomic by pairs, and written only into
folders clipcli wrote. (Lance was measured and dropped: docs/formats.md.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ("-m", "tiny-shapes")


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    """The bundled model's samples, copied so that a test may change them."""
    folder = tmp_path / "shapes"
    shutil.copytree(ROOT / "samples", folder, ignore=shutil.ignore_patterns("*.txt"))
    return folder


def all_images(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*.jpg")}


def embed_layout(cli, out: Path, *inputs: Path | str, extra: tuple[str, ...] = ()):
    return cli("embed", *map(str, inputs), *MODEL, "--layout", "clip-retrieval", "-o", f"{out}/", *extra)


def layout_rows(out: Path) -> tuple[np.ndarray, list[str]]:
    """Every row of a layout folder, read with the real embedding-reader (matrices beside metadata)."""
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(
        str(out / "img_emb"),
        file_format="parquet_npy",
        embedding_column="embedding",
        metadata_folder=str(out / "metadata"),
        meta_columns=["image_path"],
    )
    assert EmbeddingReader(str(out / "img_emb"), file_format="npy").count == reader.count
    matrices, paths = [], []
    for matrix, meta in reader(batch_size=7, show_progress=False):
        matrices.append(matrix)
        paths += meta["image_path"].tolist()
    return np.concatenate(matrices), paths


def npy_rows(cli, tmp_path: Path, inputs: Path, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The same images embedded into an NPY: row vectors by path."""
    out = tmp_path / f"ref-{dtype}.npy"
    assert cli("embed", str(inputs), *MODEL, "--dtype", dtype, "-o", str(out)).exit_code == 0
    lines = (tmp_path / f"ref-{dtype}.rows.jsonl").read_text().splitlines()[1:]
    return dict(zip(map(json.loads, lines), np.load(out), strict=True))


def test_embedding_reader_reads_every_row_with_its_path(cli, shapes, tmp_path):
    out = tmp_path / "cr"
    ran = embed_layout(cli, out, shapes, extra=("--part-size", "5"))
    assert ran.exit_code == 0, ran.stderr
    matrix, paths = layout_rows(out)
    assert sorted(paths) == sorted(all_images(shapes))  # every row, each once
    assert {np.load(f).dtype for f in (out / "img_emb").glob("*.npy")} == {np.dtype(np.float16)}  # as clip-retrieval
    assert len(list((out / "img_emb").glob("*.npy"))) == 7  # 32 rows in parts of 5
    reference = npy_rows(cli, tmp_path, shapes)
    for path, vector in zip(paths, matrix, strict=True):  # row-aligned: each vector is its path's
        np.testing.assert_allclose(vector.astype(np.float32), reference[path], atol=2e-3)
    record = json.loads((out / "clipcli.json").read_text())
    assert (record["model"], record["dim"], record["dtype"]) == ("tiny-shapes", 64, "float16")
    meta = pq.read_table(out / "metadata" / "metadata_000000.parquet")
    assert {"image_path", "caption", "width", "height", "bytes", "mtime", "folder"} <= set(meta.column_names)
    assert "embedding" not in meta.column_names


def test_float32_on_request(cli, shapes, tmp_path):
    out = tmp_path / "cr"
    assert embed_layout(cli, out, shapes / "seen", extra=("--dtype", "float32")).exit_code == 0
    matrix, paths = layout_rows(out)
    assert {np.load(f).dtype for f in (out / "img_emb").glob("*.npy")} == {np.dtype(np.float32)}
    reference = npy_rows(cli, tmp_path, shapes / "seen")
    np.testing.assert_allclose(matrix, np.stack([reference[p] for p in paths]), atol=1e-6)
    ran = embed_layout(cli, out, shapes / "seen")  # float16 by default: not what the folder holds
    assert ran.exit_code == 2 and "--dtype float32" in ran.stderr


def test_embed_without_layout_goes_on_in_the_folders_layout(cli, shapes, tmp_path):
    """`embed busy/ -o cr/` (no --layout) into a layout folder wrote a clipcli part there: its rows were
    in no result, a rerun called them unchanged, and the layout's next run was refused."""
    out = tmp_path / "cr"
    assert embed_layout(cli, out, shapes / "seen").exit_code == 0
    ran = cli("embed", str(shapes / "busy"), *MODEL, "-o", f"{out}/")
    assert ran.exit_code == 0 and "embedded 6, unchanged 0" in ran.stderr, ran.stderr
    assert not list(out.glob("*.parquet"))
    _, paths = layout_rows(out)
    assert sorted(paths) == sorted(all_images(shapes / "seen") | all_images(shapes / "busy"))
    refused = cli("embed", str(shapes / "busy"), *MODEL, "--layout", "parquet", "-o", f"{out}/")
    assert refused.exit_code == 2 and "is a folder in clip-retrieval's layout" in refused.stderr
    for inside in ("metadata/", "img_emb/", "img_emb/x.npy", "sub/deeper/"):  # among the layout's files
        refused = cli("embed", str(shapes / "busy"), *MODEL, "-o", f"{out}/{inside}")
        assert refused.exit_code == 2 and "is inside a folder in clip-retrieval's layout" in refused.stderr
    assert not list(out.rglob("part-*.parquet"))
    assert "embedded 0, unchanged" in embed_layout(cli, out, shapes / "seen", shapes / "busy").stderr


def test_a_dtype_that_differs_from_the_datasets_names_both(cli, shapes, tmp_path):
    out = tmp_path / "emb"
    assert cli("embed", str(shapes / "seen"), *MODEL, "-o", f"{out}/").exit_code == 0
    ran = cli("embed", str(shapes / "seen"), *MODEL, "--dtype", "float16", "-o", f"{out}/")
    assert ran.exit_code == 2 and "holds float32 embeddings; pass --dtype float32" in ran.stderr, ran.stderr


def test_reruns_embed_only_what_changed_and_drop_what_is_gone(cli, shapes, tmp_path):
    out = tmp_path / "cr"
    assert embed_layout(cli, out, shapes / "seen", shapes / "busy", extra=("--part-size", "4")).exit_code == 0
    ran = embed_layout(cli, out, shapes, extra=("--part-size", "4"))
    assert "embedded 10, unchanged 22, removed 0" in ran.stderr
    gone, changed = shapes / "seen" / "red-square.jpg", shapes / "busy" / "blue-star.jpg"
    gone.unlink()
    shutil.copyfile(shapes / "seen" / "blue-cross.jpg", changed)
    ran = embed_layout(cli, out, shapes, extra=("--part-size", "4"))
    assert "embedded 1, unchanged 30, removed 1" in ran.stderr
    matrix, paths = layout_rows(out)
    assert sorted(paths) == sorted(all_images(shapes))
    cross = paths.index(str(shapes / "seen" / "blue-cross.jpg"))
    np.testing.assert_array_equal(matrix[paths.index(str(changed))], matrix[cross])  # embedded as it is now
    assert "embedded 0, unchanged 31, removed 0" in embed_layout(cli, out, shapes).stderr


def test_a_killed_run_leaves_whole_pairs(cli, shapes, tmp_path):
    """What a kill can leave (a matrix renamed but not its metadata, temporaries) is not read as rows,
    and the next run removes it and carries on."""
    out = tmp_path / "cr"
    assert embed_layout(cli, out, shapes / "seen").exit_code == 0
    orphan = out / "img_emb" / "img_emb_000007.npy"
    np.save(orphan, np.ones((3, 64), np.float16))
    (out / "img_emb" / ".img_emb_000007.npy.pending").touch()  # marked by the run that was killed
    tmp = out / "metadata" / ".metadata_000008.parquet.999999.tmp"
    tmp.write_bytes(b"half a part")
    ran = cli("rank", "a photo of a red circle.", f"{out}/", *MODEL, "-k", "50", "-f", "csv")
    assert ran.exit_code == 0 and len(ran.stdout.splitlines()) == 1 + 16  # the pair's rows, not the orphan's
    ran = embed_layout(cli, out, shapes)
    assert ran.exit_code == 0 and "embedded 16, unchanged 16" in ran.stderr
    assert not orphan.exists() and not tmp.exists()
    assert not list((out / "img_emb").glob(".*"))
    assert sorted(layout_rows(out)[1]) == sorted(all_images(shapes))


@pytest.mark.parametrize("moment", ["after the matrix", "removing a pair"])
def test_sigkill_between_a_pairs_two_files_is_cleaned_by_the_next_run(shapes, tmp_path, moment):
    """A real SIGKILL where a matrix stands without its metadata: after its rename, before the
    metadata's; or in a rerun's removal of a stale pair, between the metadata's removal and the
    matrix's. The next run removes the matrix the killed one marked, and every row is there once."""
    import subprocess
    import sys

    out = tmp_path / "cr"
    if moment == "removing a pair":
        done = subprocess.run([sys.executable, "-m", "clipcli", "embed", str(shapes), *MODEL, "--layout",
                               "clip-retrieval", "-o", f"{out}/"], capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        (shapes / "seen" / "blue-cross.jpg").unlink()  # its pair is rewritten without it, then removed
    kill = (
        "import os, pathlib, signal, sys\n"
        "from clipcli.store import clip_retrieval as cr\n"
        "from clipcli.cli import main\n"
        "real_unlink = pathlib.Path.unlink\n"
        "def write_table(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "def unlink(self, *args, **kwargs):\n"
        "    if self.name.startswith('img_emb_'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real_unlink(self, *args, **kwargs)\n"
        + ("cr.write_table = write_table\n" if moment == "after the matrix" else "pathlib.Path.unlink = unlink\n")
        + "sys.argv = ['clipcli', *sys.argv[1:]]\nmain()\n"
    )
    args = ["embed", str(shapes), *MODEL, "--layout", "clip-retrieval", "-o", f"{out}/"]
    killed = subprocess.run([sys.executable, "-c", kill, *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    marks = list((out / "img_emb").glob(".*.pending"))
    assert len(marks) == 1 and (out / "img_emb" / marks[0].name[1 : -len(".pending")]).exists()
    again = subprocess.run([sys.executable, "-m", "clipcli", *args], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert sorted(layout_rows(out)[1]) == sorted(all_images(shapes))  # each row once, none lost
    assert not list((out / "img_emb").glob(".*")) and len(list((out / "img_emb").iterdir())) == len(
        list((out / "metadata").iterdir())
    )


def test_a_matrix_without_metadata_that_no_run_left_is_never_removed(cli, shapes, tmp_path):
    """Found by attack: a user's img_emb_000007.npy (from another clip-retrieval run, say) was taken for a
    killed run's leftover and deleted. Only a matrix clipcli marked as pending is; another is refused."""
    out = tmp_path / "cr"
    assert embed_layout(cli, out, shapes / "seen").exit_code == 0
    theirs = out / "img_emb" / "img_emb_000007.npy"
    np.save(theirs, np.ones((3, 64), np.float16))
    before = theirs.read_bytes()
    ran = embed_layout(cli, out, shapes)
    assert ran.exit_code == 2 and "img_emb/img_emb_000007.npy has no metadata" in ran.stderr, ran.stderr
    assert theirs.read_bytes() == before
    theirs.unlink()
    (out / "img_emb" / "img_emb_000009.npy").mkdir()  # a folder named like a matrix: one line, exit 2
    ran = embed_layout(cli, out, shapes)
    assert ran.exit_code == 2 and "holds img_emb/img_emb_000009.npy, which clipcli did not write" in ran.stderr
    (out / "img_emb" / "img_emb_000009.npy").rmdir()
    for name in ("img_emb/.img_emb_000001.npy.pending", "metadata/.metadata_000000.parquet.99999.tmp"):
        (out / name).mkdir()  # a folder by the name of clipcli's mark or temporary: refused, not removed
        ran = embed_layout(cli, out, shapes)
        assert ran.exit_code == 2 and f"holds {name}, which clipcli did not write" in ran.stderr, ran.stderr
        assert (out / name).is_dir()
        (out / name).rmdir()


def test_refuses_folders_clipcli_did_not_write(cli, shapes, tmp_path):
    mine = tmp_path / "mine"
    (mine / "notes.txt").parent.mkdir()
    (mine / "notes.txt").write_text("keep me")
    ran = embed_layout(cli, mine, shapes / "seen")
    assert ran.exit_code == 2 and "notes.txt" in ran.stderr and "did not write" in ran.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    theirs = tmp_path / "theirs"  # clip-retrieval's own output: no record of clipcli's
    (theirs / "img_emb").mkdir(parents=True)
    (theirs / "metadata").mkdir()
    np.save(theirs / "img_emb" / "img_emb_0.npy", np.zeros((1, 64), np.float16))
    ran = embed_layout(cli, theirs, shapes / "seen")
    assert ran.exit_code == 2 and "did not write" in ran.stderr
    assert [p.name for p in (theirs / "img_emb").iterdir()] == ["img_emb_0.npy"]
    ran = cli("rank", "a photo of a red circle.", f"{theirs}/", *MODEL)  # no record of the model: refused
    assert ran.exit_code == 2 and "clipcli.json" in ran.stderr and "Traceback" not in ran.stderr
    ours = tmp_path / "ours"
    assert embed_layout(cli, ours, shapes / "seen").exit_code == 0
    (ours / "metadata" / "extra.parquet").write_bytes(b"x")  # would misalign embedding-reader's pairs
    ran = embed_layout(cli, ours, shapes / "seen")
    assert ran.exit_code == 2 and "metadata/extra.parquet" in ran.stderr


def test_written_by_this_process_into_a_local_folder(cli, shapes, tmp_path):
    """Ray workers and --shard runs write clipcli's own parts: this layout is refused before any image."""
    for extra in (("--engine", "ray"), ("--shard", "0/2")):
        ran = embed_layout(cli, tmp_path / "cr", shapes / "seen", extra=extra)
        assert ran.exit_code == 2 and ran.stderr.startswith("Error:") and "Traceback" not in ran.stderr
        assert not (tmp_path / "cr" / "img_emb").exists()
    ran = cli("embed", str(shapes), *MODEL, "--layout", "clip-retrieval", "-o", "s3://bucket/emb/")
    assert ran.exit_code == 2 and "local folder" in ran.stderr


def _tsv(text: str) -> list[tuple[float, str]]:
    return [(float(s), p) for s, p in (line.split("\t") for line in text.splitlines())]


def test_rank_index_and_dedup_read_the_layout(cli, shapes, tmp_path):
    from PIL import Image

    star = Image.open(shapes / "seen" / "blue-star.jpg")  # a copy, pixel for pixel, for --keep to list
    star.resize((star.width // 2, star.height // 2)).save(shapes / "seen" / "blue-star-small.jpg", quality=70)
    out, parquet = tmp_path / "cr", tmp_path / "pq"
    assert embed_layout(cli, out, shapes, extra=("--part-size", "6")).exit_code == 0
    same = ("--dtype", "float16")
    assert cli("embed", str(shapes), *MODEL, *same, "--part-size", "6", "-o", f"{parquet}/").exit_code == 0
    query = ("rank", "a photo of a red circle.", *MODEL, "-k", "5", "-f", "tsv")
    from_layout = _tsv(cli(*query[:2], f"{out}/", *query[2:]).stdout)
    from_parquet = _tsv(cli(*query[:2], f"{parquet}/", *query[2:]).stdout)
    assert from_layout == from_parquet
    assert Path(from_layout[0][1]).name == "red-circle.jpg"
    assert _tsv(cli(*query[:2], f"{out}/", *query[2:], "--no-cache").stdout) == from_layout  # pair by pair
    ran = cli("index", f"{out}/")
    assert ran.exit_code == 0 and "33 rows" in ran.stderr, ran.stderr
    assert _tsv(cli(*query[:2], f"{out}/", *query[2:]).stdout) == from_layout  # now through the index
    groups = {}
    for source in (out, parquet):
        ran = cli("dedup", f"{source}/", *MODEL, "-f", "csv")
        assert ran.exit_code == 0, ran.stderr
        rows = [line.split(",") for line in ran.stdout.splitlines()[1:]]
        found: dict[str, set[str]] = {}
        for group, path, *_ in rows:
            found.setdefault(group, set()).add(path)
        groups[source] = sorted(map(sorted, found.values()))
    assert groups[out] == groups[parquet] and groups[out]
    # --keep lists the verified copies: the layout's metadata records each file's size and mtime too; the
    # other members of the groups are pictures the bundled model finds alike, named on stderr
    listed = {s: cli("dedup", f"{s}/", *MODEL, "--keep", "largest", "-0") for s in (out, parquet)}
    assert [r.exit_code for r in listed.values()] == [1, 1], listed[out].stderr
    assert listed[out].stdout == listed[parquet].stdout == f"{shapes / 'seen' / 'blue-star-small.jpg'}\0"
    assert listed[out].stderr.count("not listed: its picture") == sum(len(g) - 1 for g in groups[out]) - 1


def test_float16_rows_score_as_unit_vectors(cli, shapes, tmp_path):
    """A unit vector rounded to float16 is a few parts in 10,000 off unit length: an image scored 1.0002
    against its own row, and dedup reported similarities above 1. Such rows are normalised as read."""
    out, parquet = tmp_path / "cr", tmp_path / "h.parquet"
    assert embed_layout(cli, out, shapes).exit_code == 0  # float16, as clip-retrieval stores it
    assert cli("embed", str(shapes), *MODEL, "--dtype", "float16", "-o", str(parquet)).exit_code == 0
    image = next(iter(sorted(all_images(shapes))))
    for source in (f"{out}/", str(parquet)):
        for cache in ((), ("--no-cache",)):
            ran = cli("rank", "--image", image, source, *MODEL, "-k", "3", "-f", "jsonl", *cache)
            assert ran.exit_code == 0, ran.stderr
            scores = [json.loads(line)["score"] for line in ran.stdout.splitlines()]
            assert abs(scores[0] - 1) < 1e-6 and max(scores) <= 1 + 1e-6, scores
        ran = cli("dedup", source, *MODEL, "-f", "jsonl")
        similarities = [json.loads(line)["similarity_to_group_representative"] for line in ran.stdout.splitlines()]
        assert similarities and max(similarities) <= 1 + 1e-6, similarities
