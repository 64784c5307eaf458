"""`rank --where`: a DuckDB filter over the columns saved beside the vectors, applied before the top k
(so k results come back when k rows match, with an index too), and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcli.errors import InputError
from clipcli.search.where import matching_paths, matching_rows

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


@pytest.fixture(scope="module")
def emb(samples_emb: Path) -> Path:
    return samples_emb


@pytest.fixture(scope="module")
def big(emb, tmp_path_factory) -> tuple[Path, np.ndarray, list[str]]:
    """6,000 random rows in two parts (the model tag of `emb`'s), 1% of them in folder 'rare', with an
    HNSW index beside them: an index proposes 100 candidates, so a filter applied after it would find ~1."""
    from clipcli.store.index import Kind
    from clipcli.store.index_build import build_index

    schema = pq.read_schema(next(emb.glob("*.parquet")))
    rng = np.random.default_rng(7)
    matrix = rng.normal(size=(6000, 64)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    paths = [f"/nowhere/{'rare' if i % 100 == 37 else 'common'}/{i}.jpg" for i in range(6000)]
    folder = tmp_path_factory.mktemp("big") / "big"
    folder.mkdir()
    for part, (lo, hi) in enumerate([(0, 2500), (2500, 6000)]):
        table = pa.table(
            {
                "path": paths[lo:hi],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix[lo:hi].ravel()), 64),
                "folder": [str(Path(p).parent) for p in paths[lo:hi]],
                "width": pa.array(np.arange(lo, hi), pa.int32()),
            }
        ).replace_schema_metadata(schema.metadata)
        pq.write_table(table, folder / f"part-{part:06d}.parquet")
    assert build_index(folder, kind=Kind.HNSW).kind is Kind.HNSW
    return folder, matrix, paths


def _tsv(text: str) -> list[tuple[float, str]]:
    return [(float(s), p) for s, p in (line.split("\t") for line in text.splitlines())]


def _rank(cli, *args: str) -> list[tuple[float, str]]:
    ran = cli("rank", *args, "-m", "tiny-shapes", "--precision", "fp32")
    assert ran.exit_code == 0, ran.stderr
    return _tsv(ran.stdout)


def test_where_keeps_matching_rows_before_the_top_k(cli, emb):
    hits = _rank(cli, "a red circle", str(emb), "--where", "folder LIKE '%busy%'", "-k", "6")
    busy = sorted(str(p) for p in (SAMPLES / "busy").glob("*.jpg"))
    assert sorted(p for _, p in hits) == busy  # all six, though most score below other folders' rows
    assert Path(hits[0][1]).name == "red-circle.jpg"
    everywhere = _rank(cli, "a red circle", str(emb), "-k", "6")
    assert sum("/busy/" in p for _, p in everywhere) < 6


def test_where_with_an_index_returns_k_rows_scored_exactly(cli, big):
    folder, matrix, paths = big
    assert (folder.parent / "big.index" / "meta.json").exists()
    hits = _rank(cli, "a red circle", str(folder), "--where", "folder = '/nowhere/rare'", "-k", "10")
    assert len(hits) == 10 and all("/rare/" in p for _, p in hits)
    from clipcli.models.loader import load_model
    from clipcli.zeroshot.encode import encode_texts

    query = encode_texts(load_model("tiny-shapes", precision="fp32"), ["a red circle"]).numpy()[0]
    rare = np.array([i for i, p in enumerate(paths) if "/rare/" in p])
    scores = matrix[rare] @ (query / np.linalg.norm(query))
    order = rare[np.argsort(-scores)[:10]]
    assert [p for _, p in hits] == [paths[i] for i in order]  # rows of both parts, mapped right
    unfiltered = _rank(cli, "a red circle", str(folder), "-k", "10")
    assert sum("/rare/" in p for _, p in unfiltered) < 10


def test_matching_rows_and_paths_across_parts(big):
    folder, _, paths = big
    rows = matching_rows(folder, "width BETWEEN 2498 AND 2502")
    assert rows.tolist() == [2498, 2499, 2500, 2501, 2502]
    assert matching_paths(folder, "width < 2") == {paths[0], paths[1]}


def test_a_missing_column_is_a_one_line_error_naming_it(cli, emb, tmp_path):
    old = tmp_path / "old.parquet"  # a dataset from before the metadata columns
    table = pq.read_table(next(emb.glob("*.parquet")))
    pq.write_table(table.select(["path", "embedding"]).replace_schema_metadata(table.schema.metadata), old)
    ran = cli("rank", "x", str(old), "-m", "tiny-shapes", "--where", "taken >= '2024-06-01'")
    assert ran.exit_code == 2 and ran.stderr.count("\n") == 1
    assert "no column 'taken'" in ran.stderr and str(old) in ran.stderr
    assert len(_rank(cli, "x", str(old), "--where", "path LIKE '%/seen/%'", "-k", "50")) == 16  # path still works


@pytest.mark.parametrize(
    "where,says",
    [
        ("width >", "syntax error"),
        ("1=1; DROP TABLE rows", "one SQL expression"),
        ("path IN (SELECT * FROM read_text('/etc/passwd'))", "disabled"),
        ("  ", "an empty filter"),
    ],
)
def test_a_bad_filter_is_a_one_line_error(cli, emb, where, says):
    ran = cli("rank", "x", str(emb), "-m", "tiny-shapes", "--where", where)
    assert ran.exit_code == 2 and ran.stderr.count("\n") == 1 and says in ran.stderr, ran.stderr


def test_where_only_for_saved_parquet(cli, emb, tmp_path):
    ran = cli("rank", "x", str(SAMPLES), "-m", "tiny-shapes", "--where", "width > 1")
    assert ran.exit_code == 2 and ran.stderr.count("\n") == 1 and "not images" in ran.stderr
    npy = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "busy"), "-m", "tiny-shapes", "-o", str(npy)).exit_code == 0
    ran = cli("rank", "x", str(npy), "-m", "tiny-shapes", "--where", "width > 1")
    assert ran.exit_code == 2 and "NPY" in ran.stderr
    with pytest.raises(InputError, match="no such file"):
        matching_paths(tmp_path / "missing", "width > 1")


def test_without_duckdb_the_error_names_the_extra(cli, emb, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "duckdb", None)  # as if not installed
    ran = cli("rank", "x", str(emb), "-m", "tiny-shapes", "--where", "width > 1")
    assert ran.exit_code == 2 and ran.stderr.count("\n") == 1 and "pip install 'clipcli[sql]'" in ran.stderr
