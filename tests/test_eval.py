"""`clipcli eval`: agreement with classify, datasets, the text cache, the report and exit codes."""

from __future__ import annotations

import io
import json
import pickle
import random
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest

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
