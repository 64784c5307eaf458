"""The query language (clipcli/search/query.py): its grammar, its errors, and its arithmetic, pinned
against numpy on saved embeddings through `clipcli rank`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipcli.errors import InputError
from clipcli.search.query import Query, Term, parse_query, query_vector

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


def terms(text: str, negative: tuple[str, ...] = ()) -> list[tuple[float, str | None, str | None]]:
    return [(t.weight, t.text, t.image) for t in parse_query(text, negative).terms]


def test_rclip_examples_parse_into_weighted_terms():
    assert terms('"2:dog" + ./x.jpg - fruit') == [(2.0, "dog", None), (1.0, None, "./x.jpg"), (-1.0, "fruit", None)]
    assert terms("beach - people") == [(1.0, "beach", None), (-1.0, "people", None)]
    assert terms("./new york.jpg - new york + paris") == [
        (1.0, None, "./new york.jpg"),
        (-1.0, "new york", None),
        (1.0, "paris", None),
    ]


def test_weights_quotes_signs_and_images():
    assert terms("2:'a red circle' + 0.5:blue - -1.5:\"green star\"") == [
        (2.0, "a red circle", None),
        (0.5, "blue", None),
        (1.5, "green star", None),  # minus a negative weight
    ]
    assert terms("- people") == [(-1.0, "people", None)]
    assert terms("+ photo.PNG") == [(1.0, None, "photo.PNG")]
    assert terms("cat + https://example.org/a") == [(1.0, "cat", None), (1.0, None, "https://example.org/a")]
    assert terms('"a + b" - "c - d"') == [(1.0, "a + b", None), (-1.0, "c - d", None)]  # quoted: as written


def test_a_query_without_operators_is_the_whole_text_verbatim():
    for text in ("a photo of a dog, running", "a t-shirt", "blue-green", '"quoted" words', "2:dog", "x.jpg"):
        assert terms(text) == [(1.0, text, None)]
        assert parse_query(text).plain_text == text
    assert parse_query("a - b").plain_text is None


def test_negative_adds_subtracted_texts():
    assert terms("beach", ("people", "cars")) == [(1.0, "beach", None), (-1.0, "people", None), (-1.0, "cars", None)]
    with pytest.raises(InputError, match="--negative: an empty text"):
        parse_query("beach", (" ",))


@pytest.mark.parametrize(
    "text,column,why",
    [
        ("dog +", 5, "a term is missing after '+'"),
        ("dog + + cat", 7, "where a term should be"),
        ('dog + "cat', 7, "never closed"),
        ("2: + x", 3, "has no term after it"),
        ('dog + ""', 7, "an empty quoted text"),
        ('dog + "cat" "cow"', 13, "two terms in a row"),
        ("-", 1, "a term is missing"),
    ],
)
def test_a_malformed_query_names_its_column(text, column, why):
    with pytest.raises(InputError) as e:
        parse_query(text)
    message = str(e.value)
    assert f"column {column}:" in message and why in message and "\n" not in message


def test_query_vector_is_the_renormalised_weighted_sum():
    rng = np.random.default_rng(3)
    vectors = {name: rng.normal(size=8) for name in ("a", "b", "img")}
    query = Query((Term(2.0, text="a"), Term(-0.5, text="b"), Term(1.0, image="img")))
    asked: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        asked.append(texts)
        return np.stack([vectors[t] * 3 for t in texts])  # not unit: query_vector normalises

    got = query_vector(query, encode, lambda path: vectors[path])
    unit = {k: v / np.linalg.norm(v) for k, v in vectors.items()}
    want = 2 * unit["a"] - 0.5 * unit["b"] + unit["img"]
    assert asked == [["a", "b"]]  # every text in one call
    assert got.dtype == np.float32 and got.shape == (8,)
    np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-6)
    with pytest.raises(InputError, match="cancel out"):
        query_vector(parse_query("a - a"), lambda t: np.stack([vectors["a"]] * len(t)), lambda p: vectors[p])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """samples/ embedded by the bundled model (a copy, so one image can be deleted later)."""
    root = tmp_path_factory.mktemp("query")
    shutil.copytree(SAMPLES, root / "samples")
    from typer.testing import CliRunner

    from clipcli.cli import app

    args = ["embed", str(root / "samples"), "-m", "tiny-shapes", "--precision", "fp32", "-o", str(root / "emb/")]
    ran = CliRunner().invoke(app, args)
    assert ran.exit_code == 0, ran.output
    table = pq.read_table(next((root / "emb").glob("*.parquet")))
    matrix = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return root, table.column("path").to_pylist(), matrix


def _unit_texts(texts: list[str]) -> np.ndarray:
    from clipcli.models.loader import load_model
    from clipcli.zeroshot.encode import encode_texts

    out = encode_texts(load_model("tiny-shapes", precision="fp32"), texts).numpy().astype(np.float64)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _tsv(text: str) -> list[tuple[float, str]]:
    return [(float(s), p) for s, p in (line.split("\t") for line in text.splitlines())]


def test_rank_combines_texts_and_images_as_numpy_does(cli, saved):
    root, paths, matrix = saved
    star = str(root / "samples" / "seen" / "blue-star.jpg")
    row = paths.index(star)
    ran = cli(
        "rank", f'"2:a red circle" + {star} - blue', str(root / "emb"), "-m", "tiny-shapes", "--precision", "fp32",
        "-k", "5",
    )  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    red, blue = _unit_texts(["a red circle", "blue"])
    image = matrix[row] / np.linalg.norm(matrix[row])
    want = 2 * red + image - blue
    scores = matrix @ (want / np.linalg.norm(want))
    order = np.argsort(-scores)[:5]
    got = _tsv(ran.stdout)
    assert [p for _, p in got] == [paths[i] for i in order]
    np.testing.assert_allclose([s for s, _ in got], scores[order], atol=1e-4)  # printed to 4 places


def test_negative_option_and_a_row_of_the_dataset_as_an_image_term(cli, saved, tmp_path):
    root, paths, matrix = saved
    gone = root / "samples" / "busy" / "green-arrow.jpg"
    gone.unlink()  # no file: the term is its saved row
    ran = cli("rank", f"+ {gone}", str(root / "emb"), "-m", "tiny-shapes", "--negative", "green", "-k", "3")
    assert ran.exit_code == 0, ran.stderr
    (green,) = _unit_texts(["green"])
    vec = matrix[paths.index(str(gone))]
    want = vec / np.linalg.norm(vec) - green
    scores = matrix @ (want / np.linalg.norm(want))
    order = np.argsort(-scores)[:3]
    assert [p for _, p in _tsv(ran.stdout)] == [paths[i] for i in order]
    outside = SAMPLES / "seen" / "blue-star.jpg"  # a file that is no row: embedded by the model
    ran = cli("rank", f"+ {outside}", str(root / "emb"), "-m", "tiny-shapes", "-k", "1")
    assert ran.exit_code == 0 and _tsv(ran.stdout)[0][1] == str(root / "samples" / "seen" / "blue-star.jpg")


def test_a_plain_query_ranks_exactly_as_before(cli, saved):
    root, paths, matrix = saved
    ran = cli("rank", "a red circle", str(root / "emb"), "-m", "tiny-shapes", "--precision", "fp32", "-k", "3")
    (red,) = _unit_texts(["a red circle"])
    scores = matrix @ red
    order = np.argsort(-scores)[:3]
    assert [p for _, p in _tsv(ran.stdout)] == [paths[i] for i in order]


def test_bad_queries_are_one_line_errors(cli, saved):
    root, _, _ = saved
    emb = str(root / "emb")
    ran = cli("rank", "dog + ", emb, "-m", "tiny-shapes")
    assert ran.exit_code == 2 and ran.stderr.count("\n") == 1 and "column 5" in ran.stderr
    ran = cli("rank", "+ ./no/such.jpg", emb, "-m", "tiny-shapes")
    assert ran.exit_code == 2 and "./no/such.jpg" in ran.stderr and ran.stderr.count("\n") == 1
    ran = cli("rank", "+ https://example.org/x.jpg", emb, "-m", "tiny-shapes")
    assert ran.exit_code == 2 and "URL" in ran.stderr
    ran = cli("rank", "x", emb, "-m", "tiny-shapes", "--negative", "x")
    assert ran.exit_code == 2 and "cancel out" in ran.stderr
