"""The relevance cutoff (clipcli/search/cutoff.py): `rank --min-score` and `--cutoff auto|Z`, pinned on
the bundled model over samples/ (a shape that is there comes back; one that is not returns nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipcli.search.cutoff import AUTO_MIN_Z, auto_cutoff, auto_z, sample_rows

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


@pytest.fixture(scope="module")
def emb(samples_emb: Path) -> Path:
    return samples_emb


def _tsv(text: str) -> list[tuple[float, str]]:
    return [(float(s), p) for s, p in (line.split("\t") for line in text.splitlines())]


def _rank(cli, *args: str) -> list[tuple[float, str]]:
    ran = cli("rank", *args, "-m", "tiny-shapes", "--precision", "fp32")
    assert ran.exit_code == 0, ran.stderr
    return _tsv(ran.stdout)


@pytest.mark.parametrize("shape", ["pink cross", "cyan heart"])
def test_auto_cutoff_returns_a_shape_that_is_there(cli, emb, shape):
    hits = _rank(cli, shape, str(emb), "--cutoff", "auto")
    assert hits and Path(hits[0][1]).stem == shape.replace(" ", "-")
    assert len(hits) < 10  # not every row: only what stands out


@pytest.mark.parametrize("shape", ["yellow star", "red star", "cyan triangle"])
def test_auto_cutoff_returns_nothing_for_a_shape_that_is_not(cli, emb, shape):
    assert not any(Path(p).stem == shape.replace(" ", "-") for p in SAMPLES.rglob("*.jpg"))
    assert _rank(cli, shape, str(emb), "-k", "3")  # without the cutoff: the three nearest, all wrong
    ran = cli("rank", shape, str(emb), "-m", "tiny-shapes", "--precision", "fp32", "--cutoff", "auto")
    assert ran.exit_code == 0 and ran.stdout == "" and "ranked 0 results" in ran.stderr


def test_cutoff_z_is_mean_plus_z_sd_of_the_query_over_the_rows(cli, emb):
    from clipcli.models.loader import load_model
    from clipcli.zeroshot.encode import encode_texts

    table = pq.read_table(next(emb.glob("*.parquet")))
    matrix = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    query = encode_texts(load_model("tiny-shapes", precision="fp32"), ["a green heart"]).numpy()[0]
    scores = matrix @ (query / np.linalg.norm(query))
    for z in (0.5, 1.5):
        threshold = scores.mean() + z * scores.std()
        kept = sorted(float(s) for s in scores if s >= threshold + 1e-4)  # clear of float noise
        hits = _rank(cli, "a green heart", str(emb), "-k", "32", "--cutoff", str(z))
        assert len(hits) in range(len(kept), int((scores >= threshold - 1e-4).sum()) + 1)
        assert 0 < len(hits) < 32


@pytest.mark.slow
def test_auto_cutoff_on_images_matches_saved_embeddings(cli, emb):
    live = _rank(cli, "pink cross", str(SAMPLES), "--cutoff", "auto")
    saved = _rank(cli, "pink cross", str(emb), "--cutoff", "auto")
    assert [p for _, p in live] == [p for _, p in saved]


def test_min_score_is_threshold(cli, emb):
    a = _rank(cli, "a red circle", str(emb), "--min-score", "0.6")
    assert a == _rank(cli, "a red circle", str(emb), "--threshold", "0.6")
    assert a and all(s >= 0.6 for s, _ in a) and len(a) < 10


def test_bad_cutoff_is_a_one_line_error(cli, emb):
    ran = cli("rank", "x", str(emb), "-m", "tiny-shapes", "--cutoff", "high")
    assert ran.exit_code == 2 and ran.stderr.count("\n") == 1 and "--cutoff 'high'" in ran.stderr


def test_auto_cutoff_arithmetic_and_sample():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(10_000, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    query = rows[0]
    sample = sample_rows(rows, n=500, seed=0)
    assert sample.shape == (500, 16)
    np.testing.assert_array_equal(sample, sample_rows(rows, n=500, seed=0))  # fixed
    assert not np.array_equal(sample, sample_rows(rows, n=500, seed=1))
    assert len(sample_rows(rows[:20], n=500)) == 20  # fewer rows than n: all of them
    scores = sample @ query
    assert auto_cutoff(query, sample, z=2.0) == pytest.approx(scores.mean() + 2 * scores.std(), rel=1e-5)
    assert auto_cutoff(query, sample, rows=10_000) == pytest.approx(scores.mean() + auto_z(10_000) * scores.std())
    assert auto_z(32) == AUTO_MIN_Z and 3.6 < auto_z(10_000) < 3.8 and auto_z(1_000_000) > auto_z(10_000)
    assert auto_cutoff(query, np.tile(rows[1], (5, 1))) == float("inf")  # all alike: nothing stands out
