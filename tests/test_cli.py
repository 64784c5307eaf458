"""The command line as a new user meets it: one-line usage errors, options given twice, help that lists
what is accepted, empty inputs, and progress on a real terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
IMAGE = str(SAMPLES / "seen" / "red-cross.jpg")


@pytest.mark.parametrize(
    "args",
    [
        ["classify", IMAGE, "--bogus"],
        ["classify", IMAGE, "-l", "a,b", "--top-k", "zero"],
        ["embed", IMAGE, "-f", "table"],
        ["rank", "a", IMAGE, "-f", "npy"],
        ["nonsense"],
    ],
)
def test_usage_errors_are_one_line(cli, args):
    ran = cli(*args)
    assert ran.exit_code == 2
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), ran.stderr
    assert "--help" in lines[0]
    assert "Value error" not in lines[0]  # the validation library's wording, not the user's concern


def test_debug_works_after_the_command(cli):
    ran = cli("classify", IMAGE, "-l", "a,b", "-m", "/nonexistent/model.pt", "--debug")
    assert ran.exit_code == 2
    assert "Traceback" in ran.stderr
    assert ran.stderr.strip().splitlines()[-1].startswith("Error: /nonexistent/model.pt: no such checkpoint file")


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["classify", IMAGE, "-l", "a,b", "--top-k", "3", "--top-k", "1"], "--top-k"),
        (["classify", IMAGE, "-l", "a,b", "-k", "3", "-k1"], "-k"),
        (["classify", IMAGE, "--labels=a,b", "--labels", "c"], "--labels"),
        (["rank", "a red cross", IMAGE, "--exact", "--no-exact"], "--no-exact"),
        (["embed", IMAGE, "-o", "a.csv", "--output", "b.csv"], "--output"),
    ],
)
def test_an_option_given_twice_is_refused(cli, tmp_path, args, flag):
    ran = cli(*args)
    assert ran.exit_code == 2
    assert re.fullmatch(rf"Error: {re.escape(flag)} given more than once \(.+ came first\); give it once\n", ran.stderr)


def test_a_repeated_option_value_that_looks_like_an_option_is_a_value(cli):
    ran = cli("classify", IMAGE, "-m", "tiny-shapes", "-l", "a,b", "--template", "--top-k {}", "-k", "1")
    assert ran.exit_code == 0, ran.stderr


@pytest.mark.slow
def test_templates_repeat_into_one_ensemble(cli):
    from clipcli.zeroshot.prompts import builtin_templates, resolve_templates

    pooled = resolve_templates(None, ["simple", "cifar"])
    assert pooled.name == "simple+cifar"
    expected = dict.fromkeys(builtin_templates("simple").templates + builtin_templates("cifar").templates)
    assert pooled.templates == tuple(expected)
    ran = cli("classify", IMAGE, "-m", "tiny-shapes", "--labels-file", str(SAMPLES / "labels.txt"), "-k", "1",
              "--templates", "simple", "--templates", "cifar")  # fmt: skip
    assert ran.exit_code == 0, ran.stderr
    assert ran.stdout.splitlines()[1].split(",")[2] == "red cross"


def test_rank_refuses_a_query_text_with_image(cli):
    ran = cli("rank", "a red cross", "--image", IMAGE, str(SAMPLES / "seen"), "-m", "tiny-shapes")
    assert ran.exit_code == 2
    assert (
        ran.stderr.strip()
        == "Error: give a QUERY or --image, not both ('a red cross' is not a file, folder or pattern)"
    )


@pytest.mark.parametrize("command", ["classify", "embed", "rank"])
@pytest.mark.parametrize("source", ["folder", "stdin"])
def test_no_images_found_is_an_error(cli, tmp_path, command, source):
    empty = tmp_path / "empty"
    empty.mkdir()
    where = str(empty) if source == "folder" else "-"
    args = {"classify": ["classify", where, "-l", "a,b"], "embed": ["embed", where], "rank": ["rank", "x", where]}
    ran = cli(*args[command], "-m", "tiny-shapes", "-o", str(tmp_path / "out.csv"), input="")
    assert ran.exit_code == 2
    named = where if source == "folder" else "the list on standard input"
    assert ran.stderr.strip() == f"Error: no images found in {named}"
    assert not (tmp_path / "out.csv").exists()


def test_parquet_is_not_written_to_a_terminal(cli, monkeypatch):
    import clipcli.store.formats

    monkeypatch.setattr(clipcli.store.formats, "stdout_is_tty", lambda: True)
    for args in (["classify", IMAGE, "-l", "a,b", "-f", "parquet"], ["embed", IMAGE, "-f", "parquet"]):
        ran = cli(*args, "-m", "tiny-shapes")
        assert ran.exit_code == 2
        assert ran.stderr.startswith("Error: Parquet is binary: pass -o FILE.parquet")
        assert ran.stdout == ""


@pytest.mark.parametrize(
    ("command", "formats"),
    [
        ("classify", "table|csv|jsonl|parquet"),
        ("embed", "csv|jsonl|parquet|npy"),
        ("rank", "table|tsv|csv|jsonl|parquet"),
    ],
)
def test_help_lists_exactly_the_formats_a_command_writes(cli, command, formats):
    ran = cli(command, "--help", env={"COLUMNS": "200"})
    assert re.search(rf"--format \[?<?{re.escape(formats)}>?\]?", ran.stdout), ran.stdout
    assert "<list[str]>" not in ran.stdout and "<int range>" not in ran.stdout and "{inputs}" not in ran.stdout


def test_rank_data_outputs_put_the_path_first_and_tsv_keeps_score_first(cli, tmp_path):
    base = ["rank", "a photo of a red cross.", str(SAMPLES / "seen"), "-m", "tiny-shapes", "-k", "2"]
    ran = cli(*base, "-f", "csv")
    assert ran.stdout.splitlines()[0] == "path,score"
    assert ran.stdout.splitlines()[1].startswith(str(SAMPLES / "seen" / "red-cross.jpg") + ",")
    ran = cli(*base)
    score, path = ran.stdout.splitlines()[0].split("\t")
    assert float(score) > 0 and path.endswith("red-cross.jpg")


@pytest.mark.slow
def test_progress_appears_on_a_terminal_and_prompts_have_their_own_bar(tmp_path):
    """Encoding many prompts and classifying are two bars, one after the other (rich allows one at a time)."""
    leader, follower = os.openpty()
    labels = ["--labels-file", str(SAMPLES / "labels.txt"), "--templates", "imagenet"]
    command = [sys.executable, "-m", "clipcli", "classify", str(SAMPLES / "seen"), "-m", "tiny-shapes", *labels]
    command += ["-o", str(tmp_path / "o.csv")]
    env = {**os.environ, "CLIPCLI_CACHE": str(tmp_path / "cache"), "COLUMNS": "120"}
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=follower, stdin=subprocess.DEVNULL, env=env)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert run.wait(timeout=120) == 0, seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    assert "encoding prompts" in text and "5120/5120" in text
    assert "classifying" in text and "Traceback" not in text
    assert (tmp_path / "o.csv").read_text().count("\n") == 1 + 16 * 5


def test_one_file_named_two_ways_in_two_runs_is_stored_once(cli, tmp_path, monkeypatch):
    import shutil

    import pyarrow.dataset as ds

    monkeypatch.chdir(tmp_path)
    shutil.copy(IMAGE, "cat.jpg")
    assert cli("embed", ".", "-m", "tiny-shapes", "-o", "emb/").exit_code == 0
    again = cli("embed", "cat.jpg", "-m", "tiny-shapes", "-o", "emb/")
    assert again.exit_code == 0 and "embedded 0, unchanged 1" in again.stderr
    assert ds.dataset("emb", format="parquet").to_table().column("path").to_pylist() == ["cat.jpg"]


def test_model_names_suggest_the_right_spelling_and_the_offline_model(cli, tmp_path):
    ran = cli("classify", IMAGE, "-l", "a,b", "-m", "vit-b/32")
    assert ran.stderr.strip() == "Error: unknown model 'vit-b/32' (did you mean ViT-B/32?)"
    env = {"CLIPCLI_CACHE": str(tmp_path), "CLIPCLI_MIRROR": "http://127.0.0.1:9"}
    ran = cli("classify", IMAGE, "-l", "a,b", "-m", "ViT-B/32", env=env)
    assert ran.exit_code == 2 and ran.stderr.strip().endswith("--model tiny-shapes works offline")


def test_models_prints_plain_rows_in_a_pipe(cli):
    ran = cli("models")
    rows = [line.split("\t") for line in ran.stdout.splitlines()]
    assert ["tiny-shapes", "bundled", "bundled"] in [r[:3] for r in rows] and all(len(r) == 5 for r in rows)
    assert "─" not in ran.stdout and "│" not in ran.stdout


def test_tests_keep_their_caches_out_of_the_home_folder(cli, private_cache, tmp_path):
    from clipcli.cache import cache_dir

    assert cache_dir() == private_cache and Path.home() not in cache_dir().parents
    for name, image in (("red cross", IMAGE), ("blue star", str(SAMPLES / "seen" / "blue-star.jpg"))):
        folder = tmp_path / "by-class" / name
        folder.mkdir(parents=True)
        (folder / "a.jpg").write_bytes(Path(image).read_bytes())
    assert cli("eval", str(tmp_path / "by-class"), "-m", "tiny-shapes").exit_code == 0
    assert list((private_cache / "clipcli-classifiers").iterdir())  # the classifier cache went here


def test_eval_predictions_with_an_unknown_extension_names_what_works(cli, tmp_path):
    ran = cli("eval", str(SAMPLES), "-m", "tiny-shapes", "--predictions", str(tmp_path / "p.xlsx"))
    assert ran.exit_code == 2
    assert (
        ran.stderr.strip()
        == f"Error: {tmp_path / 'p.xlsx'}: cannot tell the format from the extension (use .csv, .parquet, .pq)"
    )


@pytest.mark.parametrize("command", ["classify", "embed", "rank", "eval", "train", "make-shapes", "models"])
def test_help_names_values_not_python_types(cli, command):
    ran = cli(command, "--help", env={"COLUMNS": "200"})
    assert ran.exit_code == 0
    python_types = re.findall(r"<(?:str|int|float|path|list\[[a-z]+\]|[a-z]+ range)>", ran.stdout)
    assert python_types == [] and not re.search(r"\{[a-z_]+\}", ran.stdout), ran.stdout


def test_bad_training_settings_are_usage_errors(cli, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,text\nx.jpg,a red cross\n")
    for option, value, expected in (
        ("--lr", "-1", "--lr must be a positive number, not -1.0"),
        ("--lr", "nan", "--lr must be a positive number, not nan"),
        ("--weight-decay", "-1", "--weight-decay must be 0 or more, not -1.0"),
        ("--warmup", "2", "--warmup is a fraction of the steps, from 0 up to 1, not 2.0"),
    ):
        ran = cli("train", str(pairs), "-o", str(tmp_path / "m.pt"), option, value)
        assert (ran.exit_code, ran.stderr.strip()) == (2, f"Error: {expected}")


def test_a_file_that_is_no_checkpoint_is_not_called_dangerous(cli):
    readme = str(Path(__file__).resolve().parent.parent / "README.md")
    ran = cli("classify", IMAGE, "-l", "a,b", "-m", readme)
    assert (
        ran.stderr.strip()
        == f"Error: {readme}: not a readable checkpoint (not a PyTorch file: neither a zip nor a pickle)"
    )


def test_eval_refuses_what_a_retrieval_manifest_cannot_give(cli, tmp_path):
    manifest = tmp_path / "captions.csv"
    manifest.write_text(f"path,text\n{IMAGE},a red cross\n{SAMPLES / 'seen' / 'blue-star.jpg'},a blue star\n")
    ran = cli("eval", str(manifest), "-m", "tiny-shapes", "--predictions", str(tmp_path / "p.csv"))
    assert ran.exit_code == 2 and not (tmp_path / "p.csv").exists()
    assert ran.stderr.strip() == (
        f"Error: {manifest}: a retrieval manifest (path,text) has no classes: --predictions apply to classification"
    )


def test_eval_needs_two_classes_and_compares_each_template_set_once(cli, tmp_path):
    ran = cli("eval", str(SAMPLES / "seen"), "-m", "tiny-shapes")
    assert ran.exit_code == 2 and "all in one class folder ('seen')" in ran.stderr
    report = tmp_path / "r.json"
    args = ["eval", str(SAMPLES), "-m", "tiny-shapes", "--templates", "simple", "--templates", "simple"]
    assert cli(*args, "--report", str(report)).exit_code == 0
    import json

    assert len(json.loads(report.read_text())["results"]) == 1


def test_npy_needs_a_name_that_ends_in_npy(cli, tmp_path):
    ran = cli("embed", str(SAMPLES / "busy"), "-m", "tiny-shapes", "-f", "npy", "-o", str(tmp_path / "outdir"))
    assert (
        ran.exit_code == 2
        and ran.stderr.strip() == "Error: NPY is written to a file with its sidecar: pass -o FILE.npy"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["classify", "embed", "rank"])
def test_a_mistyped_input_is_an_error_when_it_was_the_only_one(cli, tmp_path, command):
    args = {
        "classify": ["classify", "sampels/", "-l", "a,b"],
        "embed": ["embed", "sampels/"],
        "rank": ["rank", "x", "sampels/"],
    }
    ran = cli(*args[command], "-m", "tiny-shapes", "-o", str(tmp_path / "out.csv"))
    assert ran.exit_code == 2
    assert ran.stderr.strip() == "Error: no images found in sampels/ (sampels/: no such file or directory)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_output_is_locked_while_stdin_is_read(tmp_path):
    env = {**os.environ, "COLUMNS": "100"}
    first = subprocess.Popen(
        [sys.executable, "-m", "clipcli", "embed", "-", "-m", "tiny-shapes", "-o", "L.csv"],
        cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / ".L.csv.lock").exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.01)
        second = subprocess.run(
            [sys.executable, "-m", "clipcli", "embed", IMAGE, "-m", "tiny-shapes", "-o", "L.csv"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert second.returncode == 2 and "another clipcli run" in second.stderr
        _, err = first.communicate(f"{IMAGE}\n".encode(), timeout=120)
        assert first.returncode == 0, err.decode()
    finally:
        first.kill()
    assert (tmp_path / "L.csv").read_text().count("\n") == 2


def test_rank_without_a_query_says_what_it_took_for_one(cli):
    ran = cli("rank", str(SAMPLES / "seen"), "-m", "tiny-shapes")
    assert ran.exit_code == 2
    assert ran.stderr.strip().endswith(f"({str(SAMPLES / 'seen')!r} was taken as the query text)")
