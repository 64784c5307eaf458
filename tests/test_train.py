"""`clipcli train`: the loss goes down, the output loads in OpenAI's code, resume is exact."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
import torch

from clipcli.models import import_clip
from clipcli.synth import generate
from clipcli.train import TrainConfig, contrastive_loss, lr_at, train


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    list(generate(folder, 48, seed=11, workers=1))
    return folder / "pairs.csv"


def _config(pairs: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = {"arch": "test-rn", "steps": 24, "batch_size": 16, "lr": 2e-3, "seed": 3}
    base.update(kw)
    return TrainConfig(pairs=pairs, output=out, **base)  # type: ignore[arg-type]


def test_loss_goes_down_and_clip_loads_the_result(pairs, tmp_path):
    losses: list[float] = []
    result = train(_config(pairs, tmp_path / "m.pt", val_fraction=0.25), on_step=lambda s: losses.append(s.loss))
    assert result.steps == 24 and len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1
    assert result.val_image_to_text_r1 is not None and 0 <= result.val_image_to_text_r1 <= 1
    clip = import_clip()
    model, _ = clip.load(str(tmp_path / "m.pt"), device="cpu", jit=False)
    assert model.visual.input_resolution == 32
    assert not (tmp_path / "m.pt.ckpt").exists()


def test_resume_matches_an_uninterrupted_run(pairs, tmp_path):
    straight = tmp_path / "straight.pt"
    train(_config(pairs, straight, checkpoint_every=10))

    class Stop(Exception):
        pass

    def stop_at_15(info):
        if info.step == 15:
            raise Stop

    resumed = tmp_path / "resumed.pt"
    with pytest.raises(Stop):
        train(_config(pairs, resumed, checkpoint_every=10), on_step=stop_at_15)
    assert (tmp_path / "resumed.pt.ckpt").exists() and not resumed.exists()
    steps: list[int] = []
    train(_config(pairs, resumed, checkpoint_every=10, resume=True), on_step=lambda s: steps.append(s.step))
    assert steps[0] == 11  # continued from the checkpoint at step 10
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_contrastive_loss_is_symmetric_cross_entropy():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(2.0)
    i = torch.nn.functional.normalize(img, dim=-1)
    t = torch.nn.functional.normalize(txt, dim=-1)
    logits = scale.exp() * i @ t.T
    by_hand = sum(-torch.log_softmax(logits, 1)[k, k] - torch.log_softmax(logits, 0)[k, k] for k in range(4)) / 8
    assert contrastive_loss(img, txt, scale).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_schedule_warms_up_then_decays():
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


def test_bad_pairs_name_the_row(cli, pairs, tmp_path):
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


def test_train_exits_1_when_an_image_was_skipped(cli, pairs, tmp_path):
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
