"""`clipcli eval`: agreement with classify, datasets, the text cache, the report and exit codes."""

from __future__ import annotations

import io
import json
import pickle
import random
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import ClassVar

import jsonschema
import numpy as np
import pandas as pd
import pytest
from conftest import Ran

from clipcli.synth import render

CLASSES = [
    ("red", "circle"),
    ("blue", "star"),
    ("yellow", "heart"),
    ("green", "arrow"),
    ("purple", "cross"),
    ("orange", "hexagon"),
]


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes x 6 images, one folder per class, plus the same data as a manifest."""
    root = tmp_path_factory.mktemp("labelled")
    rng = random.Random(77)
    rows = []
    for colour, shape in CLASSES:
        (root / "data" / f"{colour}_{shape}").mkdir(parents=True)
        for i in range(6):
            name = f"data/{colour}_{shape}/{i}.png"
            render(rng, colour, shape).image.save(root / name)
            rows.append({"path": name, "label": f"{colour}_{shape}"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPCLI_CACHE", str(tmp_path / "cache"))


def test_acc1_equals_the_fraction_classify_gets_right(cli, shapes_folder, tmp_path):
    data = shapes_folder / "data"
    report = tmp_path / "r.json"
    ran = cli("eval", str(data), "-m", "tiny-shapes", "--report", str(report), "--templates", "cifar")
    assert ran.exit_code == 0, ran.stderr
    acc1 = json.loads(report.read_text())["results"][0]["metrics"]["acc1"]
    labels = ",".join(f"{c} {s}" for c, s in CLASSES)
    out = cli(
        "classify", str(data), "--labels", labels, "--templates", "cifar", "-m", "tiny-shapes", "-k", "1", "-f", "csv"
    )
    top = pd.read_csv(io.StringIO(out.stdout))
    truth = top["path"].map(lambda p: Path(p).parent.name.replace("_", " "))
    assert acc1 == pytest.approx((top["label"] == truth).mean())
    assert acc1 > 0.5  # the bundled model knows these shapes


def test_folder_and_manifest_give_the_same_report(cli, shapes_folder, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    cli("eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--report", str(a))
    cli("eval", str(shapes_folder / "manifest.csv"), "-m", "tiny-shapes", "--report", str(b))
    ra, rb = (json.loads(p.read_text())["results"][0] for p in (a, b))
    assert ra["metrics"] == rb["metrics"] and ra["per_class"] == rb["per_class"] and ra["n"] == rb["n"] == 36
    assert ra["confusion_matrix"] == rb["confusion_matrix"]


def test_report_matches_its_schema_and_predictions_file(cli, shapes_folder, tmp_path, vit_ckpt):
    report, preds = tmp_path / "r.json", tmp_path / "p.parquet"
    ran = cli(
        "eval",
        str(shapes_folder / "data"),
        "-m",
        "tiny-shapes",
        "-m",
        str(vit_ckpt),
        "--templates",
        "simple",
        "--templates",
        "cifar",
        "--report",
        str(report),
        "--predictions",
        str(preds),
    )
    assert ran.exit_code == 0, ran.stderr
    doc = json.loads(report.read_text())
    schema = json.loads((resources.files("clipcli") / "report.schema.json").read_text())
    jsonschema.validate(doc, schema)
    assert [(r["model"], r["templates"]) for r in doc["results"]] == [
        ("tiny-shapes", "simple"),
        ("tiny-shapes", "cifar"),
        (str(vit_ckpt), "simple"),
        (str(vit_ckpt), "cifar"),
    ]
    assert all(set(r["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"} for r in doc["results"])
    frame = pd.read_parquet(preds)
    assert list(frame.columns) == ["model", "templates", "path", "true_label", "predicted_label", "score", "true_rank"]
    assert len(frame) == 4 * 36
    first = frame[(frame["model"] == "tiny-shapes") & (frame["templates"] == "simple")]
    assert (first["true_label"] == first["predicted_label"]).mean() == pytest.approx(
        doc["results"][0]["metrics"]["acc1"]
    )
    assert ((first["true_rank"] == 1) == (first["true_label"] == first["predicted_label"])).all()
    assert "vs simple" in ran.stderr and "cifar (18)" in ran.stderr


def test_text_cache_is_hit_on_a_rerun(cli, shapes_folder, tmp_path, monkeypatch):
    import clipcli.encode

    calls = []
    real = clipcli.encode.encode_texts
    monkeypatch.setattr(clipcli.encode, "encode_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = ["eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--templates", "cifar"]
    cli(*args, "--report", str(tmp_path / "1.json"))
    assert len(calls) == 1
    cli(*args, "--report", str(tmp_path / "2.json"))
    assert len(calls) == 1  # the second run encoded no text
    assert json.loads((tmp_path / "2.json").read_text())["results"][0]["text_cache"] == "hit"
    cli(*args, "--no-cache")
    assert len(calls) == 2


def test_min_acc1_gate(cli, shapes_folder):
    data = str(shapes_folder / "data")
    assert cli("eval", data, "-m", "tiny-shapes", "--min-acc1", "0.2").exit_code == 0
    failed = cli("eval", data, "-m", "tiny-shapes", "--min-acc1", "1.01")
    assert failed.exit_code == 1 and "below --min-acc1 1.01" in failed.stderr


def test_limit_and_seed(cli, shapes_folder, tmp_path):
    report = tmp_path / "r.json"
    cli(
        "eval",
        str(shapes_folder / "data"),
        "-m",
        "tiny-shapes",
        "--limit",
        "10",
        "--seed",
        "3",
        "--report",
        str(report),
    )
    assert json.loads(report.read_text())["results"][0]["n"] == 10


def _fake_cifar10(root: Path, n: int = 20) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [i % 10 for i in range(n)]
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({"data": data, "labels": labels}, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": names}, f)


def test_cifar_from_torchvision_layout(cli, tmp_path, monkeypatch, vit_ckpt):
    import torchvision.datasets.cifar as tv_cifar

    # torchvision checks its files' md5 against the real release; the fake has its own bytes
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    _fake_cifar10(tmp_path / "cifar")
    report = tmp_path / "r.json"
    ran = cli(
        "eval",
        "--dataset",
        "cifar10",
        "--data-root",
        str(tmp_path / "cifar"),
        "-m",
        str(vit_ckpt),
        "--report",
        str(report),
        "--predictions",
        str(tmp_path / "p.csv"),
    )
    assert ran.exit_code == 0, ran.stderr
    result = json.loads(report.read_text())["results"][0]
    assert result["n"] == 20 and result["classes"][:2] == ["airplane", "automobile"]
    assert pd.read_csv(tmp_path / "p.csv")["path"][0] == "cifar10/test/00000"


def test_cifar_missing_offline_is_a_clear_error(cli, tmp_path, vit_ckpt):
    ran = cli("eval", "--dataset", "cifar100", "--data-root", str(tmp_path / "none"), "-m", str(vit_ckpt))
    assert ran.exit_code == 2 and "cifar100 not found under" in ran.stderr and "--download" in ran.stderr


def test_retrieval_manifest(cli, shapes_folder, tmp_path):
    rows = [{"path": f"data/{c}_{s}/{i}.png", "text": f"a photo of a {c} {s}."} for c, s in CLASSES for i in range(2)]
    manifest = shapes_folder / "captions.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    report = tmp_path / "r.json"
    ran = cli("eval", str(manifest), "-m", "tiny-shapes", "--report", str(report))
    assert ran.exit_code == 0, ran.stderr
    metrics = json.loads(report.read_text())["results"][0]["metrics"]
    assert set(metrics) == {f"{d}_recall@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert metrics["image_to_text_recall@10"] >= metrics["image_to_text_recall@1"]


def test_plots(cli, shapes_folder, tmp_path):
    ran = cli("eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--plots", str(tmp_path / "plots"))
    assert ran.exit_code == 0, ran.stderr
    pngs = list((tmp_path / "plots").glob("confusion-*.png"))
    pages = list((tmp_path / "plots").glob("report-*.html"))
    assert len(pngs) == 1 and len(pages) == 1
    assert pngs[0].read_bytes()[:4] == b"\x89PNG"
    assert "Most confused classes" in pages[0].read_text()


Cli = Callable[..., Ran]


def _one_line_error(ran: Ran) -> str:
    """The stderr of a usage error: exactly one ``Error:`` line, exit 2, no traceback."""
    assert ran.exit_code == 2, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), ran.stderr
    return lines[0]


def test_header_only_manifest_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    manifest = tmp_path / "empty.csv"
    manifest.write_text("path,label\n")
    ran = cli("eval", str(manifest), "-m", "tiny-shapes")
    assert _one_line_error(ran) == f"Error: {manifest}: no rows"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("a.png", "cat"), ("b.png", "dog"), ("", "cat")], "row 3: empty path"),
        ([("a.png", "cat"), ("b.png", ""), ("c.png", "dog")], "row 2: empty label"),
    ],
)
def test_empty_manifest_cell_names_the_row(cli: Cli, tmp_path: Path, rows: list[tuple[str, str]], message: str) -> None:
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(manifest, index=False)
    ran = cli("eval", str(manifest), "-m", "tiny-shapes")
    assert _one_line_error(ran) == f"Error: {manifest}: {message}"


def test_empty_class_folder_is_reported(cli: Cli, tmp_path: Path) -> None:
    from clipcli.datasets import image_folder

    rng = random.Random(5)
    root = tmp_path / "data"
    for colour, shape in CLASSES[:2]:
        (root / f"{colour}_{shape}").mkdir(parents=True)
        render(rng, colour, shape).image.save(root / f"{colour}_{shape}" / "0.png")
    (root / "blue_star" / "nested" / "deeper").mkdir(parents=True)  # empty, but under a class with images
    (root / "green_arrow" / "sub").mkdir(parents=True)  # reported once, as its top-most folder
    (root / "green_arrow" / "notes.txt").write_text("not an image")
    data = image_folder(root)
    assert data.classes == ["blue star", "red circle"]
    assert data.empty_folders == [str(root / "blue_star" / "nested"), str(root / "green_arrow")]
    ran = cli("eval", str(root), "-m", "tiny-shapes")
    assert ran.exit_code == 0, ran.stderr
    assert f"note: {root / 'green_arrow'}: no images, class left out" in ran.stderr.splitlines()


def test_report_onto_a_directory_leaves_no_temporary(cli: Cli, shapes_folder: Path, tmp_path: Path) -> None:
    report = tmp_path / "out"
    report.mkdir()
    ran = cli("eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--report", str(report))
    assert _one_line_error(ran) == f"Error: {report}: cannot write (is a directory)"
    assert list(tmp_path.rglob(".*.tmp")) == []
    assert list(report.iterdir()) == []


def test_write_report_onto_a_directory_leaves_no_temporary(tmp_path: Path) -> None:
    from clipcli.errors import OutputError
    from clipcli.evaluate import write_report

    report = tmp_path / "out"
    report.mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        write_report([], report)
    assert list(tmp_path.rglob(".*.tmp")) == []


def test_classifier_cache_onto_a_directory_is_an_output_error() -> None:
    from clipcli.errors import OutputError
    from clipcli.evaluate import cached_classifier, classifier_cache_dir
    from clipcli.models import load_model
    from clipcli.prompts import builtin_templates

    lm = load_model("tiny-shapes", "cpu", "fp32")
    templates = builtin_templates("simple")
    _, hit = cached_classifier(lm, ["red circle", "blue star"], templates)
    assert not hit
    [entry] = classifier_cache_dir().glob("*.pt")
    entry.unlink()
    entry.mkdir()  # something in the way of the cache file
    with pytest.raises(OutputError, match="is a directory"):
        cached_classifier(lm, ["red circle", "blue star"], templates)
    assert list(classifier_cache_dir().glob(".*.tmp")) == []
    assert entry.is_dir() and list(entry.iterdir()) == []


class _FakeProgress:
    """Stands in for console.Progress (which draws nothing off a terminal) and records its use."""

    made: ClassVar[list[_FakeProgress]] = []

    def __init__(self, description: str, total: int | None, unit: str = "img") -> None:
        self.description, self.total, self.done, self.entered = description, total, 0, False
        _FakeProgress.made.append(self)

    def advance(self, n: int) -> None:
        self.done += n

    def update(self, **fields: object) -> None:
        pass

    def __enter__(self) -> _FakeProgress:
        self.entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_prompt_encoding_shows_progress_unless_cached(
    cli: Cli, shapes_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipcli.console

    monkeypatch.setattr(clipcli.console, "Progress", _FakeProgress)
    monkeypatch.setattr(_FakeProgress, "made", [])
    args = ["eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--templates", "cifar"]
    assert cli(*args).exit_code == 0
    [bar] = [p for p in _FakeProgress.made if p.description.startswith("encoding prompts")]
    assert bar.total == 6 * 18 and bar.done == 6 * 18 and bar.entered
    _FakeProgress.made.clear()
    assert cli(*args).exit_code == 0  # the classifier now comes from the cache
    [bar] = [p for p in _FakeProgress.made if p.description.startswith("encoding prompts")]
    assert bar.done == 0 and not bar.entered
