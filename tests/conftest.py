"""Fixtures: tiny random CLIP checkpoints in OpenAI's fp16 layout, images, and a CLI runner."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.models.families.openai import ARCHITECTURES, import_clip

# Ctrl-C as a terminal gives it, to every process the tests start. A test run started in the background by a
# shell without job control (`(pytest &)` in a script) inherits SIGINT ignored, and so would every clipcli it
# starts: Python leaves an ignored SIGINT ignored, so the tests that press Ctrl-C would see it do nothing.
# A handler here is reset to the default in each child, where Python installs its own.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The terminal width every test and every process it starts sees. Rich (and click) read COLUMNS; without it a
# table is as wide as the terminal pytest was started from, or 80 columns under CI, and a path in a table or
# a title folds wherever its length puts it: a test that reads terminal output then passes or fails on the
# length of the temporary folder's path. 500 columns hold a path under a long --basetemp (.ci/run uses one).
# A test that needs another width says so (env={"COLUMNS": "80"}).
TEST_COLUMNS = 500


@pytest.fixture(autouse=True)
def fixed_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set for each test, not for the session, so pytest's own report keeps the terminal's width."""
    monkeypatch.setenv("COLUMNS", str(TEST_COLUMNS))
    # Typer's help reads TERMINAL_WIDTH before COLUMNS: a developer's own setting must not change the suite.
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)


def write_checkpoint(path: Path, arch: str, seed: int = 0) -> Path:
    """A random model saved the way OpenAI's checkpoints are: fp16 weights, plain state dict."""
    import torch

    torch.manual_seed(seed)
    model = ARCHITECTURES[arch].build()
    # Random init gives near-identical text features; spread the temperature and embeddings so
    # probabilities differ across labels and the parity tests compare something.
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))
    import_clip().model.convert_weights(model)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test (and every process it starts) keeps its caches in a folder of its own, never in the
    real ~/.cache/clip: classifier, search and download caches must not leak between tests or runs."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("CLIPCLI_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def vit_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "test-vit.pt", "test-vit")


@pytest.fixture(scope="session")
def rn_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "test-rn.pt", "test-rn", seed=1)


def make_image(path: Path, size: tuple[int, int] = (80, 60), seed: int = 0, mode: str = "RGB", **save: object) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Five small RGB JPEGs and PNGs in a folder, named so natural sort differs from plain sort."""
    folder = tmp_path / "imgs"
    names = ["img1.jpg", "img2.png", "img10.jpg", "sub/img3.JPG", "sub/img20.jpeg"]
    return [make_image(folder / n, (64 + 8 * i, 48 + 4 * i), seed=i) for i, n in enumerate(names)]


@dataclass
class Ran:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli() -> Callable[..., Ran]:
    """Invoke the Typer app in-process with separate stdout and stderr."""
    runner = CliRunner()

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Ran:
        result = runner.invoke(app, list(args), input=input, env=env, catch_exceptions=False)
        return Ran(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="module")
def samples_emb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """samples/ embedded with the bundled model (fp32) as a Parquet dataset, once per test module."""
    out = tmp_path_factory.mktemp("samples") / "emb"
    samples = Path(__file__).resolve().parent.parent / "samples"
    ran = CliRunner().invoke(app, ["embed", str(samples), "-m", "tiny-shapes", "--precision", "fp32", "-o", f"{out}/"])
    assert ran.exit_code == 0, ran.output
    return out
