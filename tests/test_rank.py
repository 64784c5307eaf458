"""`clipcli rank`: text and image queries, saved embeddings, the reverse direction, output forms."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clipcli.search.rank import TopK

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPCLI_CACHE", str(tmp_path / "cache"))


def _tsv(text: str) -> list[tuple[float, str]]:
    return [(float(s), p) for s, p in (line.split("\t") for line in text.splitlines())]


def test_text_query_over_samples_puts_a_red_circle_first(cli):
    ran = cli("rank", "a photo of a red circle.", str(SAMPLES), "-m", "tiny-shapes", "-k", "3")
    assert ran.exit_code == 0, ran.stderr
    hits = _tsv(ran.stdout)  # piped: score<TAB>path lines
    assert len(hits) == 3
    assert Path(hits[0][1]).name == "red-circle.jpg"
    assert [s for s, _ in hits] == sorted((s for s, _ in hits), reverse=True)


@pytest.mark.slow
def test_saved_embeddings_rank_like_the_images(cli, tmp_path):
    for out in (tmp_path / "emb/", tmp_path / "emb.npy", tmp_path / "emb.parquet"):
        assert cli("embed", str(SAMPLES), "-m", "tiny-shapes", "-o", str(out)).exit_code == 0
    query = ["a photo of a blue star.", "-m", "tiny-shapes", "-k", "8", "--precision", "fp32"]
    live = _tsv(cli("rank", query[0], str(SAMPLES), *query[1:]).stdout)
    for source in ("emb", "emb.npy", "emb.parquet"):
        saved = _tsv(cli("rank", query[0], str(tmp_path / source), *query[1:]).stdout)
        assert [p for _, p in saved] == [p for _, p in live], source
        assert np.allclose([s for s, _ in saved], [s for s, _ in live], atol=2e-3)


def test_a_file_in_two_sources_is_one_result(cli, tmp_path, monkeypatch):
    """`rank --image q.jpg photos/ emb.npy`, emb.npy holding photos/, listed each picture twice."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((SAMPLES / "busy").glob("*.jpg")):
        (photos / p.name).write_bytes(p.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert cli("embed", "photos", "-m", "tiny-shapes", "-o", "emb.npy").exit_code == 0
    query = ["--image", "photos/red-circle.jpg", "-m", "tiny-shapes", "-k", "4"]
    for sources in (["photos/", "emb.npy"], ["emb.npy", "photos/", "emb.npy"]):
        hits = _tsv(cli("rank", *query, *sources).stdout)
        assert len(hits) == 4 and len({p for _, p in hits}) == 4, hits
        assert hits[0] == (pytest.approx(1.0, abs=1e-3), "photos/red-circle.jpg")
        assert [p for _, p in hits] == [p for _, p in _tsv(cli("rank", *query, "emb.npy").stdout)]


@pytest.mark.parametrize("kind", ["dataset", "file", "index", "layout", "npy"])
def test_rows_embedded_from_another_folder_are_named_as_they_open_from_here(cli, tmp_path, monkeypatch, kind):
    """From B, rank printed A's rows as stored (`photos/blue-star.jpg`), which from B names B's own file."""
    for folder, samples in (("A", "busy"), ("B", "seen")):
        (tmp_path / folder / "photos").mkdir(parents=True)
        for p in sorted((SAMPLES / samples).glob("*.jpg"))[:4]:
            (tmp_path / folder / "photos" / p.name).write_bytes(p.read_bytes())
    monkeypatch.chdir(tmp_path / "A")
    out = {"dataset": "emb/", "file": "emb.parquet", "index": "emb/", "layout": "emb/", "npy": "emb.npy"}[kind]
    extra = ["--layout", "clip-retrieval"] if kind == "layout" else []
    assert cli("embed", "photos", "-m", "tiny-shapes", "-o", out, *extra).exit_code == 0
    if kind == "index":
        assert cli("index", "emb/").exit_code == 0
    here = _tsv(cli("rank", "a blue star", out, "-m", "tiny-shapes", "-k", "3").stdout)
    assert len(here) == 3 and all(p.startswith("photos/") for _, p in here)
    monkeypatch.chdir(tmp_path / "B")
    mixed = cli("rank", "a blue star", f"../A/{out}", "photos/", "-m", "tiny-shapes", "-k", "8")
    assert mixed.exit_code == 0, mixed.stderr
    hits = _tsv(mixed.stdout)
    assert {p for _, p in hits} >= {f"../A/{p}" for _, p in here} and all(Path(p).is_file() for _, p in hits)
    assert len({p for _, p in hits}) == 8  # B's own photos are B's, A's are A's
    monkeypatch.chdir(tmp_path)
    (tmp_path / "A").rename(tmp_path / "A moved")  # the project moved as a whole: names open as stored
    monkeypatch.chdir(tmp_path / "A moved")
    moved = _tsv(cli("rank", "a blue star", out, "photos/", "-m", "tiny-shapes", "-k", "3").stdout)
    assert moved == [(pytest.approx(s, abs=2e-3), p) for s, p in here]
    (tmp_path / "A").mkdir()  # moved out of a folder that is still there: its rows are found here, as stored
    assert _tsv(cli("rank", "a blue star", out, "-m", "tiny-shapes", "-k", "3").stdout) == here


def test_image_query_and_reverse_direction(cli, tmp_path):
    query = SAMPLES / "busy" / "blue-star.jpg"
    ran = cli("rank", "--image", str(query), str(SAMPLES), "-m", "tiny-shapes", "-k", "2", "-f", "csv")
    top = pd.read_csv(io.StringIO(ran.stdout))
    assert list(top.columns) == ["path", "score"]  # data outputs name the row first, as classify does
    assert top["path"][0] == str(query) and top["score"][0] == pytest.approx(1.0, abs=1e-3)
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a red circle.\na photo of a blue star.\na photo of a green arrow.\n")
    ran = cli("rank", "--image", str(query), "--texts-file", str(captions), "-m", "tiny-shapes", "-f", "jsonl")
    assert ran.exit_code == 0, ran.stderr
    assert '"text": "a photo of a blue star."' in ran.stdout.splitlines()[0]


def test_threshold_and_formats(cli, tmp_path):
    args = ["rank", "a photo of a yellow heart.", str(SAMPLES), "-m", "tiny-shapes", "-k", "50"]
    everything = _tsv(cli(*args).stdout)
    cut = (everything[0][0] + everything[-1][0]) / 2
    kept = _tsv(cli(*args, "--threshold", str(cut)).stdout)
    assert 0 < len(kept) < len(everything) and all(s >= cut for s, _ in kept)
    out = tmp_path / "hits.parquet"
    assert cli(*args, "-o", str(out)).exit_code == 0
    assert len(pd.read_parquet(out)) == len(everything)


def test_another_models_embeddings_are_refused(cli, tmp_path, vit_ckpt):
    cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(tmp_path / "emb/"))
    ran = cli("rank", "a dog", str(tmp_path / "emb"), "-m", str(vit_ckpt))
    assert ran.exit_code == 2 and "made with tiny-shapes" in ran.stderr
    # a model that cannot be loaded: the error says first which one the rows need
    env = {"CLIPCLI_CACHE": str(tmp_path / "cache"), "CLIPCLI_MIRROR": "http://127.0.0.1:9"}
    ran = cli("rank", "a dog", str(tmp_path / "emb"), "-m", "ViT-B/32", env=env)
    assert ran.exit_code == 2 and ran.stderr.startswith(
        f"Error: {tmp_path / 'emb'}: made with tiny-shapes, not ViT-B/32"
    )
    assert ran.stderr.rstrip().endswith("pass --model tiny-shapes") and ran.stderr.count("\n") == 1


def test_topk_partial_sort_matches_a_full_sort():
    rng = np.random.default_rng(0)
    scores = [rng.standard_normal(1000) for _ in range(5)]
    best = TopK(7)
    for chunk_no, chunk in enumerate(scores):
        best.offer(chunk, lambda idx, c=chunk_no: [f"{c}:{i}" for i in idx])
    flat = sorted(((s, f"{c}:{i}") for c, chunk in enumerate(scores) for i, s in enumerate(chunk)), reverse=True)[:7]
    assert best.names == [n for _, n in flat]


def test_usage_errors(cli):
    assert "no query" in cli("rank", "-m", "tiny-shapes").stderr
    assert "no sources" in cli("rank", "a dog", "-m", "tiny-shapes").stderr


@pytest.mark.slow
def test_search_cache_answers_like_parquet_and_follows_changes(cli, tmp_path, monkeypatch):
    """The memory-mapped copy gives the same hits, is used once built, and is rebuilt when a part changes."""
    import clipcli.store.saved as saved_module

    emb = tmp_path / "emb"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", f"{emb}/").exit_code == 0
    query = ["a photo of a green heart.", str(emb), "-m", "tiny-shapes", "-k", "5", "--precision", "fp32"]
    direct = cli("rank", *query, "--no-cache")
    assert direct.exit_code == 0, direct.stderr
    assert not (tmp_path / "cache" / "clipcli-search").exists()
    first = cli("rank", *query)  # decodes the parts and builds the copy
    (entry,) = (tmp_path / "cache" / "clipcli-search").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "matrix.npy"]
    assert np.load(entry / "matrix.npy").shape == (16, 64)  # one row per sample, tiny-shapes' width

    decoded = []
    monkeypatch.setattr(saved_module, "_open_saved", lambda *a: decoded.append(a) or pytest.fail("decoded"))
    second = cli("rank", *query)  # served by the copy: no Parquet file is opened for embeddings
    assert first.stdout == direct.stdout == second.stdout and not decoded
    monkeypatch.undo()
    monkeypatch.setenv("CLIPCLI_CACHE", str(tmp_path / "cache"))

    # embedding more images adds a part: the copy is stale and the new image must be found
    assert cli("embed", str(SAMPLES / "held-out"), "-m", "tiny-shapes", "-o", f"{emb}/").exit_code == 0
    after = _tsv(cli("rank", "a photo of a purple star.", *query[1:]).stdout)
    again = _tsv(cli("rank", "a photo of a purple star.", *query[1:], "--no-cache").stdout)
    assert after == again and Path(after[0][1]).name == "purple-star.jpg"


def test_search_cache_that_cannot_be_written_is_not_an_error(cli, tmp_path, monkeypatch):
    emb = tmp_path / "emb.parquet"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    monkeypatch.setenv("CLIPCLI_CACHE", str(tmp_path / "blocked"))
    ran = cli("rank", "a photo of a green heart.", str(emb), "-m", "tiny-shapes", "-k", "1")
    assert ran.exit_code == 0, ran.stderr
    assert Path(_tsv(ran.stdout)[0][1]).name == "green-heart.jpg"


@pytest.mark.parametrize("text", ["a.jpg\nb c/ü.png\n\nlast.jpg\n", "a.jpg\nb c/ü.png\n\nlast.jpg", "", "\n"])
def test_sidecar_lines_read_like_splitlines(tmp_path, text):
    from clipcli.store.npy import Lines

    path = tmp_path / "x.paths.txt"
    path.write_bytes(text.encode())
    lines = Lines(path)
    assert [lines[i] for i in range(len(lines))] == text.split("\n")[: len(text.splitlines())]
    assert len(lines) == len(text.splitlines())


@pytest.mark.parametrize("damage", ["truncate matrix", "garbage manifest", "manifest without rows", "manifest a list"])
def test_damaged_search_cache_is_rebuilt(cli, tmp_path, damage):
    import json

    emb = tmp_path / "emb"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", f"{emb}/").exit_code == 0
    query = ["a photo of a green heart.", str(emb), "-m", "tiny-shapes", "-k", "3"]
    first = cli("rank", *query)
    (entry,) = (tmp_path / "cache" / "clipcli-search").iterdir()
    if damage == "truncate matrix":
        (entry / "matrix.npy").write_bytes((entry / "matrix.npy").read_bytes()[:200])
    elif damage == "garbage manifest":
        (entry / "manifest.json").write_text("{not json")
    elif damage == "manifest a list":  # found by attack: an internal error on every later run
        (entry / "manifest.json").write_text("[1, 2]")
    else:
        manifest = json.loads((entry / "manifest.json").read_text())
        del manifest["rows"]
        (entry / "manifest.json").write_text(json.dumps(manifest))
    again = cli("rank", *query)
    assert again.exit_code == 0, again.stderr
    assert again.stdout == first.stdout
    assert "rows" in json.loads((entry / "manifest.json").read_text())  # rebuilt whole


def test_sidecar_that_is_not_utf8_is_named(cli, tmp_path):
    out = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(out)).exit_code == 0
    sidecar = tmp_path / "emb.rows.jsonl"
    header = sidecar.read_bytes().split(b"\n")[0]
    sidecar.write_bytes(header + b"\n" + b"\xff\xfe.jpg\n" * 16)
    ran = cli("rank", "a photo of a green heart.", str(out), "-m", "tiny-shapes", "-k", "1")
    assert ran.exit_code == 2
    assert re.search(r"^Error: .*emb\.rows\.jsonl: line \d+ is not UTF-8 text$", ran.stderr.strip())


def test_a_query_too_long_to_be_a_file_name_ranks_with_an_existing_output(cli, tmp_path):
    """Found by attack: a query of more than 255 bytes was looked at as a path while checking that the
    existing output is no input, and the OS's "file name too long" ended the run as an internal error."""
    out = tmp_path / "out.csv"
    query = "a photo of a " + "very " * 60 + "blue star"
    for _ in range(2):
        ran = cli("rank", query, str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(out))
        assert ran.exit_code == 0, ran.stderr


def test_a_file_gone_from_the_recorded_folder_never_sends_its_rows_to_another_folders_files(cli, tmp_path, monkeypatch):
    """With one of A's photos deleted, rank from B named every row of A's rows after B's own, different
    files of the same names; a folder of Parquet files from two folders took one folder for all."""
    for folder, samples in (("A", "busy"), ("B", "seen")):
        (tmp_path / folder / "photos").mkdir(parents=True)
        names = sorted(p.name for p in (SAMPLES / "busy").glob("*.jpg"))
        pictures = sorted((SAMPLES / samples).glob("*.jpg"))
        for name, picture in zip(names, pictures, strict=False):  # the same names, other pictures in B
            (tmp_path / folder / "photos" / name).write_bytes(picture.read_bytes())
    monkeypatch.chdir(tmp_path / "A")
    for out in ("emb.parquet", "emb.npy"):
        assert cli("embed", "photos", "-m", "tiny-shapes", "-o", out).exit_code == 0
    (tmp_path / "A" / "photos" / names[0]).unlink()
    monkeypatch.chdir(tmp_path / "B")
    for out in ("emb.parquet", "emb.npy"):
        hits = _tsv(cli("rank", "a red circle", f"../A/{out}", "-m", "tiny-shapes", "-k", "3").stdout)
        assert hits and all(p.startswith("../A/photos/") for _, p in hits), hits
    (tmp_path / "C").mkdir()
    monkeypatch.chdir(tmp_path / "C")
    assert cli("embed", "../B/photos", "-m", "tiny-shapes", "-o", "../A/mixed/c.parquet").exit_code == 0
    (tmp_path / "A" / "emb.parquet").rename(tmp_path / "A" / "mixed" / "a.parquet")
    mixed = cli("rank", "a red circle", "../A/mixed/", "-m", "tiny-shapes")
    assert mixed.exit_code == 2 and "embedded from different folders" in mixed.stderr, mixed.stderr


def test_a_recorded_folder_with_a_nul_byte_is_no_internal_error(cli, tmp_path, monkeypatch):
    import json as _json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes((SAMPLES / "busy" / "red-circle.jpg").read_bytes())
    assert cli("embed", "photos", "-m", "tiny-shapes", "-o", "emb.npy").exit_code == 0
    sidecar = tmp_path / "emb.rows.jsonl"
    lines = sidecar.read_text().splitlines()
    header = _json.loads(lines[0])
    sidecar.write_text("\n".join([_json.dumps({**header, "base": "/tmp\x00x"}), *lines[1:]]) + "\n")
    ran = cli("rank", "a red circle", "emb.npy", "-m", "tiny-shapes")
    assert ran.exit_code == 0 and _tsv(ran.stdout)[0][1] == "photos/a.jpg", ran.stderr
