"""The README's examples are run: every ``$ clipcli ...`` line shown with its output must still print
that output (its leading lines, when the example ends with ``…``), so the README cannot drift. The
documentation's pages are run the same way, by tests/test_docs.py, with the functions below."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```console\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Example:
    command: str
    output: list[str]
    leading: bool  # the README shows only the first lines of the output


def examples(page: Path = ROOT / "README.md") -> list[Example]:
    """Every command of a ``console`` block in ``page`` that is shown with its output."""
    found = []
    for block in BLOCK.findall(page.read_text()):
        command, output = None, []
        for line in [*block.splitlines(), "$ "]:
            if line.startswith("$ "):
                if command and output:
                    leading = output[-1] in ("…", "...")
                    found.append(Example(command, output[:-1] if leading else output, leading))
                command, output = line[2:].split("  #")[0].strip(), []
            elif command and command.endswith("\\"):
                command = command[:-1] + line.strip()  # a command continued on the next line
            elif command:
                output.append(line)
    return found


def test_the_readme_has_examples_with_output():
    assert len(examples()) >= 3


@pytest.mark.parametrize("example", examples(), ids=lambda e: e.command[:60])
@pytest.mark.slow
def test_readme_example_prints_what_the_readme_shows(example):
    prints_what_it_shows(example, "README")


def prints_what_it_shows(example: Example, where: str) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "100"}
    ran = subprocess.run(
        ["bash", "-c", example.command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert ran.returncode in (0, 1), ran.stderr
    lines = ran.stdout.splitlines()
    shown = lines[: len(example.output)] if example.leading else lines
    assert len(shown) == len(example.output) and all(map(same_line, shown, example.output)), (
        f"{where} shows:\n{chr(10).join(example.output)}\nthe command prints:\n{ran.stdout}"
    )


NUMBER = re.compile(r"-?\d+\.\d+")


def same_line(printed: str, shown: str) -> bool:
    """The same text, and decimals equal to half a percent: CPUs with bf16 and without (where ``auto``
    runs fp32) print scores that differ in the third or fourth digit."""
    if NUMBER.split(printed) != NUMBER.split(shown):
        return False
    pairs = zip(map(float, NUMBER.findall(printed)), map(float, NUMBER.findall(shown)), strict=True)
    return all(abs(a - b) <= 0.005 * max(1.0, abs(b)) for a, b in pairs)


def test_the_readme_stays_a_newcomers_page():
    """The README is the short tour (issue 22): details belong in docs/, so it stays near 300 lines."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
