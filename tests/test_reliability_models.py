"""Issue 21, the models, text classification, training and messages items, each reproduced as reported.

Training is interrupted by real signals sent to a real process; damaged Hugging Face folders are real
folders with tensors deleted from their safetensors; ``clipcli models`` is read from a real terminal (a pty).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import Ran, write_checkpoint
from nli_models import bart_folder

from clipcli.training.loop import TrainConfig, train
from clipcli.training.synth import generate

Cli = Callable[..., Ran]
SAMPLES = Path(__file__).resolve().parent.parent / "samples"
IMAGE = SAMPLES / "seen" / "red-square.jpg"


def _one_line_error(ran: Ran, *fragments: str) -> str:
    assert ran.exit_code == 2, (ran.exit_code, ran.stdout, ran.stderr)
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), ran.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- item 7: an interrupted run's checkpoint --------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    list(generate(folder, 16, seed=5, workers=1))
    return folder / "pairs.csv"


TRAIN_ARGS = ["--arch", "test-rn", "--steps", "4", "-b", "4", "--checkpoint-every", "2", "--device", "cpu"]


class Stop(Exception):
    """Raised from on_step: a run that stopped after its first checkpoint."""


def _interrupted_run(pairs: Path, out: Path) -> bytes:
    """A run of TRAIN_ARGS stopped at step 3, after its checkpoint at step 2; the checkpoint's bytes."""
    config = TrainConfig(pairs, out, arch="test-rn", steps=4, batch_size=4, checkpoint_every=2, device="cpu")

    def stop_at_3(info: object) -> None:
        if getattr(info, "step", 0) == 3:
            raise Stop

    with pytest.raises(Stop):
        train(config, on_step=stop_at_3)
    return Path(f"{out}.ckpt").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_training_says_how_to_resume_and_keeps_the_checkpoint(
    pairs: Path, tmp_path: Path, signum: int, code: int
) -> None:
    out = tmp_path / "m.pt"
    ckpt = Path(f"{out}.ckpt")
    args = ["--arch", "tiny-shapes", "--steps", "100000", "-b", "4", "--checkpoint-every", "1", "--device", "cpu"]
    run = subprocess.Popen(
        [sys.executable, "-m", "clipcli", "train", str(pairs), "-o", str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not ckpt.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ckpt.exists(), "no checkpoint was written"
        time.sleep(1)  # mid-training: past the first checkpoint
        os.kill(run.pid, signum)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    stderr = err.decode()
    assert run.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    line = next((ln for ln in stderr.splitlines() if "resume with --resume" in ln), None)
    assert line is not None, stderr
    assert re.search(rf"{re.escape(str(ckpt))} holds step \d+", line), line
    assert ckpt.exists() and not out.exists()


@pytest.mark.slow
def test_a_rerun_without_resume_refuses_to_overwrite_the_checkpoint(cli: Cli, pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    saved = _interrupted_run(pairs, out)
    ran = cli("train", str(pairs), "-o", str(out), *TRAIN_ARGS)
    _one_line_error(ran, f"{out}.ckpt", "--resume", "--overwrite")
    assert Path(f"{out}.ckpt").read_bytes() == saved and not out.exists()


@pytest.mark.slow
def test_overwrite_starts_the_run_over(cli: Cli, pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    _interrupted_run(pairs, out)
    ran = cli("train", str(pairs), "-o", str(out), *TRAIN_ARGS, "--overwrite")
    assert ran.exit_code == 0, ran.stderr
    assert "resuming" not in ran.stderr and ran.stderr.startswith("trained 4 steps")
    assert out.exists() and not Path(f"{out}.ckpt").exists()


def test_resume_and_overwrite_together_are_refused(cli: Cli, pairs: Path, tmp_path: Path) -> None:
    ran = cli("train", str(pairs), "-o", str(tmp_path / "m.pt"), *TRAIN_ARGS, "--resume", "--overwrite")
    _one_line_error(ran, "--resume", "--overwrite", "not both")


@pytest.mark.slow
def test_resume_without_a_checkpoint_says_it_starts_from_scratch(cli: Cli, pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    ran = cli("train", str(pairs), "-o", str(out), *TRAIN_ARGS, "--resume")
    assert ran.exit_code == 0, ran.stderr
    assert ran.stderr.splitlines()[0] == f"no checkpoint at {out}.ckpt: starting from scratch"
    assert out.exists()


# --- item 10: Hugging Face folders with tensors missing or extra --------------------------------------------


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from family_models import hf_clip_folder

    return hf_clip_folder(tmp_path_factory.mktemp("hf") / "clip")


@pytest.fixture(scope="module")
def bart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bart_folder(tmp_path_factory.mktemp("nli") / "bart")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _edited_copy(
    folder: Path, to: Path, drop: tuple[str, ...] = (), add: dict[str, torch.Tensor] | None = None
) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, to)
    tensors = load_file(to / "model.safetensors")
    assert not drop or any(k.startswith(drop) for k in tensors), f"none of {drop} in the fixture"
    kept = {k: v for k, v in tensors.items() if not k.startswith(drop)} if drop else tensors
    save_file({**kept, **(add or {})}, str(to / "model.safetensors"), metadata={"format": "pt"})
    return to


def test_a_clip_folder_missing_tensors_is_refused(cli: Cli, hf_clip: Path, tmp_path: Path) -> None:
    cut = _edited_copy(hf_clip, tmp_path / "cut", drop=("visual_projection.weight", "logit_scale"))
    ran = cli("classify", str(IMAGE), "-l", "a,b", "-m", f"hf:{cut}")
    _one_line_error(ran, str(cut), "missing", "visual_projection.weight", "logit_scale")


def test_a_clip_folder_with_unexpected_tensors_is_refused(cli: Cli, hf_clip: Path, tmp_path: Path) -> None:
    extra = {"text_model.encoder.layers.7.mlp.fc1.weight": torch.zeros(4, 4)}
    odd = _edited_copy(hf_clip, tmp_path / "odd", add=extra)
    ran = cli("embed", str(IMAGE), "-m", f"hf:{odd}", "-f", "jsonl")
    _one_line_error(ran, str(odd), "unexpected", "text_model.encoder.layers.7.mlp.fc1.weight")


def test_an_nli_folder_missing_its_classification_head_is_refused(cli: Cli, bart: Path, tmp_path: Path) -> None:
    cut = _edited_copy(bart, tmp_path / "cut", drop=("classification_head.",))
    ran = cli("classify-text", "a game of football", "-l", "sports,politics", "-m", str(cut))
    line = _one_line_error(ran, str(cut), "missing", "classification_head.out_proj.weight")
    assert "classification_head.dense.bias" in line


def test_an_intact_nli_folder_still_loads(cli: Cli, bart: Path) -> None:
    ran = cli("classify-text", "a game of football", "-l", "sports,politics", "-m", str(bart), "-f", "jsonl")
    assert ran.exit_code == 0, ran.stderr


# --- item 13: byte-order marks, and one template check --------------------------------------------------------


BOM = "\ufeff"


def test_a_byte_order_mark_does_not_stay_in_the_first_label(cli: Cli, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_bytes(b"\xef\xbb\xbfcat\r\ndog\r\n")  # as Notepad saves UTF-8
    ran = cli("classify", str(IMAGE), "-m", "tiny-shapes", "--labels-file", str(labels), "-f", "jsonl")
    assert ran.exit_code == 0, ran.stderr
    assert {p["label"] for p in json.loads(ran.stdout)["predictions"]} == {"cat", "dog"}


def test_a_byte_order_mark_is_dropped_from_templates_queries_and_texts(cli: Cli, tmp_path: Path) -> None:
    from clipcli.zeroshot.prompts import read_lines, resolve_templates

    templates = tmp_path / "templates.txt"
    templates.write_text(f"{BOM}a photo of a {{}}.\n", encoding="utf-8")
    assert resolve_templates(templates=str(templates)).templates == ("a photo of a {}.",)
    queries = tmp_path / "queries.txt"
    queries.write_text(f"{BOM}a red square\n", encoding="utf-8")
    assert read_lines(queries, "queries") == ["a red square"]

    from clipcli.text.inputs import open_texts

    texts = tmp_path / "texts.txt"
    texts.write_text(f"{BOM}first text\nsecond\n", encoding="utf-8")
    assert list(open_texts([], str(texts), None).items) == [(1, "first text"), (2, "second")]
    import io

    assert list(open_texts(["-"], None, None, io.StringIO(f"{BOM}from stdin\n")).items) == [(1, "from stdin")]


def test_classify_text_refuses_the_template_classify_refuses(cli: Cli, bart: Path) -> None:
    template = "about {.__class__}"
    ran = cli("classify", str(IMAGE), "-m", "tiny-shapes", "-l", "a,b", "--template", template)
    _one_line_error(ran, f"template {template!r} has no {{}} for the label")
    ran = cli("classify-text", "a game", "-l", "sports,politics", "--hypothesis", template, "-m", str(bart))
    _one_line_error(ran, f"hypothesis {template!r} has no {{}} for the label")


# --- item 17: a checkpoint whose token table is too small ---------------------------------------------------


def test_a_checkpoint_with_a_ten_row_token_table_is_a_one_line_error(cli: Cli, tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "small.pt", "test-vit")
    state = torch.load(path, weights_only=True)
    state["token_embedding.weight"] = state["token_embedding.weight"][:10].clone()
    torch.save(state, path)
    ran = cli("classify", str(IMAGE), "-m", str(path), "-l", "a,b")
    _one_line_error(ran, str(path), "token_embedding.weight has 10 rows", "49408")


# --- item 19: messages that send users the right way ----------------------------------------------------------


def test_a_bad_model_in_clipcli_model_names_the_variable(cli: Cli) -> None:
    ran = cli("classify", str(IMAGE), "-l", "a,b", env={"CLIPCLI_MODEL": "tiny-shape"})
    _one_line_error(ran, "CLIPCLI_MODEL", "tiny-shape", "did you mean tiny-shapes?")
    # A model given with -m is not blamed on the variable.
    ran = cli("classify", str(IMAGE), "-l", "a,b", "-m", "tiny-shape", env={"CLIPCLI_MODEL": "tiny-shapes"})
    assert "CLIPCLI_MODEL" not in _one_line_error(ran, "did you mean tiny-shapes?")


def test_a_mistyped_template_set_gets_a_suggestion(cli: Cli) -> None:
    ran = cli("classify", str(IMAGE), "-m", "tiny-shapes", "-l", "a,b", "--templates", "imagnet")
    _one_line_error(ran, "'imagnet'", "did you mean imagenet?")


def test_an_unknown_open_clip_architecture_shows_the_closest_few(cli: Cli) -> None:
    import open_clip  # in the test extra: missing, this fails rather than skips

    ran = cli("classify", str(IMAGE), "-l", "a,b", "-m", "open_clip:ViT-B-3/openai")
    line = _one_line_error(ran, "unknown open_clip architecture 'ViT-B-3'", "did you mean ViT-B-32?", "ViT-B-16")
    shown = [n for n in open_clip.list_models() if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", line)]
    assert 2 <= len(shown) <= 8, shown
    assert len(line) < 400


def test_one_label_warns_that_it_always_scores_one(cli: Cli) -> None:
    ran = cli("classify", str(IMAGE), "-m", "tiny-shapes", "-l", "cat", "-f", "jsonl")
    assert ran.exit_code == 0, ran.stderr
    assert json.loads(ran.stdout)["predictions"] == [{"label": "cat", "score": 1.0}]
    warning = [line for line in ran.stderr.splitlines() if "one label" in line]
    assert len(warning) == 1 and "1.0" in warning[0] and "more labels" in warning[0], ran.stderr
    two = cli("classify", str(IMAGE), "-m", "tiny-shapes", "-l", "cat,dog", "-f", "jsonl")
    assert two.exit_code == 0 and "one label" not in two.stderr


def _read_pty(args: list[str], columns: int, env: dict[str, str]) -> str:
    """What ``clipcli ARGS`` shows on a terminal ``columns`` wide."""
    main, side = pty.openpty()
    run = subprocess.Popen(
        [sys.executable, "-m", "clipcli", *args],
        stdin=side,
        stdout=side,
        stderr=side,
        env={**os.environ, **env, "COLUMNS": str(columns), "LINES": "50", "TERM": "xterm"},
        close_fds=True,
    )
    os.close(side)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([main], [], [], 60)
            if not ready:
                break
            try:
                data = os.read(main, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(main)
        run.wait(timeout=60)
    text = b"".join(chunks).decode(errors="replace")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


@pytest.mark.parametrize("columns", [80, 120, 200])
@pytest.mark.slow
def test_models_on_a_terminal_shows_every_name_whole(tmp_path: Path, columns: int) -> None:
    env = {"HF_HOME": str(tmp_path / "hf"), "CLIPCLI_CACHE": str(tmp_path / "cache")}
    piped = subprocess.run(
        [sys.executable, "-m", "clipcli", "models"], capture_output=True, text=True, env={**os.environ, **env}
    )
    names = [line.split("\t")[0] for line in piped.stdout.splitlines()]
    assert len(names) > 10 and max(map(len, names)) > 40
    shown = _read_pty(["models"], columns, env)
    assert "…" not in shown
    words = set(shown.split())
    missing = [n for n in names if n not in words]
    assert not missing, missing[:5]
    assert all(len(line) <= columns for line in shown.splitlines())
