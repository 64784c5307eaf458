"""dedup finds exactly the planted copies of real photos, and no pair among distinct ones.

tiny-shapes knows shapes and colours only: two different photos of the same shape and colour (samples/
seen/red-circle.jpg and samples/busy/red-circle.jpg) are one subject to it. The distinct photos here
are therefore one per shape and colour (samples/seen and samples/held-out, 26 photos): their closest
pair scores 0.83, while resized, recompressed and cropped copies score 0.93 and up, so the default
threshold of 0.9 lies in the gap.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, set[str]]]:
    """26 distinct photos, three of them with copies: a half-size one, a recompressed one, a cropped one."""
    folder = tmp_path_factory.mktemp("dedup") / "photos"
    folder.mkdir()
    for photo in sorted({p.name: p for p in sorted(SAMPLES.glob("[sh]*/*.jpg"))}.values()):
        shutil.copy(photo, folder / photo.name)
    groups = {}
    for name, copies in [
        ("red-circle", {"resized": lambda im: im.resize((im.width // 2, im.height // 2))}),
        ("blue-star", {"q60": None, "crop": lambda im: im.crop((8, 8, im.width - 8, im.height - 8))}),
        ("green-hexagon", {"crop": lambda im: im.crop((10, 0, im.width, im.height - 10))}),
    ]:
        original = folder / f"{name}.jpg"
        image = Image.open(original).convert("RGB")
        members = {str(original)}
        for suffix, change in copies.items():
            copy = folder / f"{name}-{suffix}.jpg"
            (change(image) if change else image).save(copy, quality=60 if change is None else 85)
            members.add(str(copy))
        groups[str(original)] = members
    return folder, groups


def parse_groups(text: str) -> dict[str, set[str]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    found: dict[str, list[str]] = {}
    for row in rows:
        found.setdefault(row["group"], []).append(row["path"])
    return {paths[0]: set(paths) for paths in found.values()}


def test_dedup_finds_exactly_the_planted_copies(cli, planted):
    folder, groups = planted
    ran = cli("dedup", str(folder), "-m", "tiny-shapes", "-f", "csv")
    assert ran.exit_code == 0, ran.stderr
    assert parse_groups(ran.stdout) == groups  # representatives (the originals, the largest files) first
    rows = list(csv.DictReader(io.StringIO(ran.stdout)))
    assert list(rows[0]) == ["group", "path", "similarity_to_group_representative"]
    assert all(0.9 <= float(r["similarity_to_group_representative"]) <= 1.0 for r in rows)
    assert "found 3 groups of near-duplicates (4 copies)" in ran.stderr


@pytest.mark.slow
def test_keep_prints_the_paths_one_could_delete(cli, planted):
    folder, groups = planted
    largest = cli("dedup", str(folder), "-m", "tiny-shapes", "--keep", "largest")
    copies = {p for rep, g in groups.items() for p in g - {rep}}
    # the crops are grouped (above) but not listed: only a resized or recompressed copy is a verified one
    assert set(largest.stdout.splitlines()) == {p for p in copies if not p.endswith("-crop.jpg")}
    assert largest.stderr.count("not listed: its picture") == 2
    first = cli("dedup", str(folder), "-m", "tiny-shapes", "--keep", "first").stdout.splitlines()
    assert str(folder / "blue-star.jpg") not in first  # blue-star-crop.jpg sorts first: a crop, not its copy
    assert all(Path(p).exists() for p in groups)  # nothing deleted


def test_dedup_over_saved_embeddings_and_their_index(cli, planted, tmp_path):
    folder, groups = planted
    emb = tmp_path / "emb.parquet"
    assert cli("embed", str(folder), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    assert parse_groups(cli("dedup", str(emb)).stdout) == groups
    assert cli("index", str(emb), "--kind", "hnsw").exit_code == 0
    assert parse_groups(cli("dedup", str(emb), "-f", "csv").stdout) == groups
    out = tmp_path / "groups.parquet"
    assert cli("dedup", str(emb), "-o", str(out)).exit_code == 0
    import pyarrow.parquet as pq

    assert pq.read_table(out).column_names == ["group", "path", "similarity_to_group_representative"]


def test_a_model_named_for_saved_embeddings_must_be_theirs(cli, planted, tmp_path, vit_ckpt):
    folder, groups = planted
    emb = tmp_path / "emb.parquet"
    assert cli("embed", str(folder), "-m", "tiny-shapes", "-o", str(emb)).exit_code == 0
    assert parse_groups(cli("dedup", str(emb), "-m", "tiny-shapes").stdout) == groups
    other = cli("dedup", str(emb), "-m", str(vit_ckpt))
    assert other.exit_code == 2 and other.stdout == ""
    assert "embeddings were made with tiny-shapes" in other.stderr and len(other.stderr.splitlines()) == 1
