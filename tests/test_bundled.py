"""The bundled `tiny-shapes` model: accurate on fresh images, and the README quick start works."""

from __future__ import annotations

import io
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from clipcli.models.loader import list_models, load_model
from clipcli.training.synth import COLOURS, HELD_OUT, SHAPES, combinations, render
from clipcli.zeroshot.prompts import TemplateSet, zero_shot_classifier

ROOT = Path(__file__).resolve().parent.parent
LABELS = [f"{c} {s}" for s in SHAPES for c in COLOURS]


def accuracy(split: str, background: str, n: int, seed: int) -> float:
    """Top-1 (64-way) on ``n`` freshly drawn images; seeds differ from the training seed (1)."""
    from clipcli.images.decode import preprocess
    from clipcli.zeroshot.encode import encode_pixels

    lm = load_model("tiny-shapes", "cpu", "fp32")
    classifier = zero_shot_classifier(lm, LABELS, TemplateSet("t", ("a photo of a {}.",)))
    rng = random.Random(seed)
    combos = combinations(split)  # type: ignore[arg-type]
    pixels, targets = [], []
    for _ in range(n):
        colour, shape = rng.choice(combos)
        pixels.append(preprocess(render(rng, colour, shape, background).image, lm.input_resolution))  # type: ignore[arg-type]
        targets.append(LABELS.index(f"{colour} {shape}"))
    predicted = (encode_pixels(lm, torch.stack(pixels)) @ classifier.T).argmax(1)
    return float((predicted == torch.tensor(targets)).float().mean())


@pytest.mark.slow
def test_bundled_model_is_listed_and_small():
    entry = next(e for e in list_models() if e.name == "tiny-shapes")
    assert entry.available and entry.kind == "bundled"
    assert entry.size is not None and entry.size <= 12 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize(
    ("split", "background", "seed", "target"),
    [("seen", "varied", 9001, 0.99), ("held-out", "varied", 9002, 0.95), ("all", "saturated", 9003, 0.90)],
)
def test_accuracy_on_fresh_images(split, background, seed, target):
    assert accuracy(split, background, 500, seed) >= target


def test_held_out_combinations_are_a_fifth():
    assert 12 <= len(HELD_OUT) <= 14
    assert {s for _, s in HELD_OUT} <= set(SHAPES) and len(combinations("seen")) + len(HELD_OUT) == 64


def _quick_start_command() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)\n```", readme, re.S)
    assert block, "README has no quick start block"
    return block.group(1)


@pytest.mark.slow
def test_readme_quick_start_names_every_sample_correctly():
    """The README's first command, minus the install it starts with, run as a user would."""
    command = _quick_start_command()
    argv = shlex.split(command[command.index("clipcli classify") :])
    # the console script as this interpreter's module, whether or not the venv is on PATH
    done = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # piped stdout gets CSV: check the top label of every sample against its file name
    top = pd.read_csv(io.StringIO(done.stdout)).query("rank == 1")
    assert len(top) == len(list((ROOT / "samples").rglob("*.jpg")))
    expected = top["path"].map(lambda p: Path(p).stem.replace("-", " "))
    wrong = top[top["label"] != expected]
    assert len(wrong) <= 1, wrong
