"""`clipcli classify-text` and `eval` on a text manifest, end to end through the CLI, on tiny random NLI
models saved in fixtures (see nli_models.py). Scores are checked against clipcli's own core, which the
parity tests hold to Hugging Face's pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import Ran
from nli_models import bart_dir, bart_folder, bert_dir

from clipcli.models.nli import load_nli_model
from clipcli.text.nli import iter_scores

__all__ = ["bart_dir", "bert_dir"]  # fixtures, used by name

LABELS = "sports,politics,music"
TEXTS = ["I love playing basketball.", "Parliament passed the budget.", "The band played two encores."]


def expected(folder: Path, texts: list[str], labels: str = LABELS, multi_label: bool = False) -> list[dict[str, float]]:
    """Each text's score per label, from the core at the precision the CLI picks by default."""
    nm = load_nli_model(str(folder))
    names = labels.split(",")
    rows = iter_scores(nm, texts, names, "This text is about {}.", multi_label)
    return [dict(zip(names, map(float, row), strict=True)) for row in rows]


def csv_rows(text: str) -> pd.DataFrame:
    from io import StringIO

    return pd.read_csv(StringIO(text), keep_default_na=False)


def check_tidy(frame: pd.DataFrame, texts: list[str], scores: list[dict[str, float]], k: int) -> None:
    """Tidy rows: k per text in input order, ranks 1..k, best first, scores as the core gives them."""
    assert list(frame["text"]) == [t for t in texts for _ in range(k)]
    assert list(frame["rank"]) == list(range(1, k + 1)) * len(texts)
    for i, want in enumerate(scores):
        mine = frame.iloc[i * k : (i + 1) * k]
        best = sorted(want, key=want.__getitem__, reverse=True)[:k]
        assert list(mine["label"]) == best
        assert list(mine["score"]) == pytest.approx([want[b] for b in best], abs=1e-6)


# --- inputs --------------------------------------------------------------------------------------


def test_texts_as_arguments_give_tidy_csv_without_ids(cli: Callable[..., Ran], bart_dir: Path) -> None:
    ran = cli("classify-text", *TEXTS, "--labels", LABELS, "-m", str(bart_dir), "-f", "csv")
    assert ran.exit_code == 0, ran.stderr
    frame = csv_rows(ran.stdout)
    assert list(frame.columns) == ["text", "rank", "label", "score"]
    check_tidy(frame, TEXTS, expected(bart_dir, TEXTS), k=3)
    assert ran.stderr.strip().splitlines()[-1] == "classified 3 texts, skipped 0"


def test_the_tutorial_example_with_hf_prefix_and_top_k(cli: Callable[..., Ran], bart_dir: Path) -> None:
    labels = "sports,politics,entertainment"
    ran = cli(
        "classify-text",
        "I love playing basketball.",
        "--labels",
        labels,
        "-m",
        f"hf:{bart_dir}",
        "-k",
        "1",
        "-f",
        "csv",
    )
    assert ran.exit_code == 0, ran.stderr
    frame = csv_rows(ran.stdout)
    check_tidy(frame, ["I love playing basketball."], expected(bart_dir, ["I love playing basketball."], labels), k=1)


def test_lines_of_a_file_keep_their_line_numbers_and_blank_lines_are_passed_over(
    cli: Callable[..., Ran], bart_dir: Path, tmp_path: Path
) -> None:
    file = tmp_path / "texts.txt"
    file.write_text(f"{TEXTS[0]}\n\n   \n{TEXTS[1]}\r\n{TEXTS[2]}")  # no final newline, a CRLF line
    ran = cli("classify-text", "--texts-file", str(file), "--labels", LABELS, "-m", str(bart_dir), "-f", "csv")
    assert ran.exit_code == 0, ran.stderr
    frame = csv_rows(ran.stdout)
    assert list(frame.columns) == ["id", "text", "rank", "label", "score"]
    assert list(frame["id"]) == [1, 1, 1, 4, 4, 4, 5, 5, 5]
    check_tidy(frame, TEXTS, expected(bart_dir, TEXTS), k=3)


@pytest.mark.slow
def test_stdin_lines_with_a_dash(cli: Callable[..., Ran], bart_dir: Path) -> None:
    for args in (["-"], ["--texts-file", "-"]):
        ran = cli("classify-text", *args, "-l", LABELS, "-m", str(bart_dir), "-f", "csv", input="\n".join(TEXTS))
        assert ran.exit_code == 0, ran.stderr
        frame = csv_rows(ran.stdout)
        assert list(frame["id"].unique()) == [1, 2, 3]
        check_tidy(frame, TEXTS, expected(bart_dir, TEXTS), k=3)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_column_of_csv_or_parquet_with_an_empty_cell_skipped(
    cli: Callable[..., Ran], bart_dir: Path, tmp_path: Path, suffix: str
) -> None:
    frame = pd.DataFrame({"ticket": [10, 11, 12, 13], "body": [TEXTS[0], "", TEXTS[1], TEXTS[2]]})
    file = tmp_path / f"tickets{suffix}"
    if suffix == ".csv":
        frame.to_csv(file, index=False)
    else:
        frame.loc[1, "body"] = None
        frame.to_parquet(file)
    ran = cli("classify-text", "--texts-file", str(file), "--column", "body", "-l", LABELS, "-m", str(bart_dir))
    assert ran.exit_code == 1  # a row without a text is a skipped input
    assert f"skipped {file} row 2: empty text" in ran.stderr
    out = csv_rows(ran.stdout)
    assert list(out["id"].unique()) == [1, 3, 4]  # data rows of the file
    check_tidy(out, TEXTS, expected(bart_dir, TEXTS), k=3)


def test_a_csv_without_the_column_names_the_columns(cli: Callable[..., Ran], bart_dir: Path, tmp_path: Path) -> None:
    file = tmp_path / "t.csv"
    file.write_text("body\nhello\n")
    ran = cli("classify-text", "--texts-file", str(file), "-l", LABELS, "-m", str(bart_dir))
    assert ran.exit_code == 2
    assert ran.stderr.strip() == f"Error: {file}: no column 'text'; pick one with --column: body"


def test_an_empty_file_gives_an_empty_output_without_loading_a_model(cli: Callable[..., Ran], tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "out.parquet"
    ran = cli("classify-text", "--texts-file", str(empty), "-l", LABELS, "-m", "hf:no/such-model", "-o", str(out))
    assert ran.exit_code == 0, ran.stderr
    assert f"no texts in {empty}" in ran.stderr
    table = pd.read_parquet(out)
    assert len(table) == 0 and list(table.columns) == ["id", "text", "rank", "label", "score"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a", "--texts-file", "x.txt"], "give texts as arguments or with --texts-file, not both"),
        (["a", "-"], "- reads the texts from stdin: give it alone"),
        ([], "no texts: pass them as arguments, with --texts-file FILE, or - to read lines on stdin"),
        (["a", "--column", "x"], "--column picks a column of a CSV/Parquet --texts-file"),
        (["a", "--hypothesis", "About sports."], "hypothesis 'About sports.' has no {} for the label"),
    ],
)
def test_usage_errors_are_one_line(cli: Callable[..., Ran], args: list[str], message: str) -> None:
    ran = cli("classify-text", *args, "-l", LABELS, "-m", "hf:no/such-model")
    assert ran.exit_code == 2
    assert ran.stderr.strip() == f"Error: {message}"


# --- outputs -------------------------------------------------------------------------------------


def test_jsonl_holds_one_record_per_text(cli: Callable[..., Ran], bert_dir: Path) -> None:
    ran = cli("classify-text", *TEXTS, "-l", LABELS, "-m", str(bert_dir), "-f", "jsonl", "-k", "2", "--multi-label")
    assert ran.exit_code == 0, ran.stderr
    records = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [r["text"] for r in records] == TEXTS
    for record, want in zip(records, expected(bert_dir, TEXTS, multi_label=True), strict=True):
        best = sorted(want, key=want.__getitem__, reverse=True)[:2]
        assert [p["label"] for p in record["predictions"]] == best
        assert [p["score"] for p in record["predictions"]] == pytest.approx([want[b] for b in best], abs=1e-6)


def test_multi_label_scores_each_label_on_its_own(cli: Callable[..., Ran], bart_dir: Path) -> None:
    single = csv_rows(cli("classify-text", TEXTS[0], "-l", LABELS, "-m", str(bart_dir), "-f", "csv").stdout)
    multi = csv_rows(
        cli("classify-text", TEXTS[0], "-l", LABELS, "-m", str(bart_dir), "-f", "csv", "--multi-label").stdout
    )
    assert single["score"].sum() == pytest.approx(1.0, abs=1e-6)
    assert multi["score"].sum() != pytest.approx(1.0, abs=1e-3)
    check_tidy(multi, [TEXTS[0]], expected(bart_dir, [TEXTS[0]], multi_label=True), k=3)


def test_parquet_and_csv_files_by_extension(cli: Callable[..., Ran], bart_dir: Path, tmp_path: Path) -> None:
    file = tmp_path / "texts.txt"
    file.write_text("\n".join(TEXTS))
    for name in ("out.parquet", "out.csv"):
        out = tmp_path / name
        ran = cli("classify-text", "--texts-file", str(file), "-l", LABELS, "-m", str(bart_dir), "-o", str(out))
        assert ran.exit_code == 0, ran.stderr
        assert ran.stdout == ""
        frame = pd.read_parquet(out) if name.endswith(".parquet") else pd.read_csv(out)
        assert list(frame.columns) == ["id", "text", "rank", "label", "score"]
        check_tidy(frame, TEXTS, expected(bart_dir, TEXTS), k=3)


def test_table_shows_percentages_and_the_start_of_long_texts(cli: Callable[..., Ran], bart_dir: Path) -> None:
    long_text = "word " * 40
    ran = cli("classify-text", TEXTS[0], long_text, "-l", LABELS, "-m", str(bart_dir), "-f", "table", "-k", "1")
    assert ran.exit_code == 0, ran.stderr
    assert "I love playing basketball." in ran.stdout and "%" in ran.stdout
    assert ran.stdout.count("word") == 12  # the first 59 characters ("word " x 11 + "word"), then "…"


# --- models --------------------------------------------------------------------------------------


def test_a_model_without_an_entailment_label_is_refused(cli: Callable[..., Ran], tmp_path: Path) -> None:
    folder = bart_folder(tmp_path / "sentiment", label2id={"negative": 0, "positive": 1})
    ran = cli("classify-text", "a", "-l", LABELS, "-m", str(folder))
    assert ran.exit_code == 2
    assert ran.stderr.strip() == (
        f"Error: {folder}: no entailment label in the model's label2id (it has negative, positive); "
        "zero-shot classification needs a model fine-tuned on NLI"
    )


def test_a_folder_asking_for_custom_code_is_refused(cli: Callable[..., Ran], bart_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(bart_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    ran = cli("classify-text", "a", "-l", LABELS, "-m", f"hf:{folder}")
    assert ran.exit_code == 2
    assert ran.stderr.strip() == (
        f"Error: {folder}: config.json asks for custom code (auto_map), which clipcli never runs; "
        "use a model that transformers supports natively"
    )


def test_pickled_weights_load_with_weights_only(cli: Callable[..., Ran], bart_dir: Path, tmp_path: Path) -> None:
    """An older folder with pytorch_model.bin only: read as tensors, scores unchanged."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(bart_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    ran = cli("classify-text", *TEXTS, "-l", LABELS, "-m", str(folder), "-f", "csv")
    assert ran.exit_code == 0, ran.stderr
    check_tidy(csv_rows(ran.stdout), TEXTS, expected(bart_dir, TEXTS), k=3)


def test_a_pickle_that_would_run_code_is_refused_in_clipclis_words(
    cli: Callable[..., Ran], bart_dir: Path, tmp_path: Path
) -> None:
    import pickle
    import shutil

    folder = tmp_path / "hostile"
    shutil.copytree(bart_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Payload()}))
    ran = cli("classify-text", "a", "-l", LABELS, "-m", str(folder))
    assert ran.exit_code == 2 and not marker.exists()
    assert ran.stderr.strip() == (
        f"Error: {folder}: pytorch_model.bin holds objects other than tensors, which clipcli never unpickles "
        "(they could run code); use the model's safetensors weights"
    )


def test_a_missing_extra_names_it(cli: Callable[..., Ran], bart_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    ran = cli("classify-text", "a", "-l", LABELS, "-m", str(bart_dir))
    assert ran.exit_code == 2
    assert ran.stderr.strip() == "Error: NLI models need the Hugging Face libraries: pip install 'clipcli[hf]'"


def test_offline_without_the_model_is_one_line_at_once(cli: Callable[..., Ran], tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.update({k: "" for k in ("HF_HUB_CACHE",) if k in os.environ})
    ran = cli("classify-text", "a", "-l", LABELS, "-m", "hf:facebook/bart-large-mnli", env=env)
    assert ran.exit_code == 2
    assert ran.stderr.strip() == (
        f"Error: hf:facebook/bart-large-mnli is not in the Hugging Face cache ({tmp_path / 'hf' / 'hub'}) and "
        "HF_HUB_OFFLINE is set: download it once with a network, or pass a folder written by save_pretrained"
    )


@pytest.mark.slow
def test_offline_default_model_in_a_fresh_process(tmp_path: Path, python: str) -> None:
    """The console script, no --model: HF_HUB_OFFLINE is honoured as the hub library reads it, at start."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    cmd = [python, "-m", "clipcli", "classify-text", "I love playing basketball.", "-l", "sports,politics"]
    ran = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2
    assert ran.stderr.count("\n") == 1 and ran.stderr.startswith("Error: hf:facebook/bart-large-mnli is not in")


def test_a_model_from_the_hub_cache_loads_offline(cli: Callable[..., Ran], bart_dir: Path, tmp_path: Path) -> None:
    """hf:ORG/REPO finds a snapshot laid out as huggingface_hub caches it, with no network."""
    import shutil

    repo = tmp_path / "hf" / "hub" / "models--tiny--bart-mnli"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(bart_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    ran = cli("classify-text", *TEXTS, "-l", LABELS, "-m", "hf:tiny/bart-mnli", "-f", "csv", env=env)
    assert ran.exit_code == 0, ran.stderr
    check_tidy(csv_rows(ran.stdout), TEXTS, expected(bart_dir, TEXTS), k=3)


# --- eval on a text manifest ---------------------------------------------------------------------


def test_eval_on_a_text_manifest_reports_the_metrics_of_the_predictions(
    cli: Callable[..., Ran], bart_dir: Path, tmp_path: Path
) -> None:
    """Metrics checked by hand from the per-text predictions classify-text gives for the same texts."""
    texts = [*TEXTS, "Who won the game?", "The vote was close.", "A quiet song.", "ok"]
    truth = ["sports", "politics", "music", "sports", "politics", "music", "sports"]
    manifest = tmp_path / "texts.csv"
    pd.DataFrame({"text": texts, "label": truth}).to_csv(manifest, index=False)
    report, preds = tmp_path / "run.json", tmp_path / "preds.csv"
    ran = cli("eval", str(manifest), "-m", str(bart_dir), "--report", str(report), "--predictions", str(preds))
    assert ran.exit_code == 0, ran.stderr
    assert "(7 texts)" in ran.stderr

    classes = ["music", "politics", "sports"]  # natural order
    scores = expected(bart_dir, texts, ",".join(classes))
    predicted = [max(s, key=s.__getitem__) for s in scores]
    pairs = list(zip(truth, predicted, strict=True))
    confusion = [[sum(t == a and p == b for t, p in pairs) for b in classes] for a in classes]
    recall = [confusion[i][i] / sum(confusion[i]) for i in range(3)]
    result = json.loads(report.read_text())["results"][0]
    assert result["templates"] == "This text is about {}." and result["n"] == 7
    assert result["classes"] == classes and result["confusion_matrix"] == confusion
    assert result["metrics"]["acc1"] == pytest.approx(sum(t == p for t, p in zip(truth, predicted, strict=True)) / 7)
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(sum(recall) / 3)
    assert [c["recall"] for c in result["per_class"]] == pytest.approx(recall)
    rows = pd.read_csv(preds)
    assert list(rows["text"]) == texts and list(rows["predicted_label"]) == predicted
    assert list(rows["row"]) == list(range(1, 8))


def test_eval_compares_hypotheses_side_by_side(cli: Callable[..., Ran], bart_dir: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "texts.parquet"
    pd.DataFrame({"text": TEXTS * 2, "label": ["sports", "politics", "music"] * 2}).to_parquet(manifest)
    templates = tmp_path / "hyps.txt"
    templates.write_text("It is about {}.\n{}\n")
    report = tmp_path / "run.json"
    ran = cli(
        "eval", str(manifest), "-m", str(bart_dir), "-m", str(bart_dir),
        "--template", "This text is about {}.", "--templates", str(templates), "--report", str(report),
    )  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    results = json.loads(report.read_text())["results"]
    assert [r["templates"] for r in results] == ["This text is about {}.", "It is about {}.", "{}"] * 2
    assert len({r["metrics"]["acc1"] for r in results[:3]}) >= 1
    assert results[0]["metrics"] == results[3]["metrics"]  # the same model twice: the same figures


def test_eval_text_manifest_refuses_image_options(cli: Callable[..., Ran], bart_dir: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "texts.csv"
    pd.DataFrame({"text": TEXTS, "label": ["a", "b", "c"]}).to_csv(manifest, index=False)
    ran = cli("eval", str(manifest), "-m", str(bart_dir), "--templates", "imagenet")
    assert ran.exit_code == 2
    assert ran.stderr.startswith("Error: --templates imagenet is a set of image templates")


def test_text_metrics_by_hand() -> None:
    """Four texts, three classes; worked out on paper: predictions b, a, c, c for truths a, a, c, b."""
    import numpy as np

    from clipcli.evaluation.run import EvalResult, classification_metrics

    scores = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.3, 0.2, 0.5]])
    base = EvalResult("m", "0" * 64, "{}", 1, "texts:x", 4, 0, {})
    r = classification_metrics(scores, np.array([0, 0, 2, 1]), ["a", "b", "c"], base, ["1", "2", "3", "4"])
    assert r.confusion_matrix == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]
    assert r.metrics == pytest.approx({"acc1": 0.5, "mean_per_class_recall": (0.5 + 0 + 1) / 3})
    assert [c["precision"] for c in r.per_class] == pytest.approx([1.0, 0.0, 0.5])
    assert [c["recall"] for c in r.per_class] == pytest.approx([0.5, 0.0, 1.0])
    assert r.predictions is not None and list(r.predictions.true_rank) == [3, 1, 1, 3]


# --precision int8 and bf16 for NLI models, and their refusals: tests/test_text_precision.py
