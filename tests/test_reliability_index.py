"""Issue 21, the ANN index: a folder it did not make, content restored behind its back, SIGTERM mid-build,
damaged or impossible indexes, and messages that point the right way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clipcli.store.index import META, default_index_path, exact_search, open_index, read_meta
from clipcli.store.npy import open_npy, write_npy
from clipcli.store.parts import ModelTag
from clipcli.store.saved import Expect, open_matrix

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
ROOT = Path(__file__).resolve().parent.parent
WIDE = {"COLUMNS": "200"}


def tiny_tag(cli, folder: Path) -> tuple[ModelTag, int]:
    """The tag (and width) of tiny-shapes embeddings, read from a real `embed` output."""
    small = folder / "small" / "tag.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(small)).exit_code == 0
    saved = open_npy(small)
    return saved.header.tag, int(saved.matrix.shape[1])


def random_rows(n: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- item 1: `index -o DIR` never deletes or overwrites what it did not write -----------------------


def test_index_into_a_folder_of_other_files_refuses_and_keeps_every_file(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", "emb.npy").exit_code == 0
    np.save("features.npy", np.arange(10))
    Path("meta.json").write_text('{"dataset":1}\n')
    before = snapshot(tmp_path)
    assert {"emb.npy", "emb.rows.jsonl", "features.npy", "meta.json"} <= set(before)

    ran = cli("index", "emb.npy", "-o", ".", env=WIDE)
    assert ran.exit_code == 2, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an index folder clipcli made" in lines[0] and lines[0].startswith("Error: .:")
    assert snapshot(tmp_path) == before  # every file byte-identical, nothing added (no lock, no marker)

    rebuilt = cli("index", "emb.npy", "-o", ".", "--rebuild", env=WIDE)  # --rebuild is no way round it
    assert rebuilt.exit_code == 2 and snapshot(tmp_path) == before


def test_an_index_folder_keeps_files_it_did_not_write_across_updates(cli, tmp_path):
    emb = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    assert cli("index", str(emb), "--kind", "hnsw").exit_code == 0
    folder = default_index_path(emb)
    np.save(folder / "notes.npy", np.arange(3))
    (folder / "rows-0000.npy").write_bytes(b"mine")
    (folder / "x.tmp").write_text("mine")
    for extra in (["--kind", "hnsw"], ["--rebuild"], ["--kind", "flat"]):
        assert cli("index", str(emb), *extra).exit_code == 0
    assert np.load(folder / "notes.npy").tolist() == [0, 1, 2]
    assert (folder / "rows-0000.npy").read_bytes() == b"mine" and (folder / "x.tmp").read_text() == "mine"
    named = set(read_meta(folder).files.values())
    ours = {p.name for p in folder.iterdir()} - {"notes.npy", "rows-0000.npy", "x.tmp", META}
    assert ours - named == {".clipcli-index"}  # what earlier builds wrote is gone, the marker stays


def test_a_forged_marker_gets_no_file_it_lists_removed(cli, tmp_path):
    """A marker is only a list of names: one copied from elsewhere, or written by someone else, that
    lists the user's files must not make an update remove them."""
    emb = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    folder = default_index_path(emb)
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(b"precious")
    (folder / "keys.npy").write_bytes(b"precious too")
    (tmp_path / "outside.txt").write_text("precious")
    marker = {"clipcli": "index", "format": 1, "written": ["photo.jpg", "keys.npy", "../outside.txt", ".clipcli-index"]}
    (folder / ".clipcli-index").write_text(json.dumps(marker))
    for extra in (["--kind", "hnsw"], ["--rebuild"], ["--kind", "flat"]):
        assert cli("index", str(emb), *extra).exit_code == 0
    assert (folder / "photo.jpg").read_bytes() == b"precious"
    assert (folder / "keys.npy").read_bytes() == b"precious too"
    assert (tmp_path / "outside.txt").read_text() == "precious"
    assert cli("rank", "a red circle", str(emb), "-m", "tiny-shapes", "-k", "1").exit_code == 0


# --- item 11: a stale index behind restored sizes and mtimes ----------------------------------------


def test_a_stale_index_with_restored_sizes_and_mtimes_is_caught_by_content(cli, tmp_path):
    tag, dim = tiny_tag(cli, tmp_path)
    emb = tmp_path / "emb.npy"
    names = [f"photos/{i:05d}.jpg" for i in range(3000)]
    write_npy(emb, random_rows(3000, dim, 1), names, tag)
    assert cli("index", str(emb), "--kind", "hnsw").exit_code == 0
    stats = {p: p.stat() for p in (emb, emb.with_name("emb.rows.jsonl"))}
    write_npy(emb, random_rows(3000, dim, 2), names, tag)  # other content, same sizes (a backup restored)
    for p, st in stats.items():
        assert p.stat().st_size == st.st_size
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` or `touch -r` leave it

    query = ["rank", "a photo of a red circle.", str(emb), "-m", "tiny-shapes", "-k", "1", "-f", "csv"]
    scan = cli(*query, "--no-index")
    searched = cli(*query, env=WIDE)
    assert searched.exit_code == 0 and scan.exit_code == 0
    assert searched.stdout == scan.stdout  # the top score (and path) a full scan gives
    assert "does not match" in searched.stderr and "scanning every row" in searched.stderr

    # the core: the opened index raises Stale from its search, so every caller can fall back
    from clipcli.store.index import Stale

    opened = open_index(default_index_path(emb), emb, Expect(tag.name, tag.sha256, dim))
    with pytest.raises(Stale, match="clipcli index"):
        opened.search(random_rows(3, dim, 5), 5)


def test_a_parquet_source_rewritten_behind_its_size_and_mtime_is_not_served_from_the_search_cache(cli, tmp_path):
    """The index re-scores Parquet rows through the search cache: the cache must notice the rewrite too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = tmp_path / "emb.parquet"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    table = pq.read_table(emb)
    column = table.column("embedding").combine_chunks()

    def rewrite(order: np.ndarray) -> None:  # uncompressed: the same size whatever the order
        moved = table.set_column(1, table.schema.field("embedding"), column.take(pa.array(order)))
        pq.write_table(moved, emb, compression="NONE", use_dictionary=["model"])

    n = table.num_rows
    rewrite(np.arange(n))
    query = ["rank", "a photo of a red circle.", str(emb), "-m", "tiny-shapes", "-k", "3", "-f", "csv"]
    first = cli(*query)  # builds the search cache
    st = emb.stat()
    rewrite(np.roll(np.arange(n), 1))  # each path now holds its neighbour's embedding
    assert emb.stat().st_size == st.st_size
    os.utime(emb, ns=(st.st_atime_ns, st.st_mtime_ns))
    cached, fresh = cli(*query), cli(*query, "--no-cache")
    assert fresh.stdout != first.stdout
    assert cached.stdout == fresh.stdout


# --- item 16: SIGTERM during an ivfpq build -------------------------------------------------------


def test_sigterm_during_an_ivfpq_build_is_prompt_and_keeps_the_old_index(tmp_path, python):
    """faiss holds off Python's signal handlers while it trains: the polysemous ordering of the PQ code
    books alone runs for minutes at CLIP's width (512) with no check for signals, even over 300 rows
    (cc98338 took minutes to stop here)."""
    from clipcli.store.index import Kind
    from clipcli.store.index_build import build_index

    tag, dim = ModelTag("model-a", "a" * 64, True), 512  # index needs no model: CLIP's width
    emb = tmp_path / "emb.npy"
    rows = random_rows(300, dim, 3)
    write_npy(emb, rows, [f"p/{i}.jpg" for i in range(len(rows))], tag)
    build_index(emb, kind=Kind.FLAT)  # the index there before
    folder = default_index_path(emb)
    before = snapshot(folder)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [python, "-m", "clipcli", "index", str(emb), "--kind", "ivfpq"]
    build = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(build.stderr or []), daemon=True)
    reader.start()
    # faiss warns once per k-means it runs over these 300 rows: the coarse one, then one per PQ code book
    # (dim / 8 of them); after the last comes the code books' ordering, minutes without a signal check.
    deadline = time.monotonic() + 120
    while sum("to 256 centroids" in line for line in list(lines)) < dim // 8 and time.monotonic() < deadline:
        assert build.poll() is None, "".join(lines)
        time.sleep(0.05)
    time.sleep(0.5)
    assert build.poll() is None, "the build ended before the signal: make the dataset larger"
    build.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    try:
        code = build.wait(timeout=60)
    finally:
        build.kill()
    took = time.monotonic() - sent
    reader.join(5)
    err = "".join(lines)
    assert code == 143, err
    assert took < 3.0, f"exit {took:.1f} s after SIGTERM"
    assert "Terminated." in err and "Traceback" not in err
    assert snapshot(folder) == before  # the old index, byte for byte, and no leftovers
    opened = open_index(folder, emb, Expect(tag.name, tag.sha256, dim))  # it loads and answers
    scores, found = opened.search(rows[:3], 1)
    assert found[:, 0].tolist() == [0, 1, 2] and np.allclose(scores[:, 0], 1.0, atol=1e-4)


# --- item 17: impossible or damaged indexes are user errors ---------------------------------------


def one_line_error(ran, *needles: str) -> None:
    assert ran.exit_code == 2, (ran.exit_code, ran.stderr)
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), ran.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_ivfpq_on_too_few_rows_and_hnsw_on_none_are_one_line_errors(cli, tmp_path):
    tag, dim = tiny_tag(cli, tmp_path)
    few = tmp_path / "few.npy"
    write_npy(few, random_rows(40, dim, 0), [f"{i}.jpg" for i in range(40)], tag)
    one_line_error(cli("index", str(few), "--kind", "ivfpq", env=WIDE), str(few), "40 rows", "--kind")
    empty = tmp_path / "empty.npy"
    write_npy(empty, np.zeros((0, dim), np.float32), [], tag)
    one_line_error(cli("index", str(empty), "--kind", "hnsw", env=WIDE), str(empty), "no rows")
    assert not default_index_path(few).exists() and not default_index_path(empty).exists()


@pytest.mark.parametrize("damage", ["out of range", "too few"])
def test_an_index_with_damaged_row_ids_is_a_one_line_error(cli, tmp_path, damage):
    emb = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    assert cli("index", str(emb), "--kind", "hnsw").exit_code == 0
    folder = default_index_path(emb)
    rows_file = folder / read_meta(folder).files["rows"]
    rows = np.load(rows_file)
    np.save(rows_file, rows + 1000 if damage == "out of range" else rows[:3])
    for argv in (["rank", "a red circle", str(emb), "-m", "tiny-shapes"], ["dedup", str(emb)]):
        one_line_error(cli(*argv, env=WIDE), str(folder), "rebuild")


# --- item 19: messages that send users the right way ----------------------------------------------


def test_a_model_mismatch_beside_an_index_gives_the_advice_that_works(cli, tmp_path, vit_ckpt):
    emb = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    without = cli("rank", "a red circle", str(emb), "-m", str(vit_ckpt), env=WIDE)
    assert cli("index", str(emb), "--kind", "hnsw").exit_code == 0
    beside = cli("rank", "a red circle", str(emb), "-m", str(vit_ckpt), env=WIDE)
    for ran in (without, beside):
        one_line_error(ran, str(emb), "made with tiny-shapes", "--model tiny-shapes", "embed")
        assert "clipcli index" not in ran.stderr and "write to another output" not in ran.stderr
    assert cli("rank", "a red circle", str(emb), "-m", "tiny-shapes").exit_code == 0  # the advice works


def test_an_index_of_another_model_than_its_source_advises_a_rebuild_that_works(cli, tmp_path, vit_ckpt):
    emb = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    assert cli("index", str(emb), "--kind", "hnsw").exit_code == 0
    emb.unlink()
    emb.with_name("emb.rows.jsonl").unlink()
    assert cli("embed", str(SAMPLES / "seen"), "-m", str(vit_ckpt), "-o", str(emb)).exit_code == 0
    for argv in (["rank", "a red circle", str(emb), "-m", str(vit_ckpt)], ["dedup", str(emb)]):
        ran = cli(*argv, env=WIDE)
        one_line_error(ran, "index of embeddings made with tiny-shapes", "--rebuild")
        assert "pass --model" not in ran.stderr
    assert cli("index", str(emb), "--rebuild").exit_code == 0  # the advice works
    assert cli("rank", "a red circle", str(emb), "-m", str(vit_ckpt)).exit_code == 0


def test_an_index_whose_source_is_gone_says_so(cli, tmp_path):
    emb = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    elsewhere = tmp_path / "idx"
    assert cli("index", str(emb), "-o", str(elsewhere)).exit_code == 0
    emb.unlink()
    ran = cli("rank", "a red circle", str(emb), "-m", "tiny-shapes", "--index", str(elsewhere), env=WIDE)
    one_line_error(ran, str(emb), "does not exist")
    assert "not among the sources given" not in ran.stderr


def test_index_of_a_missing_path_says_it_does_not_exist(cli, tmp_path):
    one_line_error(cli("index", str(tmp_path / "nope") + "/", env=WIDE), "nope", "does not exist")


def test_missing_faiss_names_each_commands_own_way_out(cli, tmp_path, monkeypatch):
    emb = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    assert cli("index", str(emb), "--kind", "hnsw").exit_code == 0
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    dedup = cli("dedup", str(emb), env=WIDE)
    one_line_error(dedup, "faiss", "dedup", "--no-index")
    assert "rank with" not in dedup.stderr
    assert cli("dedup", str(emb), "--no-index").exit_code == 0
    rank = cli("rank", "a red circle", str(emb), "-m", "tiny-shapes", env=WIDE)
    one_line_error(rank, "faiss", "--no-index")
    built = cli("index", str(emb), "--kind", "hnsw", "--rebuild", env=WIDE)
    one_line_error(built, "faiss", "--kind flat")
    assert "--no-index" not in built.stderr


def test_a_saved_source_still_scans_equal_after_the_check(tmp_path):
    """The content check leaves a current index's answers exactly as they were."""
    from clipcli.store.index import Kind
    from clipcli.store.index_build import build_index

    tag = ModelTag("model-a", "a" * 64, True)
    emb = tmp_path / "emb.npy"
    rows = random_rows(3000, 32, 9)
    write_npy(emb, rows, [f"{i}.jpg" for i in range(3000)], tag)
    build_index(emb, kind=Kind.HNSW)
    expect = Expect(tag.name, tag.sha256, 32)
    opened = open_index(default_index_path(emb), emb, expect)
    queries = rows[:20]
    scores, found = opened.search(queries, 5)
    exact_scores, _ = exact_search(open_matrix(emb, expect), queries, 5)
    assert (found[:, 0] == np.arange(20)).all() and np.allclose(scores[:, 0], exact_scores[:, 0])
    assert json.loads((default_index_path(emb) / ".clipcli-index").read_text())["written"]


def test_an_unmarked_folder_whose_meta_json_names_a_users_file_never_loses_it(cli, tmp_path):
    """Found by a fault run after the first fix: a folder with no marker whose meta.json reads as an index
    (copied from one, then edited to name the user's own file) was adopted, and that file removed."""
    emb = tmp_path / "e.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    assert cli("index", str(emb)).exit_code == 0
    real = default_index_path(emb)
    fake = tmp_path / "fake"
    fake.mkdir()
    meta = json.loads((real / META).read_text())
    user_file = next(iter(meta["files"]))
    meta["files"][user_file] = "user.npy"
    (fake / META).write_text(json.dumps(meta))
    np.save(fake / "user.npy", np.arange(7))
    before = (fake / "user.npy").read_bytes()
    ran = cli("index", str(emb), "-o", str(fake), "--rebuild")
    assert ran.exit_code == 0, ran.stderr
    assert (fake / "user.npy").read_bytes() == before  # a meta.json proves nothing about who wrote a file
    assert "answered" not in ran.stderr
    assert cli("rank", "a red circle", str(emb), "-m", "tiny-shapes", "--index", str(fake)).exit_code == 0
