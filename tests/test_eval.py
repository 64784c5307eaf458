"""`clipcli eval`: agreement with classify, datasets, the text cache, the report and exit codes."""

from __future__ import annotations

import io
import json
import pickle
import random
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jsonschema
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import Ran

from clipcli.training.synth import render

if TYPE_CHECKING:
    from clipcli.evaluation.run import EvalResult

Cli = Callable[..., Ran]

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
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPCLI_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_acc1_equals_the_fraction_classify_gets_right(cli: Cli, shapes_folder: Path, tmp_path: Path) -> None:
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


@pytest.mark.slow
def test_folder_and_manifest_give_the_same_report(cli: Cli, shapes_folder: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    cli("eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--report", str(a))
    cli("eval", str(shapes_folder / "manifest.csv"), "-m", "tiny-shapes", "--report", str(b))
    ra, rb = (json.loads(p.read_text())["results"][0] for p in (a, b))
    assert ra["metrics"] == rb["metrics"] and ra["per_class"] == rb["per_class"] and ra["n"] == rb["n"] == 36
    assert ra["confusion_matrix"] == rb["confusion_matrix"]


@pytest.mark.slow
def test_report_matches_its_schema_and_predictions_file(
    cli: Cli, shapes_folder: Path, tmp_path: Path, vit_ckpt: Path
) -> None:
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


@pytest.mark.slow
def test_text_cache_is_hit_on_a_rerun(
    cli: Cli, shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipcli.zeroshot.encode

    calls: list[int] = []
    real = clipcli.zeroshot.encode.encode_texts

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(clipcli.zeroshot.encode, "encode_texts", counted)
    args = ["eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--templates", "cifar"]
    cli(*args, "--report", str(tmp_path / "1.json"))
    assert len(calls) == 1
    cli(*args, "--report", str(tmp_path / "2.json"))
    assert len(calls) == 1  # the second run encoded no text
    assert json.loads((tmp_path / "2.json").read_text())["results"][0]["text_cache"] == "hit"
    cli(*args, "--no-cache")
    assert len(calls) == 2


@pytest.mark.slow
def test_min_acc1_gate(cli: Cli, shapes_folder: Path, tmp_path: Path) -> None:
    data = str(shapes_folder / "data")
    assert cli("eval", data, "-m", "tiny-shapes", "--min-acc1", "0.2").exit_code == 0
    assert cli("eval", data, "-m", "tiny-shapes", "--min-acc1", "1").exit_code == 0  # acc1 is 1.0: not below
    # Each class named after the next one: the model, right about the pictures, is wrong about the names.
    names = sorted(f"{c} {s}" for c, s in CLASSES)
    rotated = tmp_path / "rotated.txt"
    rotated.write_text("\n".join(names[1:] + names[:1]) + "\n")
    failed = cli("eval", data, "-m", "tiny-shapes", "--classnames", str(rotated), "--min-acc1", "0.5")
    assert failed.exit_code == 1
    assert "acc1 0.0000 of tiny-shapes / simple is below --min-acc1 0.5" in failed.stderr.splitlines()


@pytest.mark.parametrize("value", ["80", "1.01", "-0.1"])
def test_min_acc1_outside_0_1_is_a_usage_error(cli: Cli, shapes_folder: Path, value: str) -> None:
    ran = cli("eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--min-acc1", value)
    line = _one_line_error(ran)
    assert "--min-acc1" in line and "zero-shot evaluation" not in ran.stderr  # refused before any work


def _captions(shapes_folder: Path) -> Path:
    """Two images per class, one caption each: tiny-shapes finds half of them at rank 1 both ways."""
    rows = [{"path": f"data/{c}_{s}/{i}.png", "text": f"a photo of a {c} {s}."} for c, s in CLASSES for i in range(2)]
    manifest = shapes_folder / "captions.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


@pytest.mark.slow
def test_min_acc1_gates_retrieval_on_the_smaller_recall_at_1(cli: Cli, shapes_folder: Path, tmp_path: Path) -> None:
    manifest = str(_captions(shapes_folder))
    report = tmp_path / "r.json"
    passed = cli("eval", manifest, "-m", "tiny-shapes", "--report", str(report), "--min-acc1", "0.5")
    metrics = json.loads(report.read_text())["results"][0]["metrics"]
    assert min(metrics["image_to_text_recall@1"], metrics["text_to_image_recall@1"]) == 0.5
    assert passed.exit_code == 0, passed.stderr
    failed = cli("eval", manifest, "-m", "tiny-shapes", "--min-acc1", "0.6")
    assert failed.exit_code == 1
    assert "recall@1 0.5000 of tiny-shapes is below --min-acc1 0.6" in failed.stderr.splitlines()


def test_gate_score_is_acc1_or_the_smaller_recall_at_1() -> None:
    from clipcli.evaluation.run import EvalResult, gate_score

    def result(metrics: dict[str, float]) -> EvalResult:
        return EvalResult("m", "0" * 64, "none", 0, "manifest:x.csv", 4, 0, metrics)

    assert gate_score(result({"acc1": 0.25, "acc5": 0.5})) == ("acc1", 0.25)
    both = {"image_to_text_recall@1": 0.75, "text_to_image_recall@1": 0.5, "image_to_text_recall@5": 1.0}
    assert gate_score(result(both)) == ("recall@1", 0.5)
    name, value = gate_score(result({"image_to_text_recall@1": 0.75}))
    assert name == "recall@1" and np.isnan(value)  # one direction missing: nothing to pass the gate with


def test_limit_and_seed(cli: Cli, shapes_folder: Path, tmp_path: Path) -> None:
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


def test_cifar_from_torchvision_layout(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vit_ckpt: Path
) -> None:
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


def test_cifar_missing_offline_is_a_clear_error(cli: Cli, tmp_path: Path, vit_ckpt: Path) -> None:
    ran = cli("eval", "--dataset", "cifar100", "--data-root", str(tmp_path / "none"), "-m", str(vit_ckpt))
    assert ran.exit_code == 2 and "cifar100 not found under" in ran.stderr and "--download" in ran.stderr


def test_retrieval_manifest(cli: Cli, shapes_folder: Path, tmp_path: Path) -> None:
    manifest = _captions(shapes_folder)
    report = tmp_path / "r.json"
    ran = cli("eval", str(manifest), "-m", "tiny-shapes", "--report", str(report))
    assert ran.exit_code == 0, ran.stderr
    metrics = json.loads(report.read_text())["results"][0]["metrics"]
    assert set(metrics) == {f"{d}_recall@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert metrics["image_to_text_recall@10"] >= metrics["image_to_text_recall@1"]


@pytest.mark.slow
def test_plots(cli: Cli, shapes_folder: Path, tmp_path: Path) -> None:
    ran = cli("eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--plots", str(tmp_path / "plots"))
    assert ran.exit_code == 0, ran.stderr
    pngs = list((tmp_path / "plots").glob("confusion-*.png"))
    pages = list((tmp_path / "plots").glob("report-*.html"))
    assert len(pngs) == 1 and len(pages) == 1
    assert pngs[0].read_bytes()[:4] == b"\x89PNG"
    assert "Most confused classes" in pages[0].read_text()
    # Found by attack: a link by the name of one of its files was written through (to a file outside)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    pages[0].unlink()
    pages[0].symlink_to(precious)
    ran = cli("eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--plots", str(tmp_path / "plots"))
    assert ran.exit_code == 2 and "is a link or not a file" in ran.stderr, ran.stderr
    assert precious.read_text() == "keep me" and pages[0].is_symlink()
    pages[0].unlink()
    pages[0].write_text("my notes on the run")  # a file of the user's by that name: left as it is
    ran = cli("eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--plots", str(tmp_path / "plots"))
    assert ran.exit_code == 2 and "exists and is not a --plots html output" in ran.stderr, ran.stderr
    assert pages[0].read_text() == "my notes on the run"
    pages[0].unlink()
    for _ in range(2):  # its own files are replaced
        ran = cli("eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--plots", str(tmp_path / "plots"))
        assert ran.exit_code == 0, ran.stderr
    (tmp_path / "linked").symlink_to(tmp_path / "plots")  # the folder the user names may be a link
    ran = cli("eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--plots", str(tmp_path / "linked"))
    assert ran.exit_code == 0, ran.stderr


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
    from clipcli.evaluation.datasets import image_folder

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
    from clipcli.evaluation.run import write_report

    report = tmp_path / "out"
    report.mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        write_report([], report)
    assert list(tmp_path.rglob(".*.tmp")) == []


def test_a_classifier_cache_that_cannot_be_written_is_skipped() -> None:
    from clipcli.evaluation.run import cached_classifier, classifier_cache_dir
    from clipcli.models import load_model
    from clipcli.zeroshot.prompts import builtin_templates

    lm = load_model("tiny-shapes", "cpu", "fp32")
    templates = builtin_templates("simple")
    first, hit = cached_classifier(lm, ["red circle", "blue star"], templates)
    assert not hit
    [entry] = classifier_cache_dir().glob("*.pt")
    entry.unlink()
    entry.mkdir()  # something in the way of the cache file
    again, hit = cached_classifier(lm, ["red circle", "blue star"], templates)
    assert not hit and torch.equal(again, first)
    assert list(classifier_cache_dir().glob(".*.tmp")) == []
    assert entry.is_dir() and list(entry.iterdir()) == []


@pytest.mark.parametrize("damage", [b"garbage", "a dict", "a wrong shape"])
def test_a_damaged_classifier_cache_entry_is_recomputed(damage: object) -> None:
    """Found by attack: garbage in an entry was an internal error (exit 3) on every later run."""
    from clipcli.evaluation.run import cached_classifier, classifier_cache_dir
    from clipcli.models import load_model
    from clipcli.zeroshot.prompts import builtin_templates

    templates, classes = builtin_templates("simple"), ["red circle", "blue star"]
    lm = load_model("tiny-shapes", "cpu", "fp32")
    want, _ = cached_classifier(lm, classes, templates)
    [entry] = classifier_cache_dir().glob("*.pt")
    if isinstance(damage, bytes):
        entry.write_bytes(damage)
    else:
        torch.save({"x": [1, 2]} if damage == "a dict" else torch.zeros(3, 3), entry)
    got, hit = cached_classifier(lm, classes, templates)
    assert not hit and torch.equal(got, want)
    assert cached_classifier(lm, classes, templates)[1] is True  # written again, whole


def test_the_classifier_cache_is_kept_per_precision() -> None:
    """A report states its precision: its classifier must be the one computed at that precision."""
    from clipcli.evaluation.run import cached_classifier
    from clipcli.models import load_model
    from clipcli.zeroshot.prompts import builtin_templates

    templates, classes = builtin_templates("simple"), ["red circle", "blue star"]
    fp32, int8 = load_model("tiny-shapes", "cpu", "fp32"), load_model("tiny-shapes", "cpu", "int8")
    assert cached_classifier(fp32, classes, templates)[1] is False
    at_int8, hit = cached_classifier(int8, classes, templates)
    assert not hit and not torch.equal(at_int8, cached_classifier(fp32, classes, templates)[0])
    assert cached_classifier(int8, classes, templates)[1] is True


def test_the_checksum_is_of_the_file_loaded_not_of_one_renamed_over_it_later(vit_ckpt: Path, tmp_path: Path) -> None:
    import hashlib
    import shutil

    from clipcli.models import load_model

    live = tmp_path / "live.pt"
    shutil.copy(vit_ckpt, live)
    loaded = hashlib.sha256(live.read_bytes()).hexdigest()
    lm = load_model(str(live), "cpu", "fp32")
    other = tmp_path / "other.pt"
    other.write_bytes(b"not those weights")
    other.replace(live)  # as `mv` replaces a checkpoint while a long run is under way
    assert lm.checksum == loaded


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

    def hide(self) -> None:
        pass

    def __enter__(self) -> _FakeProgress:
        self.entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.mark.slow
def test_prompt_encoding_shows_progress_unless_cached(
    cli: Cli, shapes_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipcli.commands.console

    monkeypatch.setattr(clipcli.commands.console, "Progress", _FakeProgress)
    monkeypatch.setattr(_FakeProgress, "made", [])
    args = ["eval", str(shapes_folder / "data"), "-m", "tiny-shapes", "--templates", "cifar"]
    assert cli(*args).exit_code == 0
    [bar] = [p for p in _FakeProgress.made if p.description.startswith("encoding prompts")]
    assert bar.total == 6 * 18 and bar.done == 6 * 18 and bar.entered
    _FakeProgress.made.clear()
    assert cli(*args).exit_code == 0  # the classifier now comes from the cache
    [bar] = [p for p in _FakeProgress.made if p.description.startswith("encoding prompts")]
    assert bar.done == 0  # nothing encoded: a bar is drawn from its first advance, so none shows


# --- the summary table -------------------------------------------------------------------------------

LONG_CHECKPOINT = "/tmp/pytest-of-someone/pytest-123/checkpoints0/very-long-checkpoint-name-vit-b-32-finetuned.pt"


def _result(model: str, templates: str, n_templates: int, metrics: dict[str, float]) -> EvalResult:
    from clipcli.evaluation.run import EvalResult

    return EvalResult(model, "0" * 64, templates, n_templates, "folder:/data/photos-by-class", 500, 0, metrics)


def _classified(model: str, templates: str, n_templates: int, acc1: float) -> EvalResult:
    return _result(model, templates, n_templates, {"acc1": acc1, "acc5": 0.9912, "mean_per_class_recall": 0.345})


def _render(results: list[EvalResult]) -> list[str]:
    """The table as an 80-column terminal shows it (the CLI's console soft-wraps, as this one does)."""
    from rich.console import Console

    from clipcli.commands.eval_table import print_table

    console = Console(width=80, record=True, file=io.StringIO(), soft_wrap=True, highlight=False)
    print_table(console, results)
    return console.export_text().rstrip("\n").splitlines()


def _header_lines(lines: list[str]) -> list[str]:
    top = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    rule = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    return lines[top + 1 : rule]


def test_table_fits_80_columns_without_splitting_a_header_or_a_figure() -> None:
    lines = _render(
        [
            _classified("ViT-B/32", "simple", 1, 0.5),
            _classified("ViT-B/32", "imagenet", 80, 0.5612),
            _classified(LONG_CHECKPOINT, "cifar", 18, 0.345),
        ]
    )
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    [header] = _header_lines(lines)  # one line of headers: none is folded
    assert [h.strip() for h in header.strip("┃").split("┃")] == [
        "model",
        "templates",
        "acc@1",
        "acc@5",
        "mpcr",
        "vs simple",
    ]
    rows = "\n".join(lines)
    for figure in ("56.12%", "50.00%", "34.50%", "99.12%", "+6.12 pts"):
        assert figure in rows  # whole, on one line
    assert lines[-1] == "acc@k: top-k accuracy; mpcr: mean per-class recall; vs simple: acc@1 gain"
    body = [line for line in lines if line.startswith("│") and "%" in line]
    assert [line.split("│")[2].strip() for line in body] == ["imagenet (80)", "simple (1)", "cifar (18)"]  # best first
    assert "+6.12 pts" in body[0] and "pts" not in body[1] + body[2]  # no gain for the baseline or without one


def test_table_has_no_comparison_for_a_single_template_set() -> None:
    lines = _render([_classified("ViT-B/32", "simple", 1, 0.5), _classified("RN50", "simple", 1, 0.6)])
    text = "\n".join(lines)
    assert "vs simple" not in text and "pts" not in text
    [header] = _header_lines(lines)
    assert "vs simple" not in header and header.split() == [
        "┃",
        "model",
        "┃",
        "templates",
        "┃",
        "acc@1",
        "┃",
        "acc@5",
        "┃",
        "mpcr",
        "┃",
    ]
    assert lines[-1] == "acc@k: top-k accuracy; mpcr: mean per-class recall"
    # a set other than simple, with no simple run to compare it with: nothing to compare either
    assert "vs simple" not in "\n".join(_render([_classified("RN50", "cifar", 18, 0.6)]))


def test_retrieval_table_has_no_templates_column() -> None:
    recalls = {f"{way}_recall@{k}": 0.5 for k in (1, 5, 10) for way in ("image_to_text", "text_to_image")}
    lines = _render([_result(LONG_CHECKPOINT, "none", 0, recalls)])
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    [header] = _header_lines(lines)
    assert header.split("┃")[1:-1] == [
        " model                  ",
        "  i2t@1 ",
        "  t2i@1 ",
        "  i2t@5 ",
        "  t2i@5 ",
        " i2t@10 ",
        " t2i@10 ",
    ]
    text = "\n".join(lines)
    assert "templates" not in text and "none (0)" not in text and "vs simple" not in text
    assert lines[-1] == "i2t@k, t2i@k: recall@k from images to texts and from texts to images"


def test_eval_table_on_stderr_for_one_template_set(cli: Cli, shapes_folder: Path) -> None:
    ran = cli("eval", str(shapes_folder / "data"), "-m", "tiny-shapes", env={"COLUMNS": "80"})
    assert ran.exit_code == 0, ran.stderr
    lines = ran.stderr.splitlines()
    assert all(len(line) <= 80 for line in lines), ran.stderr
    assert "vs simple" not in ran.stderr and "acc@1" in ran.stderr and "simple (1)" in ran.stderr
    assert lines[-1] == "acc@k: top-k accuracy; mpcr: mean per-class recall"


# --- where the data comes from -----------------------------------------------------------------------


def test_load_dataset_picks_folder_manifest_or_benchmark(shapes_folder: Path, tmp_path: Path) -> None:
    from clipcli.errors import InputError
    from clipcli.evaluation.datasets import Benchmark, CaptionPairs, LabelledImages, load_dataset

    folder = load_dataset(shapes_folder / "data")
    assert isinstance(folder, LabelledImages) and len(folder) == 36 and folder.classes[0] == "blue star"
    labelled = load_dataset(shapes_folder / "manifest.csv")
    assert isinstance(labelled, LabelledImages) and labelled.classes == folder.classes
    assert sorted(labelled.targets) == sorted(folder.targets)
    captions = load_dataset(_captions(shapes_folder))
    assert isinstance(captions, CaptionPairs) and len(captions) == 12 and len(captions.texts) == 12
    with pytest.raises(
        InputError, match=r"^give a folder or manifest, or --dataset cifar10\|cifar100 \(one of them\)$"
    ):
        load_dataset(None)
    with pytest.raises(InputError, match="one of them"):
        load_dataset(shapes_folder / "data", Benchmark.CIFAR10)
    with pytest.raises(InputError, match=f"^{tmp_path / 'absent'}: no such folder or manifest$"):
        load_dataset(tmp_path / "absent")


def test_dataset_choices_are_typers_own(cli: Cli) -> None:
    help_text = " ".join(cli("eval", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "cifar10|cifar100" in help_text
    line = _one_line_error(cli("eval", "--dataset", "imagenet"))
    assert "--dataset" in line and "'imagenet' is not one of 'cifar10', 'cifar100'" in line


def test_report_help_names_the_schema_that_ships(cli: Cli) -> None:
    help_text = " ".join(cli("eval", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "schema in the README" not in help_text
    assert "clipcli/report.schema.json, installed with the package" in help_text
    assert (resources.files("clipcli") / "report.schema.json").is_file()


def test_walk_folder_is_public_and_datasets_use_it(tmp_path: Path) -> None:
    """An eval folder lists its images as classify walks a folder: natural order, images only, a link back
    up the tree entered once."""
    from PIL import Image

    import clipcli.images.sources
    from clipcli.evaluation.datasets import load_dataset

    assert not hasattr(clipcli.images.sources, "_walk_folder")
    root = tmp_path / "classes"
    for name in ("cats/img10.png", "cats/img2.png", "dogs/b.JPG", "dogs/a.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name, format="PNG")
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / "dogs" / "loop").symlink_to(root)
    walked = [ref.path for ref in clipcli.images.sources.walk_folder(str(root))]
    expected = ["cats/img2.png", "cats/img10.png", "dogs/a.png", "dogs/b.JPG"]
    assert walked == [str(root / name) for name in expected]
    dataset = load_dataset(root)
    assert dataset.ids == walked and dataset.classes == ["cats", "dogs"] and dataset.targets == [0, 0, 1, 1]


def test_eval_scores_are_classifys_probabilities(cli: Cli, shapes_folder: Path, tmp_path: Path) -> None:
    data = shapes_folder / "data"
    preds = tmp_path / "p.csv"
    # Letters for names leave the model unsure, so the scores are far from 1.0 and comparing them says something.
    names = list("abcdef")
    letters = tmp_path / "letters.txt"
    letters.write_text("\n".join(names) + "\n")
    ran = cli("eval", str(data), "-m", "tiny-shapes", "--classnames", str(letters), "--predictions", str(preds))
    assert ran.exit_code == 0, ran.stderr
    by_eval = pd.read_csv(preds).set_index("path")
    labels = ",".join(names)
    out = cli("classify", str(data), "--labels", labels, "-m", "tiny-shapes", "-k", "1", "-f", "csv")
    by_classify = pd.read_csv(io.StringIO(out.stdout)).set_index("path")
    assert len(by_eval) == len(by_classify) == 36
    assert (by_eval["predicted_label"] == by_classify.loc[by_eval.index, "label"]).all()
    assert np.allclose(by_eval["score"], by_classify.loc[by_eval.index, "score"], atol=1e-6)
    assert by_eval["score"].min() < 0.5


def test_a_report_or_predictions_file_clipcli_did_not_write_is_refused_before_the_work(
    cli: Cli, shapes_folder: Path, tmp_path: Path
) -> None:
    """`--report` and `--predictions` over a user's files are refused at once, the files untouched; an
    earlier report and predictions of clipcli's are replaced by the rerun."""
    data = str(shapes_folder / "data")
    report, predictions = tmp_path / "r.json", tmp_path / "p.csv"
    for target, other in ((report, predictions), (predictions, report)):
        target.write_text('{"my": "numbers"}\n' if target.suffix == ".json" else "name,phone\nAda,123\n")
        other.unlink(missing_ok=True)
        before = target.read_bytes()
        ran = cli("eval", data, "-m", "tiny-shapes", "--report", str(report), "--predictions", str(predictions))
        assert ran.exit_code == 2 and ran.stderr.startswith(f"Error: {target}: exists and is not a"), ran.stderr
        assert target.read_bytes() == before and not other.exists()  # nothing evaluated, nothing written
        target.unlink()
    for _ in range(2):
        ran = cli("eval", data, "-m", "tiny-shapes", "--report", str(report), "--predictions", str(predictions))
        assert ran.exit_code == 0, ran.stderr
