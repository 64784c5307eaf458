"""Terminal output that neither the length of a path nor the width of a terminal can break: the count in the
eval table's title stays whole, and the suite reads tables at one fixed width (tests/conftest.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import TEST_COLUMNS, Ran, make_image

if TYPE_CHECKING:
    from clipcli.evaluation.run import EvalResult


def _result(dataset: str, n: int) -> EvalResult:
    from clipcli.evaluation.run import EvalResult

    metrics = {"acc1": 0.5, "acc5": 0.9912, "mean_per_class_recall": 0.345}
    return EvalResult("ViT-B/32", "0" * 64, "simple", 1, dataset, n, 0, metrics)


def _title(dataset: str, n: int, width: int) -> list[str]:
    """The lines of the eval table's title as a terminal ``width`` columns wide shows them."""
    from rich.console import Console

    from clipcli.commands.eval_table import print_table

    console = Console(width=width, record=True, file=io.StringIO(), soft_wrap=True, highlight=False)
    print_table(console, [_result(dataset, n)])
    lines = console.export_text().splitlines()
    return [line.strip() for line in lines[: next(i for i, line in enumerate(lines) if line.startswith("┏"))]]


@pytest.mark.parametrize(
    ("unit", "prefix", "width", "longest"), [("images", "folder:", 80, 130), ("texts", "texts:", 40, 60)]
)
def test_eval_title_keeps_its_count_whole_whatever_the_path_length(
    unit: str, prefix: str, width: int, longest: int
) -> None:
    """Every path length up to past a line and a half, so the wrap lands on every position of the title's
    tail: the count is whole on the last line, and the title's text is all there, in order."""
    for length in range(1, longest + 1):
        dataset = prefix + "/" + "d" * (length - 1)
        for n in (7, 1_281_167):
            lines = _title(dataset, n, width)
            count = f"({n} {unit})"
            assert lines[-1].endswith(count), (length, n, lines)
            assert "".join(lines).replace(" ", "") == f"zero-shot evaluation on {dataset} {count}".replace(" ", "")
            assert all(len(line) <= width for line in lines), lines


def test_eval_title_is_unchanged_where_it_fits() -> None:
    assert _title("folder:/d", 500, 80) == ["zero-shot evaluation on folder:/d (500 images)"]
    # wider than the table, not than the terminal: wrapped at the table's width as before, between words
    assert _title("folder:/data/photos", 500, 200) == ["zero-shot evaluation on folder:/data/photos", "(500 images)"]


def _labelled_folder(root: Path) -> Path:
    for label in ("cats", "dogs"):
        for i in range(2):
            make_image(root / label / f"{i}.png", (40, 40), seed=i + (label == "dogs") * 10, format="PNG")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("length", [121, 128])
def test_eval_in_a_long_folder_keeps_the_count_whole_on_an_80_column_terminal(tmp_path: Path, length: int) -> None:
    """The fault as a user met it: `clipcli eval` on a folder with a long name, stderr at 80 columns. The
    folder is named relative to the working directory, so the title is the same whatever the temporary
    folder's path. The table is 46 columns wide; these lengths, the first and last of a run of eight, left
    "(4" at the end of the title's fourth line and "images)" on a fifth before the fix."""
    name = "f" * length
    _labelled_folder(tmp_path / name)
    env = {**os.environ, "COLUMNS": "80"}
    ran = subprocess.run(
        [sys.executable, "-m", "clipcli", "eval", name, "-m", "tiny-shapes"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    assert "(4 images)" in ran.stderr, ran.stderr
    assert all(len(line) <= 80 for line in ran.stderr.splitlines()), ran.stderr


def test_the_suite_reads_terminal_output_at_one_fixed_width() -> None:
    """tests/conftest.py fixes COLUMNS for every test (and every process it starts), wide enough for a path
    under a long --basetemp: what a test reads does not depend on the terminal it was started from."""
    assert os.environ["COLUMNS"] == str(TEST_COLUMNS) and TEST_COLUMNS >= 400
    probe = "from rich.console import Console; print(Console(stderr=True).width)"
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert ran.stdout.strip() == str(TEST_COLUMNS)


def test_a_table_of_paths_under_a_long_folder_reads_whole(
    cli: Callable[..., Ran], vit_ckpt: Path, tmp_path: Path
) -> None:
    """`test_every_output_format_reads_back` looked for a file name in `-f table` output, which folds a path
    longer than the terminal: at the suite's width a 150-character folder under the temporary path reads whole."""
    folder = tmp_path / ("t" * 150)
    image = make_image(folder / "img10.jpg", (40, 40))
    ran = cli("classify", str(folder), "--labels", "a,b", "-m", str(vit_ckpt), "-f", "table")
    assert ran.exit_code == 0, ran.stderr
    assert str(image) in ran.stdout
