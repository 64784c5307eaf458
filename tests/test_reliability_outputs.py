"""Issue 21, outputs and storage: an output that is one of the inputs, datasets updated from another
working folder or with part of their files unreachable, files rewritten while they are embedded, NPY
outputs through links, and the messages and part sizes of outputs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import Ran, make_image
from nli_models import bart_dir  # noqa: F401 (a fixture)

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MODEL = ("-m", "tiny-shapes")
Cli = Callable[..., Ran]


def one_line_error(ran: Ran, *needles: str) -> None:
    """Exit 2 with a single line on stderr holding every needle, and nothing on stdout."""
    assert ran.exit_code == 2, (ran.exit_code, ran.stderr)
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), ran.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert ran.stdout == ""


def embedded_parquet(cli: Cli, tmp_path: Path) -> Path:
    src = tmp_path / "src.parquet"
    assert cli("embed", str(SAMPLES / "busy"), *MODEL, "-o", str(src)).exit_code == 0
    return src


# Item 5: an output that resolves to an input is refused in every command, before any work.


def test_rank_refuses_an_output_that_is_its_source(cli: Cli, tmp_path: Path) -> None:
    src = embedded_parquet(cli, tmp_path)
    before = src.read_bytes()
    one_line_error(cli("rank", "a cat", str(src), *MODEL, "-o", str(src)), f"{src}: is also an input")
    # the same file through a relative path, a symbolic link and a hard link
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.parquet").symlink_to(src)
    os.link(src, tmp_path / "hard.parquet")
    for other in (tmp_path / "sub" / ".." / "src.parquet", tmp_path / "link.parquet", tmp_path / "hard.parquet"):
        one_line_error(cli("rank", "a cat", str(src), *MODEL, "-o", str(other)), str(other), "is also an input")
    assert src.read_bytes() == before


def test_rank_refuses_a_parquet_output_inside_its_source_dataset(cli: Cli, tmp_path: Path) -> None:
    emb = tmp_path / "emb"
    assert cli("embed", str(SAMPLES / "busy"), *MODEL, "-o", f"{emb}/").exit_code == 0
    before = sorted(p.name for p in emb.iterdir())
    ran = cli("rank", "a cat", str(emb), *MODEL, "-o", str(emb / "ranked.parquet"))
    one_line_error(ran, "inside the input dataset")
    assert sorted(p.name for p in emb.iterdir()) == before


def test_dedup_refuses_an_output_that_is_its_source(cli: Cli, tmp_path: Path) -> None:
    src = embedded_parquet(cli, tmp_path)
    before = src.read_bytes()
    one_line_error(cli("dedup", str(src), "-o", str(src)), f"{src}: is also an input")
    assert src.read_bytes() == before


def test_classify_text_refuses_an_output_that_is_its_texts_file(cli: Cli, tmp_path: Path, bart_dir: Path) -> None:  # noqa: F811
    texts = tmp_path / "t.csv"
    texts.write_text("text\nthe match ended in a draw\nrates rose again\n")
    before = texts.read_bytes()
    labels = ("--labels", "sport,economy", "-m", str(bart_dir))
    ran = cli("classify-text", "--texts-file", str(texts), *labels, "-o", str(texts))
    one_line_error(ran, f"{texts}: is also an input")
    assert texts.read_bytes() == before


def test_eval_refuses_predictions_or_a_report_over_its_manifest(cli: Cli, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"path,label\n{SAMPLES / 'busy' / 'blue-star.jpg'},star\n")
    before = manifest.read_bytes()
    one_line_error(cli("eval", str(manifest), *MODEL, "--predictions", str(manifest)), "is also an input")
    one_line_error(cli("eval", str(manifest), *MODEL, "--report", str(manifest)), "is also an input")
    assert manifest.read_bytes() == before


def test_embed_refuses_an_output_that_is_one_of_its_images(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    image = make_image(folder / "a.jpg")
    make_image(folder / "b.jpg", seed=1)
    os.link(image, tmp_path / "hard.jpg")
    before = image.read_bytes()
    one_line_error(cli("embed", str(image), *MODEL, "-f", "csv", "-o", str(image)), "is also an input")
    one_line_error(cli("embed", str(image), *MODEL, "-f", "csv", "-o", str(tmp_path / "hard.jpg")), "is also an input")
    # an image found in a folder given as input
    one_line_error(cli("embed", str(folder), *MODEL, "-f", "jsonl", "-o", str(image)), "is also an input")
    assert image.read_bytes() == before
    # --text: the texts file
    texts = tmp_path / "t.csv"
    texts.write_text("cat\ndog\n")
    one_line_error(cli("embed", "--text", "--texts-file", str(texts), *MODEL, "-o", str(texts)), "is also an input")
    assert texts.read_text() == "cat\ndog\n"


def test_classify_refuses_an_output_that_is_its_labels_file(cli: Cli, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("star\narrow\n")
    ran = cli("classify", str(SAMPLES / "busy"), *MODEL, "--labels-file", str(labels), "-o", str(labels))
    one_line_error(ran, "is also an input")
    assert labels.read_text() == "star\narrow\n"


@pytest.mark.slow
def test_index_refuses_an_output_that_is_its_source(cli: Cli, tmp_path: Path) -> None:
    emb = tmp_path / "emb"
    assert cli("embed", str(SAMPLES / "busy"), *MODEL, "-o", f"{emb}/").exit_code == 0
    parts = {p.name: p.read_bytes() for p in emb.iterdir()}
    one_line_error(cli("index", str(emb), "-o", str(emb)), "is also an input")
    assert {p.name: p.read_bytes() for p in emb.iterdir()} == parts
    npy = tmp_path / "emb.npy"
    assert cli("embed", str(SAMPLES / "busy"), *MODEL, "-o", str(npy)).exit_code == 0
    before = npy.read_bytes()
    one_line_error(cli("index", str(npy), "-o", str(npy)), "is also an input")
    assert npy.read_bytes() == before


def test_train_refuses_an_output_that_is_the_model_it_starts_from(cli: Cli, tmp_path: Path, vit_ckpt: Path) -> None:
    model = tmp_path / "model.pt"
    shutil.copy(vit_ckpt, model)
    (tmp_path / "link.pt").symlink_to(model)
    pairs = tmp_path / "pairs.csv"
    busy = SAMPLES / "busy"
    pairs.write_text(f"image,text\n{busy / 'blue-star.jpg'},a blue star\n{busy / 'green-arrow.jpg'},a green arrow\n")
    before = model.read_bytes()
    ran = cli("train", str(pairs), "-m", str(model), "-o", str(tmp_path / "link.pt"), "--steps", "1", "-b", "2")
    one_line_error(ran, "is also an input")
    one_line_error(cli("train", str(pairs), "-o", str(pairs), "--steps", "1"), "is also an input")
    assert model.read_bytes() == before


def test_the_refusal_comes_from_the_real_console_script_before_the_model_loads(tmp_path: Path) -> None:
    """A real process, and a model that does not exist: the refusal comes first, naming the file."""
    src = tmp_path / "src.csv"
    src.write_text("path,score\n")
    ran = subprocess.run(
        [sys.executable, "-m", "clipcli", "rank", "a cat", str(src), "-m", "no-such-model", "-o", str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        ran.returncode == 2
        and ran.stderr.strip() == f"Error: {src}: is also an input; write the output to another file"
    )
    assert src.read_text() == "path,score\n"


# Item 6: another working folder keeps the dataset's rows; removing many rows needs --prune.


def rows_of(dataset: Path) -> list[str]:
    files = sorted(dataset.glob("part-*.parquet")) if dataset.is_dir() else [dataset]
    return sorted(p for f in files for p in pq.read_table(f).column("path").to_pylist())


@pytest.mark.slow
def test_updating_a_dataset_from_another_working_folder_removes_nothing(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    shutil.copytree(SAMPLES / "busy", home / "samples" / "busy")
    extra = make_image(tmp_path / "extra.png", seed=7)
    monkeypatch.chdir(home)
    first = cli("embed", "samples/busy", str(extra), *MODEL, "-o", "ds/")
    assert first.exit_code == 0, first.stderr
    made = rows_of(home / "ds")
    assert len(made) == 7 and "samples/busy/blue-star.jpg" in made

    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    new = make_image(tmp_path / "new.png", seed=8)
    ran = cli("embed", str(new), *MODEL, "-o", str(home / "ds"))
    assert ran.exit_code == 0 and "embedded 1, unchanged 0, removed 0" in ran.stderr, ran.stderr
    assert rows_of(home / "ds") == sorted([*made, str(new)])
    # a relative path given here is stored relative to the dataset's folder, and found from there
    make_image(elsewhere / "pics" / "y.png", seed=9)
    assert "embedded 1, unchanged 0, removed 0" in cli("embed", "pics", *MODEL, "-o", str(home / "ds")).stderr
    assert "../elsewhere/pics/y.png" in rows_of(home / "ds")
    monkeypatch.chdir(home)
    again = cli("embed", "samples/busy", str(extra), str(new), "../elsewhere/pics", *MODEL, "-o", "ds/")
    assert "embedded 0, unchanged 9, removed 0" in again.stderr, again.stderr
    base = pq.read_schema(next((home / "ds").glob("part-*.parquet"))).metadata[b"clipcli.base"]
    assert os.fsdecode(base) == str(home)  # recorded in the dataset's metadata


def test_a_dataset_without_a_recorded_folder_keeps_working(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(SAMPLES / "busy", tmp_path / "busy")
    monkeypatch.chdir(tmp_path)
    assert cli("embed", "busy", *MODEL, "-o", "ds/").exit_code == 0
    for part in (tmp_path / "ds").glob("part-*.parquet"):  # as an older clipcli wrote it
        table = pq.read_table(part)
        meta = {k: v for k, v in table.schema.metadata.items() if k != b"clipcli.base"}
        pq.write_table(table.replace_schema_metadata(meta), part)
    make_image(tmp_path / "busy" / "new.png", seed=3)
    ran = cli("embed", "busy", *MODEL, "-o", "ds/")
    assert ran.exit_code == 0 and "embedded 1, unchanged 6, removed 0" in ran.stderr, ran.stderr
    assert all(b"clipcli.base" not in pq.read_schema(p).metadata for p in (tmp_path / "ds").glob("part-*.parquet"))


def test_a_partly_unmounted_share_is_refused_with_the_count_unless_prune(cli: Cli, tmp_path: Path) -> None:
    share = tmp_path / "share"
    for i in range(8):
        make_image(share / "a" / f"{i}.png", (32, 32), seed=i)
    for i in range(4):
        make_image(share / "b" / f"{i}.png", (32, 32), seed=10 + i)
    ds = tmp_path / "ds"
    assert cli("embed", str(share), *MODEL, "-o", f"{ds}/").exit_code == 0
    parts = {p.name: p.read_bytes() for p in ds.iterdir()}
    (share / "a").rename(tmp_path / "away")  # the sub-folder is not there, as an unmounted share is not
    ran = cli("embed", str(share), *MODEL, "-o", f"{ds}/")
    one_line_error(ran, "would remove 8 of its 12 rows", "--prune")
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == parts
    pruned = cli("embed", str(share), *MODEL, "-o", f"{ds}/", "--prune")
    assert pruned.exit_code == 0 and "embedded 0, unchanged 4, removed 8" in pruned.stderr, pruned.stderr
    assert len(rows_of(ds)) == 4


def test_a_few_files_gone_are_removed_without_prune(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    for i in range(12):
        make_image(folder / f"{i}.png", (32, 32), seed=i)
    ds = tmp_path / "ds.parquet"
    assert cli("embed", str(folder), *MODEL, "-o", str(ds)).exit_code == 0
    for i in range(5):  # 5 of 12: not more than a few
        (folder / f"{i}.png").unlink()
    ran = cli("embed", str(folder), *MODEL, "-o", str(ds))
    assert ran.exit_code == 0 and "unchanged 7, removed 5" in ran.stderr, ran.stderr


# Item 8: a file rewritten while it is embedded is not stored with the old picture's embedding.


@pytest.mark.slow
def test_a_file_rewritten_during_embed_is_embedded_again_on_the_next_run(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipcli.images.batches as images

    folder = tmp_path / "imgs"
    target = make_image(folder / "a.png", (50, 40), seed=1)
    make_image(folder / "b.png", (48, 48), seed=2)
    shutil.copy(SAMPLES / "busy" / "blue-star.jpg", tmp_path / "new.png")  # another picture
    original = images.resize_and_crop

    def rewrite_after_decoding(image, geometry):  # type: ignore[no-untyped-def]
        # Runs between the decoding of a.png (the only 50 x 40 picture) and the storing of its row.
        if image.size == (50, 40) and target.read_bytes() != (tmp_path / "new.png").read_bytes():
            shutil.copy(tmp_path / "new.png", tmp_path / "tmp.png")
            os.utime(tmp_path / "tmp.png", (1_700_000_000, 1_700_000_000))
            os.replace(tmp_path / "tmp.png", target)
        return original(image, geometry)

    monkeypatch.setattr(images, "resize_and_crop", rewrite_after_decoding)
    ds = tmp_path / "ds"
    first = cli("embed", str(folder), *MODEL, "-o", f"{ds}/", "-b", "1")
    monkeypatch.setattr(images, "resize_and_crop", original)
    assert first.exit_code == 1 and f"{target}: changed while it was embedded" in first.stderr, first.stderr
    second = cli("embed", str(folder), *MODEL, "-o", f"{ds}/")
    assert second.exit_code == 0 and "embedded 1, unchanged 1" in second.stderr, second.stderr
    reference = tmp_path / "ref.npy"
    assert cli("embed", str(tmp_path / "new.png"), *MODEL, "-o", str(reference)).exit_code == 0
    tables = [pq.read_table(f) for f in sorted(ds.glob("part-*.parquet"))]
    stored = {
        p: np.asarray(e) for t in tables for p, e in zip(t["path"].to_pylist(), t["embedding"].to_pylist(), strict=True)
    }
    assert np.allclose(stored[str(target)], np.load(reference)[0], atol=1e-5)


# Item 9: an NPY output through a symbolic link keeps its pair together.


def test_an_npy_output_through_a_link_writes_its_sidecar_beside_the_file(cli: Cli, tmp_path: Path) -> None:
    real = tmp_path / "realdir"
    real.mkdir()
    link = tmp_path / "xlink.npy"
    link.symlink_to(real / "x.npy")
    assert cli("embed", str(SAMPLES / "busy"), *MODEL, "-o", str(link)).exit_code == 0
    assert (real / "x.npy").is_file() and (real / "x.rows.jsonl").is_file()
    assert not (tmp_path / "xlink.rows.jsonl").exists()
    for source in (real / "x.npy", link):
        ran = cli("rank", "a blue star", str(source), *MODEL, "-k", "1", "-f", "csv")
        assert ran.exit_code == 0 and "blue-star.jpg" in ran.stdout, ran.stderr


# Item 19 (outputs) and item 17 (--max-megapixels inf).


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_parquet_to_a_full_device_says_the_device_is_full(cli: Cli) -> None:
    ran = cli("embed", str(SAMPLES / "busy"), *MODEL, "-f", "parquet", "-o", "/dev/full")
    one_line_error(ran, "/dev/full: cannot write (no space left on the device)")


def test_an_existing_directory_as_output_says_what_would_work(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "out.d"
    folder.mkdir()
    one_line_error(cli("embed", str(SAMPLES / "busy"), *MODEL, "-o", str(folder)), "is a directory", f"-o {folder}/")
    src = embedded_parquet(cli, tmp_path)
    one_line_error(cli("rank", "a star", str(src), *MODEL, "-o", str(folder)), "is a directory", ".csv")
    assert list(folder.iterdir()) == []


def test_part_size_is_honoured_whatever_the_batch_size(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    for i in range(21):
        make_image(folder / f"{i}.png", (32, 32), seed=i)
    ds = tmp_path / "ds"
    ran = cli("embed", str(folder), *MODEL, "-o", f"{ds}/", "--part-size", "8", "-b", "32")
    assert ran.exit_code == 0
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in sorted(ds.glob("part-*.parquet"))]
    assert sizes == [8, 8, 5]


def test_max_megapixels_inf_means_no_limit_and_nan_is_refused(cli: Cli, tmp_path: Path) -> None:
    ran = cli("embed", str(SAMPLES / "busy"), *MODEL, "--max-megapixels", "inf", "-f", "csv")
    assert ran.exit_code == 0 and len(ran.stdout.splitlines()) == 7
    one_line_error(cli("embed", str(SAMPLES / "busy"), *MODEL, "--max-megapixels", "nan"), "--max-megapixels")


@pytest.mark.parametrize("command", ["classify", "rank", "dedup"])
def test_an_output_that_is_an_image_inside_an_input_folder_is_refused(cli: Cli, tmp_path: Path, command: str) -> None:
    """Found by a fault run after the first fix: `classify d -o d/red-circle.jpg -f csv` replaced the photo."""
    folder = tmp_path / "d"
    shutil.copytree(SAMPLES / "busy", folder)
    victim = folder / "red-circle.jpg"
    (tmp_path / "img.csv").symlink_to(victim)  # through a link with another suffix, too
    before = victim.read_bytes()
    first = {"classify": [], "rank": ["a red circle"], "dedup": []}[command]
    labels = ["--labels", "circle,star"] if command == "classify" else []
    for output in (victim, tmp_path / "img.csv"):
        ran = cli(command, *first, str(folder), *MODEL, *labels, "-o", str(output), "-f", "csv")
        one_line_error(ran, str(output), "inside the input folder")
    assert victim.read_bytes() == before
    # a file of another kind in the folder is no input, and may be written
    ran = cli("classify", str(folder), *MODEL, "--labels", "circle,star", "-o", str(folder / "labels.csv"))
    assert ran.exit_code == 0, ran.stderr


def test_a_templates_file_given_as_output_is_refused(cli: Cli, tmp_path: Path) -> None:
    templates = tmp_path / "tpl.txt"
    templates.write_text("a photo of a {}.\n")
    image = SAMPLES / "busy" / "red-circle.jpg"
    runs = [
        ("classify", str(image), *MODEL, "--labels", "circle,star", "--templates", str(templates)),
        ("embed", "--text", "a circle", *MODEL, "--templates", str(templates)),
        ("rank", "a circle", str(SAMPLES / "busy"), *MODEL, "--templates", str(templates)),
    ]
    for args in runs:
        one_line_error(cli(*args, "-o", str(templates), "-f", "csv"), "is also an input")
    assert templates.read_text() == "a photo of a {}.\n"
