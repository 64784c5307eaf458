"""`clipcli train`: the loss goes down, the output loads in OpenAI's code, resume is exact."""

from __future__ import annotations

import csv
import itertools
import os
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Ran

from clipcli.commands.train import TrainingBar, step_fields
from clipcli.models.families.openai import ARCHITECTURES, import_clip, tokenize, trim_padding
from clipcli.training.loop import PUBLIC_ARCHITECTURES, StepInfo, TrainConfig, contrastive_loss, lr_at, train
from clipcli.training.synth import generate

Cli = Callable[..., Ran]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    list(generate(folder, 48, seed=11, workers=1))
    return folder / "pairs.csv"


def _config(pairs: Path, out: Path, **changes: Any) -> TrainConfig:
    # On the CPU, where a resumed run is bit-identical to an uninterrupted one.
    base = TrainConfig(pairs, out, arch="test-rn", steps=24, batch_size=16, lr=2e-3, seed=3, device="cpu")
    return replace(base, **changes)


class Stop(Exception):
    """Raised from on_step: an interrupted run."""


@pytest.mark.slow
def test_loss_goes_down_and_clip_loads_the_result(pairs: Path, tmp_path: Path) -> None:
    losses: list[float] = []
    result = train(_config(pairs, tmp_path / "m.pt", val_fraction=0.25), on_step=lambda s: losses.append(s.loss))
    assert result.steps == 24 and len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1
    assert result.val_image_to_text_r1 is not None and 0 <= result.val_image_to_text_r1 <= 1
    clip = import_clip()
    model, _ = clip.load(str(tmp_path / "m.pt"), device="cpu", jit=False)
    assert model.visual.input_resolution == 32
    assert not (tmp_path / "m.pt.ckpt").exists()


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(pairs: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight.pt"
    train(_config(pairs, straight, checkpoint_every=10))

    def stop_at_15(info: StepInfo) -> None:
        if info.step == 15:
            raise Stop

    resumed = tmp_path / "resumed.pt"
    with pytest.raises(Stop):
        train(_config(pairs, resumed, checkpoint_every=10), on_step=stop_at_15)
    assert (tmp_path / "resumed.pt.ckpt").exists() and not resumed.exists()
    steps: list[int] = []
    resumed_at: list[tuple[int, int]] = []
    train(
        _config(pairs, resumed, checkpoint_every=10, resume=True),
        on_step=lambda s: steps.append(s.step),
        on_resume=lambda step, total: resumed_at.append((step, total)),
    )
    assert resumed_at == [(10, 24)] and steps[0] == 11  # continued from the checkpoint at step 10
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_contrastive_loss_is_symmetric_cross_entropy() -> None:
    torch.manual_seed(0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(2.0)
    i = torch.nn.functional.normalize(img, dim=-1)
    t = torch.nn.functional.normalize(txt, dim=-1)
    logits = scale.exp() * i @ t.T
    diagonal = range(4)
    by_hand = -(torch.log_softmax(logits, 1)[diagonal, diagonal] + torch.log_softmax(logits, 0)[diagonal, diagonal])
    by_hand = by_hand.sum() / 8
    assert contrastive_loss(img, txt, scale).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_schedule_warms_up_then_decays() -> None:
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] < 0.01


def _write_pairs(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_bad_pairs_name_the_row(cli: Cli, pairs: Path, tmp_path: Path) -> None:
    folder = pairs.parent
    images = sorted(p.name for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
    out = tmp_path / "out.pt"
    no_text = _write_pairs(folder / "no_text.csv", [{"image": images[0], "caption": "x"}])
    ran = cli("train", str(no_text), "-o", str(out), "--arch", "test-rn", "--steps", "1")
    assert ran.exit_code == 2 and "missing column(s) text" in ran.stderr
    empty = _write_pairs(folder / "empty.csv", [{"image": images[0], "text": "a"}, {"image": images[1], "text": " "}])
    ran = cli("train", str(empty), "-o", str(out), "--arch", "test-rn", "--steps", "1")
    assert ran.exit_code == 2 and "row 2: empty caption" in ran.stderr
    long = _write_pairs(folder / "long.csv", [{"image": images[0], "text": "word " * 90}])
    ran = cli("train", str(long), "-o", str(out), "--arch", "test-rn", "--steps", "1")
    assert ran.exit_code == 2 and "row 1: text is longer than" in ran.stderr
    rows = [{"image": name, "text": "a red circle"} for name in images[:6]] + [{"image": "gone.jpg", "text": "x"}]
    missing = _write_pairs(folder / "missing.csv", rows)
    ran = cli("train", str(missing), "-o", str(out), "--arch", "test-rn", "--steps", "2", "-b", "4")
    assert ran.exit_code == 1, ran.stderr  # written, but an image was skipped
    assert "gone.jpg: row 7:" in ran.stderr and out.exists()
    ran = cli(
        "train",
        str(missing),
        "-o",
        str(tmp_path / "stop.pt"),
        "--arch",
        "test-rn",
        "--steps",
        "2",
        "--bad-images",
        "stop",
    )
    assert ran.exit_code == 2 and "row 7" in ran.stderr and not (tmp_path / "stop.pt").exists()
    assert "Traceback" not in ran.stderr


def test_train_exits_1_when_an_image_was_skipped(cli: Cli, pairs: Path, tmp_path: Path) -> None:
    from clipcli.errors import EXIT_PARTIAL

    folder = pairs.parent
    images = sorted(p.name for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
    rows = [{"image": name, "text": "a shape"} for name in images[:4]] + [{"image": "absent.png", "text": "x"}]
    pairs_csv = _write_pairs(tmp_path / "pairs.csv", [{**r, "image": str(folder / r["image"])} for r in rows])
    out = tmp_path / "m.pt"
    ran = cli("train", str(pairs_csv), "-o", str(out), "--arch", "test-vit", "--steps", "1", "-b", "4")
    assert ran.exit_code == EXIT_PARTIAL == 1, ran.stderr
    assert out.exists()  # the model is written all the same
    assert "absent.png: row 5:" in ran.stderr and "skipped 1 image(s)" in ran.stderr
    complete = _write_pairs(tmp_path / "complete.csv", [{**r, "image": str(folder / r["image"])} for r in rows[:4]])
    ran = cli("train", str(complete), "-o", str(tmp_path / "ok.pt"), "--arch", "test-vit", "--steps", "1", "-b", "4")
    assert ran.exit_code == 0, ran.stderr


def _first_pairs(pairs: Path, n: int, tmp_path: Path) -> Path:
    """The first ``n`` of ``pairs``, for runs that need a few steps, not a model that learns."""
    with pairs.open(newline="") as f:
        rows = list(itertools.islice(csv.DictReader(f), n))
    absolute = [{"image": str(pairs.parent / r["image"]), "text": r["text"]} for r in rows]
    return _write_pairs(tmp_path / "few.csv", absolute)


@pytest.mark.slow
def test_step_rate_counts_pairs_not_steps(pairs: Path, tmp_path: Path) -> None:
    seen: list[tuple[float, StepInfo]] = []
    few = _first_pairs(pairs, 16, tmp_path)
    config = _config(few, tmp_path / "m.pt", steps=2, batch_size=8)
    train(config, on_step=lambda info: seen.append((time.perf_counter(), info)))
    (t1, first), (t2, second) = seen
    # Pairs done / pairs per second is the time since training began, so the difference between two
    # steps is the wall time between them; a rate in steps per second would be 8 (the batch) times too small.
    between = 2 * 8 / second.samples_per_s - 1 * 8 / first.samples_per_s
    assert between == pytest.approx(t2 - t1, rel=0.05, abs=0.02)


@pytest.mark.slow
def test_resume_says_where_it_continues(cli: Cli, pairs: Path, tmp_path: Path) -> None:
    few, out = _first_pairs(pairs, 8, tmp_path), tmp_path / "m.pt"
    # The CLI's own defaults, so the CLI run below accepts this checkpoint as its own.
    config = TrainConfig(few, out, arch="test-rn", steps=4, batch_size=4, checkpoint_every=2, device="cpu")

    def stop_at_3(info: StepInfo) -> None:  # after step 2's checkpoint
        if info.step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(config, on_step=stop_at_3)
    args = ["--arch", "test-rn", "--steps", "4", "-b", "4", "--checkpoint-every", "2", "--device", "cpu"]
    ran = cli("train", str(few), "-o", str(out), *args, "--resume")
    assert ran.exit_code == 0, ran.stderr
    lines = ran.stderr.splitlines()
    assert lines[0] == f"resuming from step 2 of 4 ({out}.ckpt)"
    assert lines[1].startswith("trained 4 steps") and out.exists()


def test_step_fields_show_loss_lr_and_pairs_per_second() -> None:
    fields = step_fields(StepInfo(step=3, total=10, loss=2.34567, lr=0.00125, samples_per_s=1234.4))
    assert fields == {"loss": "loss 2.346", "lr": "lr 1.25e-03", "pairs_per_s": "1,234 pairs/s"}
    assert step_fields(None) == {"loss": "", "lr": "", "pairs_per_s": ""}


def test_training_bar_starts_at_the_resumed_step_and_keeps_its_fields() -> None:
    with TrainingBar() as bar:
        bar.resume_at(6, 10)
        assert (bar.task.completed, bar.task.total) == (6, 10)
        assert bar.task.time_remaining is None  # no time left guessed from the jump to 6
        bar.on_step(StepInfo(step=7, total=10, loss=1.5, lr=1e-3, samples_per_s=640.0))
        bar.on_step(StepInfo(step=8, total=10, loss=1.25, lr=5e-4, samples_per_s=650.0))
        assert (bar.task.completed, bar.task.remaining) == (8, 2)  # what the time left is reckoned on
        assert bar.task.fields == {"loss": "loss 1.250", "lr": "lr 5.00e-04", "pairs_per_s": "650 pairs/s"}


def test_unknown_arch_lists_the_public_architectures_only(cli: Cli, pairs: Path, tmp_path: Path) -> None:
    assert set(PUBLIC_ARCHITECTURES) == {"tiny-shapes", "ViT-B/32", "ViT-B/16", "RN50"} <= set(ARCHITECTURES)
    ran = cli("train", str(pairs), "-o", str(tmp_path / "m.pt"), "--arch", "nope")
    assert ran.exit_code == 2
    assert ran.stderr.strip() == "Error: unknown architecture 'nope'; valid: tiny-shapes, ViT-B/32, ViT-B/16, RN50"
    helped = cli("train", "--help")
    text = re.sub(r"-\n\s+", "-", helped.stdout)  # the help wraps at hyphens: "tiny-" / "shapes"
    assert "test-vit" not in text and "test-rn" not in text
    assert all(name in text for name in PUBLIC_ARCHITECTURES)


def test_train_device_defaults_to_auto(cli: Cli, pairs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run without --device asks the training loop for "auto" (the GPU where there is one), as every other
    command does, and --device reaches it; the spy stops each run there with an error naming what it got."""
    import clipcli.models.precision
    from clipcli.errors import ModelError

    def spy(spec: str) -> torch.device:
        raise ModelError(f"asked for device {spec!r}")

    monkeypatch.setattr(clipcli.models.precision, "resolve_device", spy)
    common = ["train", str(pairs), "-o", str(tmp_path / "m.pt"), "--arch", "test-rn", "--steps", "1"]
    for flags, spec in (([], "auto"), (["--device", "cpu"], "cpu")):
        ran = cli(*common, *flags)
        assert ran.exit_code == 2 and ran.stderr.strip() == f"Error: asked for device {spec!r}", ran.stderr


@pytest.mark.slow
def test_train_replaces_its_own_model_and_no_other_file(cli: Cli, pairs: Path, tmp_path: Path) -> None:
    """`train -o notes.pt` replaced a user's file, and any checkpoint of theirs, with exit 0."""
    from clipcli.errors import OutputError

    notes = tmp_path / "notes.pt"
    notes.write_bytes(b"my notes, not a model\n")
    theirs = tmp_path / "theirs.pt"
    torch.save({"text_projection": torch.ones(2)}, theirs)  # a state dict clipcli did not write
    zipped = tmp_path / "emb.zip"  # a zipped clip-retrieval folder: it holds a clipcli.json of its own
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("emb/clipcli.json", '{"written_by": "clipcli train", "kind": "model"}')
        archive.writestr("emb/notes.txt", "mine")
    for target in (notes, theirs, zipped):
        before = target.read_bytes()
        ran = cli("train", str(pairs), "-o", str(target), "--arch", "test-rn", "--steps", "1")
        assert ran.exit_code == 2 and "is not a model output clipcli writes" in ran.stderr, ran.stderr
        assert len(ran.stderr.strip().splitlines()) == 1 and target.read_bytes() == before
    own = tmp_path / "own.pt"
    train(_config(pairs, own, steps=1))
    first = own.read_bytes()
    train(_config(pairs, own, steps=2))  # a rerun replaces what the first run wrote
    assert own.read_bytes() != first and torch.load(own, weights_only=True)["text_projection"].ndim == 2
    with pytest.raises(OutputError):
        train(_config(pairs, theirs, steps=1))
    ckpt = tmp_path / "own.pt.ckpt"  # a user's file by the checkpoint's name: --overwrite does not remove it
    ckpt.write_text("my notes")
    with pytest.raises(OutputError, match="is not a training checkpoint output clipcli writes"):
        train(_config(pairs, own, steps=1, overwrite=True))
    assert ckpt.read_text() == "my notes"
    os.mkfifo(tmp_path / "piped.pt.ckpt")  # removed by --overwrite, or opened by --resume and waited on, before
    (tmp_path / "linked.pt.ckpt").symlink_to(tmp_path / "nowhere")
    (tmp_path / "folder.pt.ckpt").mkdir()
    for name in ("piped", "linked", "folder"):
        for flag in ("overwrite", "resume"):
            with pytest.raises(OutputError, match="is not a file"):
                train(_config(pairs, tmp_path / f"{name}.pt", steps=1, **{flag: True}))
            assert os.path.lexists(tmp_path / f"{name}.pt.ckpt")
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="a model is a file"):
        train(_config(pairs, fifo, steps=1))


def test_make_shapes_writes_the_images_and_their_captions(cli: Cli, tmp_path: Path) -> None:
    """The fast loop's one run of `make-shapes`: as many images as asked, each named once in pairs.csv."""
    ran = cli("make-shapes", str(tmp_path / "shapes"), "-n", "6", "--workers", "1")
    assert ran.exit_code == 0, ran.stderr
    assert ran.stderr.strip() == f"wrote 6 images and {tmp_path / 'shapes' / 'pairs.csv'}"
    with (tmp_path / "shapes" / "pairs.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(row["text"] for row in rows)
    images = sorted(p.name for p in (tmp_path / "shapes").iterdir() if p.suffix in (".jpg", ".png"))
    assert images == sorted(row["image"] for row in rows)


@pytest.mark.slow
def test_a_file_that_appears_at_the_checkpoints_name_mid_run_is_left_alone(pairs: Path, tmp_path: Path) -> None:
    """A user's file, a FIFO or a folder created at OUT.pt.ckpt during a run was replaced by the next
    checkpoint or removed at the end (a folder: an internal error after the model was written)."""
    from clipcli.errors import OutputError

    out, ckpt = tmp_path / "m.pt", tmp_path / "m.pt.ckpt"

    def drop(make: Callable[[Path], object]) -> Callable[[StepInfo], None]:
        return lambda info: make(ckpt) if info.step == 1 else None

    with pytest.raises(OutputError, match="appeared or changed during the run"):
        train(_config(pairs, out, steps=4, checkpoint_every=2), on_step=drop(lambda p: p.write_text("mine")))
    assert ckpt.read_text() == "mine" and not out.exists()
    ckpt.unlink()
    for make in (os.mkfifo, Path.mkdir):  # no checkpoint before the end: the model is written, it stays
        result = train(_config(pairs, out, steps=2, checkpoint_every=10), on_step=drop(make))
        assert result.steps == 2 and out.exists() and os.path.lexists(ckpt)
        os.rmdir(ckpt) if ckpt.is_dir() else ckpt.unlink()


def test_make_shapes_replaces_only_what_it_drew(cli: Cli, tmp_path: Path) -> None:
    """`make-shapes ms` replaced a user's pairs.csv and an image of theirs named as one of its own."""
    folder = tmp_path / "ms"
    folder.mkdir()
    (folder / "pairs.csv").write_text("path,caption\nmy/own.jpg,my caption\n")
    (folder / "000000_yellow_square.png").write_bytes(b"precious")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    ran = cli("make-shapes", str(folder), "-n", "3", "--workers", "1")
    assert ran.exit_code == 2 and "holds pairs.csv, which make-shapes did not write" in ran.stderr, ran.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    (folder / "pairs.csv").unlink()
    (folder / "notes.txt").write_text("mine")
    assert cli("make-shapes", str(folder), "-n", "3", "--workers", "1").exit_code == 2
    assert (folder / "notes.txt").read_text() == "mine"
    holiday = tmp_path / "holiday"  # named as its images are, near enough: 6 digits, 2 words
    holiday.mkdir()
    (holiday / "202401_beach_sunset.jpg").write_bytes(b"mine")
    assert cli("make-shapes", str(holiday), "-n", "3", "--workers", "1").exit_code == 2
    assert [p.name for p in holiday.iterdir()] == ["202401_beach_sunset.jpg"]
    linked = tmp_path / "linked"
    linked.mkdir()
    precious = tmp_path / "precious.jpg"
    precious.write_bytes(b"mine")
    (linked / "000000_red_star.jpg").symlink_to(precious)  # named as its image, a link out of the folder
    assert cli("make-shapes", str(linked), "-n", "3", "--workers", "1").exit_code == 2
    assert precious.read_bytes() == b"mine"
    again = tmp_path / "again"
    for n in (3, 2):  # its own folder is drawn into again
        ran = cli("make-shapes", str(again), "-n", str(n), "--workers", "1")
        assert ran.exit_code == 0, ran.stderr
    assert len((again / "pairs.csv").read_text().splitlines()) == 3


def test_trim_padding_cuts_to_the_longest_text() -> None:
    tokens = tokenize(["a", "a red circle on a grey ground", "cat"])
    longest = int((tokens[1] != 0).sum())  # start, 7 words, end
    trimmed = trim_padding(tokens)
    assert trimmed.shape == (3, longest) == (3, 9)
    assert torch.equal(trimmed, tokens[:, :longest]) and not tokens[:, longest:].any()
