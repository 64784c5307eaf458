"""The ANN index: equal to the exact scan on small sets, recall on a clustered set, refusals, staleness."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipcli.errors import ModelError
from clipcli.store.index import Kind, Stale, default_index_path, exact_search, open_index
from clipcli.store.index_build import build_index
from clipcli.store.npy import write_npy
from clipcli.store.parts import ModelTag
from clipcli.store.saved import Expect

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
TAG = ModelTag("model-a", "a" * 64, True)


def clustered(n: int, dim: int = 64, clusters: int = 200, seed: int = 0) -> np.ndarray:
    """Unit rows around cluster centres, each cluster spread along a few directions of its own."""
    shape = np.random.default_rng(1)
    centres = shape.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = shape.standard_normal((clusters, 8, dim)).astype(np.float32) * (0.6 / np.sqrt(dim))
    rng = np.random.default_rng(seed)
    which = rng.integers(0, clusters, n)
    latent = rng.standard_normal((n, 8)).astype(np.float32)
    rows = centres[which] + np.einsum("nl,nld->nd", latent, bases[which], optimize=True)
    rows += rng.standard_normal((n, dim)).astype(np.float32) * (0.1 / np.sqrt(dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def saved_npy(folder: Path, rows: np.ndarray, tag: ModelTag = TAG) -> Path:
    path = folder / "emb.npy"
    write_npy(path, rows, [f"photos/{i}.jpg" for i in range(len(rows))], tag)
    return path


def expect(dim: int = 64, tag: ModelTag = TAG) -> Expect:
    return Expect(tag.name, tag.sha256, dim)


@pytest.mark.parametrize("kind", [Kind.FLAT, Kind.HNSW])
def test_index_results_equal_the_exact_scan_on_a_small_set(tmp_path, kind):
    source = saved_npy(tmp_path, clustered(3000))
    assert build_index(source, kind=kind).kind is kind
    index = open_index(default_index_path(source), source, expect())
    queries = clustered(20, seed=7)
    scores, rows = index.search(queries, 10)
    exact_scores, exact_rows = exact_search(index.saved, queries, 10)
    assert (rows == exact_rows).all()
    assert np.allclose(scores, exact_scores, atol=1e-5)


def test_automatic_kinds_by_size():
    from clipcli.store.index import choose_kind

    assert choose_kind(10_000) is Kind.FLAT
    assert choose_kind(1_000_000) is Kind.IVFPQ
    assert choose_kind(10_000_000) is Kind.IVFPQ
    assert choose_kind(10, Kind.IVFPQ) is Kind.IVFPQ


@pytest.mark.slow  # ~10 s on an idle machine with 2 cores (the graph kind takes twice that: covered above)
@pytest.mark.parametrize("kind", [Kind.IVFPQ])
def test_recall_at_10_on_100k_clustered_rows(tmp_path, kind):
    source = saved_npy(tmp_path, clustered(100_000))
    build_index(source, kind=kind)
    index = open_index(default_index_path(source), source, expect())
    queries = clustered(100, seed=3)
    _, rows = index.search(queries, 10)
    _, truth = exact_search(index.saved, queries, 10)
    recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth, strict=True)])
    assert recall >= 0.95, recall


def test_an_index_for_another_model_is_refused(tmp_path):
    source = saved_npy(tmp_path, clustered(500))
    build_index(source)
    other = ModelTag("model-b", "b" * 64, True)
    with pytest.raises(ModelError, match="made with model-a, not model-b"):
        open_index(default_index_path(source), source, expect(tag=other))
    saved_npy(tmp_path, clustered(500), other)  # the embeddings redone with another model
    with pytest.raises(ModelError, match="index of embeddings made with model-a"):
        build_index(source)


def test_the_cli_refuses_an_index_of_another_model(cli, tmp_path, vit_ckpt):
    emb = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    assert cli("index", str(emb)).exit_code == 0
    meta = default_index_path(emb) / "meta.json"
    data = json.loads(meta.read_text())
    meta.write_text(json.dumps({**data, "model": "test-vit.pt", "model_sha256": "f" * 64}))
    ran = cli("rank", "a red circle", str(emb), "-m", "tiny-shapes")
    assert ran.exit_code == 2 and "index of embeddings made with test-vit.pt" in ran.stderr


@pytest.mark.slow
def test_a_stale_index_is_detected_then_brought_up_to_date(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    shutil.copytree(SAMPLES / "seen", photos)
    assert cli("embed", "photos", "-m", "tiny-shapes", "-o", "emb/").exit_code == 0
    built = cli("index", "emb", "--kind", "hnsw")
    assert built.exit_code == 0 and "indexed 16 rows" in built.stderr
    (photos / "red-hexagon.jpg").unlink()
    for p in (SAMPLES / "held-out").glob("*.jpg"):
        shutil.copy(p, photos / f"new-{p.name}")
    assert cli("embed", "photos", "-m", "tiny-shapes", "-o", "emb/").exit_code == 0

    query = ["rank", "a photo of a red hexagon.", "emb", "-m", "tiny-shapes", "-k", "30", "-f", "csv"]
    stale = cli(*query)
    assert stale.exit_code == 0 and "older than emb" in stale.stderr and "clipcli index emb" in stale.stderr
    assert "photos/red-hexagon.jpg" not in stale.stdout  # a gone path is never returned
    exact = cli(*query, "--no-index").stdout

    updated = cli("index", "emb")
    assert updated.exit_code == 0 and "added 10" in updated.stderr and "masked 1" in updated.stderr
    fresh = cli(*query)
    assert "older than" not in fresh.stderr and fresh.stdout == exact == stale.stdout
    assert len(fresh.stdout.splitlines()) == 1 + 25


@pytest.mark.slow
def test_batch_queries_answer_like_single_queries(cli, tmp_path):
    emb = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    assert cli("index", str(emb)).exit_code == 0
    texts = ["a photo of a red circle.", "a photo of a blue star."]
    (tmp_path / "q.txt").write_text("\n".join(texts) + "\n")
    base = ["-m", "tiny-shapes", "-k", "3", "-f", "csv", "--precision", "fp32"]
    batch = cli("rank", "--queries-file", str(tmp_path / "q.txt"), str(emb), *base)
    assert batch.exit_code == 0 and batch.stdout.splitlines()[0] == "query,path,score"
    for text in texts:
        single = cli("rank", text, str(emb), *base).stdout.splitlines()[1:]
        mine = [line.split(",", 1)[1] for line in batch.stdout.splitlines()[1:] if line.startswith(text)]
        assert mine == single

    images = sorted(str(p) for p in (SAMPLES / "seen").glob("*.jpg"))[:2]
    (tmp_path / "imgs.txt").write_text("\n".join(images) + "\n")
    by_image = cli("rank", "--image-queries", str(tmp_path / "imgs.txt"), str(emb), *base)
    firsts = [line.split(",") for line in by_image.stdout.splitlines()[1:]][::3]
    assert [(q, p) for q, p, _ in firsts] == [(i, i) for i in images]  # each image finds itself first


def test_stale_is_raised_by_the_core_after_the_source_changes(tmp_path):
    source = saved_npy(tmp_path, clustered(500))
    build_index(source)
    saved_npy(tmp_path, clustered(600))
    with pytest.raises(Stale, match="clipcli index"):
        open_index(default_index_path(source), source, expect())


@pytest.mark.slow
def test_an_index_kept_elsewhere_is_named_with_index(cli, tmp_path):
    emb = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    elsewhere = tmp_path / "indexes" / "seen.index"
    assert cli("index", str(emb), "-o", str(elsewhere), "--kind", "hnsw").exit_code == 0
    query = ["rank", "a photo of a green heart.", str(emb), "-m", "tiny-shapes", "-k", "4"]
    through = cli(*query, "--index", str(elsewhere))
    assert through.exit_code == 0 and through.stdout == cli(*query, "--no-index").stdout
    assert "not both" in cli(*query, "--index", str(elsewhere), "--no-index").stderr
    other = tmp_path / "other.npy"
    assert cli("embed", str(SAMPLES / "busy"), "-m", "tiny-shapes", "-o", str(other)).exit_code == 0
    ran = cli("rank", "x", str(emb), str(other), "-m", "tiny-shapes", "--index", str(tmp_path / "nowhere"))
    assert ran.exit_code == 2 and "not an index" in ran.stderr
